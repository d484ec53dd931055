"""The broker's messages, typed: task frames sent down a control stream, the task events a
waiting request receives, the hub messages that cross the channel layer between workers,
and the publisher's answers (result, chunks, error) parsed once at the edge.

Hub messages arrive as plain dicts from the channel layer; :func:`hub_message` checks the
type of each once as it comes in, so a mistyped or unknown message is an error raised at the
edge (a bug a test catches), not a log line deep in the router.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict, TypeGuard

from .errors import ApiError

# --- frames sent down a control stream (PROTOCOL.md "The control stream") ------------------


class InferFrame(TypedDict):
    kind: Literal["infer"]
    taskId: str
    llmName: str
    streaming: bool
    endpoint: str
    body: dict[str, Any]


class WakeFrame(TypedDict):
    kind: Literal["wake"]
    taskId: str
    llmName: str


class CancelFrame(TypedDict):
    kind: Literal["cancel"]
    taskId: str


TaskFrame = InferFrame | WakeFrame
Frame = InferFrame | WakeFrame | CancelFrame


# --- events of one task, for the request waiting on it -------------------------------------


class Chunk(TypedDict):
    data: str
    done: bool


class ResultEvent(TypedDict):
    kind: Literal["result"]
    status: int
    # The body as JSON bytes, written to the client as they are (answers.post_result).
    json: bytes


class ChunksEvent(TypedDict):
    kind: Literal["chunks"]
    chunks: list[Chunk]


class ErrorEvent(TypedDict):
    kind: Literal["error"]
    status: int
    code: str
    message: str


class FailoverEvent(TypedDict):
    """Not from the publisher: the task's stream went away before it sent anything, so the
    request sends it again to another backend (inference.py)."""

    kind: Literal["failover"]
    reason: str


TaskEvent = ResultEvent | ChunksEvent | ErrorEvent | FailoverEvent


def error_event(status: int, code: str, message: str) -> ErrorEvent:
    return {"kind": "error", "status": status, "code": code, "message": message}


def error_of(event: ErrorEvent) -> ApiError:
    return ApiError(event["status"], event["code"], event["message"])


# --- hub messages (the channel layer; docs/design.md "One hub per process") ----------------


class TaskPush(TypedDict):
    """A task frame for the control stream of session ``sid`` held by the receiving hub."""

    type: Literal["task.push"]
    sid: str
    epoch: str
    hops: int
    frame: TaskFrame
    reply: str
    tokenId: int
    # The upstream model of each backend whose model differs from the one in frame["body"].
    models: NotRequired[dict[str, str]]


class TaskCancel(TypedDict):
    type: Literal["task.cancel"]
    sid: str
    epoch: str
    taskId: str


class TaskEventMessage(TypedDict):
    type: Literal["task.event"]
    taskId: str
    event: TaskEvent


class StreamReplace(TypedDict):
    type: Literal["stream.replace"]
    sid: str
    epoch: str


class SessionClosed(TypedDict):
    type: Literal["session.closed"]
    sid: str
    epoch: str


class TokenRevoked(TypedDict):
    type: Literal["token.revoked"]
    tokenId: int


class LlmEvicted(TypedDict):
    type: Literal["llm.evicted"]
    llmId: str


class BackendEvicted(TypedDict):
    type: Literal["backend.evicted"]
    llmId: str
    sid: str


class MessagesLost(TypedDict):
    """Redis dropped the subscription of the hub ``channel``, noticed at ``at`` (Unix time):
    tasks sent to its streams before then may not have reached them (subscription.py)."""

    type: Literal["messages.lost"]
    channel: str
    at: float


class QueueReady(TypedDict):
    """A slot of the LLM may be free: the waiter's turn to try (state/routing.py)."""

    type: Literal["queue.ready"]
    llmId: str
    waiter: str


class WakeOutcomeMessage(TypedDict):
    type: Literal["wake.outcome"]
    llmId: str
    epoch: int
    ok: bool
    status: int
    code: str
    message: str


HubMessage = (
    TaskPush
    | TaskCancel
    | TaskEventMessage
    | StreamReplace
    | SessionClosed
    | TokenRevoked
    | LlmEvicted
    | BackendEvicted
    | QueueReady
    | WakeOutcomeMessage
    | MessagesLost
)


def _required(message: type) -> frozenset[str]:
    """The keys a TypedDict requires. Read from its annotations, where this module's
    (postponed, string) annotations mark the optional ones ``NotRequired[...]``: Python 3.11
    computes ``__required_keys__`` without seeing that marker in a string."""
    hints: dict[str, object] = message.__annotations__
    return frozenset(
        key
        for key, hint in hints.items()
        if not str(getattr(hint, "__forward_arg__", hint)).startswith("NotRequired[")
    )


# The keys each hub message carries, by type: what hub_message() checks.
HUB_MESSAGE_KEYS: dict[str, frozenset[str]] = {
    "task.push": _required(TaskPush),
    "task.cancel": _required(TaskCancel),
    "task.event": _required(TaskEventMessage),
    "stream.replace": _required(StreamReplace),
    "session.closed": _required(SessionClosed),
    "token.revoked": _required(TokenRevoked),
    "llm.evicted": _required(LlmEvicted),
    "backend.evicted": _required(BackendEvicted),
    "queue.ready": _required(QueueReady),
    "wake.outcome": _required(WakeOutcomeMessage),
    "messages.lost": _required(MessagesLost),
}


class UnknownMessage(Exception):
    """A hub message of no known type, or missing a key of its type: a bug."""


def hub_message(raw: dict[str, Any]) -> HubMessage:
    """``raw`` as the hub message it is, checked once where it comes in."""
    if not _is_hub_message(raw):
        raise UnknownMessage(f"not a hub message: {sorted(raw)!r} of type {raw.get('type')!r}")
    return raw


def _is_hub_message(raw: dict[str, Any]) -> TypeGuard[HubMessage]:
    keys = HUB_MESSAGE_KEYS.get(str(raw.get("type", "")))
    return keys is not None and keys <= raw.keys()


# --- the publisher's answers (PROTOCOL.md "Task results"), over HTTP or the socket --------

AnswerKind = Literal["result", "chunks", "error"]


class Result(TypedDict):
    status: int
    body: Any


class Chunks(TypedDict):
    chunks: list[Chunk]


class Failure(TypedDict):
    error: str


Answer = Result | Chunks | Failure


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


class AnswerRefused(ApiError):
    """A refused answer that ends its task all the same: a ``result`` whose status is a
    number but cannot be an answer's (1xx would break the client's connection). The
    publisher gets this 400; the client, at once, a 502 with ``client_message``, not a wait
    for the timeout. (A body that is malformed otherwise changes nothing.)"""

    def __init__(self, message: str, client_message: str) -> None:
        super().__init__(400, "invalid_request", message)
        self.client_message = client_message


def parse_result(body: dict[str, Any]) -> Result:
    status = body.get("status")
    if isinstance(status, bool) or not isinstance(status, int):
        raise _invalid("'status' must be an HTTP status (an integer, 200-599).")
    if not 200 <= status <= 599:
        raise AnswerRefused(
            f"'status' must be the HTTP status of an answer (200-599), not {status}.",
            f"The publisher answered with an invalid HTTP status ({status}).",
        )
    if "body" not in body:
        raise _invalid("'body' is required (any JSON value).")
    return {"status": status, "body": body["body"]}


def parse_chunks(body: dict[str, Any]) -> Chunks:
    chunks = body.get("chunks")
    if not isinstance(chunks, list) or not chunks:
        raise _invalid("'chunks' must be a non-empty list.")
    clean: list[Chunk] = []
    for chunk in chunks:
        if not isinstance(chunk, dict) or not isinstance(chunk.get("data"), str):
            raise _invalid("Each chunk needs a string 'data'.")
        done = chunk.get("done", False)
        if not isinstance(done, bool):
            raise _invalid("A chunk's 'done' must be a boolean.")
        clean.append({"data": chunk["data"], "done": done})
    return {"chunks": clean}


def parse_error(body: dict[str, Any]) -> Failure:
    message = body.get("error")
    if not isinstance(message, str) or not message:
        raise _invalid("'error' must be a non-empty string.")
    return {"error": message[:4000]}


PARSERS = {"result": parse_result, "chunks": parse_chunks, "error": parse_error}
