"""virtual_llms/jsonio.py: orjson where it can, ``json`` for what orjson refuses, so the
relay accepts what it accepted before and writes compact UTF-8."""

from __future__ import annotations

import json
import math
import random

import pytest

from virtual_llms import jsonio


def test_a_document_reads_as_json_reads_it() -> None:
    text = '{"a": [1, 2.5, -0.0001, true, null], "é": "✓ 🚀", "n": 9007199254740993}'
    assert jsonio.loads(text) == json.loads(text)
    assert jsonio.loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize(
    "document",
    [
        b"[NaN, Infinity, -Infinity]",  # not JSON, but json reads them, and so did the broker
        b'\xef\xbb\xbf{"bom": 1}',  # a UTF-8 byte order mark
        '{"utf16": 1}'.encode("utf-16"),
        b'["\\ud800"]',  # a lone surrogate
    ],
)
def test_what_orjson_refuses_is_read_by_json(document: bytes) -> None:
    got = jsonio.loads(document)
    want = json.loads(document)
    assert repr(got) == repr(want)  # repr: NaN is not equal to itself


@pytest.mark.parametrize("document", [b"", b"{", b'{"a": 1,}', b"nope", b'{"a": "\xff"}'])
def test_what_is_not_json_raises_what_json_raises(document: bytes) -> None:
    with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)) as got:
        jsonio.loads(document)
    with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)) as want:
        json.loads(document)
    assert type(got.value) is type(want.value)
    assert str(got.value) == str(want.value)


def test_output_is_compact_utf8_and_reads_back_the_same() -> None:
    value = {"text": "héllo ✓ 🚀", "list": [1, 2.5, None, True], "nested": {"k": "v"}}
    out = jsonio.dumps(value)
    assert out == '{"text":"héllo ✓ 🚀","list":[1,2.5,null,true],"nested":{"k":"v"}}'.encode()
    assert jsonio.dumps_str(value) == out.decode()
    assert json.loads(out) == value


def test_floats_survive_a_round_trip_exactly() -> None:
    rng = random.Random(3)
    floats = [rng.uniform(-1, 1) * 10 ** rng.randint(-30, 30) for _ in range(2000)]
    assert jsonio.loads(jsonio.dumps(floats)) == floats
    assert jsonio.loads(json.dumps(floats)) == floats


@pytest.mark.parametrize(
    "value",
    [
        {"big": 2**64},  # past orjson's 64 bits
        {"surrogate": "\ud800"},
        {1: "a key that is not a string"},
    ],
)
def test_what_orjson_cannot_write_is_written_by_json(value: object) -> None:
    assert jsonio.dumps(value) == json.dumps(value, separators=(",", ":")).encode()


def test_the_documented_differences() -> None:
    # An integer past 64 bits reads as a float; a float that is not finite writes as null.
    assert jsonio.loads(b"[18446744073709551616]") == [18446744073709551616.0]
    assert jsonio.dumps([math.nan, math.inf]) == b"[null,null]"


def test_an_sse_line_holds_no_line_break_of_any_kind() -> None:
    value = {"text": "a\x85b\u2028c\u2029d\ne\rf é ✓"}
    line = jsonio.dumps_line(value)
    assert line.splitlines() == [line]  # what httpx's line reader splits on
    assert json.loads(line) == value
    assert "é ✓" in line  # other text stays UTF-8
