"""The Responses API spoken to an upstream that has only chat completions (`responses: chat`),
pure: `translate_request` (Responses request → chat request, or a 400 naming what cannot be
translated), `response_from_chat` (chat completion → `response` object) and `StreamTranslator`
(chat chunks → Responses stream events). A `Shell` carries what the answers of one request
share: the response id, its creation time, the model and the repeated request parameters."""

from proxy.responses.body import response_from_chat
from proxy.responses.events import StreamTranslator
from proxy.responses.items import Shell, is_translated_id
from proxy.responses.request import Translated, echo_of, translate_request

__all__ = [
    "Shell",
    "StreamTranslator",
    "Translated",
    "echo_of",
    "is_translated_id",
    "response_from_chat",
    "translate_request",
]
