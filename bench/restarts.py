"""``python -m bench.restarts``: what clients get from each restart or fault, in the shape of
issue 22's "before" table (docs/benchmarks.md "Restarts and faults").

Three workers on a PostgreSQL and a Redis of this run's own (tests/faults.py: the shared
ones are never touched), the real ``mcpd-publish`` agent over SSE in front of a fake
upstream, and ``--clients`` openai-SDK clients (half streaming, tests/faults.py Load) for
``--seconds`` per fault. A fault starts 30 % into its window. A SIGTERM'd worker is first
taken out of the clients' rotation and put back once restarted, as a load balancer does.
Prints, per fault, the requests per outcome, and when the last request not answered was sent
and when it ended, in seconds from the fault's end (Redis or PostgreSQL answering again; a
restarted worker back in rotation).
"""

from __future__ import annotations

import argparse
import re
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.cluster import Broker, local_calls_skip_proxies
from tests.faults import Load, PrivatePostgres, PrivateRedis, recovered_after, summary, wait_serving
from tests.test_publisher_e2e import Agent, start_agent
from tests.test_publisher_upstream import FakeUpstream


def stream_holder(broker: Broker, agent: Agent) -> int:
    """The worker the agent's control stream is on (its log's last "connected to")."""
    urls = re.findall(r"connected to (http://\S+)", agent.log())
    return [broker.url(i) for i in range(broker.n)].index(urls[-1])


def sigterm(broker: Broker, load: Load, worker: int) -> float:
    load.up.discard(worker)
    proc = broker.procs[worker]
    assert proc is not None
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    broker.procs[worker] = None
    ended = time.monotonic()
    broker.start_worker(worker)
    load.up.add(worker)
    return ended


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.restarts", description=__doc__)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--only", default="", help="run the faults whose name has this")
    parser.add_argument(
        "--timeline", action="store_true", help="also print requests answered per second"
    )
    args = parser.parse_args(argv)
    local_calls_skip_proxies()
    postgres = PrivatePostgres()
    postgres.start()
    redis = PrivateRedis(Path(tempfile.mkdtemp(prefix="mcpd-restarts-"))).start()
    broker = Broker(
        3,
        pg_url=postgres.url,
        env={
            "REDIS_URL": redis.url,
            "MCPD_INFER_TIMEOUT_SECONDS": "20",
            "MCPD_LOG_LEVEL": "WARNING",
        },
    ).start()
    upstream = FakeUpstream().start()
    tmp = Path(tempfile.mkdtemp(prefix="mcpd-restarts-agent-"))
    name = f"restarts-{broker.tag}"
    agent = start_agent(
        tmp,
        broker.new_token("publisher"),
        [broker.url(i) for i in range(3)],
        [{"name": name, "model": "fake-model", "upstream": upstream.url}],
    )
    token = broker.token("client")

    def pg_restart() -> float:
        postgres.stop()
        time.sleep(3.0)  # away 3 s
        return postgres.start()

    faults: list[tuple[str, Callable[[Load], float | None]]] = [
        ("none", lambda load: None),
        (
            "SIGTERM to stream holder",
            lambda load: sigterm(broker, load, stream_holder(broker, agent)),
        ),
        (
            "SIGTERM to client-only worker",
            lambda load: sigterm(broker, load, (stream_holder(broker, agent) + 1) % 3),
        ),
        ("Redis restarted", lambda load: redis.restart()),
        ("Redis SIGSTOP 5 s", lambda load: redis.pause(5.0)),
        ("PostgreSQL restarted (away 3 s)", lambda load: pg_restart()),
    ]
    rows = []
    try:
        for what, fault in faults:
            if args.only.lower() not in what.lower():
                continue
            wait_serving(broker, token, name, timeout=60)
            load = Load(broker, token, name, threads=args.clients).start()
            began = time.monotonic()
            time.sleep(0.3 * args.seconds)
            ended = fault(load)
            time.sleep(max(0.0, began + args.seconds - time.monotonic()))
            outcomes = load.stop()
            back = recovered_after(outcomes, ended) if ended is not None else float("-inf")
            # The last request that failed, by when it was sent: every one sent later was
            # answered (a task lost with Redis fails 20 s on, but was sent before the end).
            failed = [o.started for o in outcomes if o.status != 200]
            served = max(failed) - ended if failed and ended is not None else float("-inf")
            rows.append((what, len(outcomes), summary(outcomes), back, served))
            if args.timeline:
                per_second = [0] * (int(args.seconds) + 30)
                for o in outcomes:
                    per_second[min(len(per_second) - 1, int(o.ended - began))] += 1
                print(f"{what}: answered per second from the start: {per_second}")
            print(
                f"{what}: {len(outcomes)} requests {summary(outcomes)}; last failure ended "
                f"{back:+.2f} s, was sent {served:+.2f} s from the fault's end",
                flush=True,
            )
    finally:
        agent.stop()
        upstream.stop()
        broker.stop()
        redis.stop()
        postgres.remove()
    print()
    print("| fault | requests | outcomes | last failure sent / ended, after the fault's end |")
    print("|---|--:|---|--:|")

    def secs(value: float) -> str:
        return "—" if value == float("-inf") else f"{value:+.1f} s"

    for what, n, counts, back, served in rows:
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        print(f"| {what} | {n} | {shown} | {secs(served)} / {secs(back)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
