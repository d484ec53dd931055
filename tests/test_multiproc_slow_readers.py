"""Peers that stop reading (issue 29 item 4), on three daphne workers with PostgreSQL + Redis,
from the outside. Raw sockets with a small receive buffer make "not reading" real: the
kernel's buffers fill, then the worker's.

- A publisher whose control stream (SSE or WebSocket) stops reading is offline once its sent
  bytes make no progress for MCPD_PUBLISHER_STALL_SECONDS: the task sent to it fails then
  (not at the infer timeout), its row goes inactive, the next call is a 503 at once.
- A client that stops reading a long stream of big chunks is cut once
  MCPD_CLIENT_BUFFER_BYTES wait for it: the publisher gets a cancel, its later chunks a 404,
  and the worker's memory stays flat.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator

import pytest

from tests.cluster import Broker
from tests.conftest import require_services
from tests.contract_publisher import ContractPublisher, chat_answer, chat_chunk
from tests.contract_support import (
    CLIENT_W,
    RESULT_W,
    STREAM_W,
    assert_offline,
    assert_openai_error,
    chat_body,
    get_row,
    http,
    post_chat,
    prime,
    provider,
    publisher,
    uname,
    wait_for,
    wait_status,
)
from tests.slow_peers import open_sse_stream, open_ws_stream, rss_bytes, stop_reading_a_stream

pytestmark = pytest.mark.multiproc
# The stall bound is TCP's user timeout (Linux); the byte bounds hold everywhere.
LINUX = pytest.mark.skipif(sys.platform != "linux", reason="TCP_USER_TIMEOUT is Linux's")

STALL_SECONDS = 2.0
CLIENT_BUFFER = 1024 * 1024
INFER_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def slow_broker() -> Iterator[Broker]:
    require_services()
    broker = Broker(
        3,
        services=True,
        env={
            "MCPD_PUBLISHER_STALL_SECONDS": str(STALL_SECONDS),
            "MCPD_CLIENT_BUFFER_BYTES": str(CLIENT_BUFFER),
            "MCPD_INFER_TIMEOUT_SECONDS": str(INFER_TIMEOUT),
        },
    ).start()
    try:
        yield prime(broker)
    finally:
        broker.stop()


@LINUX
@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_a_publisher_that_stops_reading_goes_offline_within_the_stall_bound(
    slow_broker: Broker, transport: str
) -> None:
    b = slow_broker
    name = uname(f"stall-{transport}")
    token = b.token("publisher")
    pub = ContractPublisher(b.url(STREAM_W), token)
    try:
        registered = await pub.register([provider(name)])
        assert registered.status_code == 200, registered.text
        assert pub.session_id is not None
        opener = open_sse_stream if transport == "sse" else open_ws_stream
        stream = await asyncio.to_thread(opener, b, STREAM_W, token, pub.session_id)
        try:
            # The publisher reads nothing more. A call with a big prompt: its task frame
            # cannot reach the publisher, whose window is shut.
            started = time.monotonic()
            response = await post_chat(
                b, chat_body(name, "x" * 300_000), timeout=INFER_TIMEOUT + 10
            )
            failed_after = time.monotonic() - started
            # The stream is closed like a disconnected one: the task fails as the contract
            # says for a stream lost mid-task, long before the infer timeout.
            assert_openai_error(response, 502, "publisher_disconnected")
            assert failed_after < STALL_SECONDS + 10, failed_after
            await wait_status(b, name, "inactive", timeout=5.0)
            # The next call is refused at once: the session holds no stream.
            started = time.monotonic()
            refused = await post_chat(b, chat_body(name, "again"), worker=RESULT_W)
            assert_offline(refused)
            assert time.monotonic() - started < 2.0
            print(f"{transport}: the call failed after {failed_after:.2f} s")
        finally:
            stream.close()
    finally:
        await pub.aclose()


async def test_a_client_that_stops_reading_is_cut_and_the_workers_memory_stays_flat(
    slow_broker: Broker,
) -> None:
    b = slow_broker
    name = uname("slowclient")
    worker_pid = b.procs[CLIENT_W].pid  # type: ignore[union-attr]
    async with publisher(b, "sse", [provider(name)]) as pub:
        call = asyncio.create_task(
            asyncio.to_thread(stop_reading_a_stream, b, CLIENT_W, b.token("client"), name)
        )
        frame = await pub.next_frame("infer")
        task_id = frame["taskId"]
        first = await pub.chunks(task_id, [{"data": chat_chunk("hi")}], url=b.url(RESULT_W))
        assert first.status_code == 204, first.text
        client = await asyncio.wait_for(call, 15.0)
        try:
            before = rss_bytes(worker_pid)
            peak = before
            # Up to 64 MiB of big chunks, 256 KiB per POST; the broker refuses them (404)
            # once it has cut the client.
            big = chat_chunk("x" * 16_000)
            batch = [{"data": big} for _ in range(16)]
            sent = 0
            refused = False
            while sent < 64 * 1024 * 1024:
                answered = await pub.chunks(task_id, batch, url=b.url(RESULT_W))
                peak = max(peak, rss_bytes(worker_pid))
                if answered.status_code == 404:
                    refused = True
                    break
                assert answered.status_code == 204, answered.text
                sent += len(big) * len(batch)
            assert refused, f"{sent} bytes relayed to a client that reads nothing"
            cancel = await pub.next_frame("cancel", timeout=10.0)
            assert cancel["taskId"] == task_id

            async def slot_freed() -> bool:
                row = await get_row(b, name)
                return row is not None and row["backends"][0]["inFlight"] == 0

            await wait_for(slot_freed, timeout=5.0)
            # What the kernel holds (a few MiB on loopback) plus the bound, then nothing more.
            assert sent < 16 * 1024 * 1024, sent
            growth = peak - before
            assert growth < 40 * 1024 * 1024, growth
            print(f"cut after {sent / 2**20:.1f} MiB; worker RSS +{growth / 2**20:.1f} MiB")
        finally:
            client.close()


@LINUX
async def test_a_stalled_backend_of_a_pool_fails_over_before_the_first_byte(
    slow_broker: Broker,
) -> None:
    """The stall is a lost stream: the task that relayed nothing goes to the pool's other
    backend, and the client sees only the answer."""
    b = slow_broker
    name = uname("stallpool")
    token = b.token("publisher")
    stalled = ContractPublisher(b.url(STREAM_W), token)
    try:
        # The stalled box has no limit, so it has the most free slots and takes the task.
        assert (await stalled.register([provider(name, pool=True)])).status_code == 200
        assert stalled.session_id is not None
        stream = await asyncio.to_thread(open_sse_stream, b, STREAM_W, token, stalled.session_id)
        try:
            async with publisher(
                b, "sse", [provider(name, pool=True, maxConcurrency=1)], worker=RESULT_W
            ) as healthy:

                async def answer(frame: dict[str, object]) -> None:
                    if frame.get("kind") == "infer":
                        await healthy.result(str(frame["taskId"]), 200, chat_answer("ok"))

                healthy.serve(answer)
                started = time.monotonic()
                response = await post_chat(
                    b, chat_body(name, "x" * 300_000), timeout=INFER_TIMEOUT + 10
                )
                assert response.status_code == 200, response.text
                assert response.json() == chat_answer("ok")
                assert time.monotonic() - started < STALL_SECONDS + 10
        finally:
            stream.close()
    finally:
        await stalled.aclose()


async def test_a_client_that_reads_gets_a_stream_far_over_the_bound_whole(
    slow_broker: Broker,
) -> None:
    """The bound is on what waits for a client, not on what it is sent: 8 MiB of chunks
    (eight times the bound) reach a client that reads them. The publisher keeps at most two
    batches (512 KB) ahead of what the client has read (this test's one process plays
    both, and a client slower than its publisher by more than the bound is cut, by design)."""
    b = slow_broker
    name = uname("bigstream")
    big = chat_chunk("y" * 16_000)
    batches = 32
    received = 0
    read = asyncio.Condition()
    async with publisher(b, "sse", [provider(name)]) as pub:

        async def answer(frame: dict[str, object]) -> None:
            if frame.get("kind") != "infer":
                return
            task_id = str(frame["taskId"])
            for i in range(batches):
                ahead = (i - 2) * 16
                async with read:
                    await read.wait_for(lambda: received >= ahead)  # noqa: B023 - awaited here
                chunks: list[dict[str, object]] = [{"data": big} for _ in range(16)]
                if i == batches - 1:
                    chunks.append({"data": "[DONE]", "done": True})
                posted = await pub.chunks(task_id, chunks, url=b.url(RESULT_W))
                assert posted.status_code == 204, posted.text

        pub.serve(answer)
        async with (
            http(b.token("client"), timeout=60.0) as client,
            client.stream(
                "POST",
                f"{b.url(CLIENT_W)}/v1/chat/completions",
                json=chat_body(name, "stream", stream=True),
            ) as response,
        ):
            assert response.status_code == 200
            last = ""
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    received += 1
                    async with read:
                        read.notify_all()
                    last = line
        assert received == batches * 16 + 1
        assert last == "data: [DONE]"


@pytest.fixture(scope="module")
def bytes_broker() -> Iterator[Broker]:
    """The byte bound of control streams alone (no stall bound)."""
    require_services()
    broker = Broker(
        3,
        services=True,
        env={
            "MCPD_PUBLISHER_STALL_SECONDS": "0",
            "MCPD_PUBLISHER_BUFFER_BYTES": str(1024 * 1024),
            "MCPD_INFER_TIMEOUT_SECONDS": str(INFER_TIMEOUT),
        },
    ).start()
    try:
        yield prime(broker)
    finally:
        broker.stop()


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_a_publisher_that_stops_reading_goes_offline_past_the_byte_bound(
    bytes_broker: Broker, transport: str
) -> None:
    """Task frames that keep coming for a publisher that reads nothing: once the kernel's
    buffers are full and 1 MiB waits behind them, the stream is closed and unbound."""
    b = bytes_broker
    name = uname(f"full-{transport}")
    token = b.token("publisher")
    pub = ContractPublisher(b.url(STREAM_W), token)
    try:
        assert (await pub.register([provider(name)])).status_code == 200
        assert pub.session_id is not None
        opener = open_sse_stream if transport == "sse" else open_ws_stream
        stream = await asyncio.to_thread(opener, b, STREAM_W, token, pub.session_id)
        try:
            started = time.monotonic()
            # About 8 MB of task frames: more than the kernel holds (a few MB) plus 1 MiB.
            calls = [
                post_chat(b, chat_body(name, "x" * 300_000), timeout=INFER_TIMEOUT + 10)
                for _ in range(28)
            ]
            answers = await asyncio.gather(*calls)
            failed_after = time.monotonic() - started
            codes = {response.status_code for response in answers}
            assert codes <= {502, 503}, [response.text[:200] for response in answers]
            # Those sent before the close fail as a lost stream's tasks; those after find no
            # stream.
            lost = [response for response in answers if response.status_code == 502]
            assert lost, [response.text[:200] for response in answers]
            for response in lost:
                assert_openai_error(response, 502, "publisher_disconnected")
            assert failed_after < INFER_TIMEOUT / 2, failed_after
            await wait_status(b, name, "inactive", timeout=5.0)
            path = f"/api/v1/virtual/sessions/{pub.session_id}/"
            path += "stream" if transport == "sse" else "ws"
            closed = "closed a connection whose peer stopped reading"
            assert any(
                closed in line and line.endswith(path)
                for line in b.log(STREAM_W, None).splitlines()
            ), b.log(STREAM_W)
            print(f"{transport}: {len(lost)} calls lost, all failed after {failed_after:.2f} s")
        finally:
            stream.close()
    finally:
        await pub.aclose()
