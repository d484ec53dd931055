"""The registry: the original VirtualLlmService's cases about registration, heartbeat,
unbinding and the GC sweep (one test per original case, named after it), then the contract's
rules beyond the original. Runs on SQLite and, in the second run, on PostgreSQL."""

from __future__ import annotations

import re
import threading
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from tests.conftest import Tokens, on_postgres
from virtual_llms import services
from virtual_llms.errors import ApiError
from virtual_llms.models import ApiToken, Llm, LlmKind, LlmStatus, ProviderSession
from virtual_llms.services import ProviderSpec

pytestmark = pytest.mark.django_db


def make_llm(token: Any = None, **fields: Any) -> Llm:
    """A row as the original tests' makeLlm() built it: virtual, active, session s-1."""
    defaults: dict[str, Any] = {
        "name": "vllm-local",
        "type": "openai",
        "model": "m",
        "tier": "fast",
        "kind": LlmKind.VIRTUAL,
        "provider_session_id": "s-1",
        "status": LlmStatus.ACTIVE,
        "last_heartbeat_at": timezone.now(),
        "publisher_token": token,
    }
    defaults.update(fields)
    sid = defaults["provider_session_id"]
    if defaults["kind"] == LlmKind.VIRTUAL and token is not None:
        ProviderSession.objects.get_or_create(pk=sid, defaults={"token": token})
    return Llm.objects.create(**defaults)


def spec(name: str = "vllm-local", model: str = "m", **kw: Any) -> ProviderSpec:
    return ProviderSpec(name=name, type="openai", model=model, **kw)


# --- the original cases ------------------------------------------------------------------------


def test_register_inserts_new_virtual_rows_with_active_status_and_session_id(
    tokens: Tokens,
) -> None:
    sid, llms = services.llm_register(
        token=tokens.publisher,
        session_id=None,
        providers=[spec(model="Qwen/Qwen2.5-7B-Instruct-AWQ", tier="fast")],
    )
    assert re.fullmatch(r"[0-9a-f-]{36}", sid)
    assert len(llms) == 1
    assert llms[0].kind == "virtual"
    assert llms[0].status == "active"
    assert llms[0].provider_session_id == sid
    assert llms[0].last_heartbeat_at is not None
    assert Llm.objects.get(name="vllm-local").provider_session_id == sid


def test_register_reuses_the_same_row_on_sticky_reconnect_same_name_and_session_id(
    tokens: Tokens,
) -> None:
    _, first = services.llm_register(
        token=tokens.publisher, session_id="fixed-id", providers=[spec(model="m")]
    )
    _, second = services.llm_register(
        token=tokens.publisher, session_id="fixed-id", providers=[spec(model="m-updated")]
    )
    assert second[0].pk == first[0].pk
    assert second[0].model == "m-updated"
    assert Llm.objects.count() == 1
    assert Llm.objects.get().model == "m-updated"


def test_register_refuses_to_overwrite_a_public_llm_with_the_same_name(tokens: Tokens) -> None:
    make_llm(name="qwen3-thinking", kind=LlmKind.PUBLIC, provider_session_id=None)
    with pytest.raises(ApiError, match="Cannot publish over public") as exc:
        services.llm_register(
            token=tokens.publisher, session_id="sess-x", providers=[spec("qwen3-thinking")]
        )
    assert exc.value.status == 409
    assert exc.value.code == "name_conflict"
    assert Llm.objects.get(name="qwen3-thinking").kind == "public"


def test_register_refuses_if_another_active_session_owns_the_name(tokens: Tokens) -> None:
    make_llm(tokens.publisher, name="vllm-local", provider_session_id="other", status="active")
    with pytest.raises(ApiError, match="already active under a different session") as exc:
        services.llm_register(token=tokens.publisher, session_id="mine", providers=[spec()])
    assert exc.value.status == 409
    assert Llm.objects.get(name="vllm-local").provider_session_id == "other"


def test_register_adopts_an_inactive_virtual_row_from_a_different_session_sticky_reconnect_after_lapse(  # noqa: E501 - the original case's name
    tokens: Tokens,
) -> None:
    old = make_llm(
        tokens.publisher,
        provider_session_id="old-session",
        status=LlmStatus.INACTIVE,
        inactive_since=timezone.now(),
    )
    _, llms = services.llm_register(
        token=tokens.publisher, session_id="new-session", providers=[spec()]
    )
    assert llms[0].pk == old.pk
    assert llms[0].provider_session_id == "new-session"
    assert llms[0].status == "active"
    assert llms[0].inactive_since is None


def test_heartbeat_bumps_last_heartbeat_at_and_revives_an_inactive_row(tokens: Tokens) -> None:
    past = timezone.now() - timedelta(seconds=5)
    make_llm(
        tokens.publisher,
        provider_session_id="sess",
        status=LlmStatus.INACTIVE,
        last_heartbeat_at=past,
        inactive_since=past,
    )
    assert services.llm_heartbeat(token=tokens.publisher, session_id="sess") == 1
    row = Llm.objects.get(name="vllm-local")
    assert row.status == "active"
    assert row.inactive_since is None
    assert row.last_heartbeat_at is not None
    assert row.last_heartbeat_at > past


def test_unbind_session_flips_all_owned_rows_to_inactive_immediately(tokens: Tokens) -> None:
    make_llm(tokens.publisher, name="a", provider_session_id="sess")
    make_llm(tokens.publisher, name="b", provider_session_id="sess")
    make_llm(tokens.publisher, name="c", provider_session_id="other")
    unbound_at = services.session_unbind(session_id="sess")
    assert Llm.objects.get(name="a").status == "inactive"
    assert Llm.objects.get(name="a").inactive_since == unbound_at
    assert Llm.objects.get(name="b").status == "inactive"
    assert Llm.objects.get(name="a").inactive_since is not None
    assert Llm.objects.get(name="c").status == "active"


def test_gc_sweep_flips_heartbeat_stale_active_virtuals_to_inactive(tokens: Tokens) -> None:
    now = timezone.now()
    make_llm(tokens.publisher, name="stale", last_heartbeat_at=now - timedelta(minutes=5))
    make_llm(tokens.publisher, name="fresh", last_heartbeat_at=now - timedelta(seconds=30))
    result = services.gc_sweep()
    assert result.marked_inactive == 1
    assert Llm.objects.get(name="stale").status == "inactive"
    assert Llm.objects.get(name="fresh").status == "active"


def test_gc_sweep_deletes_virtuals_inactive_past_the_4h_retention_window(tokens: Tokens) -> None:
    now = timezone.now()
    make_llm(
        tokens.publisher, name="old", status="inactive", inactive_since=now - timedelta(hours=5)
    )
    make_llm(
        tokens.publisher, name="recent", status="inactive", inactive_since=now - timedelta(hours=1)
    )
    make_llm(
        name="public-survivor",
        kind=LlmKind.PUBLIC,
        provider_session_id=None,
        status="inactive",
        inactive_since=now - timedelta(hours=9),
        last_heartbeat_at=now - timedelta(hours=9),
    )
    result = services.gc_sweep()
    assert result.deleted == 1
    assert not Llm.objects.filter(name="old").exists()
    assert Llm.objects.filter(name="recent").exists()
    assert Llm.objects.filter(name="public-survivor").exists()


def test_gc_sweep_is_idempotent_running_twice_in_a_row_is_a_no_op_the_second_time(
    tokens: Tokens,
) -> None:
    stale_since = timezone.now() - timedelta(minutes=5)
    make_llm(tokens.publisher, name="stale", last_heartbeat_at=stale_since)
    first = services.gc_sweep()
    second = services.gc_sweep()
    assert first.marked_inactive == 1
    assert second.marked_inactive == 0
    assert second.deleted == 0


# --- the contract's rules beyond the original ----------------------------------------------------


def test_a_session_belongs_to_the_token_that_created_it(tokens: Tokens) -> None:
    services.llm_register(token=tokens.publisher, session_id="mine", providers=[spec("a")])
    with pytest.raises(ApiError) as exc:
        services.llm_register(token=tokens.other_publisher, session_id="mine", providers=[])
    assert exc.value.status == 403
    with pytest.raises(ApiError) as exc:
        services.llm_heartbeat(token=tokens.other_publisher, session_id="mine")
    assert exc.value.status == 403
    assert ProviderSession.objects.get(pk="mine").token_id == tokens.publisher.pk


def test_heartbeat_of_an_unknown_session_is_404(tokens: Tokens) -> None:
    with pytest.raises(ApiError) as exc:
        services.llm_heartbeat(token=tokens.publisher, session_id="nope")
    assert exc.value.status == 404


def test_an_inactive_row_of_another_publisher_token_is_never_adopted(tokens: Tokens) -> None:
    make_llm(
        tokens.other_publisher,
        provider_session_id="theirs",
        status=LlmStatus.INACTIVE,
        inactive_since=timezone.now(),
    )
    with pytest.raises(ApiError) as exc:
        services.llm_register(token=tokens.publisher, session_id="mine", providers=[spec()])
    assert exc.value.status == 409
    row = Llm.objects.get(name="vllm-local")
    assert row.provider_session_id == "theirs"
    assert row.publisher_token_id == tokens.other_publisher.pk


def test_a_hibernating_row_of_another_session_is_not_taken(tokens: Tokens) -> None:
    make_llm(tokens.publisher, provider_session_id="other", status=LlmStatus.HIBERNATING)
    with pytest.raises(ApiError, match="already active under a different session"):
        services.llm_register(token=tokens.publisher, session_id="mine", providers=[spec()])


def test_rows_a_re_register_leaves_out_become_inactive(tokens: Tokens) -> None:
    services.llm_register(token=tokens.publisher, session_id="s", providers=[spec("a"), spec("b")])
    services.llm_register(token=tokens.publisher, session_id="s", providers=[spec("a")])
    assert Llm.objects.get(name="a").status == "active"
    dropped = Llm.objects.get(name="b")
    assert dropped.status == "inactive"
    assert dropped.inactive_since is not None


def test_register_applies_all_providers_or_none(tokens: Tokens) -> None:
    make_llm(name="taken", kind=LlmKind.PUBLIC, provider_session_id=None)
    with pytest.raises(ApiError):
        services.llm_register(
            token=tokens.publisher, session_id="s", providers=[spec("fine"), spec("taken")]
        )
    assert not Llm.objects.filter(name="fine").exists()
    assert not ProviderSession.objects.filter(pk="s").exists()


def test_register_keeps_the_given_status_and_order(tokens: Tokens) -> None:
    _, rows = services.llm_register(
        token=tokens.publisher,
        session_id=None,
        providers=[spec("z-first", status="hibernating"), spec("a-second")],
    )
    assert [r.name for r in rows] == ["z-first", "a-second"]
    assert rows[0].status == "hibernating"
    assert rows[1].status == "active"


def test_duplicate_names_in_one_register_call_are_refused(tokens: Tokens) -> None:
    with pytest.raises(ApiError) as exc:
        services.llm_register(
            token=tokens.publisher, session_id=None, providers=[spec("a"), spec("a")]
        )
    assert exc.value.status == 400
    assert not Llm.objects.exists()


def test_gc_sweep_marks_stale_hibernating_rows_inactive_and_never_touches_public_rows(
    tokens: Tokens,
) -> None:
    long_ago = timezone.now() - timedelta(minutes=5)
    make_llm(tokens.publisher, name="sleepy", status="hibernating", last_heartbeat_at=long_ago)
    make_llm(name="pub", kind="public", provider_session_id=None, last_heartbeat_at=long_ago)
    result = services.gc_sweep()
    assert result.marked_inactive == 1
    assert Llm.objects.get(name="sleepy").status == "inactive"
    assert Llm.objects.get(name="pub").status == "active"


def test_gc_sweep_dry_run_changes_nothing(tokens: Tokens) -> None:
    make_llm(tokens.publisher, name="stale", last_heartbeat_at=timezone.now() - timedelta(hours=1))
    result = services.gc_sweep(dry_run=True)
    assert result.marked_inactive == 1
    assert Llm.objects.get(name="stale").status == "active"


def test_set_status_hibernating_then_active(tokens: Tokens) -> None:
    services.llm_register(token=tokens.publisher, session_id="s", providers=[spec("a")])
    row = services.llm_set_status(
        token=tokens.publisher, session_id="s", llm_name="a", status="hibernating"
    )
    assert row.status == "hibernating"
    assert row.version == 2
    with pytest.raises(ApiError) as exc:
        services.llm_set_status(
            token=tokens.publisher, session_id="s", llm_name="nope", status="active"
        )
    assert exc.value.status == 404


def test_public_llm_api_key_is_stored_encrypted(db: None) -> None:
    row = services.llm_create_public(
        name="gpt", type="openai", model="gpt-4o", url="https://api.example.com/v1/", api_key="sk-1"
    )
    stored = Llm.objects.get(pk=row.pk)
    assert stored.url == "https://api.example.com/v1"
    assert stored.api_key_encrypted
    assert "sk-1" not in stored.api_key_encrypted
    from virtual_llms import crypto

    assert crypto.decrypt(stored.api_key_encrypted) == "sk-1"


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_registers_for_one_name_cannot_both_win() -> None:
    """Two publisher tokens register the same new name at the same moment, in two threads
    with their own connections: exactly one wins, the other gets 409 and applied nothing."""
    if not on_postgres():
        pytest.skip("row locks and concurrent writers: the PostgreSQL run covers this")
    from virtual_llms.auth import token_create

    a, _ = token_create(role="publisher", label="a")
    b, _ = token_create(role="publisher", label="b")
    barrier = threading.Barrier(2)
    outcomes: dict[str, Any] = {}

    def run(token: ApiToken, sid: str) -> None:
        try:
            barrier.wait(timeout=10)
            outcomes[sid] = services.llm_register(
                token=token, session_id=sid, providers=[spec("contested"), spec(f"own-{sid}")]
            )
        except ApiError as exc:
            outcomes[sid] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(t, s)) for t, s in ((a, "sa"), (b, "sb"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    errors = [v for v in outcomes.values() if isinstance(v, ApiError)]
    wins = [v for v in outcomes.values() if not isinstance(v, ApiError)]
    assert len(wins) == 1
    assert len(errors) == 1
    assert errors[0].status == 409
    winner_sid = wins[0][0]
    loser_sid = "sb" if winner_sid == "sa" else "sa"
    assert Llm.objects.get(name="contested").provider_session_id == winner_sid
    assert not Llm.objects.filter(name=f"own-{loser_sid}").exists()


@pytest.mark.parametrize("name", ["-starts-with-dash", "has space", "x" * 129, "semi;colon", ""])
def test_the_database_refuses_a_name_outside_the_contracts_character_set(name: str) -> None:
    from django.db import DataError, IntegrityError, transaction

    # PostgreSQL refuses an over-long name as a DataError (varchar(128)), the rest by CHECK.
    with pytest.raises((IntegrityError, DataError)), transaction.atomic():
        Llm.objects.create(name=name, type="openai", model="m", kind="public")


def test_session_rebind_undoes_exactly_one_unbind(tokens: Tokens) -> None:
    """A publisher that reconnects while its old stream is being unbound gets its rows back,
    but rows made inactive by anything else stay inactive."""
    make_llm(tokens.publisher, name="a", provider_session_id="sess")
    make_llm(
        tokens.publisher,
        name="left-out",
        provider_session_id="sess",
        status=LlmStatus.INACTIVE,
        inactive_since=timezone.now() - timedelta(minutes=1),
    )
    unbound_at = services.session_unbind(session_id="sess")
    assert services.session_rebind(session_id="sess", unbound_at=unbound_at) == 1
    assert Llm.objects.get(name="a").status == "active"
    assert Llm.objects.get(name="a").inactive_since is None
    assert Llm.objects.get(name="left-out").status == "inactive"


def test_a_heartbeat_does_not_revive_rows_a_re_register_left_out(tokens: Tokens) -> None:
    services.llm_register(token=tokens.publisher, session_id="s", providers=[spec("a"), spec("b")])
    services.llm_register(token=tokens.publisher, session_id="s", providers=[spec("a")])
    services.session_unbind(session_id="s")  # the stream closed: both inactive now
    assert services.llm_heartbeat(token=tokens.publisher, session_id="s") == 2
    assert Llm.objects.get(name="a").status == "active"  # revived
    assert Llm.objects.get(name="b").status == "inactive"  # withdrawn: stays out
    services.llm_register(token=tokens.publisher, session_id="s", providers=[spec("b")])
    assert Llm.objects.get(name="b").status == "active"
    assert not Llm.objects.get(name="b").withdrawn
