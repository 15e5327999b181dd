"""A multi-host Ray cluster on one Linux machine: hosts that share no disk, storage on S3 over HTTP.

Each *host* is a network namespace with its own address on a bridge this rig
creates, and its own mount namespace in which ``/tmp`` and ``/dev/shm`` are
fresh tmpfs mounts and ``HOME`` is ``/tmp/home``: Ray's session directory
(``/tmp/ray``), the harness's artifact cache (``~/.cache``) and anything else a
process writes to local scratch space is private to its host. The code (this
checkout and its ``.venv``) stays visible to every host: the same install on
every machine, as a cluster launcher would set it up.

Hosts (see :data:`DEFAULT_HOSTS`):

* ``head``: ``ray start --head`` with no CPUs, the dashboard (``ray job submit``)
  and the Ray Client server (``ray://HEAD:10001``);
* ``train``: 1 CPU, resource ``train``, label ``node-role=train``;
* ``replay-a``: 1 CPU, labels ``node-role=replay, cpu=native``;
* ``replay-b``: 1 CPU, labels ``node-role=replay, cpu=avx2``, started with
  ``TF_ENABLE_ONEDNN_OPTS=1`` and ``ONEDNN_MAX_CPU_ISA=AVX2`` in its node
  environment, so its workers compute as an AVX2 machine with oneDNN would;
* ``s3``: moto's standalone S3 server (a separate process on the bridge),
  optionally behind a byte-counting proxy (:mod:`s3proxy`).

Every wait has a timeout. A head whose GCS dies at start (seen now and then on
a loaded machine) is detected and the host restarted, a few times, before the
rig gives up with a :class:`RigError` and tears down what it started. Teardown
works by namespace: every process in a host's namespace is stopped (SIGTERM,
then SIGKILL), then the namespaces, links and bridge are deleted. Nothing
outside the rig's namespaces is ever signalled (never ``ray stop``). A watchdog
process tears the rig down if its owner dies without doing so.

Command line (``make cluster-demo`` uses ``demo``)::

    python tests/multihost/rig.py demo      # start, run a sweep across the hosts, print the matrix, tear down
    python tests/multihost/rig.py up        # start and print how to reach it; Ctrl-C tears down
    python tests/multihost/rig.py cleanup   # remove stale rigs of this naming scheme with no process left
    python tests/multihost/rig.py down SFX  # tear down rig SFX (stops its processes)
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VENV_BIN = Path(sys.executable).parent  # the same install on every host
STATE_ROOT = Path("/var/tmp/trh-rigs")  # per-rig logs and shared test-control files (root namespace)
PREFIX = "trh"  # namespaces trh-<sfx>-<host>, bridge trhb<sfx>, veths trh<sfx><i>
_NAME = re.compile(r"^trh-([0-9a-f]{4})-([a-z0-9-]+)$")

HEAD_PORT, CLIENT_PORT, DASHBOARD_PORT, S3_PORT, S3_BACKEND_PORT, S3_STATS_PORT = 6379, 10001, 8265, 9000, 9001, 9002
BUCKET = "harness-rig"
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
             "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
# A node that stops answering is declared dead after ~10-20 s (Ray's default is ~60 s):
# quick enough for fault tests, slow enough that a busy 2-core machine is not a dead node.
# The head's Ray Client server gives a client's own server process 30 s to answer by default: not
# always enough for a Python process importing Ray on a busy 2-core machine running four hosts.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_health_check_initial_delay_ms": "2000",
           "RAY_health_check_period_ms": "2000", "RAY_health_check_timeout_ms": "5000",
           "RAY_health_check_failure_threshold": "5", "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "120"}

START_ATTEMPTS = 3
HEAD_TIMEOUT_S = 90.0
NODE_TIMEOUT_S = 120.0
S3_TIMEOUT_S = 30.0
CMD_TIMEOUT_S = 30.0


class RigError(RuntimeError):
    """The rig could not be started or driven; the message says which host and where its log is."""


@dataclass(frozen=True)
class HostSpec:
    """A Ray worker host: its CPUs, labels, custom resources and node-level environment variables."""

    name: str
    num_cpus: int = 1
    labels: Mapping[str, str] = field(default_factory=dict)
    resources: Mapping[str, float] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)


DEFAULT_HOSTS: tuple[HostSpec, ...] = (
    HostSpec("train", labels={"node-role": "train", "cpu": "native"}, resources={"train": 1}),
    HostSpec("replay-a", labels={"node-role": "replay", "cpu": "native"}),
    HostSpec("replay-b", labels={"node-role": "replay", "cpu": "avx2"},
             env={"TF_ENABLE_ONEDNN_OPTS": "1", "ONEDNN_MAX_CPU_ISA": "AVX2"}),
)


def unavailable() -> str | None:
    """Why this machine cannot run the rig (one line), or ``None`` if it can."""
    if sys.platform != "linux":
        return f"the multi-host rig needs Linux network namespaces (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"the multi-host rig needs root for `ip netns` (running as uid {os.geteuid()})"
    missing = [tool for tool in ("ip", "unshare", "nsenter", "mount") if shutil.which(tool) is None]
    if missing:
        return f"the multi-host rig needs {', '.join(missing)} (util-linux / iproute2) on PATH"
    probe = f"{PREFIX}-probe{os.getpid() % 10000}"
    try:
        _sh(["ip", "netns", "add", probe], timeout=10)
        _sh(["ip", "netns", "exec", probe, "unshare", "--mount", "--propagation", "private",
             "mount", "-t", "tmpfs", "tmpfs", "/tmp"], timeout=10)
    except (RigError, subprocess.TimeoutExpired) as exc:
        return f"the multi-host rig cannot create a network namespace with a private mount here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


def _sh(argv: Sequence[str], timeout: float = CMD_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in the root namespace; a failure is a RigError with its stderr."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise RigError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc


def _netns_pids(netns: str) -> list[int]:
    proc = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_processes(netns: Sequence[str] | str, keep: Sequence[int] = (), grace_s: float = 3.0) -> None:
    """Stop every process in the namespaces ``netns`` but ``keep``: SIGTERM, then SIGKILL after ``grace_s``."""
    names = [netns] if isinstance(netns, str) else list(netns)

    def left() -> list[int]:
        return [p for n in names for p in _netns_pids(n) if p not in keep]

    pids = left()
    _signal_all(pids, signal.SIGTERM)
    deadline = time.time() + grace_s
    while pids and time.time() < deadline:
        time.sleep(0.1)
        pids = left()
    for _ in range(50):  # processes forked meanwhile are in the namespace too
        pids = left()
        if not pids:
            return
        _signal_all(pids, signal.SIGKILL)
        time.sleep(0.1)
    raise RigError(f"processes {pids} in network namespace(s) {', '.join(names)} survived SIGKILL")


def _reap(proc: subprocess.Popen | None) -> None:
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.200-250.x.0 that no route or address of this machine overlaps."""
    taken = []
    for line in _sh(["ip", "-4", "route", "show", "table", "all"]).stdout.splitlines() + \
            _sh(["ip", "-4", "-o", "addr", "show"]).stdout.split():
        for token in line.split():
            with contextlib.suppress(ValueError):
                if "/" in token or token.count(".") == 3:
                    taken.append(ipaddress.ip_network(token, strict=False))
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24")
        if not any(net.overlaps(t) for t in taken if t.prefixlen > 0):
            return net
    raise RigError("no free 10.x.y.0/24 subnet for the rig's bridge")


@dataclass
class Host:
    """One host of a running rig."""

    name: str
    index: int
    netns: str
    ip: str
    veth: str  # root-namespace end of its link (cut it to partition the host)
    spec: HostSpec | None = None  # None for the head and the S3 host
    holder: subprocess.Popen | None = None  # `unshare`, parent of the host's init
    init: int | None = None  # PID 1 of the host's PID namespace (root-namespace pid): keeps its disk alive
    main: subprocess.Popen | None = None  # its `ray start --block` (or the S3 server)
    extra: list[subprocess.Popen] = field(default_factory=list)

    @property
    def log(self) -> str:
        return f"{self.name}.log"


class Rig:
    """Start with :meth:`start` (or ``with Rig() as rig``); always :meth:`close`.

    Args:
        hosts: the Ray worker hosts (the head and the S3 host are always there).
        s3_proxy: put a byte-counting proxy in front of moto (see :meth:`s3_bytes`).
        log: where progress lines go (``None``: silent).
    """

    def __init__(self, hosts: Sequence[HostSpec] = DEFAULT_HOSTS, *, s3_proxy: bool = False, log=sys.stderr):
        self.specs = list(hosts)
        self.s3_proxy = s3_proxy
        self._log = log
        self.suffix = secrets.token_hex(2)
        self.dir = STATE_ROOT / self.suffix
        self.bridge = f"{PREFIX}b{self.suffix}"
        self.hosts: dict[str, Host] = {}
        self.subnet: ipaddress.IPv4Network | None = None
        self.started_at = time.time()
        self._watchdog: subprocess.Popen | None = None
        self._suspects: set[str] = set()

    # -- addresses ----------------------------------------------------------------------
    @property
    def shared(self) -> Path:
        """A directory every host can read and write (test control files only, never storage)."""
        return self.dir / "shared"

    @property
    def gateway(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def head_ip(self) -> str:
        return self.hosts["head"].ip

    @property
    def gcs_address(self) -> str:
        return f"{self.head_ip}:{HEAD_PORT}"

    @property
    def client_address(self) -> str:
        return f"ray://{self.head_ip}:{CLIENT_PORT}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head_ip}:{DASHBOARD_PORT}"

    @property
    def s3_endpoint(self) -> str:
        return f"{self.hosts['s3'].ip}:{S3_PORT}"

    def storage_uri(self, prefix: str = "store") -> str:
        """An ``s3://`` storage URI on the rig's S3 server, reachable from every host and the root namespace."""
        return f"s3://{BUCKET}/{prefix.strip('/')}?endpoint_override={self.s3_endpoint}&scheme=http&region=us-east-1"

    def host_of_ip(self, ip: str) -> str | None:
        return next((h.name for h in self.hosts.values() if h.ip == ip), None)

    # -- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> "Rig":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def say(self, message: str) -> None:
        if self._log is not None:
            print(f"rig {self.suffix}: {message}", file=self._log, flush=True)

    def start(self) -> "Rig":
        """Create the hosts and start S3, the head and the workers; on failure tear down and raise RigError."""
        cleanup_stale(before=self.started_at, log=self._log)
        try:
            self._create_network()
            self._start_watchdog()
            self._spawn_s3()  # it starts while the head does
            self._start_head()
            self._await_s3()
            self._start_workers([h for h in self.hosts.values() if h.spec is not None])
            self.say(f"up in {time.time() - self.started_at:.0f} s: head {self.head_ip}, "
                     f"{', '.join(f'{h.name} {h.ip}' for h in self.hosts.values() if h.name != 'head')}")
            return self
        except BaseException as exc:
            logs = self.log_tails()
            self.close()
            if isinstance(exc, RigError):
                raise RigError(f"{exc}\n{logs}") from None
            raise

    def close(self) -> None:
        """Stop every process in the rig's namespaces and delete namespaces, links and bridge (idempotent)."""
        teardown(self.suffix, log=self._log)
        for host in self.hosts.values():
            for proc in (host.main, host.holder, *host.extra):
                _reap(proc)
        if self._watchdog is not None:
            self._watchdog.kill()
            _reap(self._watchdog)
            self._watchdog = None

    def _create_network(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        self.shared.mkdir(exist_ok=True)
        self.shared.chmod(0o1777)
        self.subnet = _free_subnet()
        (self.dir / "rig.json").write_text(json.dumps({"owner": os.getpid(), "created": self.started_at,
                                                       "subnet": str(self.subnet)}))
        _sh(["ip", "link", "add", self.bridge, "type", "bridge"])
        _sh(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
        _sh(["ip", "link", "set", self.bridge, "up"])
        names = ["head", *(s.name for s in self.specs), "s3"]
        specs = {s.name: s for s in self.specs}
        for i, name in enumerate(names):
            host = Host(name=name, index=i, netns=f"{PREFIX}-{self.suffix}-{name}",
                        ip=str(self.subnet.network_address + 10 + i), veth=f"{PREFIX}{self.suffix}{i}",
                        spec=specs.get(name))
            peer = f"{host.veth}p"
            _sh(["ip", "netns", "add", host.netns])
            _sh(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", peer])
            _sh(["ip", "link", "set", peer, "netns", host.netns])
            _sh(["ip", "link", "set", host.veth, "master", self.bridge, "up"])
            for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "link", "set", peer, "name", "eth0"],
                        ["ip", "addr", "add", f"{host.ip}/24", "dev", "eth0"], ["ip", "link", "set", "eth0", "up"]):
                _sh(["ip", "netns", "exec", host.netns, *cmd])
            self.hosts[name] = host
            self._start_holder(host)

    def _start_holder(self, host: Host) -> None:
        """The host's ``init``: PID 1 of its own PID namespace, in a mount namespace with fresh tmpfs on
        /tmp and /dev/shm (HOME=/tmp/home). Every process of the host runs in these namespaces."""
        script = (f"{_keep_under_tmp(self.dir / 'keep')}"
                  "mount -t tmpfs -o mode=1777,size=2g tmpfs /dev/shm"
                  f" && mkdir -p /tmp/home && echo ready && exec {sys.executable} -c '{_INIT}'")
        holder = subprocess.Popen(["ip", "netns", "exec", host.netns, "unshare", "--mount", "--pid", "--fork",
                                   "--mount-proc", "--propagation", "private", "sh", "-c", script],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        line = _readline(holder, timeout=CMD_TIMEOUT_S)
        init = _children(holder.pid)
        if line.strip() != "ready" or len(init) != 1:
            holder.kill()
            raise RigError(f"host {host.name}: its namespaces could not be set up: {line.strip()!r}")
        host.holder, host.init = holder, init[0]

    def _start_watchdog(self) -> None:
        """A process that tears this rig down if this one dies without doing it (pytest killed, Ctrl-C twice)."""
        with open(self.dir / "logs" / "watchdog.log", "w") as log:
            self._watchdog = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "watchdog", self.suffix, str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)

    # -- running things on hosts ---------------------------------------------------------
    def host_env(self, host: Host, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a process on ``host``: private HOME, dummy AWS credentials, Ray settings."""
        env = {"PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": "/tmp/home", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
               **DUMMY_AWS, **RAY_ENV}
        if host.spec is not None:
            env.update(host.spec.env)
        env.update(extra or {})
        return env

    def command(self, host: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
                cwd: str = "/tmp/home") -> list[str]:
        """``argv`` wrapped to run on ``host``: in its network and mount namespaces, with its environment."""
        h = self.hosts[host]
        if h.holder is None or h.holder.poll() is not None:
            raise RigError(f"host {host} is down (its init is gone)")
        envs = [f"{k}={v}" for k, v in self.host_env(h, env).items()]
        # nsenter forks into the PID namespace: the command is its child, in its process group.
        return ["nsenter", f"--target={h.init}", "--net", "--mount", "--pid", "--", "env", "-i", "-C", cwd, *envs,
                *argv]

    def spawn(self, host: str, argv: Sequence[str], log: str, env: Mapping[str, str] | None = None,
              cwd: str = "/tmp/home") -> subprocess.Popen:
        """Start ``argv`` on ``host`` in the background; stdout and stderr go to ``logs/<log>``."""
        out = open(self.dir / "logs" / log, "ab")
        try:
            return subprocess.Popen(self.command(host, argv, env, cwd), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            out.close()

    def run(self, host: str, argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None,
            cwd: str = "/tmp/home", check: bool = False) -> subprocess.CompletedProcess:
        """Run ``argv`` on ``host`` and wait; past ``timeout`` it is SIGKILLed and TimeoutExpired raised."""
        cmd = self.command(host, argv, env, cwd)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(proc, signal.SIGKILL)
            proc.communicate(timeout=10)
            raise
        done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        if check and done.returncode:
            raise RigError(f"on {host}: `{' '.join(argv)}` failed ({done.returncode}): {err.strip()[-800:]}")
        return done

    @staticmethod
    def signal(proc: subprocess.Popen, sig: int) -> None:
        """Signal a command started by :meth:`spawn` or :meth:`run` (and nsenter around it)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def logfile(self, name: str) -> Path:
        return self.dir / "logs" / name

    def log_tails(self, lines: int = 15) -> str:
        """The end of every host's log, for a failure message."""
        out = []
        logs = self.dir / "logs"
        for path in sorted(logs.glob("*.log")) if logs.is_dir() else []:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            if tail:
                out.append(f"--- {path} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(out)

    # -- S3 --------------------------------------------------------------------------------
    def _spawn_s3(self) -> None:
        host = self.hosts["s3"]
        if self.s3_proxy:
            host.main = self.spawn("s3", ["moto_server", "-H", "127.0.0.1", "-p", str(S3_BACKEND_PORT)], host.log)
            host.extra.append(self.spawn("s3", [sys.executable, str(HERE / "s3proxy.py"), f"{host.ip}:{S3_PORT}",
                                                f"127.0.0.1:{S3_BACKEND_PORT}", f"{host.ip}:{S3_STATS_PORT}"],
                                         "s3proxy.log"))
        else:
            host.main = self.spawn("s3", ["moto_server", "-H", host.ip, "-p", str(S3_PORT)], host.log)

    def _await_s3(self) -> None:
        """Wait until the S3 server answers, then create the rig's bucket."""
        host = self.hosts["s3"]
        deadline = time.time() + S3_TIMEOUT_S
        while not _http_ok(f"http://{self.s3_endpoint}/", timeout=2):
            if host.main.poll() is not None:
                raise RigError(f"the S3 server exited ({host.main.returncode}); see {self.logfile(host.log)}")
            if time.time() > deadline:
                raise RigError(f"the S3 server did not answer on {self.s3_endpoint} within {S3_TIMEOUT_S:g}s")
            time.sleep(0.3)
        import boto3

        boto3.client("s3", endpoint_url=f"http://{self.s3_endpoint}", region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        self.say(f"S3 on {self.s3_endpoint}")

    def s3_pids(self) -> list[int]:
        """The S3 server's processes (moto, and the proxy if any)."""
        host = self.hosts["s3"]
        return [p.pid for p in (host.main, *host.extra) if p is not None]

    @contextlib.contextmanager
    def s3_outage(self) -> Iterator[None]:
        """The S3 server stops answering (SIGSTOP) and comes back with its data (SIGCONT)."""
        pids = self.s3_pids()
        _signal_all(pids, signal.SIGSTOP)
        try:
            yield
        finally:
            _signal_all(pids, signal.SIGCONT)

    def s3_bytes(self) -> dict[str, int]:
        """Bytes through the counting proxy so far: ``{"to_s3": ..., "from_s3": ..., "connections": ...}``."""
        if not self.s3_proxy:
            raise RigError("this rig was started without the counting S3 proxy (Rig(s3_proxy=True))")
        with urllib.request.urlopen(f"http://{self.hosts['s3'].ip}:{S3_STATS_PORT}/", timeout=10) as resp:
            return json.loads(resp.read())

    # -- Ray -------------------------------------------------------------------------------
    def _start_head(self) -> None:
        host = self.hosts["head"]
        argv = ["ray", "start", "--head", f"--node-ip-address={host.ip}", f"--port={HEAD_PORT}",
                f"--ray-client-server-port={CLIENT_PORT}", "--dashboard-host=0.0.0.0",
                f"--dashboard-port={DASHBOARD_PORT}", "--num-cpus=0", "--num-gpus=0", "--labels=node-role=head",
                "--object-store-memory=100000000", "--disable-usage-stats", "--block"]
        for attempt in range(1, START_ATTEMPTS + 1):
            host.main = self.spawn("head", argv, host.log)
            problem = self._wait_head(host)
            if problem is None:
                self.say(f"head up (attempt {attempt}): GCS {self.gcs_address}, client {self.client_address}, "
                         f"dashboard {self.dashboard_url}")
                return
            self.say(f"head attempt {attempt} failed: {problem}; restarting the host")
            self._restart_host_namespace(host)
        raise RigError(f"the Ray head did not come up in {START_ATTEMPTS} attempts: {problem}; "
                       f"see {self.logfile(host.log)}")

    def _wait_head(self, host: Host) -> str | None:
        """None once GCS, dashboard and client server answer; else what did not (the head is then restarted)."""
        deadline = time.time() + HEAD_TIMEOUT_S
        checks = [("GCS", self._gcs_healthy), ("dashboard", lambda: _http_ok(f"{self.dashboard_url}/api/version")),
                  ("Ray Client server", lambda: _port_open(self.head_ip, CLIENT_PORT))]
        for what, check in checks:
            while not check():
                if host.main.poll() is not None:
                    return f"`ray start --head` exited ({host.main.returncode}) before the {what} answered"
                if time.time() > deadline:
                    return f"the {what} did not answer within {HEAD_TIMEOUT_S:g}s"
                time.sleep(0.5)
        return None

    def _gcs_healthy(self) -> bool:
        try:
            proc = subprocess.run([str(VENV_BIN / "ray"), "health-check", f"--address={self.gcs_address}"],
                                  capture_output=True, timeout=20, env={**os.environ, **RAY_ENV})
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0

    def _worker_argv(self, host: Host) -> list[str]:
        spec = host.spec
        argv = ["ray", "start", f"--address={self.gcs_address}", f"--node-ip-address={host.ip}",
                f"--num-cpus={spec.num_cpus}", "--num-gpus=0", "--object-store-memory=100000000",
                "--disable-usage-stats", "--block"]
        if spec.labels:
            argv.append("--labels=" + ",".join(f"{k}={v}" for k, v in spec.labels.items()))
        if spec.resources:
            argv.append("--resources=" + json.dumps(dict(spec.resources)))
        return argv

    def _start_workers(self, hosts: Sequence[Host]) -> None:
        """Start ``ray start`` on each host and wait until the GCS lists it alive; restart a host that fails."""
        pending = {h.name: h for h in hosts}
        attempts = dict.fromkeys(pending, 1)
        since = dict.fromkeys(pending, time.time())
        known = {n["node_id"] for n in self.nodes()}  # a host restarted gets a new node: wait for that one
        for host in hosts:
            host.main = self.spawn(host.name, self._worker_argv(host), host.log)
        while pending:
            joined = {n["node_ip"] for n in self.nodes() if n["state"] == "ALIVE" and n["node_id"] not in known}
            for name, host in list(pending.items()):
                if host.ip in joined:
                    del pending[name]
                    continue
                if host.main.poll() is not None:
                    problem = f"host {name}: `ray start` exited ({host.main.returncode}) before its node joined"
                elif time.time() - since[name] > NODE_TIMEOUT_S:
                    problem = f"host {name}: its node did not join within {NODE_TIMEOUT_S:g}s"
                else:
                    continue
                if attempts[name] >= START_ATTEMPTS:
                    raise RigError(f"{problem}; gave up after {attempts[name]} attempts; "
                                   f"see {self.logfile(host.log)}")
                self.say(f"{problem}; restarting the host")
                self._restart_host_namespace(host)
                host.main = self.spawn(name, self._worker_argv(host), host.log)
                attempts[name] += 1
                since[name] = time.time()
            if pending:
                time.sleep(0.5)
        self.say("joined: " + ", ".join(h.name for h in hosts))

    def _restart_host_namespace(self, host: Host) -> None:
        """Stop every process of ``host`` and give it a fresh private disk (new holder)."""
        stop_processes(host.netns, grace_s=2.0)
        for proc in (host.main, host.holder):
            _reap(proc)
        host.main = None
        self._start_holder(host)

    def alive_ips(self) -> set[str]:
        """Node IPs the GCS lists as alive (through the dashboard's state API; empty if it does not answer)."""
        return {n["node_ip"] for n in self.nodes() if n["state"] == "ALIVE"}

    def nodes(self) -> list[dict]:
        """The cluster's nodes as the dashboard's state API lists them (``[]`` if it does not answer)."""
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/v0/nodes?limit=100&detail=false", timeout=10) as r:
                return json.loads(r.read())["data"]["result"]["result"]
        except Exception:
            return []

    def node_ids(self) -> dict[str, str]:
        """Host name -> Ray node id of its alive node."""
        return {self.host_of_ip(n["node_ip"]): n["node_id"] for n in self.nodes()
                if n["state"] == "ALIVE" and self.host_of_ip(n["node_ip"])}

    def host_of_node(self, node_id: str) -> str | None:
        """The host a Ray node id (alive or dead) ran on."""
        return next((self.host_of_ip(n["node_ip"]) for n in self.nodes() if n["node_id"] == node_id), None)

    # -- faults ----------------------------------------------------------------------------
    def kill_host(self, name: str) -> None:
        """SIGKILL every process of host ``name`` (its disk, the mount namespace, survives as on a real machine)."""
        host = self.hosts[name]
        keep = [p for p in (host.holder.pid if host.holder else None, host.init) if p]
        pids = [p for p in _netns_pids(host.netns) if p not in keep]
        _signal_all(pids, signal.SIGKILL)
        stop_processes(host.netns, keep=keep, grace_s=0)
        _reap(host.main)

    def replace_worker(self, name: str, timeout: float = NODE_TIMEOUT_S) -> None:
        """Host ``name`` as a fresh Ray node, its old node declared dead (after a partition, whose node
        the GCS may declare dead a while after the link is back: Ray's reconnection backs off)."""
        host = self.hosts[name]
        if host.spec is None:
            raise RigError(f"{name} is not a Ray worker host")
        old = {n["node_id"] for n in self.nodes() if n["node_ip"] == host.ip and n["state"] == "ALIVE"}
        self._restart_host_namespace(host)
        self._start_workers([host])
        deadline = time.time() + timeout
        while {n["node_id"] for n in self.nodes() if n["state"] == "ALIVE"} & old:
            if time.time() > deadline:
                raise RigError(f"host {name}'s old node was not declared dead within {timeout:g}s")
            time.sleep(0.5)

    def suspect(self, name: str) -> None:
        """Host ``name`` went through a fault its node may be declared dead for later (a partition: Ray's
        reconnection backs off): :meth:`ensure_healthy` replaces it before the rig is used again."""
        self._suspects.add(name)

    def ensure_healthy(self) -> None:
        """Every link up and every worker host's node alive (restarting those that are not, and replacing
        the suspects)."""
        for host in self.hosts.values():
            self.restore(host.name)
        _signal_all(self.s3_pids(), signal.SIGCONT)
        for name in sorted(self._suspects):
            self.replace_worker(name)
            self._suspects.discard(name)
        alive = self.alive_ips()
        if self.head_ip not in alive and not self._gcs_healthy():
            raise RigError("the Ray head is down; the rig cannot recover it (its GCS state is gone)")
        down = [h for h in self.hosts.values() if h.spec is not None
                and (h.ip not in alive or h.main is None or h.main.poll() is not None)]
        for host in down:
            self.say(f"host {host.name} is not an alive node: restarting it")
            self._restart_host_namespace(host)
        if down:
            self._start_workers(down)

    def cut(self, name: str) -> None:
        """Partition host ``name``: its link to the bridge goes down (nothing in or out)."""
        _sh(["ip", "link", "set", self.hosts[name].veth, "down"])

    def restore(self, name: str) -> None:
        _sh(["ip", "link", "set", self.hosts[name].veth, "up"])


# PID 1 of a host: reaps orphans (Ray's daemons outlive their parents), exits on SIGTERM,
# which makes the kernel SIGKILL everything else in the host's PID namespace.
_INIT = ("import os, signal, time; signal.signal(signal.SIGTERM, lambda *a: os._exit(0))\n"
         "while True:\n"
         "    try: os.wait()\n"
         "    except ChildProcessError: time.sleep(0.5)")


def _keep_under_tmp(stash: Path) -> str:
    """Shell that mounts the host's fresh tmpfs on /tmp, keeping visible the checkout and the venv
    when they live under /tmp (a CI clone in /tmp would vanish under the tmpfs, and with it the
    Python every host runs). Only those directories come through; the rest of /tmp stays private."""
    under = [p for p in (REPO, Path(sys.prefix).resolve()) if Path("/tmp") in p.parents]
    keep = sorted({str(p) for p in under if not any(q in p.parents for q in under)})
    if not keep:
        return "mount -t tmpfs -o mode=1777,size=4g tmpfs /tmp && "
    stash.mkdir(parents=True, exist_ok=True)
    # The old /tmp is bound to the stash (a mount point private to this host's mount namespace),
    # the tmpfs goes over /tmp, and each kept directory is bound back from the stash.
    back = " && ".join(f"mkdir -p {shlex.quote(k)} && mount --bind {shlex.quote(str(stash) + k[len('/tmp'):])} "
                       f"{shlex.quote(k)}" for k in keep)
    return (f"mount --bind /tmp {shlex.quote(str(stash))} && mount -t tmpfs -o mode=1777,size=4g tmpfs /tmp"
            f" && {back} && umount -l {shlex.quote(str(stash))} && ")


def _children(pid: int) -> list[int]:
    """The child processes of ``pid``, from every process's ``/proc/N/stat`` (kernels built without
    CONFIG_PROC_CHILDREN have no ``/proc/N/task/T/children``)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            # The command name may hold spaces and parentheses: fields resume after the last ')'.
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry))
    return sorted(found)


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    """One line of ``proc``'s stdout, or ``""`` if none comes within ``timeout``."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline()


def _http_ok(url: str, timeout: float = 5) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status < 500
    except Exception:
        return False


def _port_open(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=2):
            return True
    except OSError:
        return False


# -- teardown and stale rigs ------------------------------------------------------------
def _rig_netns(suffix: str | None = None) -> list[str]:
    out = _sh(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if _NAME.match(n) and (suffix is None or _NAME.match(n).group(1) == suffix)]


def _rig_links(suffix: str) -> list[str]:
    out = _sh(["ip", "-o", "link", "show"], check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if n == f"{PREFIX}b{suffix}" or re.fullmatch(f"{PREFIX}{suffix}[0-9]+p?", n)]


def teardown(suffix: str, log=sys.stderr) -> None:
    """Stop every process in rig ``suffix``'s namespaces, then delete them, its links, bridge and state dir."""
    names = _rig_netns(suffix)
    with contextlib.suppress(RigError):
        stop_processes(names)
    for netns in names:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=CMD_TIMEOUT_S)
    for link in _rig_links(suffix):
        subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=CMD_TIMEOUT_S)
    shutil.rmtree(STATE_ROOT / suffix, ignore_errors=True)
    left = _rig_netns(suffix) + _rig_links(suffix)
    if left and log is not None:
        print(f"rig {suffix}: could not remove {', '.join(left)}", file=log)


def cleanup_stale(before: float, log=sys.stderr) -> list[str]:
    """Remove rigs of this naming scheme created before ``before`` that have no process left; their suffixes."""
    suffixes = {_NAME.match(n).group(1) for n in _rig_netns()}
    if STATE_ROOT.is_dir():
        suffixes |= {p.name for p in STATE_ROOT.iterdir() if re.fullmatch("[0-9a-f]{4}", p.name)}
    removed = []
    for sfx in sorted(suffixes):
        record = STATE_ROOT / sfx / "rig.json"
        created = record.stat().st_mtime if record.exists() else 0.0
        if created >= before or _alive(_owner(record)) or any(_netns_pids(n) for n in _rig_netns(sfx)):
            continue  # newer than us, its owner still runs (maybe still building it), or a process is left
        teardown(sfx, log=None)
        removed.append(sfx)
    if removed and log is not None:
        print(f"rig: removed stale rig(s) with no process left: {', '.join(removed)}", file=log)
    return removed


def _owner(record: Path) -> int | None:
    try:
        return int(json.loads(record.read_text())["owner"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watchdog(suffix: str, owner: int) -> int:
    """Tear rig ``suffix`` down when process ``owner`` is gone; exit when the rig is gone."""
    record = STATE_ROOT / suffix / "rig.json"
    while record.exists():
        if not _alive(owner):
            print(f"owner {owner} is gone: tearing down rig {suffix}", file=sys.stderr, flush=True)
            teardown(suffix)
            return 0
        time.sleep(1.0)
    return 0


# -- command line ------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="start, run a sweep across the hosts, print the matrix with each cell's host, tear down")
    sub.add_parser("up", help="start and wait (Ctrl-C tears down)")
    sub.add_parser("cleanup", help="remove stale rigs with no process left")
    down = sub.add_parser("down", help="tear down one rig (stops its processes)")
    down.add_argument("suffix")
    wd = sub.add_parser("watchdog")
    wd.add_argument("suffix")
    wd.add_argument("owner", type=int)
    args = parser.parse_args(argv)
    if args.cmd == "watchdog":
        return _watchdog(args.suffix, args.owner)
    reason = unavailable()
    if reason:
        print(f"rig: skipped: {reason}", file=sys.stderr)
        return 0 if args.cmd == "cleanup" else 2
    if args.cmd == "cleanup":
        cleanup_stale(before=time.time())
        return 0
    if args.cmd == "down":
        teardown(args.suffix)
        return 0
    if args.cmd == "up":
        with Rig() as rig:
            print(f"GCS {rig.gcs_address}  client {rig.client_address}  dashboard {rig.dashboard_url}\n"
                  f"storage {rig.storage_uri()}\nrun on a host: {' '.join(rig.command('head', ['bash']))}\n"
                  "Ctrl-C tears everything down.", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        return 0
    import demo

    return demo.main()


if __name__ == "__main__":
    sys.exit(main())
