"""The `sluicegate` command: serve, check, keys, hash-key, mock-upstream."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import uvicorn

from proxy import __version__
from proxy.admission import hash_key, new_key
from proxy.app import CONFIG_ENV, LOG_LEVEL_ENV, METRICS_ROUTE_ENV, WATCH_ENV, create_app
from proxy.config import ConfigError, ServerSettings, load_config
from proxy.connection import ConnectionLimits, guarded
from proxy.fleet.report import key_rows, render
from proxy.fleet.store import StoreDown
from proxy.mock.upstream import Knobs, MockUpstream
from proxy.mock.upstream import serve as serve_mock
from proxy.observe import metrics_server
from proxy.observe.logs import LEVELS
from proxy.observe.logs import configure as configure_logs
from proxy.observe.metrics import render_workers
from proxy.reload import POLL_SECONDS
from proxy.serving import RunningServer, fastest_loop

DEMO_CONFIG = """\
# Written by `sluicegate serve --demo`: one route onto the built-in demo upstream.
upstreams:
  demo:
    base_url: {upstream_url}/v1
    stream_options: pass
routes:
  - model: support-bot
    targets: [{{upstream: demo, model: demo-chat}}]
pricing:
  demo-chat: {{input: 0.28, cached_input: 0.028, output: 0.42}}
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.run(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluicegate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sluicegate {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", default="routes.yaml", help="routes file")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=_workers, default=1, help="a number, or 'auto' (CPUs)")
    serve.add_argument("--demo", action="store_true", help="serve a built-in demo upstream too")
    serve.add_argument(
        "--metrics-port",
        type=_port,
        help="serve /metrics (and /healthz) on this port, and not on --port; "
        "wins over server.metrics_port",
    )
    serve.add_argument(
        "--metrics-host",
        help="the metrics listener's address (default: server.metrics_host, else --host); "
        "needs --metrics-port",
    )
    serve.add_argument(
        "--log-level",
        choices=tuple(LEVELS),
        default="info",
        help="log lines at this level and above, in every worker (default: info)",
    )
    serve.add_argument(
        "--no-watch",
        dest="watch",
        action="store_false",
        help="do not poll the routes file for edits (SIGHUP still reloads it)",
    )
    serve.set_defaults(run=_serve)

    check = sub.add_parser("check", help="validate a routes file")
    check.add_argument("path")
    check.set_defaults(run=_check)

    keys = sub.add_parser(
        "keys", help="each client key's limits, spend this period and remaining budget"
    )
    keys.add_argument("--config", default="routes.yaml", help="routes file")
    keys.add_argument("--json", action="store_true", help="JSON, for scripts")
    keys.set_defaults(run=_keys)

    hashing = sub.add_parser(
        "hash-key",
        help="print the SHA-256 of a client key for `keys:` (the key is read from stdin)",
    )
    hashing.add_argument(
        "--new", action="store_true", help="make a new random key and print it with its hash"
    )
    hashing.set_defaults(run=_hash_key)

    mock = sub.add_parser("mock-upstream", help="run the OpenAI-compatible demo/test upstream")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8900)
    mock.set_defaults(run=_mock)
    return parser


def _workers(value: str) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    count = int(value)
    if count < 1:
        raise argparse.ArgumentTypeError("workers must be >= 1 or 'auto'")
    return count


def _port(value: str) -> int:
    port = int(value)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError("a port is 1-65535")
    return port


def _check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        print(f"{args.path}: {len(exc.issues)} error(s)", file=sys.stderr)
        return 1
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"ok: {config.summary()}")
    return 0


def _keys(args: argparse.Namespace) -> int:
    try:
        rows = key_rows(load_config(args.config))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except StoreDown as exc:  # the URL is a secret: the error's class only
        print(f"sluicegate keys: cannot reach the state store ({exc})", file=sys.stderr)
        return 1
    print(render(rows, as_json=args.json))
    return 0


def _hash_key(args: argparse.Namespace) -> int:
    """Reads the key from stdin, so it stays out of shell history and `ps`."""
    if args.new:
        key = new_key()
        print(f"key:    {key}\nsha256: {hash_key(key)}")
        return 0
    key = sys.stdin.readline().strip()
    if not key:
        print("hash-key: give the key on stdin (or use --new)", file=sys.stderr)
        return 1
    print(hash_key(key))
    return 0


def _serve(args: argparse.Namespace) -> int:
    configure_logs(level=LEVELS[args.log_level])
    problem = _metrics_flags_problem(args)
    if problem:
        print(f"sluicegate serve: error: {problem}", file=sys.stderr)
        return 2
    if args.demo:
        return _serve_demo(args)
    metrics = (args.metrics_host, args.metrics_port)
    return _serve_config(
        args.config,
        args.host,
        args.port,
        args.workers,
        watch=args.watch,
        metrics=metrics,
        log_level=args.log_level,
    )


def _metrics_flags_problem(args: argparse.Namespace) -> str | None:
    if args.metrics_host is not None and args.metrics_port is None:
        return "--metrics-host needs --metrics-port"
    if args.metrics_port is not None and args.metrics_port == args.port:
        return f"--metrics-port must differ from --port ({args.port})"
    return None


def _serve_config(
    config_path: str,
    host: str,
    port: int,
    workers: int,
    *,
    watch: bool = True,
    metrics: tuple[str | None, int | None] = (None, None),
    log_level: str = "info",
) -> int:
    metrics_host, metrics_port = metrics  # the flags; they win over the file's server.metrics_*
    try:
        # Fail here, readably, rather than inside a worker.
        config = load_config(config_path, main_port=port if metrics_port is None else None)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    listener = metrics_server.listener(config.server, host, metrics_port, metrics_host)
    proxy = create_app(
        config_path, watch_interval=POLL_SECONDS if watch else None, metrics_route=not listener
    )
    app: object = proxy
    render: metrics_server.Render = proxy.state.render_metrics
    metrics_dir = None
    listening = None
    try:
        if workers > 1:
            # Each worker process builds its own app from the path in the environment, and
            # writes its metrics where every worker's /metrics (and the metrics listener, in
            # this supervisor process) can add them all up.
            os.environ[CONFIG_ENV] = str(Path(config_path).resolve())
            os.environ[WATCH_ENV] = "1" if watch else "0"
            os.environ[METRICS_ROUTE_ENV] = "0" if listener else "1"
            os.environ[LOG_LEVEL_ENV] = log_level  # workers set up their own logs
            app = "proxy.app:create_app_from_env"
            metrics_dir = metrics_server.prepare_multiprocess_dir()
            render = partial(render_workers, os.environ["PROMETHEUS_MULTIPROC_DIR"])
        listening = metrics_server.start(listener, render, config.server.metrics_token)
        _run_uvicorn(app, host, port, workers, config.server, log_level=log_level)
    except metrics_server.ListenError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        if listening is not None:
            listening.stop()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _run_uvicorn(
    app: object, host: str, port: int, workers: int, server: ServerSettings, *, log_level: str
) -> None:
    uvicorn.run(
        app,  # type: ignore[arg-type]  # an ASGI app or its import string
        factory=workers > 1,
        workers=workers,
        host=host,
        port=port,
        loop=fastest_loop(),
        http=guarded(ConnectionLimits.of(server)),  # type: ignore[arg-type]  # a factory
        # uvicorn's own lines are plain text, not JSON: only its warnings and errors, or only
        # its errors at --log-level error.
        log_level="error" if log_level == "error" else "warning",
        access_log=False,
        server_header=False,
        proxy_headers=False,  # client addresses are not used; skip the per-request middleware
        backlog=4096,
        # SIGTERM: stop accepting, let in-flight streams finish for this long, then exit.
        timeout_graceful_shutdown=math.ceil(server.drain_seconds),
    )


def _serve_demo(args: argparse.Namespace) -> int:
    # A human-paced answer: visible streaming in a terminal.
    mock = RunningServer(MockUpstream(Knobs(ttft=0.2, tokens=40, delay=0.04))).start()
    with tempfile.TemporaryDirectory(prefix="sluicegate-demo-") as tmp:
        config_path = Path(tmp) / "routes.yaml"
        config_path.write_text(DEMO_CONFIG.format(upstream_url=mock.url))
        print(_demo_banner(args.host, args.port, mock.url), flush=True)
        try:
            metrics = (args.metrics_host, args.metrics_port)
            path = str(config_path)
            return _serve_config(
                path,
                args.host,
                args.port,
                args.workers,
                watch=False,
                metrics=metrics,
                log_level=args.log_level,
            )
        finally:
            mock.stop()


def _demo_banner(host: str, port: int, upstream_url: str) -> str:
    base = f"http://{host}:{port}/v1"
    return f"""\
sluicegate demo: proxy on {base}  (demo upstream on {upstream_url}/v1, offline, no keys)

  playground: http://{host}:{port}/  (open it in a browser)

  curl -N {base}/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "support-bot", "stream": true,
         "messages": [{{"role": "user", "content": "hi"}}]}}'

  python -c '
from openai import OpenAI
client = OpenAI(base_url="{base}", api_key="unused")
stream = client.chat.completions.create(
    model="support-bot", stream=True, messages=[{{"role": "user", "content": "hi"}}])
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()'

Ctrl-C stops it."""


def _mock(args: argparse.Namespace) -> int:
    print(f"demo upstream on http://{args.host}:{args.port}/v1", flush=True)
    serve_mock(host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
