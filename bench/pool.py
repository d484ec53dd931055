"""Pool rows (issue 21): a name served by three backends on a three-worker broker
(PostgreSQL + Redis) - how requests spread, what the queue costs at twice the capacity, and
what a failover adds. ``python -m bench.pool`` (``make bench-pool``); not part of make test.

The publishers are the contract's (tests/contract_publisher.py) answering after a fixed
service time, the clients httpx on kept connections, round-robin over the workers.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import httpx

from tests.cluster import Broker
from tests.contract_publisher import ContractPublisher, Frame, chat_answer

from .measure import median, pct

SERVICE_S = 0.05


class Box:
    def __init__(self, pub: ContractPublisher, *, vanish: bool = False) -> None:
        self.pub, self.vanish, self.tasks = pub, vanish, 0

    async def handle(self, frame: Frame) -> None:
        if frame.get("kind") != "infer":
            return
        self.tasks += 1
        if self.vanish:  # takes the task and goes away: the broker must fail it over
            self.vanish = False
            await self.pub.disconnect()
            return
        await asyncio.sleep(SERVICE_S)
        await self.pub.result(frame["taskId"], 200, chat_answer("ok"))


async def pool(broker: Broker, tokens: list[str], slots: int, n: int = 3) -> tuple[str, list[Box]]:
    name = f"bench-pool-{uuid.uuid4().hex[:6]}"
    boxes = []
    for i in range(n):
        pub = ContractPublisher(broker.url(i), tokens[i])
        provider = {"name": name, "type": "openai", "model": "m", "pool": True}
        response = await pub.register([provider | {"maxConcurrency": slots}])
        assert response.status_code == 200, response.text
        await pub.connect()
        box = Box(pub)
        pub.serve(box.handle)
        boxes.append(box)
    return name, boxes


async def drive(broker: Broker, token: str, name: str, total: int, c: int) -> list[float]:
    """``total`` chat calls, ``c`` at a time; each call's latency (s). All must be 200."""
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
    latencies: list[float] = []
    counter = iter(range(total))
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(headers=headers, timeout=60.0) as client:

        async def one_client() -> None:
            for i in counter:
                began = time.perf_counter()
                response = await client.post(f"{broker.url(i)}/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                latencies.append(time.perf_counter() - began)

        await asyncio.gather(*(one_client() for _ in range(c)))
    return latencies


async def close(boxes: list[Box]) -> None:
    for box in boxes:
        await box.pub.aclose()


async def run(requests: int) -> dict[str, Any]:
    broker = Broker(3, services=True, env={"MCPD_QUEUE_TIMEOUT_SECONDS": "60"}).start()
    try:
        tokens = broker.owner_tokens(3)
        client = broker.token("client")
        figures: dict[str, Any] = {}

        name, boxes = await pool(broker, tokens, slots=4)
        await drive(broker, client, name, 30, 6)  # warm
        for box in boxes:
            box.tasks = 0
        await drive(broker, client, name, requests, 12)
        spread = [box.tasks for box in boxes]
        figures["spread"] = {"tasks": spread, "max/min": max(spread) / max(1, min(spread))}
        await close(boxes)

        # Twice the capacity: 3 backends x 2 slots, 12 clients.
        name, boxes = await pool(broker, tokens, slots=2)
        await drive(broker, client, name, 30, 6)
        waits = [lat - SERVICE_S for lat in await drive(broker, client, name, requests, 12)]
        figures["queue_wait_2x_ms"] = {
            "p50": round(median(waits) * 1000, 1),
            "p99": round(pct(waits, 99) * 1000, 1),
        }
        await close(boxes)

        # Failover: c=1 latency of calls whose first backend vanished with the task, against
        # the calls it did not take (ties between the two backends go at random).
        name, boxes = await pool(broker, tokens, slots=1, n=2)
        plain = await drive(broker, client, name, 40, 1)
        over: list[float] = []
        while len(over) < 10:
            victim = await _vanishing(broker, tokens[0], name, boxes)
            while victim.tasks == 0:
                (latency,) = await drive(broker, client, name, 1, 1)
                (over if victim.tasks else plain).append(latency)
        figures["failover_added_ms"] = round((median(over) - median(plain)) * 1000, 1)
        figures["failover_samples"] = {"over": len(over), "plain": len(plain)}
        await close(boxes)
        return figures
    finally:
        broker.stop()


async def _vanishing(broker: Broker, token: str, name: str, boxes: list[Box]) -> Box:
    """Box 0 again, as one that takes its next task and goes away."""
    await boxes[0].pub.aclose()
    pub = ContractPublisher(broker.url(0), token)
    provider = {"name": name, "type": "openai", "model": "m", "pool": True, "maxConcurrency": 1}
    response = await pub.register([provider])
    assert response.status_code == 200, response.text
    await pub.connect()
    victim = Box(pub, vanish=True)
    pub.serve(victim.handle)
    boxes[0] = victim
    return victim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=600)
    args = parser.parse_args()
    figures = asyncio.run(run(args.requests))
    for key, value in figures.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
