"""Demo traffic for sluicegate: a bounded run of OpenAI-style chat requests, stdlib only.

    python deploy/traffic.py --url http://127.0.0.1:8080 --rate 3 --duration 60

Requests arrive at `--rate` per second on average (Poisson), streamed and not, spread over
the proxy's routes (from /v1/models unless `--model` is given), until `--duration` seconds or
`--requests` requests, whichever comes first. At most `--concurrency` are in flight; a tick
with no free slot is counted as `skipped`, never queued. With `--mock-knobs` each request
also carries knobs for `sluicegate mock-upstream` (varied latency and length, a few injected
errors, a few unknown models) so a dashboard has something to show; a real upstream would
reject those requests. Prints a progress line every 10 s and a JSON summary at the end;
exits 1 if no request succeeded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence

PROMPTS = (
    "双十一预售什么时候开始?",
    "Where is my order #4417?",
    "Summarise our refund policy in two sentences.",
    "Translate 'free shipping over 99 yuan' into English.",
    "Which plan includes priority support?",
)
PROGRESS_SECONDS = 10.0


class Tally:
    """Outcome counts shared by the request threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def add(self, outcome: str) -> None:
        with self._lock:
            self.counts[outcome] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(sorted(self.counts.items()))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    base = args.url.rstrip("/")
    if not _wait_ready(base, args.ready_timeout):
        print(f"traffic: {base}/readyz did not answer 200 in {args.ready_timeout}s", flush=True)
        return 1
    models = args.model or _route_names(base)
    rng = random.Random(args.seed)
    tally = _run(base, models, args, rng)
    summary = tally.snapshot()
    print(json.dumps({"traffic": "done", **summary}), flush=True)
    return 0 if summary.get("200", 0) > 0 else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="the proxy's base URL")
    parser.add_argument("--rate", type=float, default=3.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to run")
    parser.add_argument("--requests", type=int, default=100_000, help="most requests to send")
    parser.add_argument("--concurrency", type=int, default=16, help="most requests in flight")
    parser.add_argument("--model", action="append", help="a route to use (repeatable)")
    parser.add_argument("--stream-share", type=float, default=0.7, help="share of streamed")
    parser.add_argument("--mock-knobs", action="store_true", help="vary the mock's behaviour")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait")
    parser.add_argument("--seed", type=int, default=None, help="random seed (reproducible runs)")
    return parser


def _wait_ready(base: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def _route_names(base: str) -> list[str]:
    with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as response:
        return [model["id"] for model in json.load(response)["data"]]


def _run(base: str, models: Sequence[str], args: argparse.Namespace, rng: random.Random) -> Tally:
    tally = Tally()
    slots = threading.BoundedSemaphore(args.concurrency)
    threads: list[threading.Thread] = []
    start = time.monotonic()
    deadline = start + args.duration
    next_at, next_progress = start, start + PROGRESS_SECONDS
    for _ in range(args.requests):
        if time.monotonic() >= deadline:
            break
        if not slots.acquire(blocking=False):
            tally.add("skipped")
        else:
            body = _body(models, args, rng)
            thread = threading.Thread(
                target=_send, args=(base, body, args.timeout, tally, slots), daemon=True
            )
            thread.start()
            threads.append(thread)
        if time.monotonic() >= next_progress:
            print(json.dumps({"traffic": "progress", **tally.snapshot()}), flush=True)
            next_progress += PROGRESS_SECONDS
        next_at += rng.expovariate(args.rate)
        time.sleep(max(0.0, min(next_at, deadline) - time.monotonic()))
    for thread in threads:
        thread.join(timeout=args.timeout + 5)
    return tally


def _body(models: Sequence[str], args: argparse.Namespace, rng: random.Random) -> dict[str, object]:
    body: dict[str, object] = {
        "model": rng.choice(models),
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "seed": rng.randrange(1_000_000),
    }
    if rng.random() < args.stream_share:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    if args.mock_knobs:
        knobs: dict[str, object] = {
            "ttft": round(rng.uniform(0.05, 1.5), 3),
            "tokens": rng.randint(8, 160),
            "delay": 0.01,
        }
        roll = rng.random()
        if roll < 0.03:
            knobs["status"] = rng.choice((429, 500, 503))
        elif roll < 0.05:
            body["model"] = "no-such-route"
        body["mock"] = knobs
    return body


def _send(
    base: str,
    body: dict[str, object],
    timeout: float,
    tally: Tally,
    slots: threading.BoundedSemaphore,
) -> None:
    request = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": "Bearer demo"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            while response.read(65536):  # the whole answer, streamed or not
                pass
            tally.add(str(response.status))
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(OSError):
            exc.read()
        exc.close()
        tally.add(str(exc.code))
    except (urllib.error.URLError, OSError):
        tally.add("connection_error")
    finally:
        slots.release()


if __name__ == "__main__":
    sys.exit(main())
