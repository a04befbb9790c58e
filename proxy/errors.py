"""The proxy's error tree and the one function that renders OpenAI's error body.

    ProxyError                      status  type                    code
    ├── BadRequest                  400     invalid_request_error   (given)
    ├── ModelNotFound               404     invalid_request_error   model_not_found
    ├── NotFound                    404     invalid_request_error   not_found
    ├── MethodNotAllowed            405     invalid_request_error   method_not_allowed
    ├── RequestTimeout              408     invalid_request_error   request_timeout
    ├── BodyTooLarge                413     invalid_request_error   request_too_large
    ├── HeadersTooLarge             431     invalid_request_error   headers_too_large
    ├── UpstreamUnreachable         502     upstream_error          upstream_unreachable
    ├── UpstreamProtocolError       502     upstream_error          upstream_protocol_error
    ├── UpstreamTimeout             504     upstream_error          upstream_timeout
    └── InternalError               500     server_error            internal_error

Errors that the upstream itself answered (4xx/5xx with a body) are not in this tree:
the relay passes them on with the upstream's own status and body.

Whether a failure is worth another candidate is not a property of these classes: it is
decided per attempt outcome by `routing.classify`, one table that covers the upstream's own
error answers as well as ours (`routing.outcome_of` names the outcome of each of ours).
"""

from __future__ import annotations

import orjson


class ProxyError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> bytes:
        return error_body(self.message, self.type, param=self.param, code=self.code)


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class ModelNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


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


class HeadersTooLarge(ProxyError):
    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"


class UpstreamUnreachable(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_unreachable"


class UpstreamProtocolError(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_protocol_error"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class InternalError(ProxyError):
    status = 500
    type = "server_error"
    code = "internal_error"


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> bytes:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )
