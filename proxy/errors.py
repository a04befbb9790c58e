"""The proxy's error tree and the one function that renders OpenAI's error body.

    ProxyError                      status  type                    code
    ├── BadRequest                  400     invalid_request_error   (given)
    │   └── Untranslatable          400     invalid_request_error   unsupported_parameter
    ├── Unauthorized                401     invalid_request_error   invalid_api_key
    │   └── MetricsUnauthorized     401     invalid_request_error   invalid_api_key
    ├── ModelNotAllowed             403     invalid_request_error   model_not_allowed
    ├── OriginNotAllowed            403     invalid_request_error   origin_not_allowed
    ├── ModelNotFound               404     invalid_request_error   model_not_found
    ├── NotFound                    404     invalid_request_error   not_found
    ├── MethodNotAllowed            405     invalid_request_error   method_not_allowed
    ├── RequestTimeout              408     invalid_request_error   request_timeout
    ├── BodyTooLarge                413     invalid_request_error   request_too_large
    ├── UnsupportedMediaType        415     invalid_request_error   unsupported_content_type
    ├── HostNotAllowed              421     invalid_request_error   host_not_allowed
    ├── RateLimited                 429     requests|tokens         rate_limit_exceeded
    ├── Overloaded                  429     rate_limit_error        proxy_overloaded
    ├── BudgetExceeded              429     insufficient_quota      budget_exceeded
    ├── HeadersTooLarge             431     invalid_request_error   headers_too_large
    ├── InternalError               500     server_error            internal_error
    ├── UpstreamUnreachable         502     upstream_error          upstream_unreachable
    ├── UpstreamProtocolError       502     upstream_error          upstream_protocol_error
    │   └── UpstreamTooLarge        502     upstream_error          upstream_response_too_large
    ├── UpstreamTlsError            502     upstream_error          upstream_tls_error
    ├── NotReady                    503     server_error            not_ready
    ├── StateUnavailable            503     server_error            state_unavailable
    ├── TooManyConnections          503     server_error            too_many_connections
    └── UpstreamTimeout             504     upstream_error          upstream_timeout

`(given)`: set where the error is raised (none if not given); `a|b`: one of them, per error.
Every ProxyError subclass is defined here, and listed here (tests/test_errors.py checks both).
`headers()` is what an error adds to the response: RateLimited `retry-after`, BudgetExceeded
`x-should-retry: false` (`NO_RETRY`: the OpenAI SDKs then do not retry a spent budget),
StateUnavailable `retry-after`. After a failed walk of the upstreams, whether the client gets
`NO_RETRY` is `routing.client_may_retry`'s call (the endpoint adds it).

Errors that the upstream itself answered (4xx/5xx with a body) are not in this tree:
the relay passes them on with the upstream's own status and body.

Whether a failure is worth another candidate is not a property of these classes: it is
decided per attempt outcome by `routing.classify`, one table that covers the upstream's own
error answers as well as ours (`routing.outcome_of` names the outcome of each of ours).
"""

from __future__ import annotations

import math

import orjson

NO_RETRY = (b"x-should-retry", b"false")  # openai-python and openai-node obey it


class ProxyError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    extra_headers: tuple[tuple[bytes, bytes], ...] = ()  # what `headers()` adds to the answer

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> bytes:
        return error_body(self.message, self.type, param=self.param, code=self.code)

    def headers(self) -> list[tuple[bytes, bytes]]:
        return list(self.extra_headers)


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class Untranslatable(BadRequest):
    """A Responses API parameter that a `responses: chat` upstream cannot honour (stored state,
    built-in tools, ...): refused rather than dropped. `param` names it."""

    code = "unsupported_parameter"  # OpenAI's code for a parameter a model does not take


class Unauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class MetricsUnauthorized(Unauthorized):
    """A 401 from /metrics: answered with a Bearer challenge (RFC 6750)."""


class ModelNotAllowed(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class OriginNotAllowed(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "origin_not_allowed"


class ModelNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


def unknown_model(model: str, max_chars: int) -> ModelNotFound:
    """OpenAI's 404 for a model that is not served, or not to this caller."""
    shown = clipped(model, max_chars)
    message = f"The model '{shown}' does not exist or you do not have access to it."
    return ModelNotFound(message, param="model")


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class BodyTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(ProxyError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_content_type"  # OpenAI's code


class HostNotAllowed(ProxyError):
    status = 421  # Misdirected Request: not a host this server answers for
    type = "invalid_request_error"
    code = "host_not_allowed"


class RateLimited(ProxyError):
    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, kind: str, retry_after: float) -> None:
        super().__init__(message)
        self.type = kind  # OpenAI's word for what ran out: "requests" or "tokens"
        self.retry_after = retry_after

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"retry-after", b"%d" % max(1, math.ceil(self.retry_after)))]


class Overloaded(ProxyError):
    status = 429
    type = "rate_limit_error"
    code = "proxy_overloaded"


class HeadersTooLarge(ProxyError):
    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"


class InternalError(ProxyError):
    status = 500
    type = "server_error"
    code = "internal_error"


class BudgetExceeded(ProxyError):
    """The key has spent its budget for the period; retrying will not help until it resets."""

    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"
    extra_headers = (NO_RETRY,)


class StateUnavailable(ProxyError):
    """`state.on_unavailable: closed` and the shared store cannot be reached."""

    status = 503
    type = "server_error"
    code = "state_unavailable"
    extra_headers = ((b"retry-after", b"1"),)


class UpstreamUnreachable(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


class UpstreamProtocolError(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_protocol_error"


class UpstreamTooLarge(UpstreamProtocolError):
    """An answer past `max_response_bytes`, or a stream past `server.max_event_bytes` before
    its first token: its message names the limit."""

    code = "upstream_response_too_large"


class UpstreamTlsError(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_tls_error"


class NotReady(ProxyError):
    status = 503
    type = "server_error"
    code = "not_ready"


class TooManyConnections(ProxyError):
    status = 503
    type = "server_error"
    code = "too_many_connections"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> bytes:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def clipped(text: str, limit: int) -> str:
    """A client's string as an error message or a log line quotes it: at most `limit`
    characters of it, so one request cannot write megabytes to the logs."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"
