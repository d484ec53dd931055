"""The per-process cache of LLM rows on the request path (rowcache.py) and the stamps that
keep it honest (state/stamps.py): every way a row can change is seen by the next request,
which checks the cached row's stamps in the round trip that routes its task
(state/routing.py; here rowcache.checked, the same check).

The first run of the suite uses SQLite and the in-memory state; the second PostgreSQL and
Redis, where the stamps live in a Redis hash that every worker reads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, transaction
from django.utils import timezone

from virtual_llms import binding, routing, rowcache, services, state, tasks
from virtual_llms import hub as hub_mod
from virtual_llms.auth import token_create
from virtual_llms.models import ApiToken, Llm, LlmKind, LlmStatus, ProviderSession

pytestmark = [pytest.mark.django_db(transaction=True)]


@sync_to_async
def make_row(name: str = "m1", sid: str = "sess", status: str = "active") -> ApiToken:
    token, _ = token_create(role="publisher", label="pub")
    ProviderSession.objects.create(pk=sid, token=token)
    Llm.objects.create(
        name=name,
        type="openai",
        model="m",
        kind=LlmKind.VIRTUAL,
        provider_session_id=sid,
        publisher_token=token,
        status=status,
        last_heartbeat_at=timezone.now(),
        inactive_since=timezone.now() if status == "inactive" else None,
    )
    return token


async def lookup(name: str = "m1") -> Llm | None:
    """The row as the next request sees it."""
    entry = await rowcache.checked(name)
    return entry.row if entry is not None else None


async def test_a_row_is_read_once_then_served_from_the_cache(async_orm: None) -> None:
    await make_row()
    first = await lookup()
    assert first is not None
    assert first.status == "active"
    assert await lookup() is first  # the same object: no second read
    assert await lookup("nope") is None


def _set_status(token: ApiToken) -> None:
    services.llm_set_status(token=token, session_id="sess", llm_name="m1", status="hibernating")


def _admin_save(token: ApiToken) -> None:
    row = Llm.objects.get(name="m1")
    row.status = LlmStatus.HIBERNATING
    row.save()


def _mark_inactive(token: ApiToken) -> None:
    services.llm_mark_inactive(names=["m1"])


def _unbind(token: ApiToken) -> None:
    services.session_unbind(session_id="sess")


def _register_leaving_it_out(token: ApiToken) -> None:
    spec = services.ProviderSpec(name="other", type="openai", model="m")
    services.llm_register(token=token, session_id="sess", providers=[spec])


def _register_with_new_model(token: ApiToken) -> None:
    spec = services.ProviderSpec(name="m1", type="openai", model="m2", status="hibernating")
    services.llm_register(token=token, session_id="sess", providers=[spec])


def _gc_stale(token: ApiToken) -> None:
    services.gc_sweep(now=timezone.now() + timedelta(days=1))


WRITES: dict[str, Callable[[ApiToken], None]] = {
    "set_status": _set_status,
    "admin_save": _admin_save,
    "mark_inactive": _mark_inactive,
    "session_unbind": _unbind,
    "register_leaves_it_out": _register_leaving_it_out,
    "register_changes_it": _register_with_new_model,
    "gc_sweep": _gc_stale,
}


@pytest.mark.parametrize("write", list(WRITES))
async def test_every_write_is_seen_by_the_next_lookup(write: str, async_orm: None) -> None:
    token = await make_row()
    before = await lookup()
    assert before is not None
    assert before.status == "active"
    await sync_to_async(WRITES[write])(token)
    after = await lookup()
    assert after is not None
    assert after is not before
    assert after.status != "active"


async def test_revivals_are_seen(async_orm: None) -> None:
    """Inactive → active by a heartbeat, by a rebind, and hibernating → active by a wake."""
    token = await make_row(status="inactive")
    assert (await lookup()).status == "inactive"  # type: ignore[union-attr]  # the row exists
    await sync_to_async(services.llm_heartbeat)(token=token, session_id="sess")
    assert (await lookup()).status == "active"  # type: ignore[union-attr]  # the row exists

    unbound_at = await sync_to_async(services.session_unbind)(session_id="sess")
    assert (await lookup()).status == "inactive"  # type: ignore[union-attr]  # the row exists
    await sync_to_async(services.session_rebind)(session_id="sess", unbound_at=unbound_at)
    assert (await lookup()).status == "active"  # type: ignore[union-attr]  # the row exists

    await sync_to_async(_set_status)(token)
    row = await lookup()
    assert row is not None
    assert row.status == "hibernating"
    await sync_to_async(services.llm_mark_awake)(llm_id=row.id, name="m1", session_id="sess")
    assert (await lookup()).status == "active"  # type: ignore[union-attr]  # the row exists


async def test_an_evicted_row_is_gone_at_once(async_orm: None) -> None:
    await make_row()
    row = await lookup()
    assert row is not None
    await sync_to_async(services.llm_evict)(llm=row)
    assert await lookup() is None


async def test_a_row_moved_to_another_session_is_read_with_that_session(
    async_orm: None,
) -> None:
    token = await make_row()
    assert (await lookup()).provider_session_id == "sess"  # type: ignore[union-attr]
    await sync_to_async(services.session_unbind)(session_id="sess")
    spec = services.ProviderSpec(name="m1", type="openai", model="m")
    await sync_to_async(services.llm_register)(token=token, session_id="sess2", providers=[spec])
    row = await lookup()
    assert row is not None
    assert row.provider_session_id == "sess2"
    assert await lookup() is row
    # A write by session now reaches the row through its new session's stamp.
    await sync_to_async(services.session_unbind)(session_id="sess2")
    assert (await lookup()).status == "inactive"  # type: ignore[union-attr]  # the row exists


async def test_a_lookup_during_a_write_is_not_kept_past_its_commit(async_orm: None) -> None:
    """The writer touches the stamps inside its transaction and again at commit: a reader
    that read the old row in between keeps it only until the commit."""
    await make_row()
    assert (await lookup()).status == "active"  # type: ignore[union-attr]  # the row exists
    loop = asyncio.get_running_loop()
    writer = ThreadPoolExecutor(1)  # one thread: the transaction spans several calls
    in_tx, release = threading.Event(), threading.Event()

    def write() -> None:
        with transaction.atomic():
            services.llm_mark_inactive(names=["m1"])
            in_tx.set()
            release.wait(10)
        connection.close()

    done = loop.run_in_executor(writer, write)
    await loop.run_in_executor(None, in_tx.wait, 10)
    during = await lookup()  # the stamps changed; the row read still sees the old state
    assert during is not None
    assert during.status == "active"
    release.set()
    await done
    writer.shutdown()
    after = await lookup()
    assert after is not None
    assert after.status == "inactive"


async def test_a_write_behind_mcpds_back_is_seen_within_the_cache_age(
    async_orm: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    await make_row()
    assert (await lookup()).status == "active"  # type: ignore[union-attr]  # the row exists
    # A raw UPDATE touches no stamp: the cached row is served until it ages out.
    await sync_to_async(Llm.objects.filter(name="m1").update)(status="hibernating")
    assert (await lookup()).status == "active"  # type: ignore[union-attr]  # the row exists
    monkeypatch.setattr(rowcache, "ROW_CACHE_SECONDS", 0.0)
    assert (await lookup()).status == "hibernating"  # type: ignore[union-attr]  # (aged out)


async def test_stamps_change_on_every_touch_and_never_repeat(async_orm: None) -> None:
    routing = state.get_state().routing
    stamps = state.get_state().stamps
    name = state.name_field("a")
    seen = {await routing.stamp("a")}
    for fields in ([name], [state.ALL_ROWS], [name, state.session_field("s")]):
        await sync_to_async(stamps.touch)(fields)
        seen.add(await routing.stamp("a"))
    assert len(seen) == 4
    # Another name's stamp is untouched by a touch of "a"; "everything" touches it.
    other = await routing.stamp("b")
    await sync_to_async(stamps.touch)([name])
    assert await routing.stamp("b") == other
    # Pruning drops dead fields and touches everything: no old stamp comes back.
    await sync_to_async(stamps.prune)({name})
    assert await routing.stamp("a") not in seen
    assert await routing.stamp("b") != other


async def test_gc_sweep_prunes_the_stamps_of_deleted_rows(async_orm: None) -> None:
    await make_row(name="old", status="inactive")
    await make_row(name="kept", sid="sess2")
    routing = state.get_state().routing
    await sync_to_async(state.get_state().stamps.touch)([state.name_field("old")])
    before = (await routing.stamp("old")).split("/")
    assert before[0]
    long_ago = timezone.now() - timedelta(days=30)
    await sync_to_async(Llm.objects.filter(name="old").update)(inactive_since=long_ago)
    assert (await sync_to_async(services.gc_sweep)()).deleted == 1
    after = (await routing.stamp("old")).split("/")
    assert after[0] == ""  # the deleted row's stamp is gone
    assert after[1] != before[1]  # and everything was touched


class Counted:
    """Counts the calls a request makes to the shared state's concerns (not the calls they
    make to each other: in memory, the route reads presence itself)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self.depth = 0
        shared = state.get_state()
        for concern in ("routing", "presence", "tasks", "leases"):
            target = getattr(shared, concern)
            for method in ("route", "stamp", "lookup", "open", "put", "get", "take", "join"):
                original = getattr(target, method, None)
                if original is not None:
                    monkeypatch.setattr(target, method, self._wrap(f"{concern}.{method}", original))

    def _wrap(self, label: str, original: Callable[..., Any]) -> Callable[..., Any]:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            if self.depth == 0:
                self.calls.append(label)
            self.depth += 1
            try:
                return await original(*args, **kwargs)
            finally:
                self.depth -= 1

        return counted


async def test_a_cached_row_sends_its_task_in_one_round_trip(
    hub: hub_mod.Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request path: a cached active row gets its task routed, its slot taken, its
    record written and its frame sent by one call to the shared state. After a write to the
    row, that call sends nothing and returns the stamps it read, under which the row is read
    again (no second check)."""
    token = await make_row()
    body = {"model": "m1", "messages": []}
    stream = hub_mod.ControlStream("sess", token.pk)
    await binding.stream_open(stream)
    try:
        entry = await rowcache.lookup("m1")  # read now
        assert entry is not None
        assert entry.ref is not None
        counted = Counted(monkeypatch)
        frame = tasks.infer_frame(entry.ref, body, True, "/v1/chat/completions")
        sent = await routing.send(hub, entry.ref, frame)
        assert isinstance(sent, hub_mod.Pending)
        assert counted.calls == ["routing.route"]
        got = await asyncio.wait_for(stream.queue.get(), 5)
        assert got is not None
        pushed = dict(got)
        assert pushed["taskId"] == sent.task_id
        assert pushed["streaming"] is True
        assert pushed["body"] == {"model": "m", "messages": []}
        assert (sent.session_id, sent.epoch) == ("sess", stream.epoch)

        await sync_to_async(_set_status)(token)  # hibernating: not the route's to wake
        counted.calls.clear()
        stale = await routing.send(hub, entry.ref, frame)
        assert isinstance(stale, state.Routed)
        assert stale.verdict == "stale"
        assert counted.calls == ["routing.route"]
        fresh = await rowcache.llm_lookup("m1", stale.stamp)
        assert fresh is not None
        assert fresh.row.status == "hibernating"
        assert fresh.stamp == stale.stamp
        assert counted.calls == ["routing.route"]  # the stamps it read were enough
        assert stream.queue.empty()
    finally:
        await binding.stream_close(stream)


async def test_a_new_stream_since_the_lookup_gets_the_task(hub: hub_mod.Hub) -> None:
    """The route reads who holds the session's stream as it sends: a publisher that
    reconnected since the row was read gets the task on its new stream."""
    token = await make_row()
    first = hub_mod.ControlStream("sess", token.pk)
    await binding.stream_open(first)
    entry = await rowcache.lookup("m1")
    assert entry is not None
    assert entry.ref is not None
    second = hub_mod.ControlStream("sess", token.pk)
    await binding.stream_open(second)  # the publisher reconnected: the first is replaced
    try:
        frame = tasks.infer_frame(entry.ref, {"model": "m1"}, False, "/v1/chat/completions")
        sent = await routing.send(hub, entry.ref, frame)
        assert isinstance(sent, hub_mod.Pending)
        assert sent.epoch == second.epoch
        got = await asyncio.wait_for(second.queue.get(), 5)
        assert got is not None
        assert got["taskId"] == sent.task_id
    finally:
        await binding.stream_close(second)
        await binding.stream_close(first)


def _database_away(**_: Any) -> Llm | None:
    from django.db import OperationalError

    raise OperationalError("connection refused")


async def test_an_old_copy_serves_while_the_database_is_away_unless_its_stamps_moved(
    async_orm: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 22: the 10 s re-read of a cached row meets a PostgreSQL restart; the copy read
    under the same stamps is still the row, so the relay goes on. A row whose stamps moved
    may have changed: 503 (the OperationalError errors.unavailable maps)."""
    from django.db import OperationalError

    await make_row()
    first = await lookup()
    assert first is not None
    monkeypatch.setattr(rowcache, "ROW_CACHE_SECONDS", 0.0)  # every copy is old now
    monkeypatch.setattr(rowcache.selectors, "llm_get", _database_away)
    assert await lookup() is first
    from virtual_llms.state.stamps import name_field

    await sync_to_async(state.get_state().stamps.touch)([name_field("m1")])
    with pytest.raises(OperationalError):
        await lookup()
