"""virtual_llms/runtime/: each patch of, or reliance on, a third-party internal, checked
against the installed library, so an upgrade that changes what it relies on fails here
loudly rather than silently somewhere else."""

from __future__ import annotations

import asyncio
import inspect
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


def test_twisted_still_has_what_the_drain_closes_idle_connections_by() -> None:
    """DrainingServer._close_idle: a connection's protocol from daphne's factory wraps an
    HTTPChannel (``_channel``) whose ``requests`` lists the requests in progress."""
    from daphne.server import HTTPFactory
    from twisted.internet.testing import StringTransport
    from twisted.web.http import HTTPChannel

    protocol: Any = HTTPFactory(None).buildProtocol(None)
    assert isinstance(protocol._channel, HTTPChannel)
    protocol.makeConnection(StringTransport())
    assert protocol._channel.requests == []  # idle; Twisted appends each request it reads


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
