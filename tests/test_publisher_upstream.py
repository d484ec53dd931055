"""The fake OpenAI-compatible upstream the publisher tests run against, and the tests of the
agent's upstream half (virtual_llms/publisher/upstream.py) against it, without a broker.

FakeUpstream is a stdlib ``ThreadingHTTPServer``: non-streaming chat/completions,
completions and embeddings, a slow streaming mode, an error mode, a readiness URL tied to a
flag file (for sleep/wake), and a record of every request and of every client that hung up
mid-stream. The last user message steers it:

    "slow:<n>:<seconds>[:<tag>]"   stream n chunks, one every <seconds>
    "fail:<status>"        answer <status> with an OpenAI-shaped error
    "nodone:<n>"           stream n chunks and end without [DONE]
    "linger:<seconds>"     stream, but keep the body open that long after [DONE]
    anything else          echo it ("echo: <text>"), streamed word by word when asked
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from virtual_llms.publisher import transport
from virtual_llms.publisher.batcher import Chunk
from virtual_llms.publisher.config import LlmConfig
from virtual_llms.publisher.upstream import forward

# --- the fake upstream ---------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    path: str
    body: dict[str, Any]
    authorization: str | None
    peer: int = 0  # the client's port: one per connection


class FakeUpstream:
    def __init__(self, *, awake_flag: Path | None = None) -> None:
        self.awake_flag = awake_flag  # None: always awake
        self.seen: list[Seen] = []
        self.hangups: list[str] = []  # the prompt of each stream whose client hung up
        self.completed: list[str] = []  # the prompt of each stream sent to its end
        self.lock = threading.Lock()
        upstream = self

        class Handler(_Handler):
            owner = upstream

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeUpstream:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def awake(self) -> bool:
        return self.awake_flag is None or self.awake_flag.exists()

    def record(self, seen: Seen) -> None:
        with self.lock:
            self.seen.append(seen)

    def prompts(self) -> list[str]:
        with self.lock:
            return [prompt_of(s.body) for s in self.seen]

    def wait_for(self, what: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s; seen {self.prompts()}")
            time.sleep(0.05)


def prompt_of(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        return str(messages[-1].get("content", ""))
    return str(body.get("prompt", body.get("input", "")))


def chat_body(model: str, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def chat_chunk(model: str, text: str | None) -> str:
    delta = {"content": text} if text is not None else {}
    return json.dumps(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": model,
            "choices": [
                {"index": 0, "delta": delta, "finish_reason": None if text is not None else "stop"}
            ],
        }
    )


class HungUp(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    owner: FakeUpstream
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet

    def _json(self, status: int, body: Any) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            if not self.owner.awake():
                self._json(503, {"error": {"message": "asleep"}})
                return
            self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        self.owner.record(
            Seen(self.path, body, self.headers.get("Authorization"), self.client_address[1])
        )
        if not self.owner.awake():
            self._json(503, {"error": {"message": "the model is asleep"}})
            return
        prompt = prompt_of(body)
        model = str(body.get("model"))
        if prompt.startswith("fail:"):
            status = int(prompt.split(":")[1])
            self._json(status, {"error": {"message": f"upstream says {status}", "type": "x"}})
        elif self.path == "/v1/embeddings":
            inputs = body.get("input")
            count = len(inputs) if isinstance(inputs, list) else 1
            data = [
                {"object": "embedding", "index": i, "embedding": [float(i), 0.5, -1.0]}
                for i in range(count)
            ]
            self._json(200, {"object": "list", "data": data, "model": model, "usage": {}})
        elif self.path in ("/v1/chat/completions", "/v1/completions"):
            if body.get("stream"):
                self._stream(model, prompt)
            else:
                self._json(200, chat_body(model, f"echo: {prompt}"))
        else:
            self._json(404, {"error": {"message": f"no route {self.path}"}})

    def _stream(self, model: str, prompt: str) -> None:
        words, delay, done, linger = [f"echo: {prompt}"], 0.0, True, 0.0
        if prompt.startswith("linger:"):
            words, linger = ["w0 "], float(prompt.split(":")[1])
        elif prompt.startswith("slow:"):
            _, n, seconds, *_ = prompt.split(":")
            words, delay = [f"w{i} " for i in range(int(n))], float(seconds)
        elif prompt.startswith("nodone:"):
            words, done = [f"w{i} " for i in range(int(prompt.split(":")[1]))], False
        else:
            words = [f"{w} " for w in f"echo: {prompt}".split(" ")]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = [chat_chunk(model, w) for w in words] + [chat_chunk(model, None)]
        if done:
            events.append("[DONE]")
        try:
            for event in events:
                self._chunk(f"data: {event}\n\n".encode())
                if delay:
                    self._pause(delay)
            if linger:
                self._pause(linger)
            self._chunk(b"")
        except HungUp:
            with self.owner.lock:
                self.owner.hangups.append(prompt)
            self.close_connection = True
            return
        with self.owner.lock:
            self.owner.completed.append(prompt)

    def _chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        except OSError as exc:
            raise HungUp() from exc

    def _pause(self, seconds: float) -> None:
        """Sleep, but notice at once when the client closes the connection."""
        sock: socket.socket = self.connection
        readable, _, _ = select.select([sock], [], [], seconds)
        if readable:
            try:
                if sock.recv(1, socket.MSG_PEEK) == b"":
                    raise HungUp()
            except OSError as exc:
                raise HungUp() from exc


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


# --- the agent's upstream half, against it ------------------------------------------------------


class RecordingSink:
    """Collects what the agent would post to the broker; ``slow`` delays each chunk POST."""

    def __init__(self, slow: float = 0.0, gone_after: int | None = None) -> None:
        self.results: list[tuple[int, Any]] = []
        self.posts: list[list[Chunk]] = []
        self.errors: list[str] = []
        self.slow = slow
        self.gone_after = gone_after
        self.in_flight = 0
        self.max_in_flight = 0
        self.posted = asyncio.Event()

    async def result(self, status: int, body: Any) -> None:
        self.results.append((status, body))

    async def chunks(self, chunks: list[Chunk]) -> None:
        from virtual_llms.publisher.broker import TaskGone

        if self.gone_after is not None and len(self.posts) >= self.gone_after:
            raise TaskGone("t")
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(self.slow)
        self.in_flight -= 1
        self.posts.append(chunks)
        self.posted.set()

    async def error(self, message: str) -> None:
        self.errors.append(message)

    def data(self) -> list[str]:
        return [c["data"] for batch in self.posts for c in batch]


def llm(url: str, **kwargs: Any) -> LlmConfig:
    return LlmConfig(name="fake", model="fake-model", upstream=url, **kwargs)


def infer(text: str, *, stream: bool = False, endpoint: str = "/v1/chat/completions") -> Any:
    body: dict[str, Any] = {"model": "fake-model", "messages": [{"role": "user", "content": text}]}
    if stream:
        body["stream"] = True
    return {
        "kind": "infer",
        "taskId": "t1",
        "streaming": stream,
        "endpoint": endpoint,
        "body": body,
    }


async def test_non_streaming_answer_passes_through(upstream: FakeUpstream) -> None:
    sink = RecordingSink()
    async with transport.client() as http:
        await forward(http, llm(upstream.url, api_key="sekrit"), infer("hello"), sink)
    assert sink.results == [(200, chat_body("fake-model", "echo: hello"))]
    assert upstream.seen[0].path == "/v1/chat/completions"
    assert upstream.seen[0].authorization == "Bearer sekrit"


async def test_upstream_refusal_keeps_status_and_body(upstream: FakeUpstream) -> None:
    for stream in (False, True):
        sink = RecordingSink()
        async with transport.client() as http:
            await forward(http, llm(upstream.url), infer("fail:400", stream=stream), sink)
        assert sink.results == [(400, {"error": {"message": "upstream says 400", "type": "x"}})]
        assert not sink.posts


async def test_stream_is_relayed_in_order_and_ends_with_done(upstream: FakeUpstream) -> None:
    sink = RecordingSink()
    async with transport.client() as http:
        await forward(http, llm(upstream.url), infer("slow:5:0.01", stream=True), sink)
    data = sink.data()
    assert data[-1] == "[DONE]"
    assert sink.posts[-1][-1] == {"data": "[DONE]", "done": True}
    words = [json.loads(d)["choices"][0]["delta"].get("content") for d in data[:-1]]
    assert words == ["w0 ", "w1 ", "w2 ", "w3 ", "w4 ", None]


async def test_stream_without_done_gets_one(upstream: FakeUpstream) -> None:
    sink = RecordingSink()
    async with transport.client() as http:
        await forward(http, llm(upstream.url), infer("nodone:3", stream=True), sink)
    assert sink.data()[-1] == "[DONE]"
    assert sink.data().count("[DONE]") == 1
    assert len(sink.data()) == 5  # three words, the finish chunk, [DONE]


async def test_streams_reuse_the_upstream_connection(upstream: FakeUpstream) -> None:
    """What follows [DONE] (the end of the body) is read, so the connection goes back to the
    pool: one connection for two streams and an answer, not one per stream."""
    async with transport.client() as http:
        for text, stream in (("a b", True), ("c d", True), ("e", False)):
            sink = RecordingSink()
            await forward(http, llm(upstream.url), infer(text, stream=stream), sink)
            assert (sink.data()[-1] if stream else sink.results[0][0]) in ("[DONE]", 200)
    assert len(upstream.seen) == 3
    assert len({seen.peer for seen in upstream.seen}) == 1


async def test_a_body_that_stays_open_after_done_is_dropped_after_a_bound(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    from virtual_llms.publisher import upstream as module

    monkeypatch.setattr(module, "DRAIN_SECONDS", 0.3)
    sink = RecordingSink()
    started = time.monotonic()
    async with transport.client() as http:
        await forward(http, llm(upstream.url), infer("linger:5", stream=True), sink)
    assert time.monotonic() - started < 3.0
    assert sink.data()[-1] == "[DONE]"
    assert not sink.errors
    await asyncio.to_thread(upstream.wait_for, lambda: "linger:5" in upstream.hangups, 5.0)


async def test_slow_posts_batch_what_piles_up(upstream: FakeUpstream) -> None:
    sink = RecordingSink(slow=0.3)
    async with transport.client() as http:
        await forward(http, llm(upstream.url), infer("slow:30:0", stream=True), sink)
    assert len(sink.data()) == 32
    assert sink.max_in_flight == 1
    # What arrives while a POST is in flight piles up and goes in the next one.
    assert len(sink.posts) < len(sink.data())
    assert max(len(batch) for batch in sink.posts) > 1


async def test_an_upstream_silent_past_its_timeout_is_an_error(upstream: FakeUpstream) -> None:
    """The LLM's timeout_seconds reaches the upstream call (a read timeout between chunks)."""
    sink = RecordingSink()
    async with transport.client() as http:
        await forward(
            http, llm(upstream.url, timeout_seconds=0.3), infer("slow:3:2", stream=True), sink
        )
    # Without the timeout the stream would end normally after ~6 s, with no error.
    assert sink.errors == [
        f"upstream of 'fake' sent nothing for 0.3 s ({upstream.url}/chat/completions)"
    ]


async def test_unreachable_upstream_is_an_error_naming_it() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sink = RecordingSink()
    url = f"http://127.0.0.1:{port}/v1"
    async with transport.client() as http:
        await forward(http, llm(url), infer("hi"), sink)
    assert len(sink.errors) == 1
    assert "unreachable" in sink.errors[0]
    assert f"127.0.0.1:{port}" in sink.errors[0]


async def test_task_gone_at_the_broker_hangs_up_on_the_upstream(upstream: FakeUpstream) -> None:
    from virtual_llms.publisher.broker import TaskGone

    sink = RecordingSink(gone_after=1)
    async with transport.client() as http:
        with pytest.raises(TaskGone):
            await forward(http, llm(upstream.url), infer("slow:50:0.1", stream=True), sink)
    await asyncio.to_thread(upstream.wait_for, lambda: "slow:50:0.1" in upstream.hangups, 5.0)


async def test_cancel_hangs_up_on_the_upstream_at_once(upstream: FakeUpstream) -> None:
    sink = RecordingSink()
    async with transport.client() as http:
        job = asyncio.create_task(
            forward(http, llm(upstream.url), infer("slow:100:0.1", stream=True), sink)
        )
        await asyncio.wait_for(sink.posted.wait(), 10)
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
    await asyncio.to_thread(upstream.wait_for, lambda: "slow:100:0.1" in upstream.hangups, 5.0)
    assert not sink.errors


async def test_embeddings_and_refused_endpoint(upstream: FakeUpstream) -> None:
    sink = RecordingSink()
    frame = {
        "kind": "infer",
        "taskId": "t",
        "streaming": False,
        "endpoint": "/v1/embeddings",
        "body": {"model": "fake-model", "input": ["a", "b"]},
    }
    async with transport.client() as http:
        await forward(http, llm(upstream.url), frame, sink)
        await forward(http, llm(upstream.url), {**frame, "endpoint": "/v1/files"}, sink)
    assert sink.results[0][0] == 200
    assert len(sink.results[0][1]["data"]) == 2
    assert sink.errors == ["this publisher does not serve '/v1/files' with that body"]
