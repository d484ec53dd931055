"""JSON on the relay's paths (the broker's and the publisher agent's): orjson, with the
standard library for what orjson refuses.

Answers pass through several decodes and encodes: the agent reads the upstream's body and
writes its answer, the broker reads that answer and writes it to the client. For a batch of
embeddings (16 x 1,536 floats, 500 KB) ``json`` takes 3.7 ms to read and 8.7 ms to write
on the bench host, orjson 0.6 and 0.4 (docs/benchmarks.md, *Big answers*).

What the standard library accepts is still accepted: input that orjson refuses (``NaN`` and
``Infinity``, a byte order mark, UTF-16 or UTF-32, lone surrogates) is read by ``json``,
which raises its own ``json.JSONDecodeError`` or ``UnicodeDecodeError`` (both
``ValueError``) for what is not JSON at all, and a ``JSONDecodeError`` too for an integer
of more than 4,300 digits (Python's ``sys.int_info.default_max_str_digits``, where ``json``
raised a bare ``ValueError``). Two differences remain, both where JSON
promises nothing (RFC 8259, section 6):

- an integer outside the 64-bit range is read as a float, as JavaScript reads every number;
- a float that is not finite (only ``json`` reads one) is written as ``null``.

What is written is compact UTF-8. An object orjson cannot write (an integer past 64 bits, a
lone surrogate, a key that is not a string) is written by ``json``.

Depth: a document nested deeper than ``max_depth`` (the broker passes MCPD_MAX_JSON_DEPTH)
is refused with :class:`TooDeep`, a ``json.JSONDecodeError``, and so is one deeper than
orjson reads (1,024 levels) whatever ``max_depth`` says: the standard library is never
left to recurse through it (it would raise RecursionError). A document with no more
opening brackets than ``max_depth`` (found with ``find``, memchr) needs no more; past that,
a small value is walked and a big one written once by orjson inside enough lists to reach
orjson's own write limit, which it refuses exactly when the value is too deep
(docs/design.md, *Hostile input*).
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson


class TooDeep(json.JSONDecodeError):
    """A JSON document nested deeper than the limit."""

    def __init__(self, limit: int, doc: bytes | str) -> None:
        text = doc if isinstance(doc, str) else ""
        super().__init__(f"nested deeper than {limit} levels", text, 0)
        self.limit = limit

    def __str__(self) -> str:
        return self.msg


def loads(data: bytes | str, max_depth: int | None = None) -> Any:
    """The value of a JSON document; ``json.JSONDecodeError`` (or ``UnicodeDecodeError``)
    if it is not one, :class:`TooDeep` if it nests deeper than ``max_depth``."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc):  # "depth limit exceeded": orjson reads 1,024 levels
            raise TooDeep(min(max_depth or READ_LIMIT, READ_LIMIT), data) from None
        try:
            value = json.loads(data)
        except RecursionError:
            raise TooDeep(min(max_depth or READ_LIMIT, READ_LIMIT), data) from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise
        except ValueError as exc:  # an integer of more than 4,300 digits (sys.int_info)
            raise json.JSONDecodeError(str(exc), data if isinstance(data, str) else "", 0) from None
    if max_depth is not None and not within_depth(value, data, max_depth):
        raise TooDeep(max_depth, data)
    return value


def _write_limit() -> int:
    """How deep orjson writes (254 levels in orjson 3): found once, so an upgrade that moves
    it cannot make :func:`within_depth` wrong."""
    low, high = 1, 4096  # orjson writes ``low`` levels and not ``high``
    while high - low > 1:
        mid = (low + high) // 2
        value: Any = 0
        for _ in range(mid):
            value = [value]
        try:
            orjson.dumps(value)
            low = mid
        except orjson.JSONEncodeError:
            high = mid
    return low


# orjson refuses to read a document deeper than this (its "depth limit exceeded").
READ_LIMIT = 1024
WRITE_LIMIT = _write_limit()


def depth(value: Any) -> int:
    """How deeply ``value`` nests: 0 for a scalar, 1 for ``[]`` or ``[1]``, 2 for ``[[1]]``."""
    level = [value] if isinstance(value, dict | list) else []
    deepest = 0
    while level:
        deepest += 1
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, dict | list)
        ]
    return deepest


# Children looked at by the walk of within_depth() before it hands over to orjson.
WALK_BUDGET = 256


def _walk_at_most(value: Any, limit: int, budget: float) -> bool | None:
    """Whether ``value`` nests at most ``limit`` levels, walked level by level in Python;
    None once more than ``budget`` children were looked at."""
    level = [value]
    spent = 0
    for _ in range(limit):
        deeper = []
        for item in level:
            spent += len(item)
            if spent > budget:
                return None
            for child in item.values() if type(item) is dict else item:
                kind = type(child)
                if kind is dict or kind is list:
                    deeper.append(child)
        if not deeper:
            return True
        level = deeper
    return False


# Below this size counting brackets beats finding them one by one (8 KB: 6 against 16 us).
COUNT_BELOW = 16 * 1024


def _brackets_at_most(doc: bytes | str, limit: int) -> bool:
    """Whether ``doc`` holds at most ``limit`` opening brackets. For a big document ``find``
    (memchr) is about 20 times faster than ``count`` (13 against 300 us for 500 KB), and
    stops at ``limit``."""
    if len(doc) < COUNT_BELOW:
        if isinstance(doc, str):
            return doc.count("[") + doc.count("{") <= limit
        return doc.count(b"[") + doc.count(b"{") <= limit
    found = 0
    for bracket in ("[", "{") if isinstance(doc, str) else (b"[", b"{"):
        at = doc.find(bracket)  # type: ignore[arg-type]  # str in str, bytes in bytes
        while at >= 0:
            found += 1
            if found > limit:
                return False
            at = doc.find(bracket, at + 1)  # type: ignore[arg-type]  # as above
    return True


def within_depth(value: Any, doc: bytes | str, limit: int) -> bool:
    """Whether ``value`` (read from ``doc``) nests at most ``limit`` levels."""
    if _brackets_at_most(doc, limit):  # each level opens a bracket: most documents stop here
        return True
    if type(value) is not dict and type(value) is not list:
        return True  # a string full of brackets
    # A small document is walked (a batch of 64 chunks: 9 us); a big one, or one of many
    # values (a long chat, token ids), is written by orjson inside WRITE_LIMIT - limit lists,
    # which it writes iff the value nests at most ``limit`` levels (300 messages: 29 us
    # against 81 walked; 100,000 token ids: 0.8 ms against 2.5 walked, 3.5 to read).
    walked = _walk_at_most(value, limit, WALK_BUDGET)
    if walked is not None:
        return walked
    if limit < WRITE_LIMIT:
        wrapped = value
        for _ in range(WRITE_LIMIT - limit):
            wrapped = [wrapped]
        try:
            orjson.dumps(wrapped)
            return True
        except orjson.JSONEncodeError as exc:
            if "ecursion" in str(exc):  # "Recursion limit reached"
                return False
            # something else orjson does not write (an integer past 64 bits): walk it all
    return _walk_at_most(value, limit, math.inf) is True


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
