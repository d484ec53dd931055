"""A PostgreSQL restart under load (issue 22), from outside: three daphne workers on a
PostgreSQL of the test's own (tests/faults.py PrivatePostgres: the shared one on 5432 is never
touched), the real ``mcpd-publish`` agent heartbeating every second (so its heartbeats meet
the outage), and the continuous load of tests/faults.py, plus a reader of the database path
(``GET /api/v1/llms/<name>``, a row read per request) on every worker.

While PostgreSQL is away a request is answered (the token and row caches serve the relay) or
refused with 503 ``database_unavailable`` and ``Retry-After``, never 500, and no stream ends
silently; once it accepts connections again every worker reads the database again within
RECOVERY_BOUND, relays again, and takes the agent's heartbeats again.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from tests.cluster import Broker
from tests.conftest import require_services
from tests.faults import (
    Load,
    PrivatePostgres,
    ServiceMissing,
    agent_per_transport,
    assert_outage_handled,
    probe_at,
    recovered_after,
    summary,
    wait_serving,
)
from tests.test_publisher_e2e import Agent
from tests.test_publisher_upstream import FakeUpstream

pytestmark = pytest.mark.multiproc

# How long PostgreSQL stays stopped: the fault itself, not a wait for anything.
AWAY_SECONDS = 3.0
# Every worker reads the database again within this of PostgreSQL accepting connections. The
# broker's part is at most a second (its connections are checked every DB_UPKEEP_SECONDS,
# runtime/django_asgi.py); the rest is slack for a loaded 2-core machine.
RECOVERY_BOUND = 3.0


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    require_services()
    try:
        server = PrivatePostgres()
    except ServiceMissing as exc:
        pytest.skip(str(exc))
    server.start()
    yield server
    server.remove()


@pytest.fixture(scope="module")
def broker(postgres: PrivatePostgres) -> Iterator[Broker]:
    b = Broker(
        3,
        services=True,
        pg_url=postgres.url,
        env={"MCPD_INFER_TIMEOUT_SECONDS": "20", "MCPD_DRAIN_SECONDS": "15"},
    ).start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module", params=["sse", "ws"])
def agent(
    request: pytest.FixtureRequest,
    broker: Broker,
    upstream: FakeUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Agent, str]]:
    yield from agent_per_transport(
        request.param,
        broker,
        upstream.url,
        tmp_path_factory.mktemp(f"agent-{request.param}"),
        "pgrestart",
        settings={"heartbeat_seconds": 1},
    )


@dataclass
class Read:
    worker: int
    at: float  # monotonic, when the answer came
    status: int
    body: dict[str, object]
    retry_after: str | None


@dataclass
class DbReader:
    """Reads the LLM's row through each worker in turn (one database read per request)."""

    broker: Broker
    token: str
    model: str
    reads: list[Read] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> DbReader:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[Read]:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)
        return self.reads

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(timeout=10.0) as http:
            turn = 0
            while not self._stop.is_set():
                worker = turn % self.broker.n
                turn += 1
                url = f"{self.broker.url(worker)}/api/v1/llms/{self.model}"
                response = http.get(url, headers=headers)
                self.reads.append(
                    Read(
                        worker,
                        time.monotonic(),
                        response.status_code,
                        response.json(),
                        response.headers.get("retry-after"),
                    )
                )
                self._stop.wait(0.03)

    def recovered(self, since: float, timeout: float = 30.0) -> list[float]:
        """Per worker, seconds from ``since`` to its first row read answered after it."""
        deadline = time.monotonic() + timeout
        while True:
            firsts: dict[int, float] = {}
            for read in list(self.reads):
                if read.at >= since and read.status == 200:
                    firsts.setdefault(read.worker, read.at - since)
            if len(firsts) == self.broker.n:
                return [firsts[i] for i in range(self.broker.n)]
            assert time.monotonic() < deadline, f"workers reading again: {sorted(firsts)}"
            time.sleep(0.05)


def heartbeat_at(broker: Broker, token: str, model: str) -> dt.datetime:
    response = httpx.get(
        f"{broker.url(0)}/api/v1/llms/{model}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10.0,
    )
    assert response.status_code == 200, response.text
    return dt.datetime.fromisoformat(response.json()["lastHeartbeatAt"])


def test_a_postgres_restart_costs_at_most_503s_and_every_worker_recovers(
    broker: Broker, agent: tuple[Agent, str], postgres: PrivatePostgres
) -> None:
    running, model = agent
    token = broker.token("client")
    wait_serving(broker, token, model)
    load = Load(broker, token, model).start()
    reader = DbReader(broker, token, model).start()
    time.sleep(1.5)
    postgres.stop()
    stopped = time.monotonic()
    time.sleep(AWAY_SECONDS)
    starting = time.monotonic()
    back = postgres.start()
    back_wall = dt.datetime.now(dt.UTC)
    recovered = reader.recovered(back)
    probes = probe_at(load, time.monotonic())
    time.sleep(1.0)
    outcomes = load.stop()
    reads = reader.stop()

    during = [r for r in reads if stopped + 0.5 < r.at < starting]
    refused = [r for r in reads if r.status != 200]
    relayed_back = recovered_after(outcomes, back)
    print(
        f"\npostgres restart ({running.config.stem}): away {back - stopped:.1f} s; "
        f"load {summary(outcomes)}; last refused request ended "
        f"{relayed_back:+.2f} s from PostgreSQL back; row reads refused "
        f"{len(refused)} of {len(reads)}; every worker reading again after "
        f"{[round(s, 2) for s in recovered]} s"
    )
    assert_outage_handled(outcomes, probes, "postgres restart")
    assert len(during) >= 10, during
    assert all(r.status == 503 for r in during), [r for r in during if r.status != 503][:5]
    for r in refused:  # the /api/ shape, with Retry-After: never a 500
        assert r.status == 503, r
        assert r.retry_after, r
        assert r.body["error"] == {
            "code": "database_unavailable",
            "message": "The broker's database is unreachable; retry shortly.",
        }, r
    assert max(recovered) < RECOVERY_BOUND, recovered
    assert relayed_back < RECOVERY_BOUND, (relayed_back, summary(outcomes))
    # The agent's heartbeats (over its control socket, or POSTed) are taken again.
    deadline = time.monotonic() + 10
    while heartbeat_at(broker, token, model) < back_wall:
        assert time.monotonic() < deadline, running.log()[-3000:]
        time.sleep(0.2)
    for i in range(broker.n):
        assert httpx.get(f"{broker.url(i)}/readyz", timeout=5).status_code == 200
    logs = "".join(broker.log(i, None) for i in range(broker.n))
    at = logs.find("Traceback")
    assert at < 0, logs[max(0, at - 1500) : at + 4000]
