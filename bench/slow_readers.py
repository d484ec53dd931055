"""``python -m bench.slow_readers``: peers that stop reading (issue 29 item 4), with the bounds
off (the broker before them) and at their defaults, on 3 workers with PostgreSQL + Redis.

- A publisher whose SSE control stream stops reading: how long a call sent to it waits, and
  whether its row went inactive.
- A client that stops reading a stream: the serving worker's RSS (VmRSS) before and after a
  publisher pushes up to PUSH_BYTES of 16 KB chunks at it, and how much was relayed.
"""

from __future__ import annotations

import asyncio
import time

from tests.cluster import Broker, local_calls_skip_proxies
from tests.contract_publisher import ContractPublisher, chat_chunk
from tests.contract_support import (
    CLIENT_W,
    RESULT_W,
    STREAM_W,
    chat_body,
    get_row,
    post_chat,
    prime,
    provider,
    uname,
)
from tests.slow_peers import open_sse_stream, rss_bytes, stop_reading_a_stream

INFER_TIMEOUT = 30.0
PUSH_BYTES = 64 * 1024 * 1024
OFF = {
    "MCPD_CLIENT_BUFFER_BYTES": "0",
    "MCPD_PUBLISHER_BUFFER_BYTES": "0",
    "MCPD_PUBLISHER_STALL_SECONDS": "0",
}


async def stalled_publisher(b: Broker) -> str:
    name = uname("stall")
    token = b.token("publisher")
    pub = ContractPublisher(b.url(STREAM_W), token)
    try:
        await pub.register([provider(name)])
        assert pub.session_id is not None
        stream = await asyncio.to_thread(open_sse_stream, b, STREAM_W, token, pub.session_id)
        try:
            started = time.monotonic()
            response = await post_chat(b, chat_body(name, "x" * 300_000), timeout=90)
            waited = time.monotonic() - started
            row = await get_row(b, name)
            status = row["status"] if row else "gone"
            return f"call answered {response.status_code} after {waited:.1f} s, row {status}"
        finally:
            stream.close()
    finally:
        await pub.aclose()


async def stalled_client(b: Broker) -> str:
    name = uname("slowclient")
    pid = b.procs[CLIENT_W].pid  # type: ignore[union-attr]
    pub = ContractPublisher(b.url(STREAM_W), b.token("publisher"))
    try:
        await pub.register([provider(name)])
        await pub.connect()
        call = asyncio.create_task(
            asyncio.to_thread(stop_reading_a_stream, b, CLIENT_W, b.token("client"), name)
        )
        task_id = (await pub.next_frame("infer"))["taskId"]
        await pub.chunks(task_id, [{"data": chat_chunk("hi")}], url=b.url(RESULT_W))
        client = await asyncio.wait_for(call, 15.0)
        try:
            before = rss_bytes(pid)
            big = chat_chunk("x" * 16_000)
            batch = [{"data": big} for _ in range(16)]
            sent = 0
            while sent < PUSH_BYTES:
                answered = await pub.chunks(task_id, batch, url=b.url(RESULT_W))
                if answered.status_code != 204:
                    break
                sent += len(big) * len(batch)
            await asyncio.sleep(1.0)  # the relay has written what it took
            after = rss_bytes(pid)
            return (
                f"relayed {sent / 2**20:.1f} MiB; worker RSS {before / 2**20:.0f} → "
                f"{after / 2**20:.0f} MiB"
            )
        finally:
            client.close()
    finally:
        await pub.aclose()


async def main() -> None:
    local_calls_skip_proxies()
    for label, env in (("bounds off", OFF), ("defaults", {})):
        broker = Broker(
            3,
            services=True,
            env={"MCPD_INFER_TIMEOUT_SECONDS": str(INFER_TIMEOUT), "MCPD_LOG_LEVEL": "WARNING"}
            | env,
        ).start()
        try:
            prime(broker)
            print(f"{label}: publisher stops reading: {await stalled_publisher(broker)}")
            print(f"{label}: client stops reading: {await stalled_client(broker)}")
        finally:
            broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
