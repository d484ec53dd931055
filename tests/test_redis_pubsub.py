"""virtual_llms/redis_pubsub.py: the channel layer reads pub/sub messages with a parser that
does not turn each one into a discarded debug line (redis/redis-py#4230)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from channels_redis.utils import create_pool
from django.conf import settings
from redis.utils import HIREDIS_AVAILABLE

from virtual_llms import events
from virtual_llms.redis_pubsub import PubSubParser, layer_address, layer_host


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
