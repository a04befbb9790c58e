"""Where one request's token usage comes from (pure): the stream or body itself, the
upstream's usage headers, or an offline estimate, tried in that order."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import orjson

from proxy.api_request import RESPONSES, ApiRequest
from proxy.config import Upstream
from proxy.metering.estimate import choice_texts, estimate_usage, response_texts
from proxy.metering.reported import usage_from_headers, usage_from_json
from proxy.metering.tee import Collect, CollectAddingUsage, Drop, Tee, Watch, WatchResponses
from proxy.record import Usage
from proxy.sse import choices_of

if TYPE_CHECKING:  # only the type: this module stays free of I/O imports
    from proxy.answer import Answer


def may_estimate(upstream: Upstream) -> bool:
    """Whether this upstream's answers may come without usage, so that the proxy estimates
    it: unless the proxy asks for the usage event itself (`auto`; non-stream bodies carry
    usage anyway) or the upstream sends usage headers."""
    names = upstream.usage_headers
    headers = names.prompt_tokens is not None or names.completion_tokens is not None
    return upstream.stream_options != "auto" and not headers


def tee_for(request: ApiRequest, answer: Answer, upstream: Upstream) -> Tee:
    if answer.response is None:  # complete already: a converted JSON answer, or no content at all
        return Collect()
    if request.api is RESPONSES:  # every Responses stream ends with its usage
        return WatchResponses()
    if answer.stream_options == "inject" and not request.wants_usage:
        return Drop()  # the usage event was requested by the proxy: the client never sees it
    headers = _header_usage(answer, upstream)
    asked = request.wants_usage
    if (asked and answer.stream_options != "strip") or (headers is not None and not asked):
        return Watch()  # the stream carries the usage the client asked for, or headers do
    if not request.wants_usage:
        return Collect()
    prompt, chat = request.prompt, request.counts_messages

    def synthesize(text: str) -> dict[str, int]:
        return _openai_shape(headers or estimate_usage(prompt, text, chat=chat))

    return CollectAddingUsage(answer.first_event or {}, synthesize)


def usage_of_stream(request: ApiRequest, answer: Answer, upstream: Upstream, tee: Tee) -> Usage:
    reported = (
        tee.usage()
        or (usage_from_json(answer.body_usage) if answer.body_usage is not None else None)
        or _header_usage(answer, upstream)
    )
    if reported is not None:
        return reported
    estimate = estimate_usage(request.prompt, tee.text, chat=request.counts_messages)
    if not tee.keeps_text:  # a stream cut before its usage event, text not kept:
        # upstreams stream about one token per event, after one role-only event (chat)
        estimate = replace(estimate, output=max(tee.events - tee.framing_events, 0))
    return estimate


def usage_of_body(request: ApiRequest, answer: Answer, upstream: Upstream) -> Usage | None:
    if not 200 <= answer.status < 300:
        return None
    if answer.body_usage is not None:  # attempts parsed the body once already
        return usage_from_json(answer.body_usage)
    header = _header_usage(answer, upstream)
    if header is not None:
        return header
    try:  # the rare path: no usage anywhere, so the text is needed for an estimate
        body = orjson.loads(answer.head)
    except orjson.JSONDecodeError:
        body = None
    text = "".join(response_texts(body)) if request.api is RESPONSES else _answer_text(body)
    return estimate_usage(request.prompt, text, chat=request.counts_messages)


def _header_usage(answer: Answer, upstream: Upstream) -> Usage | None:
    names = upstream.usage_headers
    if names.prompt_tokens is None and names.completion_tokens is None:
        return None
    return usage_from_headers(answer.headers, names.prompt_tokens, names.completion_tokens)


def _answer_text(body: Any) -> str:
    choices = choices_of(body) if isinstance(body, dict) else []
    return "".join(text for choice in choices for text in choice_texts(choice))


def _openai_shape(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt,
        "completion_tokens": usage.completion,
        "total_tokens": usage.prompt + usage.completion,
    }
