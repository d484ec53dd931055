"""The broker's publisher API over HTTP (PROTOCOL.md "Publisher API" and "Task results").

One :class:`BrokerClient` per agent. It knows one or more broker URLs (daphne workers, or
load balancers); a call whose connection fails goes to the next URL, and the one that
answered becomes the current one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import httpx

from . import __version__
from .batcher import Chunk
from .logs import log
from .transport import Client

USER_AGENT = f"mcpd-publish/{__version__}"
# The request failed before the broker could act on it: safe to send again, elsewhere.
# (The pool drops a kept connection the peer closed before reusing it, so a dead worker
# shows up here as a connect error; transport.py keeps a connection that broke after the
# request went out out of these.)
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# The broker keeps at most this much of an error message.
MAX_MESSAGE = 4000
# A task's last answer (its result, its error, the chunk batch that ends its stream) is sent
# again after these pauses when the connection fails under it (reset, closed unanswered,
# timed out). The broker takes a task's last answer once, so a repeat of one that did arrive
# gets 404 and nothing is relayed twice. Earlier chunk batches are not repeated: one that did
# arrive would reach the client twice.
FINAL_RETRY_PAUSES = (0.05, 0.25, 1.0)
RETRIED = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)


class BrokerError(Exception):
    """The broker refused a call: ``status`` and the contract's ``code`` and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} ({status} {code})" if code else f"{message} ({status})")
        self.status = status
        self.code = code
        self.message = message


class TaskGone(Exception):
    """404 on a task result: unknown, cancelled or finished. Stop working on it."""


def error_of(status: int, body: bytes) -> BrokerError:
    """The contract's ``{"error": {"code", "message"}}``, or whatever came instead."""
    try:
        error = json.loads(body)["error"]
        return BrokerError(status, str(error.get("code", "")), str(error["message"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        text = body.decode(errors="replace").strip()[:300] or httpx.codes.get_reason_phrase(status)
        return BrokerError(status, "", text)


class BrokerClient:
    def __init__(
        self,
        urls: Sequence[str],
        token: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,  # tests: a mock broker
    ) -> None:
        assert urls, "at least one broker URL"
        self.urls = list(urls)
        self._index = 0
        self.token = token
        self.timeout = httpx.Timeout(30.0, connect=10.0)
        self.http = Client(
            headers={"Authorization": f"Bearer {token}", "User-Agent": USER_AGENT},
            timeout=self.timeout,
            limits=httpx.Limits(max_connections=200),
            transport=transport,
        )

    @property
    def url(self) -> str:
        return self.urls[self._index]

    def rotate(self, failed: str | None = None) -> str:
        """Move on to the next URL (unless someone else already moved on from ``failed``)."""
        if failed is None or failed == self.url:
            self._index = (self._index + 1) % len(self.urls)
        return self.url

    async def aclose(self) -> None:
        await self.http.aclose()

    async def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST to the current broker URL; when the connection fails, to the others in turn."""
        error: httpx.HTTPError | None = None
        for _ in self.urls:
            url = self.url
            try:
                # The client's headers (the token) go with every request.
                response = await self.http.direct(
                    "POST", f"{url}{path}", headers={}, json=body, timeout=self.timeout
                )
                try:
                    await response.aread()
                finally:
                    await response.aclose()
                return response
            except NOT_SENT as exc:
                log.debug("broker %s unreachable (%s); trying the next one", url, exc)
                error = exc
                self.rotate(url)
        assert error is not None
        raise error

    async def _call(self, path: str, body: dict[str, Any], ok: int = 200) -> httpx.Response:
        response = await self.post(path, body)
        if response.status_code != ok:
            raise error_of(response.status_code, response.content)
        return response

    # --- registry --------------------------------------------------------------------------

    async def register(
        self, session_id: str | None, providers: list[dict[str, Any]]
    ) -> tuple[str, list[dict[str, Any]]]:
        response = await self._call(
            "/api/v1/virtual/register", {"providerSessionId": session_id, "providers": providers}
        )
        data = response.json()
        return str(data["providerSessionId"]), list(data.get("llms", []))

    async def heartbeat(self, session_id: str) -> int:
        response = await self._call("/api/v1/virtual/heartbeat", {"providerSessionId": session_id})
        return int(response.json().get("llms", 0))

    async def set_status(self, session_id: str, llm_name: str, status: str) -> None:
        await self._call(
            "/api/v1/virtual/status",
            {"providerSessionId": session_id, "llmName": llm_name, "status": status},
        )

    # --- task results ----------------------------------------------------------------------

    async def _task_post(
        self, task_id: str, what: str, body: dict[str, Any], *, final: bool = True
    ) -> None:
        path = f"/api/v1/virtual/tasks/{task_id}/{what}"
        for pause in (*FINAL_RETRY_PAUSES, None) if final else (None,):
            try:
                await self._call(path, body, ok=204)
                return
            except BrokerError as exc:
                if exc.status == 404:
                    raise TaskGone(task_id) from None
                raise
            except RETRIED as exc:
                if pause is None:
                    raise
                log.debug("task %s: %s failed (%r); sending it again", task_id, what, exc)
                await asyncio.sleep(pause)

    async def result(self, task_id: str, status: int, body: Any) -> None:
        await self._task_post(task_id, "result", {"status": status, "body": body})

    async def chunks(self, task_id: str, chunks: list[Chunk]) -> None:
        final = any(chunk.get("done") for chunk in chunks)
        await self._task_post(task_id, "chunks", {"chunks": chunks}, final=final)

    async def error(self, task_id: str, message: str) -> None:
        await self._task_post(task_id, "error", {"error": message[:MAX_MESSAGE] or "failed"})
