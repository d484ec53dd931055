"""One object per event loop: clients and hubs that are bound to the loop that made them.

redis-py's and httpx's async clients, the hub and the database upkeep task all belong to the
event loop they were made on; daphne has one loop per process, the tests make a new loop per
test. :class:`PerLoop` keeps one object per running loop and forgets those of closed loops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    """A map from running event loops to one ``T`` each, made on first use."""

    def __init__(self) -> None:
        self._items: dict[asyncio.AbstractEventLoop, T] = {}

    def get(self, make: Callable[[], T]) -> T:
        """This loop's object, made with ``make()`` the first time."""
        loop = asyncio.get_running_loop()
        item = self._items.get(loop)
        if item is None:
            self._forget_closed()
            item = self._items[loop] = make()
        return item

    def peek(self) -> T | None:
        """This loop's object, if one was made."""
        return self._items.get(asyncio.get_running_loop())

    def pop(self) -> T | None:
        """Forget this loop's object and return it."""
        return self._items.pop(asyncio.get_running_loop(), None)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items.values()))

    def _forget_closed(self) -> None:
        for loop in [lp for lp in self._items if lp.is_closed()]:
            del self._items[loop]


class AsyncPerLoop(Generic[T]):
    """:class:`PerLoop` for objects whose making awaits (a hub that starts its loops): one
    maker runs per loop, the others wait for it."""

    def __init__(self) -> None:
        self._items: PerLoop[T] = PerLoop()
        self._locks: PerLoop[asyncio.Lock] = PerLoop()

    async def get(self, make: Callable[[], Awaitable[T]]) -> T:
        item = self._items.peek()
        if item is not None:
            return item
        async with self._locks.get(asyncio.Lock):
            item = self._items.peek()
            if item is None:
                made = await make()
                item = self._items.get(lambda: made)
        return item

    def peek(self) -> T | None:
        return self._items.peek()

    def pop(self) -> T | None:
        self._locks.pop()
        return self._items.pop()
