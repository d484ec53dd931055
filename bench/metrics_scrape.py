"""``make bench-metrics``: how long a scrape of ``GET /metrics`` takes with many backends (issue
23's goal: under 50 ms with 500). Starts the broker (3 workers on PostgreSQL + Redis when
those answer, else 1 embedded process), registers BACKENDS backends, each session holding an
SSE control stream, then times scrapes of one worker from a client: with
the broker's gauges only, then after one call to each name on that worker (so every name
also has its per-worker series there). The worker's Server-Timing splits its part into the
fleet's read (one query, one Lua script) and the rendering.

    python -m bench.metrics_scrape [--backends 500] [--scrapes 50] [--pool 10]

``--pool N`` serves BACKENDS / N names, each a pool of N boxes (N sessions of one owner,
each registering every name); without it each backend is a name of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import Broker, local_calls_skip_proxies
from tests.contract_publisher import ContractPublisher, Frame, chat_answer
from tests.services_up import services_up

from .measure import median, pct

# Streams opened at once: the workers' accept queues and this process's loop keep up.
CONNECT_BATCH = 50


async def run(backends: int, scrapes: int, pool: int) -> None:
    services, why = services_up()
    broker = Broker(3 if services else 1, services=services, env={"MCPD_LOG_LEVEL": "WARNING"})
    print(f"broker: {broker.n} worker(s), {'PostgreSQL + Redis' if services else why}")
    broker.start()
    publishers: list[ContractPublisher] = []
    try:
        names = [f"scrape-{i:04d}-{uuid.uuid4().hex[:4]}" for i in range(backends // pool)]
        # Each session serves one name (pool 1), or every name as one box of its pools.
        if pool == 1:
            token = broker.token("publisher")
            sessions = [(token, [name]) for name in names]
            provider: dict[str, Any] = {"type": "openai", "model": "m"}
        else:
            owner = f"bench-{uuid.uuid4().hex[:6]}"
            tokens = [
                broker.manage("createtoken", "publisher", f"box-{i}", "--owner", owner)
                .stdout.strip()
                .splitlines()[-1]
                for i in range(pool)
            ]
            sessions = [(token, names) for token in tokens]
            provider = {"type": "openai", "model": "m", "pool": True, "maxConcurrency": 4}
        # A pool's boxes join one after another (concurrent joins of one name conflict: 409).
        step = CONNECT_BATCH if pool == 1 else 1
        for start in range(0, len(sessions), step):
            batch = []
            for i, (token, served) in enumerate(sessions[start : start + step], start):
                pub = ContractPublisher(broker.url(i), token)
                publishers.append(pub)
                batch.append((pub, served))
            registered = await asyncio.gather(
                *(pub.register([{**provider, "name": n} for n in served]) for pub, served in batch)
            )
            assert all(r.status_code == 200 for r in registered), registered[0].text
            await asyncio.gather(*(pub.connect() for pub, _ in batch))
        for pub in publishers:

            async def answer(frame: Frame, pub: ContractPublisher = pub) -> None:
                await pub.result(frame["taskId"], 200, chat_answer("ok"))

            pub.serve(answer)
        client = broker.token("client")
        admin = broker.token("admin")
        async with httpx.AsyncClient(timeout=30) as http:
            url = f"{broker.url(0)}/metrics"
            headers = {"Authorization": f"Bearer {admin}"}
            shape = f"{len(names)} names x {pool}"
            await timed(http, url, headers, backends, scrapes, f"{shape}, no call yet")
            sem = asyncio.Semaphore(32)

            async def call(i: int, name: str) -> None:
                async with sem:
                    r = await http.post(
                        f"{broker.url(i)}/v1/chat/completions",
                        headers={"Authorization": f"Bearer {client}"},
                        json={"model": name, "messages": [{"role": "user", "content": "hi"}]},
                    )
                    assert r.status_code == 200, r.text

            # Every name called once on worker 0: each has its per-worker series there.
            await asyncio.gather(*(call(0, name) for name in names))
            await timed(http, url, headers, backends, scrapes, f"{shape}, one call to each")
    finally:
        await asyncio.gather(*(pub.aclose() for pub in publishers), return_exceptions=True)
        broker.stop()


def server_timing(header: str) -> dict[str, float]:
    """``fleet;dur=1.2;desc=..., render;dur=3.4`` as {"fleet": 1.2, "render": 3.4}."""
    parts = {}
    for part in header.split(","):
        name, _, rest = part.strip().partition(";")
        for item in rest.split(";"):
            if item.startswith("dur="):
                parts[name] = float(item[4:])
    return parts


async def timed(
    http: httpx.AsyncClient, url: str, headers: dict[str, str], backends: int, n: int, when: str
) -> None:
    first = await http.get(url, headers=headers)
    assert first.status_code == 200, first.text
    families = {f.name: f for f in text_string_to_metric_families(first.text)}
    active = sum(
        s.value for s in families["mcpd_backends"].samples if s.labels["status"] == "active"
    )
    assert active == backends, f"{active} of {backends} backends active"
    total, fleet, render, cpu = [], [], [], []
    for _ in range(n):
        started = time.perf_counter()
        response = await http.get(url, headers=headers)
        total.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200
        parts = server_timing(response.headers["Server-Timing"])
        fleet.append(parts["fleet"])
        render.append(parts["render"])
        cpu.append(parts["cpu"])
    samples = sum(len(f.samples) for f in families.values())
    print(
        f"/metrics, {backends} backends ({when}): {len(first.content) / 1024:.0f} KiB, "
        f"{samples} samples; {n} scrapes: median {median(total):.1f} ms "
        f"(p95 {pct(total, 95):.1f}, max {max(total):.1f}); on the worker: fleet read "
        f"{median(fleet):.1f} ms, rendering {median(render):.1f} ms, CPU {median(cpu):.1f} ms "
        "(medians)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_scrape", description=__doc__)
    parser.add_argument("--backends", type=int, default=500)
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument(
        "--pool", type=int, default=1, help="backends per name (1: a name per backend)"
    )
    args = parser.parse_args()
    if args.pool < 1 or args.backends % args.pool:
        parser.error("--pool must divide --backends")
    local_calls_skip_proxies()
    asyncio.run(run(args.backends, args.scrapes, args.pool))


if __name__ == "__main__":
    main()
