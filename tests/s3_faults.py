"""An S3 server in its own process, and a small fault-injecting HTTP proxy in front of it.

Storage fault tests talk to ``S3Process.endpoint`` (the proxy) as to any S3
endpoint. The proxy forwards every request to a moto server subprocess, except
those a rule picks: it answers them itself with an S3 error (403, 500, 503
SlowDown, 507, EntityTooLarge ...) or holds them until the test releases them
(a writer paused mid-publication). The moto process can be paused with
SIGSTOP/SIGCONT (an outage: connections hang) without losing its buckets.

    with S3Process.start() as s3:
        s3.make_bucket("b")
        s3.proxy.fail("PUT", r"/b/.*manifest\\.json", 403, "AccessDenied", "Access Denied")
        st = Storage.open(s3.uri("b", "prefix"))
"""

from __future__ import annotations

import http.client
import http.server
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

from s3_helpers import S3Server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Hold:
    """Requests held by the proxy: ``reached`` is set when the first arrives; ``release()`` lets them through.

    The first matching request decides the object held: its retries (a client
    times out and sends the request again) are held too, others pass.
    """

    reached: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event = field(default_factory=threading.Event)
    path: str | None = None  # the object held, once the first request came

    def release(self) -> None:
        self.gate.set()


@dataclass
class Rule:
    """Requests whose method and path match are answered with ``status`` (or held: ``hold``)."""

    method: str
    path: re.Pattern
    status: int = 0
    code: str = ""
    message: str = ""
    times: int | None = None  # answer this many matching requests, then forward again (None: always)
    hold: Hold | None = None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.method not in ("*", method):
            return False
        if self.hold is not None and self.hold.path is not None:
            return path == self.hold.path and not self.hold.gate.is_set()
        return bool(self.path.search(path)) and (self.times is None or self.hits < self.times)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and Expect: 100-continue, as the AWS SDK expects

    def log_message(self, *args):  # quiet
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._body()
        path = self.path.split("?", 1)[0]
        proxy.log.append((self.command, self.path))
        rule = proxy.match(self.command, path)
        if rule is not None and rule.hold is not None:
            rule.hold.reached.set()
            rule.hold.gate.wait(timeout=300)
        elif rule is not None:
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(rule.code)}</Code>'
                   f"<Message>{escape(rule.message)}</Message><Resource>{escape(path)}</Resource>"
                   "<RequestId>fault-proxy</RequestId></Error>").encode()
            self.send_response(rule.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml) if self.command != "HEAD" else 0))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml)
            return
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("transfer-encoding", "expect", "connection", "content-length")}
        headers["Content-Length"] = str(len(body))
        try:
            conn = http.client.HTTPConnection(proxy.upstream, timeout=proxy.upstream_timeout)
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError:
            self.close_connection = True  # the upstream is down: so is the "server", as a client sees it
            return
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(k, v)
        # A HEAD answer has no body but tells the object's size.
        self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                         else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up on a held or slow request (a timeout is what the test wants)


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 that forwards to ``upstream`` unless a rule says otherwise."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.upstream_timeout = 120.0  # longer than any outage a test makes
        self.rules: list[Rule] = []
        self.log: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.proxy = self  # type: ignore[attr-defined]
        self.endpoint = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()

    def match(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.hits += 1
                    if rule.hold is not None and rule.hold.path is None:
                        rule.hold.path = path
                    return rule
        return None

    def fail(self, method: str, path: str, status: int, code: str, message: str,
             times: int | None = None) -> Rule:
        """Answer matching requests (``path`` a regex on ``/bucket/key``) with an S3 error."""
        rule = Rule(method, re.compile(path), status, code, message, times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def hold(self, method: str, path: str) -> Hold:
        """Hold the first matching request, and its retries, until ``Hold.release()``."""
        hold = Hold()
        with self._lock:
            self.rules.append(Rule(method, re.compile(path), hold=hold))
        return hold

    def clear(self) -> None:
        with self._lock:
            for rule in self.rules:
                if rule.hold is not None:
                    rule.hold.release()
            self.rules.clear()

    def close(self) -> None:
        self.clear()
        self.server.shutdown()
        self.server.server_close()


@dataclass
class S3Process:
    """A moto S3 server subprocess behind a :class:`FaultProxy`."""

    process: subprocess.Popen
    moto_endpoint: str
    proxy: FaultProxy

    @property
    def endpoint(self) -> str:
        return self.proxy.endpoint

    @classmethod
    def start(cls, timeout_s: float = 60.0) -> "S3Process":
        port = free_port()
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:  # ready once it answers HTTP (a bounded wait for the process to listen)
            try:
                conn = http.client.HTTPConnection(f"127.0.0.1:{port}", timeout=2)
                conn.request("GET", "/")
                conn.getresponse().read()
                conn.close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise RuntimeError(f"moto server did not start on port {port}")
                time.sleep(0.1)
        return cls(proc, f"127.0.0.1:{port}", FaultProxy(f"127.0.0.1:{port}"))

    def make_bucket(self, name: str) -> None:
        """Create bucket ``name`` on the server itself (AWS credentials from the environment)."""
        S3Server(self.moto_endpoint).make_bucket(name)

    def uri(self, bucket: str, prefix: str = "") -> str:
        """An ``s3://`` storage URI that goes through the proxy."""
        return S3Server(self.endpoint).uri(bucket, prefix)

    def pause(self) -> None:
        """SIGSTOP the server: connections are accepted by the kernel, never answered."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.proxy.close()
        try:
            self.resume()
        except ProcessLookupError:
            pass
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def __enter__(self) -> "S3Process":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
