"""Walks a request's plan until one upstream's answer commits: retries, fallback, hedging.

An answer commits at its first content event (see `sse.parse`). Until then nothing of it
reaches the client, so a stalled, failing or slow attempt can be abandoned and the next
candidate tried; the client only ever sees the one answer that committed.

Order: targets (strategy order), then fallbacks, each once; then up to `retries` more
attempts cycling through them again after a backoff, each paid from the upstream's retry
budget. Upstreams in cooldown are skipped (unless every candidate is). With `hedge_after`,
a candidate that has not committed by then gets company: the next candidate starts in
parallel and the first to commit wins.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterator
from dataclasses import replace

from proxy.answer import Answer, Failure, Hold, whole_answer
from proxy.api_request import ApiRequest, StreamOptionsAction
from proxy.config import Route, Target, Upstream
from proxy.errors import (
    BadRequest,
    ProxyError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTooLarge,
    UpstreamUnreachable,
)
from proxy.exchange import event_reader, speaks_stream_options, upstream_call
from proxy.headers import Headers, retry_after
from proxy.latency import hedge_after, request_size
from proxy.record import Attempt, AttemptOutcome, RequestRecord
from proxy.routing import (
    backoff,
    classify,
    client_may_retry,
    outcome_for_status,
    outcome_of,
    plan,
    rejects_stream_options,
    retried,
)
from proxy.scrub import scrub_key
from proxy.sse import EventSplitter
from proxy.state import AppState
from proxy.upstream import UpstreamResponse

MAX_RETRY_AFTER = 10.0  # seconds; a longer Retry-After takes the upstream out of this request
MAX_ERROR_BYTES = 256 << 10  # an error answer is a few hundred bytes (a CDN page: some KB)


class Attempts:
    def __init__(
        self,
        state: AppState,
        route: Route,
        request: ApiRequest,
        headers: Headers,
        record: RequestRecord,
    ) -> None:
        self._state, self._route, self._request = state, route, request
        self._headers, self._record = headers, record
        self._hedged: set[asyncio.Task[Answer | Failure | None]] = set()
        self._declined = False  # a re-send the upstream's retry budget did not pay for

    @functools.cached_property
    def _size(self) -> float:
        return request_size(self._request)  # what a first-token time is divided by

    async def run(self) -> Answer | Failure:
        result = await self._walk()
        if isinstance(result, Failure):
            result.may_retry = client_may_retry(
                result.outcome,
                self._record.attempts,
                retry_on_timeout=self._retries_timeouts(result),
                declined=self._declined,
            )
        return result

    async def _walk(self) -> Answer | Failure:
        health, latency, now = self._state.health, self._state.latency, time.monotonic()
        candidates = plan(self._route, self._state.rng, lambda n: health[n].inflight, latency, now)
        try:  # the first body, written (and kept) before any attempt: too deep is the client's
            first, upstreams = candidates[0], self._state.config.upstreams
            self._request.upstream_body(first.model, self._action(upstreams[first.upstream]))
        except BadRequest as exc:
            return Failure(None, "cancelled", exc)
        after = hedge_after(self._route, candidates[0], latency, self._request)
        if after is not None and len(candidates) > 1:
            return await self._run_hedged(candidates, after)
        last: Failure | None = None
        for target in self._order(candidates):
            result = await self._try_candidate(target)
            if result is None:
                continue
            if isinstance(result, Answer) or not self._moves_on(result):
                return result
            last = result
        return last or Failure(None, "connect_error", UpstreamUnreachable("no upstream"))

    def _retries_timeouts(self, failure: Failure) -> bool:
        target = failure.target
        return target is not None and self._state.config.upstreams[target.upstream].retry_on_timeout

    def _moves_on(self, failure: Failure) -> bool:
        """Whether the request goes on to the next candidate after this failure."""
        verdict = classify(failure.outcome, retry_on_timeout=self._retries_timeouts(failure))
        return verdict.next_candidate

    def _order(self, candidates: tuple[Target, ...]) -> Iterator[Target]:
        yield from candidates
        for i in range(self._route.retries):
            yield candidates[i % len(candidates)]

    async def _try_candidate(self, target: Target) -> Answer | Failure | None:
        """One attempt, or None when the candidate is skipped (cooldown, budget)."""
        health = self._state.health[target.upstream]
        now = time.monotonic()
        earlier = [a.outcome for a in self._record.attempts if a.upstream == target.upstream]
        if not all(map(retried, earlier)):
            return None
        repeat = bool(earlier)
        if not health.available(now) and self._others_available(now, target):
            self._log_attempt(target, "skipped_cooldown", 0.0)
            return None
        if repeat:
            wait = backoff(len(self._record.attempts), self._state.rng)
            wait = max(wait, health.not_before - now)
            if wait > MAX_RETRY_AFTER:
                return None
            if not health.withdraw():
                self._declined = True
                return None
            await asyncio.sleep(wait)
        else:
            health.deposit(self._state.config.server.retry_budget)
        return await self._attempt(target)

    def _others_available(self, now: float, target: Target) -> bool:
        health = self._state.health
        others = (t for t in self._route.targets + self._route.fallbacks if t != target)
        return any(health[t.upstream].available(now) for t in others)

    async def _attempt(self, target: Target) -> Answer | Failure:
        upstream = self._state.config.upstreams[target.upstream]
        health = self._state.health[upstream.name]
        action = self._action(upstream)
        started = time.monotonic()
        health.begin(started)
        outcome: AttemptOutcome = "cancelled"
        try:
            result = await self._round_trip(upstream, target, action)
            if isinstance(result, Failure) and result.outcome == "stream_options_rejected":
                # Learnt once per process; this request goes again at once, without the field.
                health.rejects_stream_options = True
                self._log_attempt(target, "stream_options_rejected", time.monotonic() - started)
                started = time.monotonic()
                result = await self._round_trip(upstream, target, "strip")
            outcome = "ok" if isinstance(result, Answer) else result.outcome
            try:
                if outcome == "ok" and self._request.stream:  # committed: its first-token time
                    now = time.monotonic()
                    self._state.latency.record(self._route, target, now - started, self._size, now)
                self._update_health(upstream, result, outcome)
            except BaseException:
                if isinstance(result, Answer):  # committed, and now nobody will relay it
                    await result.aclose()
                raise
            return result
        except asyncio.CancelledError:
            if asyncio.current_task() in self._hedged:
                outcome = "hedge_lost"
            raise
        finally:
            if outcome != "ok" and not classify(outcome).unhealthy:
                health.release_probe()
            self._log_attempt(target, outcome, time.monotonic() - started)

    def _action(self, upstream: Upstream) -> StreamOptionsAction:
        mode = upstream.stream_options if speaks_stream_options(self._request, upstream) else "pass"
        if mode == "auto" and self._state.health[upstream.name].rejects_stream_options:
            return "strip"
        return "inject" if mode == "auto" else mode

    def _update_health(
        self, upstream: Upstream, result: Answer | Failure, outcome: AttemptOutcome
    ) -> None:
        health, now = self._state.health, time.monotonic()
        if isinstance(result, Answer):
            health.succeeded(upstream.name)
            return
        if result.retry_after is not None:
            health[upstream.name].not_before = now + result.retry_after
        if classify(outcome).unhealthy:
            health.failed(upstream.name, now, upstream.cooldown)

    def _log_attempt(self, target: Target, outcome: AttemptOutcome, seconds: float) -> None:
        self._record.attempts.append(Attempt(target.upstream, target.model, outcome, seconds))

    async def _round_trip(
        self, upstream: Upstream, target: Target, action: StreamOptionsAction
    ) -> Answer | Failure:
        first_token = target.first_token_timeout or self._route.first_token_timeout
        hold = Hold(self._state.health[upstream.name])
        result: Answer | Failure | None = None
        try:
            response = await self._open(upstream, target, action, first_token)
            if isinstance(response, Failure):
                result = response
            else:
                hold.response = response
                result = await self._read(upstream, target, action, response, first_token)
            return result
        finally:
            if isinstance(result, Answer):
                result.hold = hold  # committed: the answer owns the upstream from here
            else:
                await hold.aclose()

    async def _open(
        self,
        upstream: Upstream,
        target: Target,
        action: StreamOptionsAction,
        first_token: float | None,
    ) -> UpstreamResponse | Failure:
        """Sends the request and waits for the response headers."""
        request, timeouts = self._request, upstream.timeouts
        # The first token is due `first_token` after the request: headers later than that
        # already miss it. Non-stream answers come whole, so `total` bounds their headers too.
        header_wait = min(timeouts.read, first_token or timeouts.read)
        if not request.stream:
            header_wait = min(header_wait, timeouts.total or header_wait)
        try:
            async with asyncio.timeout(header_wait):
                path, body = upstream_call(request, upstream, target.model, action)
                return await self._state.clients.send(upstream, path, body, self._headers)
        except TimeoutError:
            # The route's deadline fired (for a non-stream answer too): its deliberate fallback.
            if first_token is not None and header_wait == first_token:
                error = UpstreamTimeout(f"upstream '{upstream.name}' sent no first token in time")
                return Failure(target, "first_token_timeout", error)
            error = UpstreamTimeout(f"upstream '{upstream.name}' sent no response headers in time")
            return Failure(target, "timeout", error)
        except ProxyError as exc:
            return Failure(target, outcome_of(exc), exc)

    async def _read(
        self,
        upstream: Upstream,
        target: Target,
        action: StreamOptionsAction,
        response: UpstreamResponse,
        first_token: float | None,
    ) -> Answer | Failure:
        try:
            if response.status >= 400:
                return await self._refusal(upstream, target, action, response)
            if self._request.stream and response.content_type.startswith("text/event-stream"):
                return await self._commit(target, action, response, first_token)
            total = upstream.timeouts.total
            async with asyncio.timeout(None if total is None else total - response.elapsed()):
                payload = await response.read(upstream.max_response_bytes)
        except TimeoutError:
            error = UpstreamTimeout(f"upstream '{upstream.name}' did not finish in time")
            return Failure(target, "timeout", error)
        except ProxyError as exc:
            return Failure(target, outcome_of(exc), exc)
        return whole_answer(self._request, target, action, response, payload)

    async def _refusal(
        self,
        upstream: Upstream,
        target: Target,
        action: StreamOptionsAction,
        response: UpstreamResponse,
    ) -> Failure:
        """An error answer: kept whole, to relay if no other candidate does better; never
        with the upstream's own key in it (see `scrub_key`)."""
        limit = min(upstream.max_response_bytes, MAX_ERROR_BYTES)
        what = "max_response_bytes" if limit == upstream.max_response_bytes else "an error may hold"
        payload = await response.read(limit, what)
        payload, headers = scrub_key(upstream, payload, response.headers)
        if rejects_stream_options(response.status, payload, upstream.stream_options, action):
            return Failure(target, "stream_options_rejected")
        outcome = outcome_for_status(response.status)
        wait = retry_after(headers)
        return Failure(target, outcome, None, response.status, headers, payload, wait)

    async def _commit(
        self,
        target: Target,
        action: StreamOptionsAction,
        response: UpstreamResponse,
        first_token: float | None,
    ) -> Answer | Failure:
        """Reads (and holds back) the stream up to its first content event, at most
        `server.max_event_bytes` of it: an upstream may not fill the proxy with comments or
        one endless event (the attempt then fails as `too_large`)."""
        if encoding := response.content_encoding:  # events the proxy could not read
            odd = f"upstream '{target.upstream}' streamed in content-encoding {encoding[:32]!r}"
            raise UpstreamProtocolError(odd)
        next_chunk, upstream = response.next_chunk, self._state.config.upstreams[target.upstream]
        splitter, held, read = EventSplitter(), bytearray(), event_reader(self._request, upstream)
        most = self._state.config.server.max_event_bytes
        remaining = None if first_token is None else max(0.0, first_token - response.elapsed())
        try:
            async with asyncio.timeout(remaining):
                while True:
                    chunk = await next_chunk()
                    if not chunk:  # ended with no content and no [DONE]
                        ended = f"upstream '{target.upstream}' ended its stream without an answer"
                        return Failure(target, "reset", UpstreamProtocolError(ended))
                    held += chunk
                    if len(held) > most:
                        raise UpstreamTooLarge(response.too_large("server.max_event_bytes", most))
                    for event in splitter.feed(chunk):
                        kind, payload = read(event)
                        if kind == "error":
                            instead = f"upstream '{target.upstream}' sent an error, not an answer"
                            return Failure(target, "stream_error", UpstreamProtocolError(instead))
                        if kind in ("content", "done"):
                            return Answer(
                                target, response.status, response.headers, bytes(held),
                                response, payload, action,
                            )  # fmt: skip
        except TimeoutError:
            error = UpstreamTimeout(f"upstream '{target.upstream}' sent no first token in time")
            return Failure(target, "first_token_timeout", error)
        except ProxyError as exc:
            return Failure(target, outcome_of(exc), exc)

    async def _run_hedged(self, candidates: tuple[Target, ...], after: float) -> Answer | Failure:
        order = self._order(candidates)
        last = Failure(None, "connect_error", UpstreamUnreachable("no upstream"))
        running: set[asyncio.Task[Answer | Failure | None]] = set()
        winner: Answer | None = None
        try:
            while True:
                if len(running) < 2 and (target := next(order, None)) is not None:
                    running.add(asyncio.ensure_future(self._try_candidate(target)))
                if not running:
                    return last
                # The hedge timer: with one attempt running, the next starts after `after`.
                timeout = after if len(running) < 2 else None
                done, running = await asyncio.wait(
                    running, timeout=timeout, return_when="FIRST_COMPLETED"
                )
                results = [task.result() for task in done]
                answers = [r for r in results if isinstance(r, Answer)]
                if answers:
                    winner = answers[0]
                    for loser in answers[1:]:  # committed in the same instant: loses
                        await self._discard(loser)
                    return winner
                for result in results:
                    if isinstance(result, Failure):
                        last = result
                        if not self._moves_on(result):
                            order = iter(())  # not sent again; a hedge running may still win
        finally:
            try:
                await self._cancel(running, won=winner is not None)
            except asyncio.CancelledError:
                if winner is not None:  # the client left as it committed: never relayed
                    await winner.aclose()
                raise

    async def _cancel(
        self, running: set[asyncio.Task[Answer | Failure | None]], *, won: bool
    ) -> None:
        if won:
            self._hedged |= running
        for task in running:
            task.cancel()
        for late in await asyncio.gather(*running, return_exceptions=True):
            if isinstance(late, Answer):
                await self._discard(late)  # committed at the same moment: loses

    async def _discard(self, answer: Answer) -> None:
        """A committed answer that will never be relayed: close it and record it as lost."""
        await answer.aclose()
        attempts, lost = self._record.attempts, (answer.target.upstream, answer.target.model)
        oks = [
            i for i, a in enumerate(attempts) if (a.outcome, a.upstream, a.model) == ("ok", *lost)
        ]
        if oks:
            attempts[oks[-1]] = replace(attempts[oks[-1]], outcome="hedge_lost")
