"""Real brokers for black-box tests: N daphne processes on PostgreSQL + Redis (one database
and one Redis key prefix per broker), or one embedded process on SQLite and the in-memory
channel layer. Nothing is mocked: tests talk to them over TCP."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import MutableMapping
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("MCPD_TEST_PG_URL", "postgres://postgres@127.0.0.1:5432/mcpd")
REDIS_URL = os.environ.get("MCPD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def local_calls_skip_proxies(environ: MutableMapping[str, str] = os.environ) -> None:
    """Add this machine to ``NO_PROXY`` (and ``no_proxy``). Everything the suite and the bench
    call runs here; a proxy in the developer's environment (``HTTP_PROXY`` without such a
    ``NO_PROXY``) would otherwise take those calls, from httpx, the openai SDK and the
    publisher agent alike, and every one of them would fail."""
    for name in ("NO_PROXY", "no_proxy"):
        hosts = [host.strip() for host in environ.get(name, "").split(",") if host.strip()]
        environ[name] = ",".join(hosts + [host for host in LOCAL_HOSTS if host not in hosts])


def drop_redis_keys(url: str, prefix: str) -> int:
    """Delete every key of one broker's (or test run's) prefix: the suite leaves nothing in
    the shared Redis. Returns how many were deleted."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        return len(keys)
    finally:
        client.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Broker:
    """A running broker. ``services=True``: ``workers`` daphne processes sharing one fresh
    PostgreSQL database and one Redis prefix. ``services=False``: one embedded process.
    ``pg_url``: the PostgreSQL server to make the database on (default: MCPD_TEST_PG_URL's);
    a test that restarts PostgreSQL passes one of its own (tests/faults.py)."""

    def __init__(
        self,
        workers: int = 3,
        *,
        services: bool = True,
        env: dict[str, str] | None = None,
        pg_url: str | None = None,
    ) -> None:
        self.pg_url = pg_url or PG_URL
        self.services = services
        self.n = workers if services else 1
        self.tag = uuid.uuid4().hex[:10]
        self.tmp = Path(tempfile.mkdtemp(prefix=f"mcpd-broker-{self.tag}-"))
        self.db_name = f"mcpd_mp_{self.tag}"
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "mcpd_site.settings",
            "SECRET_KEY": f"test-secret-{self.tag}",
            "DJANGO_DEBUG": "0",
            "MCPD_LOG_LEVEL": "INFO",
            # Tests read the access log (which worker took a publisher's posts); the bench
            # keeps it too, so its figures compare with runs before it was made optional.
            "MCPD_ACCESS_LOG": "-",
            "PYTHONUNBUFFERED": "1",
        }
        self.env.pop("DATABASE_URL", None)
        self.env.pop("REDIS_URL", None)
        if services:
            base, _, _ = self.pg_url.rpartition("/")
            self.env["DATABASE_URL"] = f"{base}/{self.db_name}"
            self.env["REDIS_URL"] = REDIS_URL
            self.env["MCPD_REDIS_PREFIX"] = f"mcpdtest{self.tag}"
        else:
            self.env["DATABASE_URL"] = f"sqlite:///{self.tmp / 'db.sqlite3'}"
        self.env.update(env or {})
        self.ports = [free_port() for _ in range(self.n)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * self.n
        self._tokens: dict[str, str] = {}

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Broker:
        if self.services:
            base, _, _ = self.pg_url.rpartition("/")
            with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.db_name}"')
        self.manage("migrate", "--verbosity", "0")
        # All workers boot at once, not one after another (three: 3.3-3.9 s against 3.9-4.5 s).
        for i in range(self.n):
            self._spawn_worker(i)
        for i in range(self.n):
            self.wait_ready(i)
        return self

    def start_worker(self, i: int) -> None:
        self._spawn_worker(i)
        self.wait_ready(i)

    def _spawn_worker(self, i: int) -> None:
        log = open(self.tmp / f"worker{i}.log", "ab")  # noqa: SIM115 - lives with the process
        self.procs[i] = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "--port", str(self.ports[i])],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def wait_ready(self, i: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs[i]
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"worker {i} exited early:\n{self.log(i)}")
            try:
                httpx.get(f"{self.url(i)}/v1/models", timeout=1.0)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"worker {i} did not start:\n{self.log(i)}")

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[i]
        if proc is not None:
            proc.send_signal(sig)
            proc.wait(timeout=15)
            self.procs[i] = None

    def restart(self, i: int) -> None:
        self.kill(i, signal.SIGTERM)
        self.start_worker(i)

    def stop(self) -> None:
        for i in range(self.n):
            with contextlib.suppress(Exception):
                self.kill(i, signal.SIGTERM)
        if self.services:
            drop_redis_keys(self.env["REDIS_URL"], self.env["MCPD_REDIS_PREFIX"])
            base, _, _ = self.pg_url.rpartition("/")
            with (
                contextlib.suppress(psycopg.Error),
                psycopg.connect(f"{base}/postgres", autocommit=True) as conn,
            ):
                conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- helpers -----------------------------------------------------------------------------

    def url(self, i: int = 0) -> str:
        return f"http://127.0.0.1:{self.ports[i % self.n]}"

    def ws_url(self, i: int = 0) -> str:
        return f"ws://127.0.0.1:{self.ports[i % self.n]}"

    def log(self, i: int, tail: int | None = 6000) -> str:
        """Worker ``i``'s output: its last ``tail`` characters, or all of it (None)."""
        path = self.tmp / f"worker{i}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return text if tail is None else text[-tail:]

    def python(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run this venv's Python in the broker's environment (settings, database, Redis)."""
        return subprocess.run(
            [sys.executable, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )

    def manage(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.python("manage.py", *args)

    def new_token(self, role: str, label: str | None = None) -> str:
        out = self.manage("createtoken", role, label or f"{role}-{uuid.uuid4().hex[:6]}")
        return out.stdout.strip().splitlines()[-1]

    def new_tokens(self, *roles: str) -> list[str]:
        """One new token per role, all made by one process: each ``manage.py`` run pays a
        Django start-up (1.3-1.5 s of CPU on a slow 2-core VM)."""
        script = (
            "import sys, uuid, django\n"
            "django.setup()\n"
            "from virtual_llms.auth import token_create\n"
            "for role in sys.argv[1:]:\n"
            "    print(token_create(role=role, label=f'{role}-{uuid.uuid4().hex[:6]}')[1])\n"
        )
        out = self.python("-c", script, *roles)
        tokens = out.stdout.split()
        assert len(tokens) == len(roles), out
        return tokens

    def owner_tokens(self, n: int) -> list[str]:
        """``n`` publisher tokens of one new owner (the boxes of a pool), made by one
        process."""
        script = (
            "import sys, uuid, django\n"
            "django.setup()\n"
            "from virtual_llms.auth import token_create\n"
            "owner = f'team-{uuid.uuid4().hex[:6]}'\n"
            "for i in range(int(sys.argv[1])):\n"
            "    print(token_create(role='publisher', label=f'{owner}-box-{i}', owner=owner)[1])\n"
        )
        tokens = self.python("-c", script, str(n)).stdout.split()
        assert len(tokens) == n, tokens
        return tokens

    def token(self, role: str) -> str:
        """One shared token per role for this broker."""
        if role not in self._tokens:
            self._tokens[role] = self.new_token(role, f"shared-{role}")
        return self._tokens[role]

    def sql(self, query: str, *params: object) -> list[tuple[object, ...]]:
        """Read the broker's PostgreSQL database directly (assertions only)."""
        assert self.services, "sql() needs the PostgreSQL broker"
        with psycopg.connect(self.env["DATABASE_URL"]) as conn:
            cur = conn.execute(query.encode(), params)
            return cur.fetchall() if cur.description else []
