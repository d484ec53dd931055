"""The publisher's control socket: the SSE stream's frames as WebSocket text messages, and
results, chunks, errors and heartbeats sent back on the same socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from asgiref.sync import sync_to_async
from asgiref.typing import WebSocketConnectEvent, WebSocketDisconnectEvent
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from . import answers, backpressure, binding, jsonio, services
from .auth import PUBLISHER_ROLES, authenticate, header_from_scope
from .errors import ApiError, unavailable
from .hub import Closing, ControlStream
from .models import ApiToken
from .runtime.channels_layer import NoDatabaseCheckDispatch
from .runtime.django_asgi import ApiASGIHandler

log = logging.getLogger("mcpd.consumers")

# WebSocket close codes (RFC 6455 private range) for refused handshakes, after accept so the
# publisher can read why: 4401 unauthorized, 4403 forbidden, 4404 unknown session.
CLOSE_CODES = {401: 4401, 403: 4403, 404: 4404}
# Frames of one socket handled at once; the next frame is read when one finishes.
MAX_FRAMES_IN_FLIGHT = 64
# Close codes of a socket the broker ends (RFC 6455 private range): reconnect elsewhere at
# once (this worker drains), or another stream took the session; else a normal close.
CLOSING_CODES = {
    Closing.RECONNECT: (4503, "reconnect: the broker worker is draining"),
    Closing.REPLACED: (4409, "replaced by a newer stream for this session"),
}
# When the socket closes, frames still being handed over get this long (then are dropped).
FRAME_DRAIN_SECONDS = 10.0
# At most this many tasks with a lost answer are remembered per socket.
LOST_ANSWERS_KEPT = 10_000


async def refuse(consumer: AsyncWebsocketConsumer, error: ApiError) -> None:
    """Refuse a handshake so the publisher can read why: accepted, one error frame, closed
    with the status's code (4401, 4403, 4404; 4400 for anything else)."""
    await consumer.accept()
    await consumer.send(json.dumps({"type": "error", "error": error.api_body()["error"]}))
    await consumer.close(code=CLOSE_CODES.get(error.status, 4400))


class NoRouteConsumer(NoDatabaseCheckDispatch, AsyncWebsocketConsumer):
    """Every WebSocket path but a session's ``/ws`` (an empty or malformed session id, a
    path with ``/`` in it): refused with 4404 instead of an HTTP 500 from the router."""

    channel_layer_alias = "__mcpd_none__"  # no channel-layer subscription per refusal

    async def websocket_connect(self, message: WebSocketConnectEvent) -> None:
        path = self.scope["path"]
        await refuse(self, ApiError(404, "not_found", f"No WebSocket route {path!r}."))


class ControlSocketConsumer(NoDatabaseCheckDispatch, AsyncWebsocketConsumer):
    # No channel-layer channel of its own: frames come through the process's hub.
    channel_layer_alias = "__mcpd_none__"

    stream: ControlStream | None = None
    token: ApiToken | None = None
    session_id = ""
    pump: asyncio.Task[None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Frames being handled: those of one task one after another (each waits for the
        # task's previous frame), those of different tasks at the same time. Channels hands a
        # consumer its messages one by one, so handling each frame before reading the next
        # would put a Redis round trip per frame in series for every task on the socket.
        self.frames: set[asyncio.Task[None]] = set()
        self.last_frame: dict[str, asyncio.Task[None]] = {}
        # Tasks one of whose answer frames could not be handed over (Redis away): their later
        # frames are refused, so no client gets an answer with a gap (_handle).
        self.lost_answers: set[str] = set()
        self.frame_slots = asyncio.Semaphore(MAX_FRAMES_IN_FLIGHT)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Whatever ends the consumer (a disconnect, or an error daphne answers with 1011),
        # the session is unbound: cleanup must not depend on websocket_disconnect running.
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()

    async def websocket_connect(self, message: WebSocketConnectEvent) -> None:
        self.session_id = self.scope["url_route"]["kwargs"]["session_id"]
        ApiASGIHandler.start_upkeep()  # the heartbeat frames' database connection
        try:
            self.token = await sync_to_async(self._authorize)()
        except ApiError as exc:
            await refuse(self, exc)
            return
        await self.accept()
        backpressure.hold_control_stream(self.scope)
        self.stream = ControlStream(self.session_id, self.token.pk, "ws")
        await binding.stream_open(self.stream)
        await self.send(json.dumps({"type": "ready", "providerSessionId": self.session_id}))
        self.pump = asyncio.create_task(self._pump(self.stream))

    def _authorize(self) -> ApiToken:
        token = authenticate(header_from_scope(self.scope), PUBLISHER_ROLES)
        services.session_get_owned(token=token, session_id=self.session_id)
        return token

    async def _pump(self, stream: ControlStream) -> None:
        try:
            async for frame in binding.stream_frames(stream):
                # Keep-alives are WebSocket pings (manage.py serve: daphne --ping-interval).
                if frame is not None:
                    await self.send(jsonio.dumps_str({"type": "task", **frame}))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("control socket pump failed")
        code, reason = CLOSING_CODES.get(stream.why, (1000, ""))
        await self.close(code=code, reason=reason)

    async def websocket_disconnect(self, message: WebSocketDisconnectEvent) -> None:
        await self._cleanup()
        await super().websocket_disconnect(message)

    async def _cleanup(self) -> None:
        if self.pump is not None:
            self.pump.cancel()
        if self.frames:  # answers that arrived before the close are handed over first
            _, late = await asyncio.wait(set(self.frames), timeout=FRAME_DRAIN_SECONDS)
            for job in late:
                job.cancel()
        if self.stream is not None:
            stream, self.stream = self.stream, None
            try:
                await asyncio.shield(binding.stream_close(stream))
            except Exception:
                log.exception("closing the control socket's session failed")

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        raw = text_data if text_data is not None else bytes_data
        try:
            frame = self._parse(raw)
        except ApiError as exc:
            await self.send(json.dumps(self._protocol_error(exc.message, raw, exc.code)))
            return
        if frame is None:
            return
        await self.frame_slots.acquire()
        task_id = frame.get("taskId") if frame["type"] != "heartbeat" else None
        previous = self.last_frame.get(task_id) if isinstance(task_id, str) else None
        job = asyncio.create_task(self._answer(frame, raw, previous))
        self.frames.add(job)
        if isinstance(task_id, str):
            self.last_frame[task_id] = job
        job.add_done_callback(lambda done: self._frame_done(done, task_id))

    def _frame_done(self, job: asyncio.Task[None], task_id: Any) -> None:
        self.frames.discard(job)
        if isinstance(task_id, str) and self.last_frame.get(task_id) is job:
            del self.last_frame[task_id]
        self.frame_slots.release()

    async def _answer(
        self, frame: dict[str, Any], raw: str | bytes | None, previous: asyncio.Task[None] | None
    ) -> None:
        if previous is not None:
            await asyncio.wait([previous])  # the task's frames keep their order
        try:
            reply = await self._handle(frame)
        except ApiError as exc:
            reply = self._protocol_error(exc.message, raw, exc.code)
        except Exception as exc:
            # A Redis or database hiccup must not kill the socket (and the session with it).
            lost = unavailable(exc)
            if lost is None:
                log.exception("control socket frame failed")
                lost = ApiError(500, "internal_error", "internal error; retry the frame")
            task_id = frame.get("taskId")
            if isinstance(task_id, str) and frame["type"] != "error":
                self._lost_answer(task_id)
            reply = self._protocol_error(lost.message, raw, lost.code)
        if reply is not None:
            with contextlib.suppress(Exception):  # the socket may be gone by now
                await self.send(json.dumps(reply))

    def _lost_answer(self, task_id: str) -> None:
        if len(self.lost_answers) >= LOST_ANSWERS_KEPT:
            self.lost_answers.clear()  # a bound; an outage that long fails by timeouts anyway
        self.lost_answers.add(task_id)

    @staticmethod
    def _protocol_error(message: str, raw: str | bytes | None, code: str) -> dict[str, Any]:
        """A protocol_error, naming the frame's taskId when it had one, so a publisher
        answering over the socket knows which task was refused, and the error's code
        (``task_not_found``: the task is over; stop working on it)."""
        reply: dict[str, Any] = {"type": "protocol_error", "message": message, "code": code}
        try:
            frame = jsonio.loads(raw, settings.MCPD_MAX_JSON_DEPTH) if raw is not None else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            frame = None
        if isinstance(frame, dict) and isinstance(frame.get("taskId"), str):
            reply["taskId"] = frame["taskId"]
        return reply

    def _parse(self, raw: str | bytes | None) -> dict[str, Any] | None:
        """The frame as a JSON object with a ``type``; None before the socket is bound."""
        if self.token is None or self.stream is None:
            return None
        try:
            frame = jsonio.loads(raw, settings.MCPD_MAX_JSON_DEPTH) if raw is not None else None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, "invalid_json", f"Malformed JSON frame: {exc}") from None
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            raise ApiError(400, "invalid_request", "A frame is a JSON object with a 'type'.")
        return frame

    async def _handle(self, frame: dict[str, Any]) -> dict[str, Any] | None:
        assert self.token is not None
        kind = frame["type"]
        if kind == "heartbeat":
            count = await sync_to_async(services.llm_heartbeat)(
                token=self.token, session_id=self.session_id
            )
            return {"type": "heartbeat", "ok": True, "llms": count}
        task_id = frame.get("taskId")
        if not isinstance(task_id, str) or not task_id:
            raise ApiError(400, "invalid_request", f"A '{kind}' frame needs a 'taskId'.")
        if kind not in ("result", "chunks", "error"):
            raise ApiError(400, "invalid_request", f"Unknown frame type '{kind}'.")
        if task_id in self.lost_answers and kind != "error":
            # The frames after a lost one would reach the client with a gap in its answer.
            raise ApiError(
                409,
                "answer_lost",
                "An earlier answer of this task was lost; the task can only end with an error.",
            )
        await answers.answer(kind, token_id=self.token.pk, task_id=task_id, body=frame)
        return None
