"""virtual_llms/jsonio.py: orjson where it can, ``json`` for what orjson refuses, so the
relay accepts what it accepted before and writes compact UTF-8."""

from __future__ import annotations

import json
import math
import random

import orjson
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


# --- depth (MCPD_MAX_JSON_DEPTH) ------------------------------------------------------------


def nested(levels: int, width: int = 1, kind: str = "list") -> object:
    """``levels`` levels of lists (or objects), ``width`` numbers beside each inner one."""
    value: object = 0
    for _ in range(levels):
        value = [*range(width), value] if kind == "list" else {"k": value, "w": list(range(width))}
    return value


@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("width", [0, 3, 50])
@pytest.mark.parametrize("limit", [1, 5, 64, 128, 253, 300])
def test_a_document_is_refused_exactly_when_it_nests_deeper_than_the_limit(
    kind: str, width: int, limit: int
) -> None:
    """Around the limit, through each of within_depth's ways (the bracket count, the walk,
    orjson's write limit, the full walk past it)."""
    for levels in (limit - 1, limit, limit + 1, limit + 40):
        value = nested(levels, width, kind)
        doc = json.dumps(value)
        assert jsonio.depth(jsonio.loads(doc)) == jsonio.depth(value)
        if jsonio.depth(value) <= limit:
            assert jsonio.loads(doc, limit) == value
        else:
            with pytest.raises(jsonio.TooDeep) as refused:
                jsonio.loads(doc, limit)
            assert str(refused.value) == f"nested deeper than {limit} levels"


def test_depth_counts_containers() -> None:
    values: list[object] = [1, "[[", [], {}, [1], [[1], [[]]], {"a": [{}]}]
    assert [jsonio.depth(v) for v in values] == [0, 0, 1, 1, 1, 3, 3]


def test_random_documents_are_judged_as_their_depth_says() -> None:
    rng = random.Random(25)

    def grow(level: int, budget: list[int]) -> object:
        budget[0] -= 1
        if budget[0] < 0 or level > 180 or rng.random() < 0.05:
            return rng.choice([1, "[{", 2**70, None, 1.5])  # 2**70: orjson cannot write it
        width = rng.choice([1, 1, 1, 2, 3])
        if rng.random() < 0.5:
            return [grow(level + 1, budget) for _ in range(width)]
        return {str(i): grow(level + 1, budget) for i in range(width)}

    seen = set()
    for _ in range(200):
        value = grow(0, [rng.choice([50, 400, 3000])])
        doc = json.dumps(value)
        limit = rng.choice([2, 10, 40, 128, 200])
        want = jsonio.depth(value) <= limit
        assert jsonio.within_depth(json.loads(doc), doc, limit) is want
        assert jsonio.within_depth(json.loads(doc), doc.encode(), limit) is want
        seen.add(want)
    assert seen == {True, False}


@pytest.mark.parametrize("levels", [1025, 2000, 100_000])
@pytest.mark.parametrize("limit", [None, 128])
def test_past_orjsons_reach_a_document_is_too_deep_never_a_recursion_error(
    levels: int, limit: int | None
) -> None:
    for doc in ("[" * levels + "]" * levels, '{"a":' * levels + "1" + "}" * levels):
        with pytest.raises(jsonio.TooDeep):
            jsonio.loads(doc, limit)
        with pytest.raises(json.JSONDecodeError):  # what every caller already catches
            jsonio.loads(doc.encode(), limit)


def test_what_only_json_reads_is_checked_for_depth_too() -> None:
    doc = "[" * 200 + "NaN" + "]" * 200  # orjson refuses NaN; json reads it
    assert jsonio.depth(jsonio.loads(doc)) == 200
    with pytest.raises(jsonio.TooDeep):
        jsonio.loads(doc, 128)
    with pytest.raises(jsonio.TooDeep):  # deeper than json can recurse
        jsonio.loads("[" * 5000 + "NaN" + "]" * 5000)


def test_orjsons_write_limit_is_found_not_assumed() -> None:
    assert jsonio.WRITE_LIMIT > 128  # the default limit is checked by orjson's write
    value: object = 0
    for _ in range(jsonio.WRITE_LIMIT):
        value = [value]
    orjson.dumps(value)
    with pytest.raises(orjson.JSONEncodeError):
        orjson.dumps([value])


def test_an_integer_past_pythons_digit_limit_is_a_json_decode_error() -> None:
    """orjson refuses it and the standard library raised a bare ValueError (a 500 on every
    body route; found by tests/test_fuzz.py)."""
    for doc in (b"9" * 5000, '{"model": ' + "9" * 5000 + "}"):
        with pytest.raises(json.JSONDecodeError, match="4300 digits"):
            jsonio.loads(doc, 128)
    assert jsonio.loads(b"9" * 4000) == int("9" * 4000)  # within the limit: read as before
