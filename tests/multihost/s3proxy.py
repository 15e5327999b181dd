"""A counting HTTP proxy in front of the rig's S3 server: bytes, requests and client connections.

    python s3proxy.py LISTEN_HOST:PORT BACKEND_HOST:PORT STATS_HOST:PORT

Every request to ``LISTEN`` is forwarded to ``BACKEND``; bytes are counted in
each direction (``to_s3``: requests and uploads, ``from_s3``: responses and
downloads, headers included), with the number of ``requests`` and of client
``connections``. ``GET http://STATS/`` answers the counters as JSON. Runs in
the S3 host's namespace (see ``rig.Rig(s3_proxy=True)``).

Client connections are kept alive as a real S3 endpoint keeps them (moto's
server closes every connection after one response, so counting connections
to it would count requests): each request goes to the backend on a
connection of its own, and its response comes back on the client's
connection. So ``connections`` says how well clients reuse their connection
pools, ``requests`` how many calls they make. ``Expect: 100-continue`` is
answered here.
"""

from __future__ import annotations

import asyncio
import json
import sys

COUNTS = {"to_s3": 0, "from_s3": 0, "requests": 0, "connections": 0}
_NO_BODY = (204, 304)


def _headers(head: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The first line of an HTTP message head and its header fields, in order."""
    lines = head[:-4].split(b"\r\n")
    fields = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields.append((name.strip(), value.strip()))
    return lines[0], fields


def _value(fields, name: bytes) -> bytes | None:
    return next((v for k, v in fields if k.lower() == name), None)


def _head(first: bytes, fields) -> bytes:
    return first + b"\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in fields) + b"\r\n"


async def _body(reader: asyncio.StreamReader, fields, until_eof: bool) -> bytes:
    """A message body, framed as its headers say (raw: chunked bodies keep their chunks)."""
    length = _value(fields, b"content-length")
    if length is not None:
        return await reader.readexactly(int(length))
    if (_value(fields, b"transfer-encoding") or b"").lower().endswith(b"chunked"):
        parts = []
        while True:
            line = await reader.readuntil(b"\r\n")
            parts.append(line)
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    parts.append(trailer)
                parts.append(trailer)
                return b"".join(parts)
            parts.append(await reader.readexactly(size + 2))
    return await reader.read() if until_eof else b""


async def _exchange(backend: tuple[str, int], head: bytes, body: bytes, method: bytes) -> tuple[bytes, bytes]:
    """One request on a fresh backend connection: the response's head and body."""
    server_r, server_w = await asyncio.open_connection(*backend)
    try:
        server_w.write(head + body)
        await server_w.drain()
        while True:
            response = await server_r.readuntil(b"\r\n\r\n")
            status = int(response.split(b" ", 2)[1])
            if status >= 200:
                break  # (a 1xx is never forwarded: this proxy answers Expect itself)
        first, fields = _headers(response)
        no_body = method == b"HEAD" or status in _NO_BODY
        data = b"" if no_body else await _body(server_r, fields, until_eof=True)
        if _value(fields, b"content-length") is None and not no_body and \
                not (_value(fields, b"transfer-encoding") or b"").lower().endswith(b"chunked"):
            fields.append((b"Content-Length", str(len(data)).encode()))  # read to EOF: frame it for the client
        fields = [(k, v) for k, v in fields if k.lower() != b"connection"]
        return _head(first, fields), data
    finally:
        server_w.close()


async def _client(backend: tuple[str, int], client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
    COUNTS["connections"] += 1
    try:
        while True:
            try:
                request = await client_r.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return  # the client closed its connection
            COUNTS["requests"] += 1
            first, fields = _headers(request)
            method = first.split(b" ", 1)[0]
            if (_value(fields, b"expect") or b"").lower() == b"100-continue":
                client_w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await client_w.drain()
            body = await _body(client_r, fields, until_eof=False)
            closing = (_value(fields, b"connection") or b"").lower() == b"close"
            fields = [(k, v) for k, v in fields if k.lower() not in (b"expect", b"connection")]
            head = _head(first, fields + [(b"Connection", b"close")])
            COUNTS["to_s3"] += len(head) + len(body)
            response, data = await _exchange(backend, head, body, method)
            COUNTS["from_s3"] += len(response) + len(data)
            client_w.write(response + data)
            await client_w.drain()
            if closing:
                return
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
        return  # a backend that went away, or a message this proxy cannot frame: the client retries
    finally:
        client_w.close()


async def _stats(reader, writer) -> None:
    await reader.readuntil(b"\r\n\r\n")
    body = json.dumps(COUNTS).encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    writer.close()


def _addr(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


async def main(listen: str, backend: str, stats: str) -> None:
    target = _addr(backend)
    proxy = await asyncio.start_server(lambda r, w: _client(target, r, w), *_addr(listen), limit=1 << 20)
    counter = await asyncio.start_server(_stats, *_addr(stats))
    async with proxy, counter:
        await asyncio.gather(proxy.serve_forever(), counter.serve_forever())


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
