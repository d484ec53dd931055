"""``mcpd-publish check``: is the token accepted, is each upstream reachable, and with
``transport = "ws"`` does the WebSocket stream open? One line per check; the exit status is
non-zero when any check failed."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shlex
import shutil
from collections.abc import Callable

import httpx
import websockets
from websockets.proxy import get_proxy
from websockets.uri import parse_uri

from . import transport
from .broker import USER_AGENT, error_of
from .config import Command, Config, LlmConfig
from .control import socket_url
from .upstream import describe, upstream_headers

Say = Callable[[bool, str], None]
# The broker accepts a stream's socket and then refuses one it cannot serve with a close code
# (virtual_llms/consumers.py): 4404 for a session it does not know, what a good token gets
# here; 4401 for a refused token, 4403 for a token of another role.
SOCKET_SECONDS = 10.0


def with_route(result: tuple[bool, str], proxy: str | None) -> tuple[bool, str]:
    """The line, ending with the proxy its call went through, if any."""
    return result if proxy is None else (result[0], f"{result[1]} (through the proxy {proxy})")


def without_credentials(proxy: str) -> str:
    """``http://user:secret@host:port`` → ``http://host:port``."""
    scheme, _, rest = proxy.partition("://")
    host, slash, path = rest.partition("/")
    return f"{scheme}://{host.rpartition('@')[2]}{slash}{path}"


async def check(config: Config, say: Say) -> bool:
    """Run every check, report each with ``say(ok, line)``; True when all passed."""
    results: list[bool] = []

    def report(ok: bool, line: str) -> None:
        results.append(ok)
        say(ok, line)

    # The agent's own client: the same transport, the same proxies.
    async with transport.client(timeout=10.0, headers={"User-Agent": USER_AGENT}) as http:
        for url in config.brokers:
            report(*with_route(await check_broker(http, url, config.token), http.proxy_for(url)))
            if config.transport == "ws":
                report(*await check_socket(url, config.token))
        for llm in config.llms:
            report(*with_route(await check_upstream(http, llm), http.proxy_for(llm.upstream)))
            report(True, serving(llm))
            if llm.power is not None:
                for what, command in (
                    ("wake_command", llm.power.wake_command),
                    ("sleep_command", llm.power.sleep_command),
                ):
                    if command is not None:
                        report(*check_command(llm, what, command))
    return all(results)


def serving(llm: LlmConfig) -> str:
    """How the broker will use this LLM: its slots, and whether it joins a pool."""
    line = f"LLM {llm.name!r}: the broker sends it at most {llm.max_concurrent} task(s) at once"
    if not llm.pool:
        return f"{line}; it is this publisher's alone (pool = false)"
    return (
        f"{line}; one box of a pool (pool = true): publisher tokens of the same owner "
        "(createtoken --owner) serve it together, and on SIGTERM this box drains first"
    )


async def check_broker(http: httpx.AsyncClient, url: str, token: str) -> tuple[bool, str]:
    """A heartbeat for a session nobody has: a publisher token gets the contract's 404."""
    probe = f"mcpd-publish-check-{secrets.token_hex(8)}"
    try:
        response = await http.post(
            f"{url}/api/v1/virtual/heartbeat",
            json={"providerSessionId": probe},
            headers={"Authorization": f"Bearer {token}"},
        )
    except httpx.HTTPError as exc:
        return False, f"broker {url}: unreachable: {describe(exc)}"
    error = error_of(response.status_code, response.content)
    if response.status_code == 404 and error.code:
        return True, f"broker {url}: publisher token accepted"
    if response.status_code == 401:
        return False, f"broker {url}: the token is refused: {error.message}"
    if response.status_code == 403:
        return False, f"broker {url}: not a publisher token: {error.message}"
    return False, f"broker {url}: unexpected answer {error} (is this an mcpd broker URL?)"


async def check_socket(url: str, token: str) -> tuple[bool, str]:
    """The WebSocket stream of a session nobody has, opened as the agent opens its own
    (websockets, with the proxy it picks from the environment: it prefers ``HTTPS_PROXY``).
    Its close code proves the route, the upgrade included, which some proxies refuse."""
    target = socket_url(url, f"mcpd-publish-check-{secrets.token_hex(8)}")
    where = f"broker {url}: WebSocket stream"
    proxy: str | None = None
    try:
        # What websockets.connect does to pick its proxy (get_proxy is not in websockets'
        # documented API; the proxy test in tests/test_publisher_transport.py fails if it
        # changes).
        proxy = get_proxy(parse_uri(target))
        async with (
            asyncio.timeout(SOCKET_SECONDS),
            websockets.connect(
                target,
                additional_headers={"Authorization": f"Bearer {token}"},
                user_agent_header=USER_AGENT,
                open_timeout=SOCKET_SECONDS,
            ) as socket,
        ):
            with contextlib.suppress(websockets.ConnectionClosed):
                async for _ in socket:  # the refusal's error frame, then the close
                    pass
        code = socket.close_code
    except (OSError, TimeoutError, websockets.WebSocketException) as exc:
        result = (False, f"{where}: cannot be opened: {describe(exc)}")
    else:
        if code == 4404:
            result = (True, f"{where}: opens")
        elif code == 4401:
            result = (False, f"{where}: the token is refused")
        elif code == 4403:
            result = (False, f"{where}: not a publisher token")
        else:
            result = (False, f"{where}: closed with code {code} (is this an mcpd broker URL?)")
    return with_route(result, None if proxy is None else without_credentials(proxy))


async def check_upstream(http: httpx.AsyncClient, llm: LlmConfig) -> tuple[bool, str]:
    url = f"{llm.upstream}/models"
    where = f"LLM {llm.name!r}: upstream {url}"
    try:
        response = await http.get(url, headers=upstream_headers(llm))
    except httpx.HTTPError as exc:
        if llm.power is not None:
            return True, f"{where}: not answering (asleep? it has a wake_command): {describe(exc)}"
        return False, f"{where}: unreachable: {describe(exc)}"
    if response.status_code in (401, 403):
        return False, f"{where}: refused the API key ({response.status_code})"
    if not response.is_success:
        return False, f"{where}: answered {response.status_code}"
    try:
        ids = [str(item["id"]) for item in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        return True, f"{where}: up (its model list is not OpenAI-shaped)"
    if llm.model not in ids:
        # Every request would then be refused by the upstream (404): a failure, not a note.
        listed = ", ".join(ids[:10]) or "none"
        return False, f"{where}: up, but it lists no model {llm.model!r} (it lists: {listed})"
    return True, f"{where}: up, serves {llm.model!r}"


# Words in front of a shell command that run the program right after them (none takes an
# option we would mistake for the program).
SHELL_PREFIXES = frozenset({"exec", "nohup", "setsid"})


def check_command(llm: LlmConfig, what: str, command: Command) -> tuple[bool, str]:
    """The program of an argv command, or of the first word of a shell command, exists."""
    where = f"LLM {llm.name!r}: {what}"
    if isinstance(command, tuple):
        program = command[0]
    else:
        try:
            words = shlex.split(command)
        except ValueError as exc:
            return False, f"{where}: cannot be parsed as a shell command ({exc})"
        # Skip VAR=value assignments and the prefixes that only change how the program is
        # run (`exec llama-server …`, as publisher.example.toml ships); another shell builtin
        # or construct is not checked.
        rest = [word for word in words if "=" not in word]
        while rest and rest[0] in SHELL_PREFIXES:
            rest = rest[1:]
        program = rest[0] if rest else ""
    if not program or shutil.which(program):
        return True, f"{where}: {program or 'shell command'} found"
    return False, f"{where}: {program!r} not found (not on PATH, or not executable)"
