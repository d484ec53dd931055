"""JSON on the relay's paths (the broker's and the publisher agent's): orjson, with the
standard library for what orjson refuses.

Answers pass through several decodes and encodes: the agent reads the upstream's body and
writes its answer, the broker reads that answer and writes it to the client. For a batch of
embeddings (16 x 1,536 floats, 500 KB) ``json`` takes 3.7 ms to read and 8.7 ms to write
on the bench host, orjson 0.6 and 0.4 (docs/benchmarks.md, *Big answers*).

What the standard library accepts is still accepted: input that orjson refuses (``NaN`` and
``Infinity``, a byte order mark, UTF-16 or UTF-32, lone surrogates) is read by ``json``,
which raises its own ``json.JSONDecodeError`` or ``UnicodeDecodeError`` (both
``ValueError``) for what is not JSON at all. Two differences remain, both where JSON
promises nothing (RFC 8259, section 6):

- an integer outside the 64-bit range is read as a float, as JavaScript reads every number;
- a float that is not finite (only ``json`` reads one) is written as ``null``.

What is written is compact UTF-8. An object orjson cannot write (an integer past 64 bits, a
lone surrogate, a key that is not a string) is written by ``json``.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(data: bytes | str) -> Any:
    """The value of a JSON document; ``json.JSONDecodeError`` (or ``UnicodeDecodeError``)
    if it is not one."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


def dumps_str(value: Any) -> str:
    """:func:`dumps` as text."""
    return dumps(value).decode()


# The characters that str.splitlines() ends a line at and JSON may leave raw in a string.
# httpx reads lines that way, so SSE clients built on it (httpx-sse, the openai SDK) would
# cut a data line at one of them. json.dumps escapes them with all non-ASCII; orjson does not.
_LINE_BREAKS = (("\x85", "\\u0085"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def dumps_line(value: Any) -> str:
    """:func:`dumps_str` for one SSE ``data:`` line: the JSON holds no character that any
    line splitter reads as a line break (the same value, escaped)."""
    text = dumps_str(value)
    for char, escaped in _LINE_BREAKS:
        if char in text:
            text = text.replace(char, escaped)
    return text
