"""Revocation that cannot be missed: a revoked token's streams on this worker are closed
within REVOCATION_CHECK_SECONDS from the database, whether or not the ``token.revoked``
broadcast arrived (a Redis restart or a partition loses broadcasts).

The broadcast stays the fast path (streams close at once). This loop is the bound: every
REVOCATION_CHECK_SECONDS a worker that holds streams asks the database, in one query, which
of their tokens are revoked, and closes those streams (their rows go inactive as any stream
close makes them). A worker that holds no stream asks nothing. Client tokens are bounded by
the verified-token cache's lifetime (auth.AUTH_CACHE_SECONDS, 1 s).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from asgiref.sync import sync_to_async

from .auth import forget_token
from .errors import unavailable
from .models import ApiToken

if TYPE_CHECKING:
    from .hub import Hub

log = logging.getLogger("mcpd.revocation")

REVOCATION_CHECK_SECONDS = 0.5


def revoked_among(token_ids: set[int]) -> set[int]:
    """Which of these tokens are revoked now."""
    rows = ApiToken.objects.filter(pk__in=token_ids, revoked_at__isnull=False)
    return set(rows.values_list("pk", flat=True))


async def close_revoked(hub: Hub) -> int:
    """Close this worker's streams whose token is revoked. Returns how many closed."""
    held = {stream.token_id for stream in hub.by_epoch.values()}
    if not held:
        return 0
    revoked = await sync_to_async(revoked_among)(held)
    closed = 0
    for token_id in revoked:
        forget_token(token_id=token_id)
        for stream in list(hub.by_epoch.values()):
            if stream.token_id == token_id:
                log.info("closing a stream of revoked token %s", token_id)
                stream.close()
                closed += 1
    return closed


async def revocation_loop(hub: Hub) -> None:
    while True:
        await asyncio.sleep(REVOCATION_CHECK_SECONDS)
        try:
            await close_revoked(hub)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if unavailable(exc) is None:
                log.exception("could not check the streams' tokens")
