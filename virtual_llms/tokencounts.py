"""The token counts an answer reports in its OpenAI ``usage`` object, found without parsing the
whole answer: a search for ``"usage"`` from the end (an embeddings answer is hundreds of KiB;
the object is at its end) and two small patterns on what follows it.

A quote inside a JSON string is escaped (``\\"usage\\"``), so ``"usage"`` is only ever a key.
Chat and text completions and embeddings say ``prompt_tokens`` / ``completion_tokens``; the
Responses API says ``input_tokens`` / ``output_tokens``.
"""

from __future__ import annotations

import re
from typing import Protocol

# How much of the text after the key the counts are looked for in: the usage object with its
# ``*_details`` objects fits, a following choice or message does not.
WINDOW = 512

_PROMPT = re.compile(r'"(?:prompt|input)_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(r'"(?:completion|output)_tokens"\s*:\s*(\d+)')
_PROMPT_B = re.compile(_PROMPT.pattern.encode())
_COMPLETION_B = re.compile(_COMPLETION.pattern.encode())


class Counted(Protocol):
    prompt_tokens: int | None
    completion_tokens: int | None


def note_body(out: Counted, body: bytes) -> None:
    """Record the counts a whole answer's body reports, if it reports any."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return
    window = body[at : at + WINDOW]
    prompt = _PROMPT_B.search(window)
    completion = _COMPLETION_B.search(window)
    if prompt is not None:
        out.prompt_tokens = int(prompt.group(1))
    if completion is not None:
        out.completion_tokens = int(completion.group(1))


def note_chunk(out: Counted, data: str) -> None:
    """Record the counts a streamed chunk reports (the usage chunk a client asked for with
    ``stream_options.include_usage``, or that the upstream sends anyway); the last one
    counts."""
    at = data.rfind('"usage"')
    if at < 0:
        return
    window = data[at : at + WINDOW]
    prompt = _PROMPT.search(window)
    completion = _COMPLETION.search(window)
    if prompt is not None:
        out.prompt_tokens = int(prompt.group(1))
    if completion is not None:
        out.completion_tokens = int(completion.group(1))
