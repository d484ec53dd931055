"""How the channel layer connects to Redis: its ``hosts`` entry (settings.CHANNEL_LAYERS),
with a parser patched for redis-py 8.1.

redis-py 8.1's hiredis parser builds a debug line out of every pub/sub message it reads,
``"Push response: " + str(response)``, before the logger is asked whether debug is on: the
whole message is turned into text and thrown away, whatever the logging settings
(redis/redis-py#4230; fixed by #4231, in no release yet). Every event of a relayed request
on several workers is a pub/sub message; for a 500 KB answer that line costs 1 ms of the
client's worker's CPU. The layer's connections use the same parser without that line. Drop
:class:`PubSubParser` once a redis-py release has the fix (tests/test_runtime.py says so when
the stock parser no longer formats messages).
"""

from __future__ import annotations

from typing import Any

from redis._parsers import _AsyncHiredisParser
from redis.utils import HIREDIS_AVAILABLE


class PubSubParser(_AsyncHiredisParser):
    """redis-py's hiredis parser, passing pub/sub messages on as they are."""

    async def handle_pubsub_push_response(self, response: Any) -> Any:
        return response


def layer_host(url: str) -> str | dict[str, Any]:
    """The channel layer's ``hosts`` entry for the Redis server at ``url``."""
    if not HIREDIS_AVAILABLE:
        return url  # redis-py's own parser then, in pure Python
    return {"address": url, "parser_class": PubSubParser}


def layer_address(host: str | dict[str, Any]) -> str:
    """The URL of a ``hosts`` entry (:func:`layer_host`)."""
    return str(host["address"]) if isinstance(host, dict) else host
