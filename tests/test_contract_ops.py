"""Contract: operations — ``manage.py gcsweep`` and ``manage.py createtoken`` (PROTOCOL.md
"Operations", "Roles and tokens"). Rows are made stale by writing their timestamps in the
database, as time passing would."""

from __future__ import annotations

import asyncio
import errno
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from tests.cluster import ROOT, Broker
from tests.contract_support import (
    Json,
    auth,
    gcsweep,
    get_row,
    http,
    model_ids,
    parse_gcsweep,
    prime,
    provider,
    publisher,
    uname,
)
from tests.services_up import services_up

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def ops() -> Iterator[Broker]:
    """A broker of its own (one worker, PostgreSQL + Redis), so gcsweep's counts are ours."""
    ok, why = services_up()
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the PostgreSQL + Redis tests, but: {why}")
        pytest.skip(f"needs PostgreSQL + Redis: {why}")
    broker = Broker(1, services=True).start()
    yield prime(broker)
    broker.stop()


def age(broker: Broker, name: str, column: str, seconds: int) -> None:
    """Move one timestamp of a row ``seconds`` into the past."""
    assert column in ("last_heartbeat_at", "inactive_since")
    broker.sql(
        f"UPDATE virtual_llms_llm SET {column} = now() - make_interval(secs => %s) WHERE name = %s",
        seconds,
        name,
    )


async def create_public(broker: Broker, name: str) -> Json:
    async with http(broker.token("admin")) as client:
        response = await client.post(
            f"{broker.url(0)}/api/v1/llms",
            json={"name": name, "type": "openai", "model": "m", "url": "https://up.example/v1"},
        )
    assert response.status_code == 201, response.text
    return dict(response.json())


async def rows(broker: Broker, *names: str) -> dict[str, Json | None]:
    return {name: await get_row(broker, name) for name in names}


async def test_gcsweep_marks_stale_deletes_expired_and_is_idempotent(ops: Broker) -> None:
    stale_a, stale_h = uname("gc-stale-a"), uname("gc-stale-h")
    fresh_a, fresh_h = uname("gc-fresh-a"), uname("gc-fresh-h")
    old_i, recent_i = uname("gc-old-i"), uname("gc-recent-i")
    pub_a, pub_i = uname("gc-pub-a"), uname("gc-pub-i")
    live = [
        provider(stale_a),
        provider(stale_h, status="hibernating"),
        provider(fresh_a),
        provider(fresh_h, status="hibernating"),
    ]
    async with publisher(
        ops, "sse", [*live, provider(old_i), provider(recent_i)], worker=0, connect=False
    ) as pub:
        assert (await pub.register(live)).status_code == 200  # old_i, recent_i: inactive
        await create_public(ops, pub_a)
        await create_public(ops, pub_i)
        for name in (stale_a, stale_h):
            age(ops, name, "last_heartbeat_at", 100)  # past the 90 s
        for name in (fresh_a, fresh_h):
            age(ops, name, "last_heartbeat_at", 30)
        age(ops, old_i, "last_heartbeat_at", 6 * 3600)
        age(ops, old_i, "inactive_since", 5 * 3600)  # past the 4 h
        age(ops, recent_i, "inactive_since", 3600)
        # Public rows that would look stale or expired, were they virtual.
        ops.sql(
            "UPDATE virtual_llms_llm SET last_heartbeat_at = now() - interval '1 day' "
            "WHERE name = %s",
            pub_a,
        )
        ops.sql(
            "UPDATE virtual_llms_llm SET status = 'inactive', "
            "inactive_since = now() - interval '1 day' WHERE name = %s",
            pub_i,
        )
        untouched = await rows(ops, fresh_a, fresh_h, recent_i, pub_a, pub_i)

        assert gcsweep(ops) == (2, 1)

        for name in (stale_a, stale_h):
            row = await get_row(ops, name)
            assert row is not None
            assert row["status"] == "inactive", row
            assert row["inactiveSince"] is not None
        assert await get_row(ops, old_i) is None
        assert await rows(ops, fresh_a, fresh_h, recent_i, pub_a, pub_i) == untouched
        listed = await model_ids(ops)
        assert stale_a not in listed
        assert stale_h not in listed
        assert {fresh_a, fresh_h, pub_a} <= listed

        # Idempotent: a second run finds nothing and changes nothing.
        after = await rows(ops, stale_a, stale_h, fresh_a, fresh_h, recent_i, pub_a, pub_i)
        assert gcsweep(ops) == (0, 0)
        assert await rows(ops, *after) == after


async def test_heartbeating_publisher_keeps_its_rows(ops: Broker) -> None:
    awake, asleep = uname("gc-hb-a"), uname("gc-hb-h")
    providers = [provider(awake), provider(asleep, status="hibernating")]
    async with publisher(ops, "sse", providers, worker=0, connect=False) as pub:
        for name in (awake, asleep):
            age(ops, name, "last_heartbeat_at", 100)
        assert (await pub.heartbeat()).status_code == 200  # a sleeping model still heartbeats
        assert gcsweep(ops) == (0, 0)
        row_a, row_h = await get_row(ops, awake), await get_row(ops, asleep)
        assert row_a is not None
        assert row_a["status"] == "active"
        assert row_h is not None
        assert row_h["status"] == "hibernating"


async def test_two_gcsweeps_at_once(ops: Broker) -> None:
    stale = [uname("gc2-stale") for _ in range(5)]
    expired = [uname("gc2-expired") for _ in range(3)]
    async with publisher(
        ops, "sse", [provider(n) for n in stale + expired], worker=0, connect=False
    ) as pub:
        assert (await pub.register([provider(n) for n in stale])).status_code == 200
        for name in stale:
            age(ops, name, "last_heartbeat_at", 120)
        for name in expired:
            age(ops, name, "inactive_since", 5 * 3600)
        runs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "manage.py",
                "gcsweep",
                cwd=ROOT,
                env=ops.env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for _ in range(2)
        ]
        outputs = []
        for run in runs:
            out, err = await asyncio.wait_for(run.communicate(), 120)
            assert run.returncode == 0, err.decode()
            outputs.append(parse_gcsweep(out.decode()))
        assert sum(marked for marked, _ in outputs) == 5, outputs  # each row counted once
        assert sum(deleted for _, deleted in outputs) == 3, outputs
        for name in stale:
            row = await get_row(ops, name)
            assert row is not None
            assert row["status"] == "inactive"
        for name in expired:
            assert await get_row(ops, name) is None
        assert gcsweep(ops) == (0, 0)


async def test_gcsweep_output_on_the_embedded_broker(embedded: Broker) -> None:
    for _ in range(2):
        marked, deleted = gcsweep(embedded)  # the format is checked by parse_gcsweep
        assert marked >= 0
        assert deleted >= 0


def all_database_text(broker: Broker) -> str:
    tables = broker.sql(
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
    )
    return "\n".join(
        str(row[0]) for (table,) in tables for row in broker.sql(f'SELECT t::text FROM "{table}" t')
    )


async def test_createtoken_each_role(ops: Broker) -> None:
    tokens = {
        role: ops.new_token(role, f"ops-{role}-{uuid.uuid4().hex[:6]}")
        for role in ("publisher", "client", "admin")
    }
    assert len(set(tokens.values())) == 3
    async with http() as client:
        base = ops.url(0)
        response = await client.post(
            f"{base}/api/v1/virtual/register",
            json={"providerSessionId": None, "providers": [provider(uname("ops-tok"))]},
            headers=auth(tokens["publisher"]),
        )
        assert response.status_code == 200, response.text
        response = await client.get(f"{base}/v1/models", headers=auth(tokens["client"]))
        assert response.status_code == 200
        secret = f"sk-ops-{uuid.uuid4().hex}"
        response = await client.post(
            f"{base}/api/v1/llms",
            json={
                "name": uname("ops-pub"),
                "type": "openai",
                "model": "m",
                "url": "https://up.example/v1",
                "apiKey": secret,
            },
            headers=auth(tokens["admin"]),
        )
        assert response.status_code == 201, response.text
    # Stored hashed (and the API key encrypted): no plaintext anywhere in the database.
    text = all_database_text(ops)
    for token in tokens.values():
        assert token not in text
    assert secret not in text
    with pytest.raises(subprocess.CalledProcessError):
        ops.manage("createtoken", "superuser", "nope")


def test_a_burst_of_connections_to_a_busy_worker_waits_in_the_queue(embedded: Broker) -> None:
    """``manage.py serve`` listens with a backlog of 2,048: 300 clients that connect while the
    worker cannot accept (stopped here, busy in life) all get in, and all get an answer once
    it runs again. Twisted's default backlog of 50 drops the SYNs past the first ~51 (their
    connects time out here) or, with SYN cookies, resets them."""
    somaxconn = Path("/proc/sys/net/core/somaxconn")
    if not somaxconn.exists() or int(somaxconn.read_text()) <= 300:
        pytest.skip("needs Linux with net.core.somaxconn above 300 (the kernel caps backlogs)")
    proc = embedded.procs[0]
    assert proc is not None
    port = embedded.ports[0]
    sockets = [socket.socket() for _ in range(300)]
    proc.send_signal(signal.SIGSTOP)
    try:
        with selectors.DefaultSelector() as selector:
            for sock in sockets:
                sock.setblocking(False)
                assert sock.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
                selector.register(sock, selectors.EVENT_WRITE)
            connected = 0
            deadline = time.monotonic() + 2.0  # past the first SYN retransmission (1 s)
            while connected < len(sockets) and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=0.1):
                    sock = cast(socket.socket, key.fileobj)
                    selector.unregister(sock)
                    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                        connected += 1
        assert connected == len(sockets)
    finally:
        proc.send_signal(signal.SIGCONT)
    try:
        for sock in sockets:
            sock.setblocking(True)
            sock.settimeout(10)
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for sock in sockets:
            assert sock.recv(64).startswith(b"HTTP/1.1 401 ")  # no token: the contract's 401
    finally:
        for sock in sockets:
            sock.close()
