"""Property-based fuzzing (hypothesis) of a real daphne process: hostile bodies, headers, ids,
names and query strings on every HTTP route, hostile WebSocket handshakes, and hostile frames on
a bound control socket. For every input: no status >= 500, the contract's JSON error on /api/
and /v1/, the broker still serves, and a refused request changes nothing in the database (nor,
on the three-worker run, the count of the broker's Redis keys).

``HYPOTHESIS_PROFILE=soak`` (``make fuzz``, part of ``make soak``) runs thousands of inputs;
the default profile keeps the run to about a minute. The number of inputs tried is printed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect as ws_connect

from tests.cluster import Broker

# --- profiles and the count of inputs -------------------------------------------------------------

_COMMON: dict[str, Any] = {
    "deadline": None,  # a real server over TCP: timing varies, a deadline only makes flakes
    "suppress_health_check": [
        HealthCheck.function_scoped_fixture,  # conftest's autouse fixtures hold no fuzz state
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
    "print_blob": True,
}
# "suite": make test (about a minute for the module); "soak": make fuzz / make soak.
# Each test takes a share of its profile's examples (budget below).
EXAMPLES = {"quick": 40, "suite": 1000, "soak": 40000}
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "suite")
if PROFILE not in EXAMPLES:
    PROFILE = "suite"
BASE = settings(max_examples=EXAMPLES[PROFILE], **_COMMON)


def budget(share: float) -> settings:
    """This test's settings: ``share`` of the profile's examples."""
    return settings(BASE, max_examples=max(10, int(BASE.max_examples * share)))


TRIED: Counter[str] = Counter()

# pytest-timeout's 120 s is too short for the soak profile (no bound there) and tight on a
# loaded 2-core host for the suite's.
TIMEOUT = 0 if PROFILE == "soak" else 400


def fuzz_marks(test: Callable[..., None]) -> Callable[..., None]:
    return pytest.mark.fuzz(pytest.mark.timeout(TIMEOUT)(test))


@pytest.fixture(scope="module", autouse=True)
def _report_inputs(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print how many inputs the module tried, past pytest's capture."""
    yield
    total = sum(TRIED.values())
    parts = ", ".join(f"{kind} {n}" for kind, n in sorted(TRIED.items()))
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\nfuzz ({PROFILE} profile): {total} inputs tried ({parts})", flush=True)


# --- the broker under test ---------------------------------------------------------------------

REAL_NAME = "fuzz-virtual"
PUBLIC_NAME = "fuzz-public"
FRAME_NAME = "fuzz-frames"


@dataclass
class Target:
    """A broker with a few rows in it, the tokens the fuzzer may use, and how to read its
    state. The publisher that owns the rows is not among the fuzzer's tokens: nothing it sends
    can bind or answer for that session, so every refusal must leave the rows as they are."""

    broker: Broker
    session_id: str
    frame_session_id: str
    frame_token: str
    tokens: dict[str, str] = field(default_factory=dict)
    _client: httpx.Client | None = None
    _redis: Any = None

    def url(self, i: int = 0) -> str:
        return self.broker.url(i)

    def snapshot(self, ignore: frozenset[str] = frozenset()) -> dict[str, Any]:
        """The rows, sessions, backends and tokens (minus the ``ignore``d columns and a
        token's ``last_used_at``), and the count of the broker's Redis keys."""
        skip = ignore | {"last_used_at"}
        if self.broker.services:
            import psycopg

            opened: Any = psycopg.connect(self.broker.env["DATABASE_URL"], autocommit=True)
        else:
            path = self.broker.tmp / "db.sqlite3"
            opened = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        state: dict[str, Any] = {}
        with contextlib.closing(opened) as conn:
            for table in TABLES:
                cur = conn.execute(f"SELECT * FROM {table}")
                keep = [i for i, d in enumerate(cur.description) if d[0] not in skip]
                state[table] = sorted(repr([row[i] for i in keep]) for row in cur.fetchall())
        if self.broker.services:
            prefix = self.broker.env["MCPD_REDIS_PREFIX"]
            keys = [
                k
                for k in self.redis().scan_iter(match=f"{prefix}:*", count=1000)
                if not any(part in k for part in VOLATILE_KEYS)
            ]
            state["redis keys"] = len(keys)
        return state

    def redis(self) -> Any:
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.broker.env["REDIS_URL"])
        return self._redis

    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(timeout=httpx.Timeout(15.0))
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._redis is not None:
            self._redis.close()

    def assert_no_tracebacks(self) -> None:
        """No worker logged a traceback: an input that failed out of sight (a background
        task, a socket's frame) fails the module too. Django's ``django.security`` records
        (a ``DisallowedHost`` on the admin, which keeps Django's handling) are its design."""
        for i in range(self.broker.n):
            records = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", self.broker.log(i, None))
            failed = [
                record
                for record in records
                if "Traceback" in record and " django.security." not in record.split("\n", 1)[0]
            ]
            assert not failed, failed[0][:6000]

    def serves(self) -> None:
        for i in range(self.broker.n):
            response = self.client().get(f"{self.url(i)}/healthz")
            assert response.status_code == 200, (i, response.status_code, response.text[:300])


TABLES = (
    "virtual_llms_llm",
    "virtual_llms_providersession",
    "virtual_llms_backend",
    "virtual_llms_apitoken",
)
# Not compared: virtual_llms_usagerecord, the log of client calls, which records refused calls
# too by design (their status and error code: README "Client limits and usage").
# Keys that come and go on their own, not by a request: a worker's presence (``w:``, refreshed
# with a TTL) and the leases of its upkeep (``l:``, ``le:``). The channel layer's are counted:
# a refused handshake must not subscribe to anything.
VOLATILE_KEYS: tuple[bytes, ...] = (b":w:", b":l:", b":le:")


def setup_target(broker: Broker) -> Target:
    """Register one virtual LLM (a session with a backend, no stream), one for the frame test,
    and one public LLM; make the fuzzer's tokens."""
    owner, frames, other, client, admin = broker.new_tokens(
        "publisher", "publisher", "publisher", "client", "admin"
    )
    session_id = str(uuid.uuid4())
    frame_session_id = str(uuid.uuid4())
    for token, sid, name in (
        (owner, session_id, REAL_NAME),
        (frames, frame_session_id, FRAME_NAME),
    ):
        response = httpx.post(
            f"{broker.url(0)}/api/v1/virtual/register",
            headers={"Authorization": f"Bearer {token}"},
            json={
                "providerSessionId": sid,
                "providers": [{"name": name, "type": "openai", "model": f"up/{name}"}],
            },
            timeout=30,
        )
        assert response.status_code == 200, response.text
    response = httpx.post(
        f"{broker.url(0)}/api/v1/llms",
        headers={"Authorization": f"Bearer {admin}"},
        json={"name": PUBLIC_NAME, "type": "openai", "model": "m", "url": "http://127.0.0.1:9/v1"},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return Target(
        broker,
        session_id,
        frame_session_id,
        frames,
        {"publisher": other, "client": client, "admin": admin},
    )


# Rows go stale after MCPD_HEARTBEAT_STALE_SECONDS only through gcsweep, never run here; a body
# limit of 64 KiB lets the fuzzer send bodies over it cheaply.
FUZZ_ENV = {"MCPD_INFER_TIMEOUT_SECONDS": "5", "MCPD_MAX_BODY_BYTES": str(64 * 1024)}


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    broker = Broker(1, services=False, env=FUZZ_ENV).start()
    try:
        made = setup_target(broker)
        yield made
        made.close()
        made.assert_no_tracebacks()
    finally:
        broker.stop()


# --- strategies ---------------------------------------------------------------------------------

KEYS = [
    "model",
    "messages",
    "stream",
    "input",
    "prompt",
    "providerSessionId",
    "providers",
    "llmName",
    "status",
    "body",
    "chunks",
    "data",
    "done",
    "error",
    "name",
    "type",
    "url",
    "tier",
    "description",
    "apiKey",
    "maxConcurrency",
    "role",
    "content",
    "taskId",
]
ODD_TEXT = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "\udfff",
    "\ufeff",
    "\u202e",
    "\u2028\u2029",
    "😀" * 10,
    "\r\ndata: [DONE]\n\n",
    "%00",
    "../../etc/passwd",
    "x" * 300,
    REAL_NAME,
    PUBLIC_NAME,
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(ODD_TEXT)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=16,
)
keyed_objects = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6)


def _dumps(value: Any, ascii_only: bool) -> bytes:
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def _deep(kind: str, depth: int) -> bytes:
    if kind == "array":
        return b"[" * depth + b"1" + b"]" * depth
    if kind == "object":
        return b'{"model":' * depth + b"1" + b"}" * depth
    return b'{"messages":[' * depth + b"{}" + b"]}" * depth


SPECIAL_BODIES = [
    b"",
    b"{",
    b"[1,]",
    b"null",
    b"NaN",
    b"-Infinity",
    b'{"model": NaN}',
    b"1e999",
    b'{"model": 1e999999}',
    b'{"a":1,"a":2}',
    b'"\\ud800"',
    b'{"model":"\\ud800\\udfff"}',
    b"\xef\xbb\xbf{}",
    b"\xff\xfe{\x00}\x00",
    b"\x00",
    b"\x80\x81\x82",
    b'{"model": "x", "messages": [], "stream": "yes"}',
    b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--x--\r\n',
    b"a=1&b=%zz&&=",
    b'"' + b"a" * (64 * 1024 + 10) + b'"',
    b'{"providers": [' + b'{"name": "n"},' * 5000 + b"{}]}",
]
bodies = st.one_of(
    st.sampled_from(SPECIAL_BODIES),
    st.builds(_deep, st.sampled_from(["array", "object", "mixed"]), st.integers(60, 3000)),
    st.builds(lambda n: b'{"model": ' + b"9" * n + b"}", st.integers(4000, 20000)),
    st.builds(_dumps, keyed_objects, st.booleans()),
    st.builds(_dumps, json_values, st.booleans()),
    st.binary(max_size=200),
    st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.builds(lambda v: json.dumps(v).encode("utf-16"), keyed_objects),
)

header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"),
    max_size=60,
)
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=utf-16",
    "application/json; charset=nonexistent",
    "text/plain",
    "text/event-stream",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "multipart/form-data",
    "multipart/form-data; boundary=",
    "application/xml",
    "*/*",
    ";;;",
]
ACCEPTS = [
    "application/json",
    "text/event-stream",
    "text/html",
    "application/xml",
    "*/*",
    "text/event-stream;q=0, application/json;q=0",
    "garbage///",
    "",
]


def auth_values(target: Target) -> st.SearchStrategy[str | None]:
    valid = list(target.tokens.values())
    return st.one_of(
        st.none(),
        st.sampled_from([f"Bearer {t}" for t in valid]),
        st.sampled_from(valid),  # no scheme
        st.sampled_from([f"bearer {t}" for t in valid] + [f"Bearer {t}x" for t in valid]),
        st.sampled_from(
            ["", "Bearer", "Bearer ", "Basic YWRtaW46YWRtaW4=", "Bearer a b c", "Token x"]
        ),
        st.builds(lambda s: f"Bearer {s}", header_text),
        header_text,
    )


def segments(target: Target) -> st.SearchStrategy[str]:
    """A path segment: odd ids and names, percent-encoded or raw."""
    special = [
        "",
        ".",
        "..",
        "%00",
        "a%00b",
        "%2e%2e",
        "%2F",
        "a/b",
        "..%2F..",
        "%",
        "%zz",
        "%ff%fe",
        "%C0%AE",
        "a:b",
        "a.b",
        "-x",
        "_",
        "x" * 129,
        "x" * 65,
        "%F0%9F%98%80",
        "%E2%80%AE",
        "a%20b",
        "%3B",
        "a;b",
        REAL_NAME,
        PUBLIC_NAME,
        FRAME_NAME,
        target.session_id,
        target.frame_session_id,
        target.session_id.upper(),
    ]
    return st.one_of(
        st.sampled_from(special),
        st.text(max_size=40).map(lambda s: quote(s.encode("utf-8", "surrogatepass"), safe="")),
        st.text(
            st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="#?"),
            max_size=40,
        ),
    )


ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/models",
    "/v1/models/{name}",
    "/api/v1/virtual/tasks/{id}/result",
    "/api/v1/virtual/tasks/{id}/chunks",
    "/api/v1/virtual/tasks/{id}/error",
    "/api/v1/virtual/register",
    "/api/v1/virtual/heartbeat",
    "/api/v1/virtual/status",
    "/api/v1/virtual/sessions/{id}/stream",
    "/api/v1/llms",
    "/api/v1/llms/{name}/backends/{id}/drain",
    "/api/v1/llms/{name}",
    "/api/schema/",
    "/api/docs/",
    "/api/v1/usage",
    "/api/v1/usage/me",
    "/healthz",
    "/readyz",
    "/metrics",
    "/admin/",
    "/admin/login/",
    "/api/{name}",
    "/v1/{name}",
    "/{name}",
]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "FOO"]
QUERY_KEYS = ["limit", "after", "groupBy", "since", "until", "token", "stream", "format", "days"]
queries = st.one_of(
    st.none(),
    st.sampled_from(
        ["", "limit=-1", "limit=abc", "limit=99999999999999999999", "after=%00", "a=%zz&&=&b"]
    ),
    st.lists(
        st.tuples(
            st.sampled_from(QUERY_KEYS) | st.text(max_size=8),
            st.text(max_size=20) | st.integers().map(str),
        ),
        max_size=4,
    ).map(
        lambda pairs: "&".join(
            f"{quote(k.encode('utf-8', 'surrogatepass'), safe='')}="
            f"{quote(v.encode('utf-8', 'surrogatepass'), safe='')}"
            for k, v in pairs
        )
    ),
    st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters="#"),
        max_size=40,
    ),
)


@dataclass
class HttpInput:
    method: str
    path: str
    query: str | None
    headers: list[tuple[bytes, bytes]]
    body: bytes | None


@st.composite
def http_inputs(draw: st.DrawFn, target: Target) -> HttpInput:
    template = draw(st.sampled_from(ROUTES))
    seg = segments(target)
    path = template.replace("{name}", draw(seg)).replace("{id}", draw(seg))
    headers: list[tuple[bytes, bytes]] = []
    auth = draw(auth_values(target))
    if auth is not None:
        headers.append((b"authorization", auth.encode("latin-1")))
    if draw(st.booleans()):
        ctype = draw(st.sampled_from(CONTENT_TYPES) | header_text)
        headers.append((b"content-type", ctype.encode("latin-1")))
    if draw(st.booleans()):
        accept = draw(st.sampled_from(ACCEPTS) | header_text)
        headers.append((b"accept", accept.encode("latin-1")))
    if draw(st.integers(0, 9)) == 0:
        host = draw(st.sampled_from(["evil.example", "127.0.0.1:1", "[::1", "a b", ""]))
        headers.append((b"host", host.encode("latin-1")))
    if draw(st.integers(0, 9)) == 0:
        headers.append(
            (b"x-" + draw(st.sampled_from([b"forwarded-for", b"request-id", b"junk"])), b"\xff")
        )
    method = draw(st.sampled_from(METHODS))
    body = draw(st.none() | bodies)  # on GET and HEAD too
    return HttpInput(method, path, draw(queries), headers, body)


def is_api(path: str) -> bool:
    return path.startswith(("/api/", "/v1/")) or path in ("/api", "/v1")


def assert_error_shape(path: str, response: httpx.Response) -> None:
    """The contract's error on /api/ (``{"error": {"code", "message"}}``) and /v1/ (OpenAI's
    ``{"error": {"message", "type", "code"}}``)."""
    where = f"{response.request.method} {response.request.url} -> {response.status_code}"
    ctype = response.headers.get("content-type", "")
    assert ctype.startswith("application/json"), (where, ctype, response.text[:300])
    body = response.json()
    assert isinstance(body, dict), (where, body)
    err = body.get("error")
    assert isinstance(err, dict), (where, body)
    assert isinstance(err.get("message"), str), (where, body)
    assert err["message"], (where, body)
    assert isinstance(err.get("code"), str), (where, body)
    if path.startswith("/v1"):
        assert isinstance(err.get("type"), str), (where, body)
        assert err["type"], (where, body)


MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


def send(client: httpx.Client, target: Target, worker: int, case: HttpInput) -> httpx.Response:
    raw_path = case.path if case.query is None else f"{case.path}?{case.query}"
    url = httpx.URL(target.url(worker)).copy_with(raw_path=raw_path.encode("utf-8"))
    request = client.build_request(case.method, url, headers=case.headers, content=case.body)
    if case.body is None:
        request.headers.pop("content-length", None)
    return client.send(request)


def check_http(target: Target, case: HttpInput, worker: int = 0) -> None:
    before = target.snapshot()
    target.client().cookies.clear()  # each input on its own (the admin's pages set cookies)
    try:
        response = send(target.client(), target, worker, case)
    except (httpx.LocalProtocolError, httpx.InvalidURL, UnicodeEncodeError):
        TRIED["http refused by the client library"] += 1
        return
    TRIED["http"] += 1
    where = f"{case.method} {response.request.url} -> {response.status_code}"
    assert response.status_code < 500, (where, response.text[:500])
    path = response.request.url.path
    if response.status_code >= 400 and is_api(path) and case.method != "HEAD":
        assert_error_shape(path, response)
    if response.status_code >= 400:
        assert target.snapshot() == before, (where, "a refused request changed the state")
    target.serves()


# --- the tests ---------------------------------------------------------------------------------


def fuzz_http(target: Target, share: float, workers: int = 1) -> Callable[[], None]:
    @budget(share)
    @given(case=http_inputs(target), worker=st.integers(0, workers - 1))
    def run(case: HttpInput, worker: int) -> None:
        check_http(target, case, worker)

    return run


@fuzz_marks
def test_every_http_route_answers_hostile_input_with_a_json_4xx(target: Target) -> None:
    fuzz_http(target, 1.0)()


@dataclass
class WsInput:
    path: str
    headers: list[tuple[str, str]]
    frames: list[str | bytes]


frame_objects = st.fixed_dictionaries(
    {"type": st.sampled_from(["result", "chunks", "error", "heartbeat", "task", "ready", ""])},
    optional={
        "taskId": st.text(max_size=70) | st.sampled_from(ODD_TEXT) | json_values,
        "status": st.integers(-1000, 1000) | json_values,
        "body": json_values,
        "chunks": st.lists(
            st.fixed_dictionaries({}, optional={"data": json_values, "done": json_values}),
            max_size=3,
        )
        | json_values,
        "error": json_values,
    },
)
frames = st.one_of(
    st.builds(lambda f: json.dumps(f), frame_objects),
    st.builds(lambda f: json.dumps(f).encode(), frame_objects),
    bodies.map(lambda b: b.decode("utf-8", "replace")),
    bodies,
)


@st.composite
def ws_inputs(draw: st.DrawFn, target: Target) -> WsInput:
    seg = draw(segments(target))
    path = draw(
        st.sampled_from(
            [
                "/api/v1/virtual/sessions/{id}/ws",
                "/api/v1/virtual/sessions/{id}/ws/",
                "/api/v1/virtual/sessions/{id}/stream",
                "/api/v1/virtual/sessions/{id}",
                "/{id}",
                "/ws",
            ]
        )
    ).replace("{id}", seg)
    query = draw(queries)
    if query is not None:
        path = f"{path}?{query}"
    headers: list[tuple[str, str]] = []
    auth = draw(auth_values(target))
    if auth is not None:
        headers.append(("Authorization", auth))
    if draw(st.booleans()):
        headers.append(("Origin", draw(st.sampled_from(["http://evil.example", "null", ""]))))
    if draw(st.booleans()):
        headers.append(("Sec-WebSocket-Protocol", draw(st.sampled_from(["x", "a, b", ","]))))
    return WsInput(path, headers, draw(st.lists(frames, max_size=3)))


def check_ws(target: Target, case: WsInput, worker: int = 0) -> None:
    before = target.snapshot()
    url = f"{target.broker.ws_url(worker)}{case.path}"
    refused: websockets.InvalidStatus | None = None
    try:
        ws = ws_connect(url, additional_headers=case.headers, open_timeout=10, close_timeout=5)
    except websockets.InvalidStatus as exc:
        refused = exc
    except (websockets.InvalidURI, websockets.InvalidHandshake, ValueError, UnicodeError):
        TRIED["websocket refused by the client library"] += 1
        return
    TRIED["websocket handshake"] += 1
    if refused is not None:  # refused before the upgrade: an HTTP status
        status = refused.response.status_code
        assert status < 500, (url, status, refused.response.body)
        assert target.snapshot() == before, (url, "a refused handshake changed the state")
        target.serves()
        return
    replies: list[Any] = []
    with ws:
        for frame in case.frames:
            with contextlib.suppress(websockets.ConnectionClosed):
                ws.send(frame)
        try:
            while True:
                replies.append(json.loads(ws.recv(timeout=10)))
        except websockets.ConnectionClosed:
            pass
        except TimeoutError:
            raise AssertionError(f"{url}: the socket of no session stayed open") from None
    # The fuzzer owns no session: every socket is refused, with an error frame and a 4xxx code.
    assert replies, (url, "closed without an error frame")
    for reply in replies:
        assert isinstance(reply, dict), (url, reply)
        assert reply.get("type") == "error", (url, reply)
        assert isinstance(reply.get("error"), dict), (url, reply)
        assert isinstance(reply["error"].get("code"), str), (url, reply)
    code = ws.close_code
    assert code is not None, url
    assert 4000 <= code < 4500, (url, code, ws.close_reason)
    assert target.snapshot() == before, (url, "a refused socket changed the state")
    target.serves()


def fuzz_ws(target: Target, share: float, workers: int = 1) -> Callable[[], None]:
    @budget(share)
    @given(case=ws_inputs(target), worker=st.integers(0, workers - 1))
    def run(case: WsInput, worker: int) -> None:
        check_ws(target, case, worker)

    return run


@fuzz_marks
def test_every_websocket_handshake_is_refused_with_a_4xxx_code(target: Target) -> None:
    fuzz_ws(target, 0.25)()


# Columns a heartbeat frame (one of the inputs) bumps: not a refusal's change.
HEARTBEAT_COLUMNS = frozenset({"last_heartbeat_at", "updated_at", "last_seen_at"})


@fuzz_marks
def test_a_bound_control_socket_answers_hostile_frames_and_stays_open(target: Target) -> None:
    url = f"{target.broker.ws_url(0)}/api/v1/virtual/sessions/{target.frame_session_id}/ws"
    auth = [("Authorization", f"Bearer {target.frame_token}")]
    with ws_connect(url, additional_headers=auth, open_timeout=10) as ws:
        ready = json.loads(ws.recv(timeout=10))
        assert ready["type"] == "ready", ready
        time.sleep(0.2)  # the bind's own writes land before the first snapshot
        before = target.snapshot(HEARTBEAT_COLUMNS)

        @budget(0.25)
        @given(batch=st.lists(frames, min_size=1, max_size=3))
        def run(batch: list[str | bytes]) -> None:
            for frame in batch:
                ws.send(frame)
            ws.send(json.dumps({"type": "heartbeat"}))
            TRIED["control socket frame"] += len(batch)
            while True:
                try:
                    reply = json.loads(ws.recv(timeout=10))
                except TimeoutError:
                    raise AssertionError("no answer to a heartbeat after hostile frames") from None
                assert isinstance(reply, dict), reply
                assert reply.get("type") in ("protocol_error", "heartbeat"), reply
                if reply["type"] == "protocol_error":
                    assert isinstance(reply.get("code"), str), reply
                    assert reply["code"] != "internal_error", reply
                    assert reply.get("message"), reply
                if reply["type"] == "heartbeat":
                    break
            target.serves()

        run()
        # Late protocol_errors of the last batch (frames are answered concurrently) are fine.
        with contextlib.suppress(TimeoutError):
            while True:
                reply = json.loads(ws.recv(timeout=0.5))
                assert reply.get("type") in ("protocol_error", "heartbeat"), reply
        assert target.snapshot(HEARTBEAT_COLUMNS) == before


# --- the same on three workers with PostgreSQL + Redis ----------------------------------------


@pytest.fixture(scope="module")
def target3() -> Iterator[Target]:
    from tests.conftest import require_services

    require_services()
    broker = Broker(3, services=True, env=FUZZ_ENV).start()
    try:
        made = setup_target(broker)
        yield made
        made.close()
        made.assert_no_tracebacks()
    finally:
        broker.stop()


@pytest.mark.multiproc
@pytest.mark.timeout(TIMEOUT)
def test_three_workers_on_postgresql_and_redis_answer_hostile_input(target3: Target) -> None:
    fuzz_http(target3, 0.15, workers=3)()
    fuzz_ws(target3, 0.04, workers=3)()
