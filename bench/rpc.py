"""JSON lines over a child's stdin/stdout: how the harness drives its helper processes.

The harness runs the load generator and the in-harness publisher each in its own process
(so their CPU is not the harness's, and a GIL is not shared with what they measure) and
calls them like ``await child.call("open_loop", rate=200, ...)``. Calls may overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

Handler = Callable[..., Awaitable[Any]]
# One reply may carry tens of thousands of latencies.
LINE_LIMIT = 256 * 1024 * 1024


class ChildError(RuntimeError):
    pass


def open_log(path: Path) -> BinaryIO:
    """A child's log file (append); the child keeps its own descriptor."""
    return open(path, "ab")


class Child:
    """A helper process (``python -m <module>``) answering JSON-line calls."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def spawn(
        cls, name: str, module: str, log_dir: Path, env: dict[str, str] | None = None
    ) -> Child:
        log = log_dir / f"{name}.log"
        with open_log(log) as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                limit=LINE_LIMIT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        return cls(name, proc, log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            try:
                reply = json.loads(line)
            except json.JSONDecodeError:
                print(f"[{self.name}] {line.decode(errors='replace').rstrip()}", file=sys.stderr)
                continue
            future = self._waiting.pop(reply.get("id"), None)
            if future is None or future.done():
                continue
            if reply.get("ok"):
                future.set_result(reply.get("result"))
            else:
                future.set_exception(ChildError(f"{self.name}: {reply.get('error')}"))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ChildError(f"{self.name} exited; see {self.log}"))
        self._waiting.clear()

    async def call(self, cmd: str, *, rpc_timeout: float | None = None, **params: Any) -> Any:
        assert self.proc.stdin is not None
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        line = json.dumps({"id": call_id, "cmd": cmd, "params": params}) + "\n"
        self.proc.stdin.write(line.encode())
        await self.proc.stdin.drain()
        if rpc_timeout is None:
            return await future
        return await asyncio.wait_for(future, rpc_timeout)

    async def close(self, timeout: float = 10.0) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.call("quit"), 5)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


# --- the child's side ---------------------------------------------------------------------


def serve(handlers: dict[str, Handler]) -> None:
    """Answer calls on stdin until ``quit`` or EOF. Each call runs as its own task."""
    asyncio.run(_serve(handlers))


async def _serve(handlers: dict[str, Handler]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    tasks: set[asyncio.Task[None]] = set()
    done = asyncio.Event()

    def reply(call_id: Any, ok: bool, payload: Any) -> None:
        key = "result" if ok else "error"
        out.write(json.dumps({"id": call_id, "ok": ok, key: payload}) + "\n")
        out.flush()

    async def run(call_id: Any, cmd: str, params: dict[str, Any]) -> None:
        try:
            if cmd == "quit":
                reply(call_id, True, None)
                done.set()
                return
            result = await handlers[cmd](**params)
        except Exception as exc:
            traceback.print_exc()
            reply(call_id, False, f"{type(exc).__name__}: {exc}")
        else:
            reply(call_id, True, result)

    async def read() -> None:
        while line := await reader.readline():
            call = json.loads(line)
            task = asyncio.create_task(run(call["id"], call["cmd"], call.get("params") or {}))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        done.set()

    reading = asyncio.create_task(read())
    await done.wait()
    reading.cancel()
    for task in list(tasks):
        task.cancel()
    # Leave at once: a handler may hold thousands of connections.
    out.flush()
    os._exit(0)
