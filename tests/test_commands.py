"""Operator commands: createtoken and gcsweep (also two sweeps at the same moment)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection
from django.test import override_settings
from django.utils import timezone
from pytest_django import Settings

from virtual_llms.auth import authenticate_token, token_create
from virtual_llms.models import ApiToken, Llm, LlmKind, LlmStatus, ProviderSession

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.mark.django_db
@pytest.mark.parametrize("role", ["publisher", "client", "admin"])
def test_createtoken_prints_the_token_alone_on_its_last_line(role: str) -> None:
    out, _ = run("createtoken", role, f"{role}-label")
    plaintext = out.strip().splitlines()[-1]
    assert re.fullmatch(r"mcpd_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", plaintext)
    token = authenticate_token(plaintext)
    assert token.role == role
    assert token.label == f"{role}-label"
    # Stored hashed: the plaintext is nowhere in the row.
    stored = ApiToken.objects.get(pk=token.pk)
    assert plaintext not in (stored.token_hash, stored.prefix)


@pytest.mark.django_db
def test_createtoken_refuses_an_unknown_role() -> None:
    from django.core.management import CommandError

    with pytest.raises(CommandError):
        run("createtoken", "root", "x")
    assert not ApiToken.objects.exists()


@pytest.mark.django_db
def test_createtoken_sets_a_client_tokens_limits() -> None:
    out, _ = run(
        "createtoken", "client", "limited", "--rpm", "60", "--tpm", "1000", "--max-concurrency", "2"
    )
    token = authenticate_token(out.strip().splitlines()[-1])
    assert (token.rpm, token.tpm, token.max_concurrency) == (60, 1000, 2)
    assert token.limited
    out, _ = run("createtoken", "client", "free")
    token = authenticate_token(out.strip().splitlines()[-1])
    assert (token.rpm, token.tpm, token.max_concurrency) == (None, None, None)
    assert not token.limited


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args",
    [("client", "x", "--rpm", "0"), ("admin", "x", "--rpm", "5"), ("client", "x", "--tpm", "-3")],
)
def test_createtoken_refuses_bad_limits(args: tuple[str, ...]) -> None:
    from django.core.management import CommandError

    with pytest.raises(CommandError):
        run("createtoken", *args)
    assert not ApiToken.objects.exists()


def _rows(token: ApiToken, stale: int, expired: int, fresh: int) -> None:
    now = timezone.now()
    ProviderSession.objects.create(pk="gc", token=token)
    rows = []
    for i in range(stale):
        rows.append(
            Llm(
                name=f"stale-{i}",
                status=LlmStatus.HIBERNATING if i % 2 else LlmStatus.ACTIVE,
                last_heartbeat_at=now - timedelta(minutes=10),
            )
        )
    for i in range(expired):
        rows.append(
            Llm(
                name=f"expired-{i}",
                status=LlmStatus.INACTIVE,
                inactive_since=now - timedelta(hours=5),
                last_heartbeat_at=now - timedelta(hours=5),
            )
        )
    for i in range(fresh):
        rows.append(Llm(name=f"fresh-{i}", last_heartbeat_at=now))
    for row in rows:
        row.type, row.model, row.kind = "openai", "m", LlmKind.VIRTUAL
        row.provider_session_id, row.publisher_token = "gc", token
    rows.append(
        Llm(
            name="public",
            type="openai",
            model="m",
            kind=LlmKind.PUBLIC,
            status=LlmStatus.INACTIVE,
            inactive_since=now - timedelta(days=3),
        )
    )
    Llm.objects.bulk_create(rows)


@pytest.mark.django_db
def test_gcsweep_prints_counts_and_is_idempotent() -> None:
    token, _ = token_create(role="publisher", label="p")
    _rows(token, stale=3, expired=2, fresh=1)
    out, _ = run("gcsweep", "--dry-run")
    assert out.strip() == "dryRun markedInactive=3 deleted=2"
    assert Llm.objects.count() == 7
    out, _ = run("gcsweep")
    assert out.strip() == "markedInactive=3 deleted=2"
    assert Llm.objects.filter(status="inactive", kind="virtual").count() == 3
    assert Llm.objects.filter(name="public").exists()
    out, _ = run("gcsweep")
    assert out.strip() == "markedInactive=0 deleted=0"


def _database_url() -> str:
    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{settings['NAME']}"
    user = settings["USER"] or "postgres"
    host = settings["HOST"] or "127.0.0.1"
    return f"postgres://{user}@{host}:{settings['PORT'] or 5432}/{settings['NAME']}"


@pytest.mark.django_db(transaction=True)
def test_two_gcsweeps_at_the_same_moment_add_up_to_one() -> None:
    """Two processes sweep the same rows at once: neither fails, and their counts add up to
    what one sweep would report."""
    token, _ = token_create(role="publisher", label="p")
    stale, expired = 3000, 2000
    _rows(token, stale=stale, expired=expired, fresh=10)
    env = {**os.environ, "DATABASE_URL": _database_url()}
    procs = [
        subprocess.Popen(
            [sys.executable, "manage.py", "gcsweep"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    marked = deleted = 0
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        match = re.fullmatch(r"markedInactive=(\d+) deleted=(\d+)", out.strip())
        assert match, out
        marked += int(match[1])
        deleted += int(match[2])
    assert marked == stale
    assert deleted == expired
    assert Llm.objects.filter(kind="virtual", status="inactive").count() == stale
    assert Llm.objects.filter(kind="virtual").exclude(status="inactive").count() == 10


def test_the_system_check_warns_about_the_in_memory_layer_and_the_dev_key() -> None:
    from django.core.checks import run_checks
    from django.test import override_settings

    with override_settings(DEBUG=False, REDIS_URL="", MCPD_SECRET_KEY_FROM_ENV=False):
        ids = {message.id for message in run_checks()}
    assert {"mcpd.W001", "mcpd.W002"} <= ids
    with override_settings(DEBUG=False, REDIS_URL="redis://x", MCPD_SECRET_KEY_FROM_ENV=True):
        ids = {message.id for message in run_checks()}
    assert not ids & {"mcpd.W001", "mcpd.W002"}


def test_serve_freezes_the_startup_objects_and_collects_young_ones_less_often() -> None:
    import gc

    from virtual_llms.management.commands.serve import freeze_startup_objects

    before = gc.get_freeze_count()
    threshold = gc.get_threshold()
    try:
        freeze_startup_objects()
        # Django, the URLconf, the views, DRF, admin: tens of thousands of objects.
        assert gc.get_freeze_count() - before > 10_000
        assert "mcpd_site.asgi" in sys.modules
        # The youngest generation is collected less often; the older ones as before.
        assert gc.get_threshold() == (10_000, *threshold[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_serve_listens_with_a_backlog_and_refuses_a_bad_one() -> None:
    from django.core.management.base import CommandError

    from virtual_llms.management.commands.serve import daphne_args

    args = daphne_args("::1", 8001, ["--verbosity", "0"], backlog=100)
    assert args[:2] == ["-e", r"tcp:port=8001:interface=\:\:1:backlog=100"]
    assert args[-3:] == ["--verbosity", "0", "mcpd_site.asgi:application"]
    assert daphne_args("127.0.0.1", 8000, [])[1].endswith(":backlog=2048")
    # The access log: off by default (mcpd.request has a line per client call), or where
    # MCPD_ACCESS_LOG says; options after -- win.
    assert daphne_args("127.0.0.1", 8000, [])[-3:-1] == ["--verbosity", "0"]
    with override_settings(MCPD_ACCESS_LOG="-"):
        assert daphne_args("127.0.0.1", 8000, [])[-3:-1] == ["--access-log", "-"]
        assert "--access-log" not in daphne_args("127.0.0.1", 8000, ["-v", "1"])
    with pytest.raises(CommandError, match="--backlog must be at least 1"):
        call_command("serve", "--backlog", "0")


@pytest.mark.django_db
def test_devtokens_file_can_be_sourced_by_a_shell(tmp_path: Path, settings: Settings) -> None:
    """Issue 28: `source .mcpd-dev/tokens.env` exports the tokens to the programs run after
    it, and a second run keeps (and reads back) the same tokens."""
    settings.DEV_DIR = tmp_path
    first, _ = run("devtokens")
    again, _ = run("devtokens")
    assert first == again
    env_file = tmp_path / "tokens.env"
    shown = subprocess.run(
        ["bash", "-c", f"source {env_file}; env"], capture_output=True, text=True, check=True
    ).stdout
    exported = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    assert authenticate_token(exported["MCPD_CLIENT_KEY"]).role == "client"
    assert authenticate_token(exported["MCPD_PUBLISHER_TOKEN"]).role == "publisher"
