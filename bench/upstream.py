"""The baseline: a fast local OpenAI-compatible upstream (``aiohttp.web``, keep-alive).

``POST /v1/chat/completions`` (any ``.../completions`` path) answers a fixed
``chat.completion``; with ``"stream": true`` it answers ``text/event-stream`` with
``max_tokens`` chunks (default 64), then ``data: [DONE]``, one HTTP chunk per event.
``bench_interval_ms`` in the body sets the gap between chunks (default 0: as fast as the
loop writes, yielding to it between chunks). ``POST /v1/embeddings`` answers a fixed batch
of 16 embeddings of 1,536 floats (about 500 KB). ``GET /health`` answers 200, ``GET
/v1/models`` a model list, and ``GET /power/<key>/{on,off,ready,stats}`` plays a model
server that sleeps and wakes (for the agent's wake and ready hooks).

Run: ``python -m bench.upstream --port 9000`` (prints ``ready <port>`` when listening).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

ANSWER = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench-upstream",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 8, "completion_tokens": 7, "total_tokens": 15},
    },
    separators=(",", ":"),
).encode()


def _chunk_event(i: int) -> bytes:
    data = json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "bench-upstream",
            "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
        },
        separators=(",", ":"),
    )
    return f"data: {data}\n\n".encode()


_CHUNKS = [_chunk_event(i) for i in range(4096)]
_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}

# POST /v1/embeddings: 16 inputs x 1,536 dimensions, as an embeddings model answers a batch
# (about 500 KB of JSON): what a broker that decodes and re-encodes answers pays for most.
EMBED_INPUTS = 16
EMBED_DIMS = 1536
_rng = random.Random(6)
EMBEDDINGS = json.dumps(
    {
        "object": "list",
        "data": [
            {
                "object": "embedding",
                "index": i,
                "embedding": [_rng.uniform(-0.1, 0.1) for _ in range(EMBED_DIMS)],
            }
            for i in range(EMBED_INPUTS)
        ],
        "model": "bench-upstream",
        "usage": {"prompt_tokens": EMBED_INPUTS, "total_tokens": EMBED_INPUTS},
    },
    separators=(",", ":"),
).encode()

_MODELS = json.dumps(
    {"object": "list", "data": [{"id": "bench-upstream", "object": "model", "owned_by": "bench"}]}
).encode()


@dataclass
class Power:
    """A pretend model server's power state, for an agent's wake/sleep commands: the agent
    runs ``GET /power/<key>/on`` to wake and polls ``/power/<key>/ready``."""

    on: bool = False
    wakes: int = 0
    ready_at: float | None = None


POWER: dict[str, Power] = {}


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


async def complete(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    if b'"stream"' not in body:
        return _json(ANSWER)
    params: dict[str, Any] = json.loads(body)
    if not params.get("stream"):
        return _json(ANSWER)
    count = min(int(params.get("max_tokens") or 64), len(_CHUNKS))
    interval = float(params.get("bench_interval_ms") or 0) / 1000
    # No Content-Length: aiohttp sends chunked, one HTTP chunk per write.
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    try:
        for i in range(count):
            await response.write(_CHUNKS[i])
            # Yield to the loop between chunks, so each one leaves as its own segment when
            # the reader keeps up (a real model produces tokens one by one).
            await asyncio.sleep(interval)
        await response.write_eof(_DONE)
    except ConnectionResetError:
        pass  # the client went away (a stalled stream given up by the load generator)
    return response


async def embed(request: web.Request) -> web.Response:
    await request.read()
    return _json(EMBEDDINGS)


async def health(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def models(_request: web.Request) -> web.Response:
    return _json(_MODELS)


async def power(request: web.Request) -> web.Response:
    key, action = request.match_info["key"], request.match_info["action"]
    state = POWER.setdefault(key, Power())
    if action == "on":
        state.on, state.ready_at = True, None
        state.wakes += 1
    elif action == "off":
        state.on = False
    elif action == "ready":
        if not state.on:
            return _json(b'{"ready":false}', 503)
        if state.ready_at is None:
            state.ready_at = time.monotonic()
    elif action != "stats":
        raise web.HTTPNotFound()
    return _json(json.dumps(asdict(state)).encode())


def app() -> web.Application:
    # Bodies as big as the broker takes (MCPD_MAX_BODY_BYTES, 10 MiB): the soak's bursts of
    # big requests reach the upstream whole (aiohttp's default refuses over 1 MiB).
    application = web.Application(client_max_size=16 * 1024 * 1024)
    application.add_routes(
        [
            web.post("/{prefix:(?:.*/)?}completions", complete),
            web.post("/{prefix:(?:.*/)?}embeddings", embed),
            web.get("/health", health),
            web.get("/{prefix:(?:.*/)?}models", models),
            web.get("/power/{key}/{action}", power),
        ]
    )
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(
        app(),
        host="127.0.0.1",
        port=args.port,
        backlog=4096,
        access_log=None,
        print=lambda _banner: print(f"ready {args.port}", flush=True),
    )


if __name__ == "__main__":
    main()
