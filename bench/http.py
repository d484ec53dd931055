"""aiohttp settings shared by the load generator and the in-harness publisher, and the one
SSE helper they need: the ``data:`` lines of a response body.

aiohttp, not httpx or the openai SDK: it parses HTTP in C and costs little per request, and
on a 2-core machine every cycle a client spends is taken from the broker it measures.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

import aiohttp

# The most connections one process holds at once, with room to spare: the load generator's
# 2,000 streams (capacity) or an overloaded open-loop window (rate x 10 s timeout); the
# publisher's upstream stream plus answer POST per task at 2,000 streams, or 1,000 idle
# sessions' control streams. Under the 20,000 open files allowed here.
CONNECTION_LIMIT = 8192
JSON = {"Content-Type": "application/json"}


def session() -> aiohttp.ClientSession:
    """A keep-alive session. No session-wide timeout: a control stream or a held request
    lasts as long as the scenario; callers that need a limit set their own."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=CONNECTION_LIMIT, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=None),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


async def data_lines(response: aiohttp.ClientResponse) -> AsyncGenerator[list[str], None]:
    """The ``data:`` payloads of an SSE response, one list per HTTP chunk received (what
    the server wrote together); other lines (``event:``, ``id:``, ``: ping``) are dropped,
    so a list may be empty. Every event mcpd and the upstream send has one data line."""
    rest = b""
    async for piece, _ in response.content.iter_chunks():
        *lines, rest = (rest + piece).split(b"\n")
        yield [line[5:].strip().decode() for line in lines if line.startswith(b"data:")]
