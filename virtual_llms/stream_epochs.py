"""Control streams' epochs that say, to whoever reads a presence record (the admin's Fleet
page), the stream's transport, the worker that holds it and when it opened."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

TRANSPORTS = ("sse", "ws")


def new(transport: str) -> str:
    """A new stream's epoch: ``<transport>.<worker>.<unix seconds>.<random>``. Still only
    compared for equality by the relay; no space (a presence record is "<hub> <epoch>"), and
    only characters that a JSON string and a log line take as they are."""
    from . import request_log  # not at import: it imports the relay, which imports the hub

    return f"{transport}.{request_log.worker_name()}.{int(time.time())}.{secrets.token_hex(8)}"


@dataclass(frozen=True)
class StreamInfo:
    transport: str
    worker: str
    since: datetime | None


def parse(epoch: str) -> StreamInfo | None:
    """What ``new`` put in an epoch; None for one that does not read so (one made before)."""
    parts = epoch.split(".")
    if len(parts) != 4 or parts[0] not in TRANSPORTS or not parts[2].isdigit():
        return None
    return StreamInfo(parts[0], parts[1], datetime.fromtimestamp(int(parts[2]), UTC))
