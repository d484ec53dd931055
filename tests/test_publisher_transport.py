"""The agent's HTTP transport (virtual_llms/publisher/transport.py) against raw TCP servers
that fail in each way a connection can: the errors are httpx's, and only a connection that
was never made counts as "not sent" (broker.NOT_SENT, where a request goes again to the
next broker URL)."""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import pytest

from tests.cluster import local_calls_skip_proxies
from virtual_llms.publisher import broker as broker_module
from virtual_llms.publisher import transport
from virtual_llms.publisher.broker import NOT_SENT, BrokerClient
from virtual_llms.publisher.check import check
from virtual_llms.publisher.config import Config

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return head, await reader.readexactly(int(line.split(b":", 1)[1]))
    return head, b""


async def closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.close()


async def resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"this is not HTTP\r\n\r\n")
    await writer.drain()
    writer.close()


async def short_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
    await writer.drain()
    writer.close()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    await asyncio.sleep(10)


async def answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        try:
            await read_request(reader)
        except asyncio.IncompleteReadError:
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()


@dataclass
class Recorder:
    """A server's record: each request's head (lowercased) and body, each connection's
    peer."""

    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    peers: list[object] = field(default_factory=list)

    def answering(self, response: bytes) -> Handler:
        """Records every request on a connection, answering each with ``response``."""

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.peers.append(writer.get_extra_info("peername"))
            while True:
                try:
                    head, body = await read_request(reader)
                except asyncio.IncompleteReadError:
                    return
                self.heads.append(head.lower())
                self.bodies.append(body)
                writer.write(response)
                await writer.drain()

        return handler


def assert_carries(head: bytes, url: str) -> None:
    """The request line, Host, the caller's headers over the client's (one User-Agent, the
    caller's) and the JSON body's type: what both header tests send."""
    port = url.split(":")[2].split("/")[0]
    lines = head.split(b"\r\n")
    assert lines[0] == b"post /x http/1.1"
    for header in (
        b"host: 127.0.0.1:" + port.encode(),
        b"authorization: bearer t",
        b"content-type: application/json",
        b"x-default: client",
        b"user-agent: caller-agent",
    ):
        assert header in lines
    assert sum(line.startswith(b"user-agent:") for line in lines) == 1


CLIENT_HEADERS = {"X-Default": "client", "User-Agent": "client-agent"}
CALLER_HEADERS = {"Authorization": "Bearer t", "user-agent": "caller-agent"}


def answers_after(seconds: float) -> Handler:
    """Answers every request 200, ``seconds`` late."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            await asyncio.sleep(seconds)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    return handler


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(handler: Handler) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            await handler(reader, writer)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x"

    yield start
    for server in servers:
        server.close()
    for writer in writers:
        writer.close()
    for server in servers:
        await server.wait_closed()


Post = Callable[..., Awaitable[httpx.Response]]


@pytest.fixture(params=["post_json", "direct", "send"])
def post(request: pytest.FixtureRequest) -> Post:
    """A JSON POST read to its end, by ``Client.post_json`` (the agent's hot calls: aiohttp
    straight; its Reply as an httpx.Response here), ``Client.direct`` (the upstream's
    streamed answers) or by httpx's own ``send`` (``AsyncClient.post``)."""

    async def call(url: str, **kwargs: float) -> httpx.Response:
        timeout = httpx.Timeout(5.0, **kwargs)
        async with transport.client() as http:
            if request.param == "post_json":
                reply = await http.post_json(url, headers={}, json={"a": 1}, timeout=timeout)
                return httpx.Response(reply.status_code, content=reply.content)
            if request.param == "direct":
                response = await http.direct(
                    "POST", url, headers={}, json={"a": 1}, timeout=timeout
                )
            else:
                response = await http.post(url, json={"a": 1}, timeout=timeout)
            try:
                await response.aread()
            finally:
                await response.aclose()
            return response

    return call


async def test_a_refused_connection_is_not_sent(post: Post) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(httpx.ConnectError) as caught:
        await post(f"http://127.0.0.1:{port}/x")
    assert isinstance(caught.value, NOT_SENT)


@pytest.mark.parametrize(
    ("handler", "error"),
    [
        (closes, httpx.RemoteProtocolError),
        (resets, httpx.ReadError),
        (garbage, httpx.RemoteProtocolError),
        (short_body, httpx.ReadError),
    ],
)
async def test_a_connection_that_breaks_after_the_request_went_out_may_have_been_sent(
    serve: Callable[[Handler], Awaitable[str]],
    post: Post,
    handler: Handler,
    error: type[httpx.HTTPError],
) -> None:
    url = await serve(handler)
    with pytest.raises(httpx.HTTPError) as caught:
        await post(url)
    assert type(caught.value) is error
    assert not isinstance(caught.value, NOT_SENT)
    assert caught.value.request.url == url


async def test_a_connection_that_breaks_while_the_response_closes_may_have_been_sent() -> None:
    """Closing a response waits for its request body's writer; httpx-aiohttp maps a broken
    pipe there to ConnectTimeout, which would read as "never sent"."""

    class BreaksOnClose(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"ok"

        async def aclose(self) -> None:
            try:
                raise aiohttp.ClientOSError(32, "Broken pipe")
            except aiohttp.ClientOSError as exc:
                raise httpx.ConnectTimeout("Broken pipe") from exc  # as httpx-aiohttp maps it

    request = httpx.Request("POST", "http://b/x")
    body = transport._Body(BreaksOnClose(), request)
    with pytest.raises(httpx.ReadError) as caught:
        await body.aclose()
    assert not isinstance(caught.value, NOT_SENT)


async def test_a_silent_server_is_a_read_timeout(
    serve: Callable[[Handler], Awaitable[str]], post: Post
) -> None:
    url = await serve(silent)
    with pytest.raises(httpx.ReadTimeout):
        await post(url, read=0.2)


async def test_a_direct_request_carries_its_headers_and_json(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    """``Client.direct`` skips the client's layers, not what a request needs: Host, the
    client's headers (httpx's Accept-Encoding: what the response will be decoded with)
    under the caller's, whatever their case, the JSON body and its length and type."""
    record = Recorder()
    url = await serve(record.answering(b'HTTP/1.1 201 Created\r\nContent-Length: 7\r\n\r\n{"a":2}'))
    async with transport.client(headers=CLIENT_HEADERS) as http:
        response = await http.direct(
            "POST", url, headers=CALLER_HEADERS, json={"é": [1]}, timeout=httpx.Timeout(5.0)
        )
        await response.aread()
        await response.aclose()
        accept_encoding = http.headers["Accept-Encoding"].encode()
    assert (response.status_code, response.json()) == (201, {"a": 2})
    assert_carries(record.heads[0], url)
    assert b"accept-encoding: " + accept_encoding in record.heads[0].split(b"\r\n")
    assert record.bodies == ['{"é":[1]}'.encode()]


async def test_a_hot_post_carries_its_headers_and_json_and_decodes_the_answer(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    """``Client.post_json`` hands aiohttp what ``direct`` hands httpx (Host, the client's
    headers under the caller's, whatever their case, the JSON body as httpx encodes it),
    but asks for the encodings aiohttp decodes, and decodes them: a gzipped answer comes
    back as its JSON. Two calls share one connection."""
    answer = gzip.compress(b'{"a":2}')
    record = Recorder()
    url = await serve(
        record.answering(
            b"HTTP/1.1 201 Created\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: " + str(len(answer)).encode() + b"\r\n\r\n" + answer
        )
    )
    async with transport.client(headers=CLIENT_HEADERS) as http:
        replies = [
            await http.post_json(
                url,
                headers=CALLER_HEADERS,
                json={"é": [1], "n": None},
                timeout=httpx.Timeout(5.0),
            )
            for _ in range(2)
        ]
    assert [(r.status_code, r.json(), r.headers["content-encoding"]) for r in replies] == [
        (201, {"a": 2}, "gzip")
    ] * 2
    assert_carries(record.heads[0], url)
    lines = record.heads[0].split(b"\r\n")
    encodings = [line for line in lines if line.startswith(b"accept-encoding:")]
    assert len(encodings) == 1
    assert b"gzip" in encodings[0]
    assert record.bodies == ['{"é":[1],"n":null}'.encode()] * 2
    assert len(record.peers) == 1


async def test_answers_come_back_on_one_kept_connection(
    serve: Callable[[Handler], Awaitable[str]],
) -> None:
    record = Recorder()
    url = await serve(record.answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    async with transport.client() as http:
        for _ in range(3):
            response = await http.post(url, json={"a": 1})
            assert (response.status_code, response.text) == (200, "ok")
    assert len(record.peers) == 1


async def test_a_control_stream_that_goes_silent_is_lost(
    serve: Callable[[Handler], Awaitable[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SSE control stream's read timeout holds on this transport: a broker that stops
    sending (no task, no keep-alive comment) is left, and the agent reconnects."""
    from virtual_llms.publisher import control
    from virtual_llms.publisher.broker import BrokerClient

    async def ready_then_silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        event = b'event: ready\ndata: {"providerSessionId": "s"}\n\n'
        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
        await asyncio.sleep(10)

    monkeypatch.setattr(control, "SSE_READ_TIMEOUT", 0.3)
    url = (await serve(ready_then_silent)).removesuffix("/x")
    broker = BrokerClient([url], "tok")
    frames: list[dict[str, object]] = []

    async def read_all() -> None:
        async for frame in control.open_stream(broker, "s", "sse"):
            frames.append(frame)

    with pytest.raises(control.StreamLost, match=r"no data for 0\.3 s"):
        await asyncio.wait_for(read_all(), 5)
    assert [frame["type"] for frame in frames] == ["ready"]
    await broker.aclose()


# --- proxies from the environment ---------------------------------------------------------------

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture
def proxy(
    serve: Callable[[Handler], Awaitable[str]], monkeypatch: pytest.MonkeyPatch
) -> Callable[[], Awaitable[tuple[str, list[bytes]]]]:
    """A forward proxy that answers every request itself (``proxied``) and records its
    request line and its Proxy-Authorization header, if any; the environment's other proxy
    settings are cleared."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)

    async def start() -> tuple[str, list[bytes]]:
        lines: list[bytes] = []

        async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                lines.append(head.split(b"\r\n", 1)[0])
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"proxy-authorization:"):
                        lines.append(line)
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":", 1)[1]))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nproxied")
                await writer.drain()

        url = await serve(forward)
        return url.rsplit("/", 1)[0], lines

    return start


@pytest.mark.parametrize(
    ("no_proxy", "answer", "via_proxy"),
    [(None, "proxied", True), ("localhost,127.0.0.1", "ok", False)],
    ids=["proxied", "no_proxy"],
)
async def test_calls_go_where_the_environments_proxy_settings_say(
    serve: Callable[[Handler], Awaitable[str]],
    proxy: Callable[[], Awaitable[tuple[str, list[bytes]]]],
    post: Post,
    monkeypatch: pytest.MonkeyPatch,
    no_proxy: str | None,
    answer: str,
    via_proxy: bool,
) -> None:
    """As the agent builds it (no transport given), the client sends both kinds of call
    through ``HTTP_PROXY``, and straight to a host ``NO_PROXY`` names: where httpx's own
    client (``mcpd-publish check``, the openai SDK) and websockets (the WebSocket control
    stream) send theirs."""
    target = await serve(answers)
    proxy_url, lines = await proxy()
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    if no_proxy is not None:
        monkeypatch.setenv("NO_PROXY", no_proxy)
    response = await post(target)
    assert (response.status_code, response.text) == (200, answer)
    assert lines == ([b"POST " + target.encode() + b" HTTP/1.1"] if via_proxy else [])


async def test_the_suites_own_calls_skip_a_proxy_the_developer_set(
    serve: Callable[[Handler], Awaitable[str]],
    proxy: Callable[[], Awaitable[tuple[str, list[bytes]]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """conftest and the bench add this machine to NO_PROXY, keeping what was there."""
    target = await serve(answers)
    proxy_url, lines = await proxy()
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    monkeypatch.setenv("NO_PROXY", "example.com")
    monkeypatch.setenv("no_proxy", "")
    local_calls_skip_proxies()
    local_calls_skip_proxies()
    assert os.environ["NO_PROXY"] == "example.com,127.0.0.1,localhost,::1"
    assert os.environ["no_proxy"] == "127.0.0.1,localhost,::1"
    async with transport.client() as http:
        response = await http.post(target, json={})
    assert (response.text, lines) == ("ok", [])


# httpx-aiohttp hands a proxy's credentials to aiohttp as a BasicAuth, deprecated in aiohttp
# 3.14 for a Proxy-Authorization header in proxy_headers; but aiohttp sends proxy_headers only
# on a CONNECT, not with a plain-HTTP request (aio-libs/aiohttp#4422), so the old way is the
# one that works for both. Outside tests Python does not show this warning.
@pytest.mark.filterwarnings("ignore:The 'proxy_auth' parameter is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:BasicAuth is deprecated:DeprecationWarning")
async def test_the_agents_broker_client_and_check_use_the_environments_proxy(
    serve: Callable[[Handler], Awaitable[str]],
    proxy: Callable[[], Awaitable[tuple[str, list[bytes]]]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """The broker client as the agent makes it (register, heartbeats, answers) and
    ``mcpd-publish check`` both go through the proxy: check vouches for the route the agent
    will take, and says it is a proxy's (without the proxy's credentials)."""
    broker = (await serve(answers)).rsplit("/", 1)[0]
    proxy_url, lines = await proxy()
    monkeypatch.setenv("HTTP_PROXY", proxy_url.replace("://", "://user:secret@"))
    client = BrokerClient([broker], "tok")
    try:
        response = await client.post("/api/v1/virtual/heartbeat", {"providerSessionId": "s"})
    finally:
        await client.aclose()
    assert response.content == b"proxied"
    config = Config(brokers=(broker,), token="tok", llms=(), state_file=tmp_path / "state")
    said: list[tuple[bool, str]] = []
    assert not await check(config, lambda ok, line: said.append((ok, line)))
    assert said == [
        (
            False,
            f"broker {broker}: unexpected answer proxied (200) (is this an mcpd broker URL?) "
            f"(through the proxy {proxy_url})",
        )
    ]
    heartbeat = b"POST " + broker.encode() + b"/api/v1/virtual/heartbeat HTTP/1.1"
    credentials = b"Proxy-Authorization: Basic " + base64.b64encode(b"user:secret")
    assert lines == [heartbeat, credentials, heartbeat, credentials]


async def test_check_opens_the_websocket_stream_through_the_proxy_websockets_picks(
    serve: Callable[[Handler], Awaitable[str]],
    proxy: Callable[[], Awaitable[tuple[str, list[bytes]]]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Over WebSocket, check also opens the stream's socket as the agent does (websockets):
    through the proxy websockets picks, ``HTTPS_PROXY`` even for ``ws://``, with its
    credentials, and the line names that proxy (without them). This proxy answers every
    request itself, the handshake too (200, not 101), so the socket cannot be opened."""
    broker = (await serve(answers)).rsplit("/", 1)[0]
    proxy_url, lines = await proxy()
    monkeypatch.setenv("HTTPS_PROXY", proxy_url.replace("://", "://user:secret@"))
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # httpx's pick for http://
    config = Config(
        brokers=(broker,), token="tok", llms=(), state_file=tmp_path / "state", transport="ws"
    )
    said: list[tuple[bool, str]] = []
    assert not await check(config, lambda ok, line: said.append((ok, line)))
    assert [ok for ok, _ in said] == [False, False]
    assert said[0][1].endswith("(through the proxy http://127.0.0.1:9)")
    assert said[1][1].startswith(f"broker {broker}: WebSocket stream: cannot be opened: ")
    assert said[1][1].endswith(f"(through the proxy {proxy_url})")
    credentials = b"Proxy-Authorization: Basic " + base64.b64encode(b"user:secret")
    assert lines[:2] == [
        b"CONNECT " + broker.removeprefix("http://").encode() + b" HTTP/1.1",
        credentials,
    ]


async def test_a_broker_url_slower_than_the_probes_deadline_takes_no_share(
    serve: Callable[[Handler], Awaitable[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's deadline holds on the agent's real transport (a mock one has no clock):
    the second URL would pass the distance rule (2 x 0.2 s + 25 ms) but answers after it."""
    monkeypatch.setattr(broker_module, "PROBE_TIMEOUT", httpx.Timeout(0.25))
    urls = [(await serve(answers_after(delay))).rsplit("/", 1)[0] for delay in (0.2, 0.3, 0.2)]
    client = BrokerClient(urls, "tok")
    try:
        await client.probe("s1")
    finally:
        await client.aclose()
    assert client.proven == {urls[2]}
