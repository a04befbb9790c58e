"""The processes under test: start, pin to a core, read CPU and memory from /proc, stop.

CPU is utime+stime from /proc/<pid>/stat (CLK_TCK ticks, 10 ms at the usual 100 Hz) and
memory VmRSS from /proc/<pid>/status, each summed over a process and all its descendants
(uvicorn's workers, nginx's master and worker).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent
STOP_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """pid and every process below it, found by parent pid in /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, ()))
    return found


@dataclass(frozen=True, slots=True)
class Cpu:
    user: float = 0.0
    system: float = 0.0

    @property
    def total(self) -> float:
        return self.user + self.system

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.user - other.user, self.system - other.system)

    def __add__(self, other: Cpu) -> Cpu:
        return Cpu(self.user + other.user, self.system + other.system)


def cpu_of(pids: list[int]) -> Cpu:
    user = system = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user, system = user + int(fields[11]), system + int(fields[12])
    return Cpu(user / CLK_TCK, system / CLK_TCK)


def rss_of(pids: list[int]) -> int:
    """Bytes of resident memory, summed (shared pages count once per process)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def pin(pids: list[int], cpu: int | None) -> None:
    if cpu is None:
        return
    for pid in pids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, {cpu})


@dataclass
class Proc:
    """A started process tree with a name, a core and a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    cpu: int | None
    log: Path
    pids: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def settle(self) -> None:
        """Once it serves: find its workers and pin them all."""
        self.pids = descendants(self.pid)
        pin(self.pids, self.cpu)

    def cpu_used(self) -> Cpu:
        return cpu_of(self.pids or [self.pid])

    def rss(self) -> int:
        return rss_of(self.pids or [self.pid])

    def affinity(self) -> list[list[int]]:
        out = []
        for pid in self.pids:
            with contextlib.suppress(OSError):
                out.append(sorted(os.sched_getaffinity(pid)))
        return out

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        tree = descendants(self.pid) if self.alive() else self.pids
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(STOP_TIMEOUT)
        for pid in tree:  # a worker that outlived its parent
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def start(name: str, argv: list[str], cpu: int | None, logs: Path) -> Proc:
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=out, cwd=REPO, stdin=subprocess.DEVNULL)
    pin([popen.pid], cpu)  # at once: it is still importing, its workers are not forked yet
    return Proc(name, popen, cpu, log)


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def routes_yaml(upstream_url: str, stream_options: str, ca_file: str = "") -> str:
    """One route, `bench`, to the mock at `upstream_url` (trusting `ca_file` if https)."""
    tls = f"    tls: {{ca_file: '{ca_file}'}}\n" if ca_file else ""
    return (
        "upstreams:\n"
        f"  mock:\n    base_url: '{upstream_url}/v1'\n    stream_options: {stream_options}\n{tls}"
        "routes:\n  - {model: bench, targets: [{upstream: mock, model: mock-chat}]}\n"
    )


NGINX_CONF = """\
daemon off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
{servers}}}
"""
# One listener relaying to one upstream: `keepalive` keeps idle upstream connections (and so
# their TLS sessions) for reuse; `proxy_buffering off` relays each chunk as it comes.
NGINX_SERVER = """\
    upstream {name} {{ server 127.0.0.1:{upstream}; keepalive 1024; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass {scheme}://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 60s;{tls}
        }}
    }}
"""
# HTTPS to the upstream as a careful deployment has it: its certificate verified against the
# CA (for the name in its certificate), sessions resumed on new connections, TLS 1.3 allowed
# (nginx before 1.23.4 offers only up to 1.2 by default).
NGINX_TLS = """
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_name localhost;
            proxy_ssl_session_reuse on;"""


@dataclass(frozen=True)
class NginxHttps:
    """A second nginx listener, on `port`, relaying to the mock's HTTPS port."""

    upstream_port: int
    port: int
    ca_file: str


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )


def nginx_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10, check=False)
    return (out.stderr or out.stdout).strip().rsplit("/", 1)[-1]


def start_nginx(
    binary: str,
    upstream_port: int,
    port: int,
    cpu: int | None,
    tmp: Path,
    *,
    https: NginxHttps | None = None,
) -> Proc:
    servers = NGINX_SERVER.format(
        name="mock", upstream=upstream_port, port=port, scheme="http", tls=""
    )
    if https is not None:
        servers += NGINX_SERVER.format(
            name="mock_tls",
            upstream=https.upstream_port,
            port=https.port,
            scheme="https",
            tls=NGINX_TLS.format(ca=https.ca_file),
        )
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, servers=servers))
    argv = [binary, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "nginx-error.log")]
    return start("nginx", argv, cpu, tmp)


def open_fds(pid: int) -> int:
    """File descriptors the process holds open (entries of /proc/<pid>/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


TCP_STATES = {"01": "established", "08": "close_wait", "0A": "listen"}


@dataclass(frozen=True, slots=True)
class TcpSocket:
    local_port: int
    remote_port: int
    state: str  # a TCP_STATES word, or the kernel's hex code


def tcp_sockets(pid: int) -> list[TcpSocket]:
    """The process's own TCP sockets: the socket inodes among its fds, looked up in
    /proc/<pid>/net/tcp and tcp6 (which list the whole network namespace)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = set()
    for entry in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(fd_dir / entry)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[9] in inodes:
                    local, remote = fields[1].rsplit(":", 1)[1], fields[2].rsplit(":", 1)[1]
                    state = TCP_STATES.get(fields[3], fields[3])
                    found.append(TcpSocket(int(local, 16), int(remote, 16), state))
    return found
