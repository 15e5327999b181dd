"""A byte-counting TCP proxy in front of the rig's S3 server.

    python s3proxy.py LISTEN_HOST:PORT BACKEND_HOST:PORT STATS_HOST:PORT

Every connection to ``LISTEN`` is forwarded to ``BACKEND``; bytes are counted
in each direction (``to_s3``: requests and uploads, ``from_s3``: responses and
downloads, headers included). ``GET http://STATS/`` answers the counters as
JSON. Runs in the S3 host's namespace (see ``rig.Rig(s3_proxy=True)``).
"""

from __future__ import annotations

import asyncio
import json
import sys

COUNTS = {"to_s3": 0, "from_s3": 0, "connections": 0}


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: str) -> None:
    try:
        while data := await reader.read(1 << 16):
            COUNTS[key] += len(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _forward(backend: tuple[str, int], client_r, client_w) -> None:
    COUNTS["connections"] += 1
    try:
        server_r, server_w = await asyncio.open_connection(*backend)
    except OSError:
        client_w.close()
        return
    await asyncio.gather(_pipe(client_r, server_w, "to_s3"), _pipe(server_r, client_w, "from_s3"))


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
    proxy = await asyncio.start_server(lambda r, w: _forward(target, r, w), *_addr(listen))
    counter = await asyncio.start_server(_stats, *_addr(stats))
    async with proxy, counter:
        await asyncio.gather(proxy.serve_forever(), counter.serve_forever())


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
