"""The agent's HTTP client: httpx's API over aiohttp's connections (the httpx-aiohttp
transport, the one the openai SDK offers as its aiohttp option).

Why: every relayed request costs the agent one upstream call, and over SSE one answer POST
to the broker. With httpx's own transport (httpcore, h11) a request cost 0.61-0.83 ms of
CPU on this project's bench host, with the aiohttp transport 0.25-0.43 ms (a probe: 3,000
small JSON POSTs, 1 and 8 at a time, to a local aiohttp server in the same process, whose
share is included). On the bench's 3-worker agent line that took the SSE chunks/s per
process at 256 streams from 4,242 to 7,300 and the max rate from 268 to 482 req/s
(docs/benchmarks-history.md).

The hot calls skip httpx's objects too (:meth:`Client.post_json`): building an
``httpx.Request`` and reading an ``httpx.Response`` cost about as much CPU as aiohttp's
call itself. They go to the aiohttp session of the transport httpx picks, with the same
options and the same errors.

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
call of the agent, ``direct`` and ``post_json`` included, goes where httpx (``mcpd-publish
check``, the openai SDK) and websockets (the WebSocket control stream) would send it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import map_aiohttp_exceptions

from .. import jsonio


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


@contextlib.contextmanager
def _aiohttp_errors(method: str, url: str) -> Iterator[None]:
    """Around a call made on aiohttp straight: its errors as the httpx errors the
    transport raises for the same failure, each with an ``httpx.Request`` (built only
    then) naming the call."""
    try:
        with map_aiohttp_exceptions():
            yield
    except Exception as exc:
        request = httpx.Request(method, url)
        error = remapped(exc, request)
        if error is not None:
            raise error from exc
        if isinstance(exc, httpx.HTTPError):
            exc.request = request
        raise


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


@dataclass(frozen=True, slots=True)
class Reply:
    """A response read to its end, as :meth:`Client.post_json` returns it."""

    status_code: int
    headers: Mapping[str, str]  # case-insensitive
    content: bytes

    def json(self) -> Any:
        return jsonio.loads(self.content)


class Transport(AiohttpTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with _httpx_errors(request):
            response = await super().handle_async_request(request)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Body(response.stream, request)
        return response

    @functools.cached_property
    def _proxy_options(self) -> dict[str, Any]:
        """What ``handle_async_request`` gives aiohttp about this transport's proxy."""
        proxy = self.proxy
        if proxy is None:
            return {}
        return {
            "proxy": str(proxy.url),
            "proxy_auth": aiohttp.BasicAuth(*proxy.auth) if proxy.auth else None,
            "proxy_headers": proxy.headers,
        }

    async def post_json(
        self, url: str, headers: dict[str, str], body: bytes, timeout: httpx.Timeout
    ) -> Reply:
        """A POST of ``body`` (JSON) on this transport's aiohttp session, the response read
        to its end: what ``handle_async_request`` does, without building an
        ``httpx.Request`` and an ``httpx.Response`` around it. aiohttp asks for and decodes
        the content encodings it can."""
        if not isinstance(self.client, aiohttp.ClientSession):
            self.client = self.get_client()
        with _aiohttp_errors("POST", url):
            async with self.client.post(
                url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    sock_connect=timeout.connect, sock_read=timeout.read, connect=timeout.pool
                ),
                **self._proxy_options,
            ) as response:
                content = await response.read()
        return Reply(response.status, response.headers, content)


class Client(httpx.AsyncClient):
    """``httpx.AsyncClient`` on :class:`Transport`, with :meth:`post_json` for the agent's
    hot calls (the upstream's non-streamed answers, every call to the broker) and
    :meth:`direct` for its streamed upstream calls. Without a
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

    @functools.cached_property
    def _routes(self) -> dict[str, httpx.AsyncBaseTransport]:
        return {}

    def _route(self, url: str) -> httpx.AsyncBaseTransport:
        """The transport ``send`` would pick for ``url``, kept per origin (what httpx's
        mounts match on: scheme, host and port)."""
        path_at = url.find("/", url.find("//") + 2)
        origin = url if path_at < 0 else url[:path_at]
        chosen = self._routes.get(origin)
        if chosen is None:
            chosen = self._routes[origin] = self._transport_for_url(httpx.URL(origin))
        return chosen

    async def post_json(
        self, url: str, *, headers: dict[str, str], json: Any, timeout: httpx.Timeout
    ) -> Reply:
        """A JSON POST, its response read to its end: the agent's hot calls (the upstream's
        non-streamed answer; every call to the broker). On an aiohttp transport it goes to
        aiohttp straight (:meth:`Transport.post_json`), with the client's headers under
        ``headers``, less Accept-Encoding (aiohttp's own: what it decodes). Other
        transports (the tests' mocks) get :meth:`direct`."""
        chosen = self._route(url)
        if not isinstance(chosen, Transport):
            response = await self.direct("POST", url, headers=headers, json=json, timeout=timeout)
            try:
                await response.aread()
            finally:
                await response.aclose()
            return Reply(response.status_code, response.headers, response.content)
        merged = {
            **self._plain_headers,
            **{name.lower(): value for name, value in headers.items()},
            "content-type": "application/json",
        }
        return await chosen.post_json(url, merged, jsonio.dumps(json), timeout)

    @functools.cached_property
    def _plain_headers(self) -> dict[str, str]:
        """The client's headers (as they are at the first call), less Accept-Encoding, by
        their lowercase names (so that the caller's replace them whatever their case)."""
        return {
            name.lower(): value
            for name, value in self.headers.items()
            if name.lower() != "accept-encoding"
        }

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
        (docs/benchmarks-history.md). The response streams: read it (``aread``) or close it
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
