"""protocol.py: every hub message the broker makes is one the hub can route, checked where it
comes in; anything else is refused there, loudly."""

from __future__ import annotations

import re
from typing import Any, get_args

import pytest

from virtual_llms import hub as hub_mod
from virtual_llms import protocol

EXAMPLES: dict[str, dict[str, Any]] = {
    "task.push": {
        "type": "task.push",
        "sid": "s",
        "epoch": "e",
        "hops": 0,
        "frame": {"kind": "wake", "taskId": "t", "llmName": "m"},
        "reply": "ch",
        "tokenId": 1,
    },
    "task.cancel": {"type": "task.cancel", "sid": "s", "epoch": "e", "taskId": "t"},
    "task.event": {"type": "task.event", "taskId": "t", "event": {"kind": "chunks", "chunks": []}},
    "stream.replace": {"type": "stream.replace", "sid": "s", "epoch": "e"},
    "session.closed": {"type": "session.closed", "sid": "s", "epoch": "e"},
    "token.revoked": {"type": "token.revoked", "tokenId": 1},
    "llm.evicted": {"type": "llm.evicted", "llmId": "x"},
    "backend.evicted": {"type": "backend.evicted", "llmId": "x", "sid": "s"},
    "queue.ready": {"type": "queue.ready", "llmId": "x", "waiter": "w"},
    "wake.outcome": {
        "type": "wake.outcome",
        "llmId": "x",
        "epoch": 1,
        "ok": True,
        "status": 200,
        "code": "",
        "message": "",
    },
    "messages.lost": {"type": "messages.lost", "channel": "c", "at": 1.5},
}


def test_every_hub_message_type_is_checked_and_routed() -> None:
    declared = set()
    for message_type in get_args(protocol.HubMessage):
        hint = message_type.__annotations__["type"]
        match = re.fullmatch(r"Literal\['(.+)'\]", getattr(hint, "__forward_arg__", str(hint)))
        assert match is not None, hint
        declared.add(match[1])
    assert declared == set(EXAMPLES) == set(protocol.HUB_MESSAGE_KEYS)
    hub = hub_mod.Hub()
    assert set(hub._routes) == set(EXAMPLES)  # a handler for every type
    for message in EXAMPLES.values():
        assert protocol.hub_message(dict(message)) == message


def test_optional_keys_are_optional_and_required_ones_required() -> None:
    push = dict(EXAMPLES["task.push"])
    assert protocol.hub_message({**push, "models": {"s": "m2"}})["type"] == "task.push"
    assert "models" not in protocol.HUB_MESSAGE_KEYS["task.push"]
    del push["tokenId"]
    with pytest.raises(protocol.UnknownMessage):
        protocol.hub_message(push)


def test_an_unknown_type_is_refused_where_it_comes_in() -> None:
    with pytest.raises(protocol.UnknownMessage):
        protocol.hub_message({"type": "task.pushed", "sid": "s"})
    with pytest.raises(protocol.UnknownMessage):
        protocol.hub_message({"no": "type"})
