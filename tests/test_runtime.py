"""virtual_llms/runtime/: each patch of, or reliance on, a third-party internal, checked
against the installed library, so an upgrade that changes what it relies on fails here
loudly rather than silently somewhere else."""

from __future__ import annotations

import asyncio
import inspect
import sys
from typing import Any, cast

import django
import msgpack
import pytest
from channels_redis.utils import create_pool
from django.conf import settings
from redis.utils import HIREDIS_AVAILABLE

from virtual_llms import events
from virtual_llms.runtime.redis_parser import PubSubParser, layer_address, layer_host

# --- redis_parser: redis-py's hiredis parser without its discarded debug line --------------


class Unprintable(bytes):
    """A message part that fails the test if anything turns it into text."""

    def __str__(self) -> str:
        raise AssertionError("the pub/sub message was formatted")

    __repr__ = __str__


async def test_the_parser_passes_pubsub_messages_on_unformatted() -> None:
    parser = PubSubParser(socket_read_size=65536)
    message = [b"message", b"channel", Unprintable(b"payload")]
    assert await parser.pubsub_push_handler_func(message) is message


def test_the_layer_host_names_the_url_and_the_parser() -> None:
    url = "redis://127.0.0.1:6379/0"
    host = layer_host(url)
    assert layer_address(host) == url
    if HIREDIS_AVAILABLE:
        assert isinstance(host, dict)
        # channels-redis builds the layer's pool from this entry: its connections get it.
        assert create_pool(host).connection_kwargs["parser_class"] is PubSubParser


async def test_the_layer_carries_a_big_message_through_redis() -> None:
    if not settings.REDIS_URL:
        pytest.skip("the in-memory layer has no Redis connections")
    config = cast(dict[str, Any], settings.CHANNEL_LAYERS["default"]["CONFIG"])
    assert config["hosts"] == [layer_host(settings.REDIS_URL)]
    channel = await events.new_channel()
    try:
        message = {"type": "task.event", "taskId": "t", "event": {"json": b"7" * 600_000}}
        await events.send(channel, message)
        assert await asyncio.wait_for(events.receive(channel), 5) == message
    finally:
        await events.close_layer()


async def test_a_dropped_subscription_is_opened_again() -> None:
    """runtime/channels_layer.resubscribe_dropped leaves a live subscription alone, and its
    forced PING (recovery.py) keeps messages flowing. Fails loudly if channels-redis renames
    what it relies on (_get_layer, _shards, _pubsub, _lock)."""
    if not settings.REDIS_URL:
        pytest.skip("the in-memory layer has no Redis connections")
    from virtual_llms.runtime.channels_layer import _shards

    channel = await events.new_channel()
    try:
        await events.send(channel, {"type": "queue.ready", "llmId": "1", "waiter": "w"})
        await asyncio.wait_for(events.receive(channel), 5)
        shards = _shards(events.layer())
        assert shards
        assert all(hasattr(s, "_lock") and s._pubsub is not None for s in shards)
        assert await events.resubscribe_dropped() == 0  # connected: nothing to do, no I/O
        # What recovery.py does after an outage: a PING on every subscriber connection.
        assert await events.resubscribe_dropped(force=True) == len(shards)
        # The stuck case (the connection dropped while Redis was down, so redis-py's one
        # reconnect failed) needs Redis down: tests/test_multiproc_restarts.py.
        message = {"type": "queue.ready", "llmId": "1", "waiter": "again"}
        await events.send(channel, message)
        assert await asyncio.wait_for(events.receive(channel), 5) == message
    finally:
        await events.close_layer()


def test_the_stock_parser_still_formats_every_message() -> None:
    """The reason for PubSubParser (redis/redis-py#4230). When this fails, the installed
    redis-py no longer formats pub/sub messages: drop PubSubParser and layer_host's entry."""
    from redis._parsers import _AsyncHiredisParser

    source = inspect.getsource(_AsyncHiredisParser)
    assert "Push response" in source, "redis-py fixed #4230: drop runtime/redis_parser.py"
    assert hasattr(_AsyncHiredisParser, "handle_pubsub_push_response")


# --- daphne_server: Twisted's form parsing and request log off ------------------------------


def test_serve_turns_off_twisted_request_work_daphne_never_uses() -> None:
    from daphne import http_protocol, server
    from twisted.web.test.requesthelper import DummyChannel

    from virtual_llms.runtime.daphne_server import (
        skip_form_parsing,
        skip_twisted_request_log,
    )

    class Server:
        def protocol_connected(self, protocol: object) -> None:
            pass

    def request() -> Any:
        channel: Any = DummyChannel()
        channel.factory = type("Factory", (), {"server": Server()})()
        made = http_protocol.WebRequest(channel)
        made.method, made.uri, made.clientproto = b"POST", b"/v1/x", b"HTTP/1.1"
        return made

    # Stock Twisted: a POST's form body is parsed, and every request is logged by the factory.
    assert request()._parsePOSTFormSubmission is True
    written: list[str] = []
    log_file = type("Log", (), {"write": lambda self, line: written.append(line)})()
    stock = server.HTTPFactory(None)
    stock._logFile = log_file
    stock.log(request())
    assert len(written) == 1
    assert '"POST /v1/x HTTP/1.1"' in written[0]

    form_parsing, factory = http_protocol.WebRequest, server.HTTPFactory
    try:
        for _ in range(2):  # idempotent: serve may run in a process that already patched
            skip_form_parsing()
            skip_twisted_request_log()
        assert request()._parsePOSTFormSubmission is False
        quiet = server.HTTPFactory(None)
        assert isinstance(quiet, factory)
        quiet._logFile = log_file
        quiet.log(request())
        assert len(written) == 1
    finally:
        http_protocol.WebRequest, server.HTTPFactory = form_parsing, factory


# --- django_asgi: Django's handler without its per-request thread ---------------------------


def test_django_still_has_what_the_asgi_handlers_rewrite() -> None:
    """ApiASGIHandler.handle is Django 5.2's handle() re-written: the methods it calls must
    exist with the arguments it passes. On another Django, re-read handle() against it."""
    from django.core.handlers.asgi import ASGIHandler

    assert django.VERSION[:2] == (5, 2), "re-read runtime/django_asgi.py against this Django"
    calls = {
        "read_body": ["receive"],
        "create_request": ["scope", "body_file"],
        "run_get_response": ["request"],
        "send_response": ["response", "send"],
        "listen_for_disconnect": ["receive"],
        "adapt_method_mode": ["is_async", "method", "method_is_async"],
    }
    for name, params in calls.items():
        signature = inspect.signature(getattr(ASGIHandler, name))
        assert list(signature.parameters)[1 : len(params) + 1] == params, (name, signature)
    assert callable(ASGIHandler._get_response_async)  # type: ignore[attr-defined]
    assert "ThreadSensitiveContext" in inspect.getsource(ASGIHandler.__call__)


# --- channels_layer: the pub/sub layer's bytes, and channels' dispatch ----------------------


def test_the_pubsub_layer_publishes_plain_msgpack() -> None:
    """The Redis scripts publish ``layer.serialize(message)``; that must be what the layer's
    send() publishes, and plain msgpack (what the hubs' layer reads back)."""
    from channels_redis.pubsub import RedisPubSubChannelLayer, RedisPubSubLoopLayer

    layer = RedisPubSubChannelLayer(hosts=["redis://127.0.0.1:6379/0"])
    message = {"type": "task.event", "taskId": "t", "event": {"json": b"{}"}}
    assert layer.serialize(message) == msgpack.packb(message)
    assert layer.deserialize(msgpack.packb(message)) == message
    send = inspect.getsource(RedisPubSubLoopLayer.send)
    assert "publish(channel, self.channel_layer.serialize(message))" in send


def test_channels_dispatch_still_checks_the_database_before_each_message() -> None:
    """The reason for NoDatabaseCheckDispatch. When this fails, channels no longer runs
    close_old_connections per message: drop the mixin."""
    from channels.consumer import AsyncConsumer, get_handler_name

    assert "aclose_old_connections" in inspect.getsource(AsyncConsumer.dispatch)
    assert get_handler_name({"type": "websocket.receive"}) == "websocket_receive"


def test_the_pubsub_layers_lost_connection_logs_one_line() -> None:
    """channels-redis logs its receive loop's failures with a traceback; a lost Redis is one
    line (settings.LOGGING), anything else keeps its traceback."""
    import logging

    import redis.exceptions

    from virtual_llms.runtime.channels_layer import QuietConnectionErrors

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            import sys

            return logging.LogRecord(
                "channels_redis.pubsub",
                logging.ERROR,
                __file__,
                1,
                "Unexpected exception in receive task",
                (),
                sys.exc_info(),
            )

    lost = record(redis.exceptions.ConnectionError("Connection closed by server."))
    assert QuietConnectionErrors().filter(lost)
    assert lost.exc_info is None
    assert lost.levelno == logging.WARNING
    assert lost.getMessage() == "Unexpected exception in receive task: Connection closed by server."

    def race() -> None:  # a reconnect read racing another coroutine's, as in CI
        try:
            raise redis.exceptions.ConnectionError("Connection closed by server.")
        except redis.exceptions.ConnectionError:
            raise RuntimeError(
                "read() called while another coroutine is already waiting for incoming data"
            ) from None

    try:
        race()
    except RuntimeError as exc:
        raced = record(exc)
    assert QuietConnectionErrors().filter(raced)
    assert raced.exc_info is None
    assert raced.levelno == logging.WARNING
    unrelated = record(RuntimeError("read() called while another coroutine is already waiting"))
    assert QuietConnectionErrors().filter(unrelated)
    assert unrelated.exc_info is not None  # no lost connection behind it: a bug, kept
    bug = record(ValueError("a bug"))
    assert QuietConnectionErrors().filter(bug)
    assert bug.exc_info is not None
    assert bug.levelno == logging.ERROR
    assert logging.getLogger("channels_redis.pubsub").filters, "settings.LOGGING installs it"


def test_whitenoise_still_has_what_the_static_files_middleware_uses() -> None:
    from whitenoise.middleware import WhiteNoiseMiddleware

    from virtual_llms.runtime.static_files import StaticFilesMiddleware, _Settings

    whitenoise = WhiteNoiseMiddleware(get_response=None, settings=_Settings())
    assert isinstance(whitenoise.autorefresh, bool)
    assert isinstance(whitenoise.files, dict)
    assert whitenoise.static_prefix == "/static/"
    assert list(inspect.signature(whitenoise.find_file).parameters) == ["url"]
    assert list(inspect.signature(WhiteNoiseMiddleware.serve).parameters) == [
        "static_file",
        "request",
    ]
    assert isinstance(inspect.getattr_static(WhiteNoiseMiddleware, "serve"), staticmethod)
    assert StaticFilesMiddleware.async_capable
    assert not StaticFilesMiddleware.sync_capable


def test_django_still_has_what_the_static_files_storage_uses() -> None:
    from django.contrib.staticfiles.storage import ManifestFilesMixin

    from virtual_llms.runtime.static_files import StaticFilesStorage

    storage = StaticFilesStorage(location="/nonexistent")
    assert storage.hashed_files == {}  # no manifest there
    assert storage.stored_name("admin/css/base.css") == "admin/css/base.css"
    assert list(inspect.signature(ManifestFilesMixin.stored_name).parameters) == ["self", "name"]
    storage.hashed_files = {"admin/css/base.css": "admin/css/base.0123456789ab.css"}
    assert storage.stored_name("admin/css/base.css") == "admin/css/base.0123456789ab.css"
    with pytest.raises(ValueError, match="Missing staticfiles manifest entry"):
        storage.stored_name("admin/css/new.css")  # a stale collectstatic still fails loudly


# --- send_buffers: what each connection's transport holds unsent ----------------------------


def _stuck_transport() -> Any:
    """A real Twisted transport (FileDescriptor's buffering and producer logic) whose peer
    takes ``accept`` bytes per write attempt: 0 is a peer that stopped reading."""
    from twisted.internet import abstract

    class Stuck(abstract.FileDescriptor):
        accept = 0
        aborted = False
        connected = True

        def writeSomeData(self, data: bytes) -> int:
            return min(len(data), self.accept)

        def startWriting(self) -> None:  # no reactor: the test calls doWrite itself
            pass

        def stopWriting(self) -> None:
            pass

        startReading = stopReading = stopWriting

        def abortConnection(self) -> None:
            self.aborted = True

        def getPeer(self) -> Any:
            from twisted.internet.address import IPv4Address

            return IPv4Address("TCP", "127.0.0.1", 50000)

        getHost = getPeer

    return Stuck()


async def test_a_send_buffer_hears_the_transport_fill_and_drain_and_bounds_it() -> None:
    """Through daphne's own Server and WebRequest on Twisted's HTTP channel: the ASGI send is
    the server's handle_reply, a streamed answer's producer is told when the transport holds
    more than 64 KiB and when it drained, bytes sent while it is full are counted, and past
    the bound the connection is aborted. On failure, re-read runtime/send_buffers.py."""
    from types import SimpleNamespace

    from daphne import http_protocol
    from daphne.server import Server
    from twisted.web import http

    from virtual_llms.runtime.send_buffers import MeteredServer, _unsent, of

    sent: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        sent.append(send)

    class Metered(MeteredServer, Server):
        default_limit = 100_000

    server = Metered(app, endpoints=["tcp:port=0"], signal_handlers=False)
    server.connections = {}
    transport = _stuck_transport()
    channel = http.HTTPChannel()
    channel.factory = SimpleNamespace(server=server, log=lambda request: None)
    channel.makeConnection(transport)
    channel.setTimeout(None)
    # Twisted registers the HTTP channel as its transport's producer (after a WebSocket
    # upgrade daphne leaves it there: send_buffers replaces it with its own).
    assert transport.producer is channel
    assert "unregisterProducer" not in inspect.getsource(http_protocol.WebRequest.process)
    request = http_protocol.WebRequest(channel)
    scope: dict[str, Any] = {"type": "http", "path": "/v1/chat/completions"}
    server.create_application(request, scope)
    await asyncio.sleep(0)
    buffer = of(scope)
    assert buffer is not None
    assert buffer.limit == 100_000
    # daphne hands the application send=partial(server.handle_reply, protocol).
    send = sent[0]
    assert send.func == server.handle_reply
    assert send.args == (request,)

    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"x" * 70_000, "more_body": True})
    assert buffer.attached
    assert request.producer is buffer
    assert buffer.full
    assert buffer.held == 0
    await send({"type": "http.response.body", "body": b"y" * 60_000, "more_body": True})
    assert buffer.held == 60_000
    assert not transport.aborted
    # What the transport holds unsent, read from its buffer's fields: all of it so far (the
    # headers, two parts and their chunked framing).
    unsent = _unsent(transport)
    assert unsent is not None
    assert 130_000 < unsent < 130_200
    # A peer that reads, but slower than it is sent to: the buffer never drains, and what
    # it took is not charged (held is at most what is unsent).
    transport.accept = unsent - 20_000
    transport.doWrite()
    assert buffer.full
    assert _unsent(transport) == 20_000
    await send({"type": "http.response.body", "body": b"w" * 50_000, "more_body": True})
    assert buffer.held == 70_000  # what is unsent now, not the 110,000 sent since it filled
    assert not transport.aborted
    transport.accept = 1 << 30  # the peer reads again: everything is sent
    transport.doWrite()
    assert not buffer.full
    assert buffer.held == 0
    transport.accept = 0
    for _ in range(4):
        await send({"type": "http.response.body", "body": b"z" * 70_000, "more_body": True})
    assert buffer.overflowed
    assert transport.aborted
    assert not buffer.attached
    assert request.producer is None
    before = transport._tempDataLen
    await send({"type": "http.response.body", "body": b"z" * 70_000, "more_body": True})
    assert transport._tempDataLen == before  # dropped, not buffered


async def test_a_finished_answer_leaves_no_producer_for_the_next_request() -> None:
    """Twisted wants a request's producer unregistered before it finishes (else it logs a
    failure and the next request on the connection could not register one)."""
    from types import SimpleNamespace

    from daphne import http_protocol
    from daphne.server import Server
    from twisted.web import http

    from virtual_llms.runtime.send_buffers import MeteredServer, of

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    class Metered(MeteredServer, Server):
        default_limit = 100_000

    server = Metered(app, endpoints=["tcp:port=0"], signal_handlers=False)
    server.connections = {}
    transport = _stuck_transport()
    transport.accept = 1 << 30
    channel = http.HTTPChannel()
    channel.factory = SimpleNamespace(server=server, log=lambda request: None)
    channel.makeConnection(transport)
    channel.setTimeout(None)
    request = http_protocol.WebRequest(channel)
    request.method, request.uri, request.clientproto = b"POST", b"/v1/x", b"HTTP/1.1"
    channel.requests.append(request)  # as the channel does with each request it reads
    scope: dict[str, Any] = {"type": "http", "path": "/v1/chat/completions"}
    server.create_application(request, scope)
    buffer = of(scope)
    assert buffer is not None
    await server.handle_reply(request, {"type": "http.response.start", "status": 200})
    await server.handle_reply(
        request, {"type": "http.response.body", "body": b"a", "more_body": True}
    )
    assert request.producer is buffer
    assert channel._requestProducer is buffer
    await server.handle_reply(request, {"type": "http.response.body", "body": b"b"})
    assert request.finished
    assert channel._requestProducer is None
    # A one-part answer never registers a producer at all (nothing to count).
    unary = http_protocol.WebRequest(channel)
    unary.method, unary.uri, unary.clientproto = b"GET", b"/v1/models", b"HTTP/1.1"
    channel.requests.append(unary)
    server.create_application(unary, {"type": "http", "path": "/v1/models"})
    await server.handle_reply(unary, {"type": "http.response.start", "status": 200})
    await server.handle_reply(unary, {"type": "http.response.body", "body": b"{}"})
    assert unary.finished
    assert channel._requestProducer is None
    await asyncio.sleep(0)


@pytest.mark.skipif(sys.platform != "linux", reason="TCP_USER_TIMEOUT is Linux's")
def test_the_kernel_has_a_tcp_user_timeout() -> None:
    """The stall bound of control streams is TCP's user timeout (Linux); where it is missing
    only the byte bound holds (docs/design.md)."""
    import socket

    from virtual_llms.runtime.send_buffers import SendBuffer, _socket_of

    assert hasattr(socket, "TCP_USER_TIMEOUT")
    with socket.socket() as sock:
        transport = type("Transport", (), {"getHandle": lambda self: sock})()
        assert _socket_of(transport) is sock
        buffer = SendBuffer(transport, lambda: None, 0, "/x")
        assert buffer.stall_after(2.5)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2500
