"""The publisher's answers to its tasks — result, chunks, error — from any worker, over HTTP
(views.py) or the control socket (consumers.py): each is handed to the request waiting on
the task, wherever that request is served."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import events, jsonio
from .errors import ApiError
from .hub import task_event_message
from .models import is_task_id
from .protocol import (
    PARSERS,
    AnswerKind,
    AnswerRefused,
    Chunk,
    ResultEvent,
    TaskEvent,
    error_event,
)
from .state import get_state

TASK_GONE = "No open task with this id for this publisher."


async def _post(task_id: str, token_id: int, event: TaskEvent, *, take: bool) -> bool:
    """Hand a publisher's answer to the request waiting on the task. False when there is no
    such open task of this token (unknown, finished, cancelled, another token's, or its
    requester died). ``take`` ends the task: it is taken once, and given back if the hand-over
    fails, so the publisher's retry finds it and nothing is lost."""
    if not is_task_id(task_id):
        return False  # no task has it: no round trip
    tasks = get_state().tasks
    message = task_event_message(task_id, event)
    payload = events.layer_payload(message)
    # With the Redis layer, the script that reads the record also publishes the event,
    # unless it is too big for pub/sub (spill.py).
    direct = events.inline(payload)
    record = await (tasks.take if take else tasks.get)(task_id, token_id, direct)
    if record is None:
        return False
    if direct is None:
        try:
            await events.send(record.split(" ", 1)[0], message, payload)
        except BaseException:
            if take:
                await tasks.put(task_id, token_id, record)
            raise
    return True


async def post_result(*, token_id: int, task_id: str, status: int, body: Any) -> bool:
    # The body travels as JSON bytes, which the client's worker writes as they are: neither
    # the channel layer (a deep copy in memory, msgpack through Redis) nor that worker walks
    # a big answer (a batch of embeddings: 25,000 floats) again. result_body() reads it.
    event: ResultEvent = {"kind": "result", "status": status, "json": jsonio.dumps(body)}
    return await _post(task_id, token_id, event, take=True)


def result_body(event: Mapping[str, Any]) -> Any:
    """The body of a ``result`` event (post_result)."""
    return jsonio.loads(event["json"])


async def post_chunks(*, token_id: int, task_id: str, chunks: list[Chunk]) -> bool:
    done = any(chunk["done"] for chunk in chunks)
    return await _post(task_id, token_id, {"kind": "chunks", "chunks": chunks}, take=done)


async def post_error(*, token_id: int, task_id: str, message: str) -> bool:
    event = error_event(502, "publisher_error", message)
    return await _post(task_id, token_id, event, take=True)


async def answer(kind: AnswerKind, *, token_id: int, task_id: str, body: dict[str, Any]) -> None:
    """Check one answer (400 if malformed) and hand it over (404 if there is no such open
    task of this token): the one path of the HTTP endpoints and the socket's frames."""
    try:
        parsed: Any = PARSERS[kind](body)
    except AnswerRefused as exc:
        # A bad body is a 400 as always; an open task of this token also ends, with a 502
        # for its client (an unknown task changes nothing).
        await post_error(token_id=token_id, task_id=task_id, message=exc.client_message)
        raise
    if kind == "result":
        ok = await post_result(
            token_id=token_id, task_id=task_id, status=parsed["status"], body=parsed["body"]
        )
    elif kind == "chunks":
        ok = await post_chunks(token_id=token_id, task_id=task_id, chunks=parsed["chunks"])
    else:
        ok = await post_error(token_id=token_id, task_id=task_id, message=parsed["error"])
    if not ok:
        raise ApiError(404, "task_not_found", TASK_GONE)
