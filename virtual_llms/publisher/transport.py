"""The agent's HTTP client: httpx's API over aiohttp's connections (the httpx-aiohttp
transport, the one the openai SDK offers as its aiohttp option).

Why: every relayed request costs the agent one upstream call, and over SSE one answer POST
to the broker. With httpx's own transport (httpcore, h11) a request cost 0.61-0.83 ms of
CPU on this project's bench host, with the aiohttp transport 0.25-0.43 ms (a probe: 3,000
small JSON POSTs, 1 and 8 at a time, to a local aiohttp server in the same process, whose
share is included). On the bench's 3-worker agent line that took the SSE chunks/s per
process at 256 streams from 4,242 to 7,300 and the max rate from 268 to 482 req/s
(docs/benchmarks.md).

httpx-aiohttp maps every ``aiohttp.ClientConnectionError`` to ``httpx.ConnectTimeout``: a
refused connection, but also one the server reset or closed after the request went out,
and it lets other aiohttp errors (a malformed response) through unmapped. The agent reads
``ConnectTimeout`` as "never sent" (broker.NOT_SENT: sent again to the next broker URL),
which would repeat a chunk batch that may have arrived. :class:`Transport` gives those the
httpx errors httpx's own transport raises: ``ConnectError`` when the connection could not be
made, ``ReadError`` when it broke, ``RemoteProtocolError`` for the rest. Timeouts keep
httpx-aiohttp's mapping (``ConnectTimeout``, ``ReadTimeout``, ...).

Proxies: httpx reads ``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` only for a
client built without a transport, into its mounts. :class:`Client` is built that way and
makes each of those transports (the plain one and one per proxy) an aiohttp one, so every
call of the agent, ``direct`` included, goes where httpx (``mcpd-publish check``, the openai
SDK) and websockets (the WebSocket control stream) would send it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport


def remapped(exc: BaseException, request: httpx.Request) -> httpx.HTTPError | None:
    """The httpx error for an aiohttp failure httpx-aiohttp maps wrongly or not at all, or
    None to keep ``exc``."""
    cause = exc.__cause__ if isinstance(exc, httpx.HTTPError) else exc
    if not isinstance(cause, aiohttp.ClientError) or isinstance(cause, asyncio.TimeoutError):
        return None
    message = str(cause) or type(cause).__name__
    if isinstance(cause, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message, request=request)
    if isinstance(cause, aiohttp.ClientOSError | aiohttp.ClientPayloadError):
        return httpx.ReadError(message, request=request)
    return httpx.RemoteProtocolError(message, request=request)


@contextlib.contextmanager
def _httpx_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        error = remapped(exc, request)
        if error is None:
            raise
        raise error from exc


class _Body(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, request: httpx.Request) -> None:
        self.inner = inner
        self.request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors(self.request):
            async for chunk in self.inner:
                yield chunk

    async def aclose(self) -> None:
        # Closing waits for the request's body to finish going out: a connection that broke
        # there was used, so it must not read as "never sent" either.
        with _httpx_errors(self.request):
            await self.inner.aclose()


class Transport(AiohttpTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with _httpx_errors(request):
            response = await super().handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Body(response.stream, request)
        return response


class Client(httpx.AsyncClient):
    """``httpx.AsyncClient`` on :class:`Transport`, with :meth:`direct` for the agent's hot
    calls (the upstream call and the answer POST of every relayed request). Without a
    ``transport`` (tests pass a mock), httpx builds its transports from the environment's
    proxy settings through the two ``_init_*`` hooks below: both give aiohttp ones."""

    # httpx's own hooks (private in httpx 0.28, as is _transport_for_url in direct; the proxy
    # tests in tests/test_publisher_transport.py fail if they change). httpx calls them with
    # its transport options by keyword (verify, cert, trust_env, http1, http2, limits), which
    # httpx-aiohttp's transport takes as they are.
    def _init_transport(  # type: ignore[override]
        self, transport: httpx.AsyncBaseTransport | None = None, **options: Any
    ) -> httpx.AsyncBaseTransport:
        return transport if transport is not None else Transport(**options)

    def _init_proxy_transport(  # type: ignore[override]
        self, proxy: httpx.Proxy, **options: Any
    ) -> httpx.AsyncBaseTransport:
        return Transport(proxy=proxy, **options)

    def proxy_for(self, url: str) -> str | None:
        """The proxy a request to ``url`` goes through, without its credentials (httpx keeps
        them apart), or None when it goes straight there (or through a transport the tests
        gave). httpx-aiohttp's transport keeps the proxy it was built with."""
        chosen = self._transport_for_url(httpx.URL(url))
        proxy = chosen.proxy if isinstance(chosen, Transport) else None
        return str(proxy.url) if proxy is not None else None

    async def direct(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        json: Any,
        timeout: httpx.Timeout,
    ) -> httpx.Response:
        """One request handed straight to the transport ``send`` would pick for its URL (the
        plain one, or a proxy's), built and JSON-encoded by httpx, with the client's headers
        under ``headers`` (Accept-Encoding among them: what httpx can decode). ``send`` adds
        layers these calls do not use (auth flows, redirects, a cookie jar read and written
        per request, event hooks), at 0.1-0.16 ms of CPU per request on the bench host
        (docs/benchmarks.md). The response streams: read it (``aread``) or close it
        (``aclose``)."""
        merged = self.headers.copy()
        merged.update(headers)
        request = httpx.Request(
            method, url, headers=merged, json=json, extensions={"timeout": timeout.as_dict()}
        )
        return await self._transport_for_url(request.url).handle_async_request(request)


def client(max_connections: int = 100, **kwargs: Any) -> Client:
    """A :class:`Client` with at most ``max_connections`` open per transport (aiohttp closes
    idle ones after httpx's keep-alive expiry, 5 s), honouring the environment's proxies."""
    return Client(limits=httpx.Limits(max_connections=max_connections), **kwargs)
