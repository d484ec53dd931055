"""The agent's configuration: a TOML file, flags and environment variables, checked at start.

Every refusal is a :class:`ConfigError` whose message names the field, e.g.
``publisher.toml: llm[1].max_concurrent: must be a whole number >= 1 (got 'many')``.
The same reader checks a TOML table and an ``--llm key=value,...`` flag, so both accept the
same keys with the same rules. See publisher.example.toml for every key, annotated.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlsplit

# PROTOCOL.md "The Llm row": what clients pass as `model`.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
TOKEN_ENV = "MCPD_PUBLISHER_TOKEN"
BROKER_ENV = "MCPD_BROKER_URL"

_T = TypeVar("_T")

Transport = Literal["sse", "ws"]
# A command is either one string, run by /bin/sh, or an argv list, run as is.
Command = str | tuple[str, ...]


class ConfigError(Exception):
    """Bad configuration; each problem names its field, and every problem found is in
    :attr:`problems` (the message has one per line), so one run reports all of them."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        self.problems = list(problems) or [message]
        super().__init__("\n".join(self.problems))


class _Problems:
    """Collects the refusals of independent reads, so that a file with several mistakes
    gets them all named at once instead of one per run."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def check(self, read: Callable[[], _T], fallback: _T) -> _T:
        try:
            return read()
        except ConfigError as exc:
            self.found.extend(exc.problems)
            return fallback

    def raise_any(self, prefix: str = "") -> None:
        if self.found:
            raise ConfigError("", [f"{prefix}{problem}" for problem in self.found])


@dataclass(frozen=True)
class PowerConfig:
    """Optional sleep/wake of one LLM's server."""

    wake_command: Command
    # Polled after the wake command started; a 2xx answer means the model is ready.
    ready_url: str
    ready_timeout_seconds: float
    sleep_command: Command | None
    # With no task for this long the sleep command runs (None: never sleep by itself).
    idle_seconds: float | None


@dataclass(frozen=True)
class LlmConfig:
    name: str
    model: str
    upstream: str  # an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    api_key: str | None = field(default=None, repr=False)
    type: str = "openai"
    tier: str | None = None
    description: str | None = None
    max_concurrent: int = 8
    # Join the name as one more backend of a pool (boxes whose tokens share an owner).
    pool: bool = False
    # The upstream's wait for the first byte of an answer, and between stream chunks.
    timeout_seconds: float = 300.0
    power: PowerConfig | None = None


@dataclass(frozen=True)
class Config:
    brokers: tuple[str, ...]
    token: str = field(repr=False)
    llms: tuple[LlmConfig, ...]
    state_file: Path
    transport: Transport = "sse"
    # PROTOCOL.md: rows whose heartbeat is older than 90 s go inactive; 30 s leaves margin.
    heartbeat_seconds: float = 30.0
    # On SIGTERM, tasks in flight get this long to finish before they are failed.
    shutdown_grace_seconds: float = 30.0


# --- reading one table --------------------------------------------------------------------------


class _Table:
    """Typed reads from one table (TOML) or one ``--llm`` flag (all values strings), each
    refusal naming ``<where>.<key>``; :meth:`finish` refuses keys nobody read."""

    def __init__(self, data: Mapping[str, object], where: str, *, strings: bool = False) -> None:
        self.data = data
        self.where = where
        self.strings = strings  # values come from a flag: numbers are spelled as text
        self.label = ""  # e.g. the LLM's name, to say which one
        self.read: set[str] = set()

    def error(self, key: str, message: str) -> ConfigError:
        path = f"{self.where}.{key}" if self.where else key
        label = f" ({self.label})" if self.label else ""
        return ConfigError(f"{path}{label}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str) -> object:
        self.read.add(key)
        return self.data.get(key)

    def text(self, key: str, *, required: bool = False, max_len: int = 4096) -> str | None:
        value = self._get(key)
        if value is None:
            if required:
                raise self.error(key, "is required")
            return None
        if not isinstance(value, str):
            raise self.error(key, f"must be a string (got {value!r})")
        value = value.strip()
        if not value:
            raise self.error(key, "must not be empty")
        if len(value) > max_len:
            raise self.error(key, f"must be at most {max_len} characters")
        return value

    def number(self, key: str, default: float, *, minimum: float, maximum: float) -> float:
        value = self._get(key)
        if value is None:
            return default
        if self.strings and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise self.error(key, f"must be a number of seconds (got {value!r})") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number of seconds (got {value!r})")
        if not minimum <= value <= maximum:
            raise self.error(key, f"must be between {minimum:g} and {maximum:g} (got {value!r})")
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        value = self._get(key)
        if value is None:
            return default
        if self.strings and isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"must be a whole number >= {minimum} (got {value!r})")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be at most {maximum} (got {value!r})")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if self.strings and isinstance(value, str) and value.strip() in ("true", "false"):
            value = value.strip() == "true"
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false (got {value!r})")
        return value

    def url(self, key: str, *, required: bool = False) -> str | None:
        value = self.text(key, required=required, max_len=2048)
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.error(key, f"must be an http:// or https:// URL (got {value!r})")
        return value.rstrip("/")

    def urls(self, key: str) -> tuple[str, ...]:
        """One URL, or a non-empty list of them."""
        value = self.data.get(key)
        if isinstance(value, list):
            self.read.add(key)
            if not value:
                raise self.error(key, "must not be an empty list")
            items = [_Table({key: item}, self.where).url(key, required=True) for item in value]
            return tuple(item for item in items if item is not None)
        one = self.url(key)
        return (one,) if one is not None else ()

    def command(self, key: str) -> Command | None:
        value = self._get(key)
        if value is None:
            return None
        if isinstance(value, str) and value.strip():
            return value.strip()
        if (
            isinstance(value, list)
            and value
            and all(isinstance(item, str) and item for item in value)
        ):
            return tuple(str(item) for item in value)
        raise self.error(
            key, "must be a shell command string or a non-empty list of strings (argv)"
        )

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            raise self.error(unknown[0], "unknown field (check its spelling)")


# --- LLMs ----------------------------------------------------------------------------------------

POWER_KEYS = ("ready_url", "ready_timeout_seconds", "sleep_command", "idle_seconds")


def _secret(table: _Table, key: str, env_key: str, environ: Mapping[str, str]) -> str | None:
    """A secret given inline (``key``) or as the name of an environment variable."""
    inline = table.text(key)
    env_name = table.text(env_key, max_len=256)
    if inline is not None and env_name is not None:
        raise table.error(env_key, f"give either {key} or {env_key}, not both")
    if env_name is not None:
        value = environ.get(env_name, "").strip()
        if not value:
            raise table.error(env_key, f"the environment variable {env_name} is not set")
        return value
    return inline


def _power(table: _Table, upstream: str) -> PowerConfig | None:
    wake = table.command("wake_command")
    if wake is None:
        for key in POWER_KEYS:
            if table.has(key):
                raise table.error(key, "needs wake_command (how to wake the model)")
        return None
    return PowerConfig(
        wake_command=wake,
        ready_url=table.url("ready_url") or f"{upstream}/models",
        ready_timeout_seconds=table.number(
            "ready_timeout_seconds", 300.0, minimum=1, maximum=86400
        ),
        sleep_command=table.command("sleep_command"),
        idle_seconds=(
            table.number("idle_seconds", 0.0, minimum=1, maximum=30 * 86400)
            if table.has("idle_seconds")
            else None
        ),
    )


def parse_llm(table: _Table, environ: Mapping[str, str]) -> LlmConfig:
    p = _Problems()
    name = p.check(lambda: table.text("name", required=True, max_len=128), None)
    if name is not None and not NAME_RE.match(name):
        p.found.append(
            str(
                table.error(
                    "name",
                    f"{name!r} must be 1-128 characters of A-Z a-z 0-9 . _ : / -, "
                    "starting with a letter or digit",
                )
            )
        )
    elif name is not None:
        table.label = f"LLM {name!r}"
    upstream = p.check(lambda: table.url("upstream", required=True), None) or "http://upstream"
    llm = LlmConfig(
        name=name or "",
        model=p.check(lambda: table.text("model", max_len=256), None) or name or "",
        upstream=upstream,
        api_key=p.check(lambda: _secret(table, "api_key", "api_key_env", environ), None),
        type=p.check(lambda: table.text("type", max_len=32), None) or "openai",
        tier=p.check(lambda: table.text("tier", max_len=32), None),
        description=p.check(lambda: table.text("description", max_len=4096), None),
        max_concurrent=p.check(
            lambda: table.integer("max_concurrent", 8, minimum=1, maximum=4096), 8
        ),
        pool=p.check(lambda: table.boolean("pool", False), False),
        timeout_seconds=p.check(
            lambda: table.number("timeout_seconds", 300.0, minimum=1, maximum=86400), 300.0
        ),
        power=p.check(lambda: _power(table, upstream), None),
    )
    p.check(table.finish, None)
    p.raise_any()
    return llm


def parse_llm_flag(spec: str, index: int, environ: Mapping[str, str]) -> LlmConfig:
    """``--llm name=qwen,model=Qwen/Qwen2.5-7B,upstream=http://127.0.0.1:8000/v1``."""
    where = f"--llm #{index + 1}"
    pairs: dict[str, object] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"{where}: expected key=value pairs separated by commas (got {part!r})"
            )
        if key in pairs:
            raise ConfigError(f"{where}.{key}: given twice")
        pairs[key] = value.strip()
    return parse_llm(_Table(pairs, where, strings=True), environ)


# --- the whole configuration ------------------------------------------------------------------


@dataclass
class Overrides:
    """What the command line says; None means "not given"."""

    config_path: Path | None = None
    brokers: Sequence[str] = ()
    transport: str | None = None
    llms: Sequence[str] = ()
    state_file: Path | None = None


def _read_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def _token(table: _Table, environ: Mapping[str, str], base: Path) -> str:
    from_env = environ.get(TOKEN_ENV, "").strip()
    inline = table.text("token")
    token_file = table.text("token_file", max_len=4096)
    if inline is not None and token_file is not None:
        raise table.error("token_file", "give either token or token_file, not both")
    if from_env:
        return from_env
    if token_file is not None:
        path = base / Path(token_file).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise table.error("token_file", f"{path} cannot be read ({exc.strerror})") from None
        if not token:
            raise table.error("token_file", f"{path} is empty")
        return token
    if inline is not None:
        return inline
    raise table.error(
        "token", f"no publisher token: set {TOKEN_ENV}, or token_file (or token) in the config"
    )


def default_state_file(environ: Mapping[str, str], key: str) -> Path:
    """``$XDG_STATE_HOME/mcpd-publish/session-<hash>.json``: one file per configuration."""
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(base) / "mcpd-publish" / f"session-{digest}.json"


def _env_brokers(environ: Mapping[str, str]) -> tuple[str, ...]:
    items = [item for item in environ.get(BROKER_ENV, "").split(",") if item.strip()]
    return _Table({BROKER_ENV: items}, "").urls(BROKER_ENV) if items else ()


def _one_llm(table: _Table, environ: Mapping[str, str]) -> list[LlmConfig]:
    return [parse_llm(table, environ)]


def _one_flag(spec: str, index: int, environ: Mapping[str, str]) -> list[LlmConfig]:
    return [parse_llm_flag(spec, index, environ)]


def load(overrides: Overrides, environ: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any), apply flags and environment, check everything.
    Precedence: flags, then environment variables, then the file."""
    env = os.environ if environ is None else environ
    path = overrides.config_path
    data = _read_toml(path) if path is not None else {}
    base = path.parent if path is not None else Path.cwd()
    top = _Table(data, "")
    flags, file = _Problems(), _Problems()
    none: tuple[str, ...] = ()
    flag_brokers = flags.check(
        lambda: (
            _Table({"--broker": list(overrides.brokers)}, "").urls("--broker")
            if overrides.brokers
            else none
        ),
        none,
    )
    if overrides.transport is not None and overrides.transport not in ("sse", "ws"):
        flags.found.append(f"--transport: must be 'sse' or 'ws' (got {overrides.transport!r})")
    brokers = flag_brokers or file.check(lambda: _env_brokers(env) or top.urls("broker"), none)
    top.read.add("broker")
    if not brokers and not flags.found and not file.found:
        file.found.append(
            str(top.error("broker", f"no broker URL: give --broker, {BROKER_ENV} or broker"))
        )
    if len(set(brokers)) != len(brokers):
        file.found.append(str(top.error("broker", "lists the same URL twice")))
    transport = overrides.transport or file.check(lambda: top.text("transport"), None) or "sse"
    top.read.add("transport")
    if transport not in ("sse", "ws") and overrides.transport is None:
        file.found.append(str(top.error("transport", f"must be 'sse' or 'ws' (got {transport!r})")))
    token = file.check(lambda: _token(top, env, base), "")
    heartbeat = file.check(
        lambda: top.number("heartbeat_seconds", 30.0, minimum=1, maximum=60), 30.0
    )
    grace = file.check(
        lambda: top.number("shutdown_grace_seconds", 30.0, minimum=0, maximum=3600), 30.0
    )
    state_text = file.check(lambda: top.text("state_file"), None)
    raw_llms = data.get("llm", [])
    top.read.add("llm")
    llms: list[LlmConfig] = []
    if not isinstance(raw_llms, list) or not all(isinstance(t, dict) for t in raw_llms):
        file.found.append(str(top.error("llm", "must be an array of tables ([[llm]])")))
    else:
        for i, t in enumerate(raw_llms):
            table = _Table(t, f"llm[{i}]")
            llms += file.check(partial(_one_llm, table, env), [])
    file.check(top.finish, None)
    for i, spec in enumerate(overrides.llms):
        llms += flags.check(partial(_one_flag, spec, i, env), [])
    problems = _Problems()
    problems.found = [f"{path}: {p}" if path is not None else p for p in file.found]
    problems.found += flags.found
    problems.raise_any()
    if not llms:
        raise ConfigError("llm: nothing to publish: add an [[llm]] table or an --llm flag")
    names = [llm.name for llm in llms]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError("", [f"llm: the name {name!r} is published twice" for name in twice])

    if overrides.state_file is not None:
        state_file = overrides.state_file
    elif state_text is not None:
        state_file = base / Path(state_text).expanduser()
    else:
        key = str(path.resolve()) if path is not None else " ".join([*brokers, *sorted(names)])
        state_file = default_state_file(env, key)
    return Config(
        brokers=brokers,
        token=token,
        llms=tuple(llms),
        state_file=state_file,
        transport="ws" if transport == "ws" else "sse",
        heartbeat_seconds=heartbeat,
        shutdown_grace_seconds=grace,
    )
