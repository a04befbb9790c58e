"""The upstream key taken out of relayed error answers (proxy/scrub.py): pure tables, no
event loop. tests/test_hostile_upstream.py sends the same spellings through a real proxy."""

from __future__ import annotations

import pytest

from proxy.config import Secret, Upstream
from proxy.scrub import scrub_key

KEY = "sk-0123456789abcdef/XYZ"


def _up(key: str | None = KEY) -> Upstream:
    return Upstream("u", "http://127.0.0.1:9/v1", api_key=None if key is None else Secret(key))


def _unicode(text: str, upper: bool = False) -> str:
    return "".join((f"\\u{ord(c):04X}" if upper else f"\\u{ord(c):04x}") for c in text)


def test_scrub_key_takes_the_key_out_of_bodies_and_header_values() -> None:
    key = "sk-0123456789abcdef"
    up = Upstream("u", "http://127.0.0.1:9/v1", api_key=Secret(key))
    body = f'{{"message": "Bearer {key} and again {key}"}}'.encode()
    headers = [(b"www-authenticate", f"Bearer x={key}".encode()), (b"x-other", b"1")]
    assert scrub_key(up, body, headers) == (
        b'{"message": "Bearer *** and again ***"}',
        [(b"www-authenticate", b"Bearer x=***"), (b"x-other", b"1")],
    )
    # No key, or a placeholder such as vLLM's "EMPTY": the answer is relayed as it came.
    for placeholder in (None, Secret("EMPTY")):
        up = Upstream("u", "http://127.0.0.1:9/v1", api_key=placeholder)
        assert scrub_key(up, b"EMPTY", headers) == (b"EMPTY", headers)


@pytest.mark.parametrize(
    ("quoted", "left"),
    [
        pytest.param(KEY, "", id="whole"),
        pytest.param(KEY[:-3], "", id="less its last 3"),
        pytest.param(KEY[5:], "", id="its tail"),
        pytest.param(KEY[2:10], "", id="8 characters"),
        pytest.param(KEY.replace("/", "\\/"), "", id="slash escaped"),
        pytest.param(_unicode(KEY), "", id="unicode escaped"),
        pytest.param(_unicode(KEY, upper=True), "", id="upper-case hex"),
        pytest.param(KEY[:6] + _unicode(KEY[6:12]) + KEY[12:], "", id="partly escaped"),
        pytest.param(KEY[:7], KEY[:7], id="7 characters stay"),
        pytest.param("abcdefgh", "abcdefgh", id="8 other characters stay"),
    ],
)
def test_every_run_of_8_or_more_key_characters_goes_in_any_json_spelling(
    quoted: str, left: str
) -> None:
    body = f'{{"error": {{"message": "not accepted: \'Bearer {quoted}\'", "n": 1}}}}'.encode()
    headers = [(b"www-authenticate", f'Bearer error_description="{quoted}"'.encode())]
    scrubbed, scrubbed_headers = scrub_key(_up(), body, headers)
    wanted = left or "***"
    assert (
        scrubbed
        == f'{{"error": {{"message": "not accepted: \'Bearer {wanted}\'", "n": 1}}}}'.encode()
    )
    assert scrubbed_headers == [
        (b"www-authenticate", f'Bearer error_description="{wanted}"'.encode())
    ]


def test_runs_apart_and_around_escapes_elsewhere_are_each_scrubbed_alone() -> None:
    body = ('{"a": "\\u00e9 ' + KEY[:9] + " \\n x " + KEY[-9:] + ' \\"q\\""}').encode()
    scrubbed, _ = scrub_key(_up(), body, [])
    assert scrubbed == b'{"a": "\\u00e9 *** \\n x *** \\"q\\""}'
