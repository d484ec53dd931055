"""The broker's publisher API over HTTP (PROTOCOL.md "Publisher API" and "Task results").

One :class:`BrokerClient` per agent. It knows one or more broker URLs (daphne workers, or
load balancers); a call whose connection fails goes to the next URL, and the one that
answered becomes the current one.

A task's answers may go to any worker of the broker (PROTOCOL.md: results are POSTs; the
worker that takes one relays it to the client's worker). So with several URLs and no load
balancer in front, the answers are spread: each task's go to one URL picked by its id,
among the current one and those where the session's last heartbeat was taken about as fast
as there (:meth:`BrokerClient.probe`). A URL never proven, far, or whose connection failed
since takes no share; it stays a fallback.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import Sequence
from typing import Any

import httpx

from . import __version__
from .batcher import Chunk
from .logs import log
from .transport import Client, Reply

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
# A probe (the session's heartbeat, sent to each URL) that takes longer leaves that URL out
# of the spread: an answer must not wait on a worker that is slow to reach.
PROBE_TIMEOUT = httpx.Timeout(5.0)
# Nor on one much farther than the stream's URL (another region's, listed as a fallback): a
# URL takes a share only if its probe took at most twice the stream URL's, plus this. Workers
# side by side differ by a few milliseconds, a region away by tens.
NEAR_SECONDS = 0.025


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
        # URLs other than the current one that took this session's last heartbeat.
        self.proven: set[str] = set()
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

    async def _send(
        self, url: str, path: str, body: dict[str, Any], timeout: httpx.Timeout
    ) -> Reply:
        # The client's headers (the token) go with every request.
        return await self.http.post_json(f"{url}{path}", headers={}, json=body, timeout=timeout)

    async def post(
        self, path: str, body: dict[str, Any], *, urls: Sequence[str] | None = None
    ) -> Reply:
        """POST to the current broker URL (or to ``urls`` in that order); when the connection
        fails, to the others in turn."""
        error: httpx.HTTPError | None = None
        for i in range(len(self.urls)):
            url = self.url if urls is None else urls[i]
            try:
                return await self._send(url, path, body, self.timeout)
            except NOT_SENT as exc:
                log.debug("broker %s unreachable (%s); trying the next one", url, exc)
                error = exc
                if url in self.proven:
                    self.proven.discard(url)
                    log.warning("broker %s unreachable: it takes no answers for now", url)
                self.rotate(url)
        assert error is not None
        raise error

    def answer_urls(self, task_id: str) -> list[str]:
        """Where a task's answers go: the URL its id picks among the current one and the
        proven ones (so they all go to one worker, in order); should its connection fail,
        the other shares, then the rest."""
        current = self.url
        shares = [url for url in self.urls if url == current or url in self.proven]
        first = shares[zlib.crc32(task_id.encode()) % len(shares)]
        rest = [url for url in self.urls if url not in shares]
        return [first, *(url for url in shares if url != first), *rest]

    async def probe(self, session_id: str) -> None:
        """Send the session's heartbeat to every URL, the current one too, at once. Another
        URL that takes it (200) reaches the broker that holds the session; if it also
        answers about as fast as the current one (:data:`NEAR_SECONDS`), it takes a share of
        the answers. The others (unreachable, slow, far, or a broker that does not know the
        session) do not."""
        if len(self.urls) == 1:
            return
        current = self.url
        urls = [current, *(url for url in self.urls if url != current)]
        body = {"providerSessionId": session_id}

        async def took(url: str) -> float | None:
            started = time.monotonic()
            try:
                response = await self._send(url, "/api/v1/virtual/heartbeat", body, PROBE_TIMEOUT)
            except httpx.HTTPError as exc:
                log.debug("broker %s takes no answers: %r", url, exc)
                return None
            if response.status_code != 200:
                log.debug("broker %s takes no answers: %s", url, response.status_code)
                return None
            return time.monotonic() - started

        times = dict(zip(urls, await asyncio.gather(*map(took, urls)), strict=True))
        answered = [seconds for seconds in times.values() if seconds is not None]
        reference = times[current]
        if reference is None:  # the stream's URL did not answer: the fastest one is the mark
            reference = min(answered, default=0.0)
        before = set(self.proven)
        for url in urls[1:]:
            seconds = times[url]
            if seconds is not None and seconds <= 2 * reference + NEAR_SECONDS:
                self.proven.add(url)
            else:
                if seconds is not None:
                    log.debug("broker %s takes no answers: %.3f s away", url, seconds)
                self.proven.discard(url)
        if self.proven != before:
            shares = [url for url in self.urls if url == current or url in self.proven]
            log.info(
                "answers go to %d of %d broker URLs: %s", len(shares), len(urls), ", ".join(shares)
            )

    async def _call(
        self,
        path: str,
        body: dict[str, Any],
        ok: int = 200,
        *,
        urls: Sequence[str] | None = None,
    ) -> Reply:
        response = await self.post(path, body, urls=urls)
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
                await self._call(path, body, ok=204, urls=self.answer_urls(task_id))
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
