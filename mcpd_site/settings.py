"""mcpd settings: one module, every knob from the environment (see README "Configuration").

With nothing set, mcpd runs embedded: SQLite and the in-memory channel layer, one process.
``DATABASE_URL`` selects PostgreSQL and ``REDIS_URL`` the Redis channel layer, and then any
number of daphne processes behave as one broker.
"""

import os
from pathlib import Path

import dj_database_url
import django_stubs_ext
from django.core.management.utils import get_random_secret_key
from whitenoise.compress import Compressor  # no Django in it: safe to import here

# Lets ModelAdmin[Llm] and friends be subscripted at run time, as the type stubs spell them.
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent


def _env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = int(raw)
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


def _env_int_or_zero(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = int(raw)
    if value < 0:
        raise ValueError(f"{name} must be 0 or more, got {raw!r}")
    return value


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = float(raw)
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


def _env_float_or_zero(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = float(raw)
    if value < 0:
        raise ValueError(f"{name} must be 0 or more, got {raw!r}")
    return value


DEBUG = _env_bool("DJANGO_DEBUG", False)

DEV_DIR = BASE_DIR / ".mcpd-dev"


def _dev_secret_key() -> str:
    """The embedded broker's key: made once and kept in .mcpd-dev/, so restarts can still
    decrypt stored API keys. Production sets SECRET_KEY (system check mcpd.W002)."""
    path = DEV_DIR / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        DEV_DIR.mkdir(exist_ok=True)
        key = get_random_secret_key()
        path.write_text(key)
        path.chmod(0o600)
        return key


MCPD_SECRET_KEY_FROM_ENV = bool(os.environ.get("SECRET_KEY"))
SECRET_KEY = os.environ.get("SECRET_KEY") or _dev_secret_key()

ALLOWED_HOSTS = [
    h.strip()
    for h in os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",")
    if h.strip()
]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's files, served under /static/ (no CDN)
    "channels",
    "django_htmx",  # htmx's file and {% htmx_script %} for the admin's Fleet page (no CDN)
    "virtual_llms",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # WhiteNoise, async (a sync middleware would put a thread hop on every request): where
    # WhiteNoise's docs put it, after SecurityMiddleware, before the rest.
    "virtual_llms.runtime.static_files.StaticFilesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "mcpd_site.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

ASGI_APPLICATION = "mcpd_site.asgi.application"

DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        conn_max_age=_env_int("MCPD_DB_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # All the ORM work of a worker runs on one thread (runtime/django_asgi.py): a connect to
    # a database host that went silent (a fail-over moving its address) would hold it, and
    # every request behind it, for libpq's default of no limit. Refused (a restart) fails at
    # once anyway. A ?connect_timeout= in DATABASE_URL wins.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("connect_timeout", 5)
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several threads (the async ORM's and the test threads) share the file: wait for the
    # write lock instead of failing at once, and take it at BEGIN so a read-then-write
    # transaction never has to upgrade its lock.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 20, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"}
    )
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    # A file (threads share it), one per test process (parallel runs never collide).
    DATABASES["default"]["TEST"] = {"NAME": str(BASE_DIR / f".test-db-{os.getpid()}.sqlite3")}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL", "").strip()
# Every Redis key of this broker (channel layer and shared state) starts with this, so
# several brokers (or test runs) can share one Redis.
MCPD_REDIS_PREFIX = os.environ.get("MCPD_REDIS_PREFIX", "mcpd").strip() or "mcpd"
if REDIS_URL:
    # Redis pub/sub: one PUBLISH per message, pushed to the one subscriber (each process's
    # hub), about five times faster per hop than the list-based RedisChannelLayer (four round
    # trips per send, a BZPOPMIN loop per receive). A message to a channel nobody holds is
    # dropped: the broker never relies on that (presence and liveness keys with TTLs, a
    # deadline on every wait; docs/design.md).
    from virtual_llms.runtime.redis_parser import layer_host  # no Django in it: safe to import here

    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {
                "hosts": [layer_host(REDIS_URL)],
                "prefix": f"{MCPD_REDIS_PREFIX}:layer:",
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": 5000, "expiry": 60},
        }
    }

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# Where collectstatic puts the static files and the workers serve them from.
STATIC_ROOT = Path(os.environ.get("MCPD_STATIC_ROOT", "").strip() or BASE_DIR / "staticfiles")
# The broker serves its static files itself (WhiteNoise, virtual_llms/runtime/static_files.py).
# After `manage.py collectstatic` (production): from STATIC_ROOT, gzip and brotli versions
# made ahead, names with a content hash, cached for a year. Before it (`make run`, the
# tests, a broker started from a checkout): the plain names, straight from the apps' static
# directories (WhiteNoise's finders, indexed at startup; looked up per request under DEBUG),
# so the admin is styled with no build step.
MCPD_STATIC_COLLECTED = (STATIC_ROOT / "staticfiles.json").is_file()
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "virtual_llms.runtime.static_files.StaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = DEBUG or not MCPD_STATIC_COLLECTED
# Source maps (4 MB of Swagger UI's and Redoc's) are fetched by a browser's developer tools
# only: not worth brotli's time at collectstatic.
WHITENOISE_SKIP_COMPRESS_EXTENSIONS = [*Compressor.SKIP_COMPRESS_EXTENSIONS, "map"]

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["virtual_llms.drf.BearerTokenAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["virtual_llms.drf.HasRole"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["virtual_llms.drf.LenientJSONParser"],
    # JSON whatever Accept and Content-Type say, as on /v1/ (PROTOCOL.md "OpenAI surface").
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "virtual_llms.drf.JsonOnly",
    "EXCEPTION_HANDLER": "virtual_llms.drf.api_exception_handler",
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

_OPENAPI_DESCRIPTION = """\
mcpd relays OpenAI-compatible calls to models whose publishers dial out to it.

Every call carries `Authorization: Bearer <token>` (a publisher, client or admin token,
made with `manage.py createtoken`); `/healthz`, `/readyz` and this document need none.
Errors on `/api/` are `{"error": {"code", "message"}}`, on `/v1/` OpenAI's
`{"error": {"message", "type", "code"}}`. Bodies are read as JSON whatever their
`Content-Type`, and `/api/` answers JSON whatever `Accept` says.

A publisher may hold its control stream as a WebSocket instead of SSE:
`GET /api/v1/virtual/sessions/{session_id}/ws` (an upgrade, bearer token in the
handshake), JSON text frames; see PROTOCOL.md, "The control stream".
"""

# The OpenAPI document at /api/schema/ and Swagger UI at /api/docs/ (virtual_llms/openapi.py):
# public, like the source; the page's files ship in drf-spectacular-sidecar.
SPECTACULAR_SETTINGS = {
    "TITLE": "mcpd",
    "DESCRIPTION": _OPENAPI_DESCRIPTION,
    "VERSION": "1.1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Request bodies get their own components, so required text fields say minLength 1
    # (what the API refuses blank) and a generated client sends what is accepted.
    "COMPONENT_SPLIT_REQUEST": True,
    "SERVE_AUTHENTICATION": [],
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "PREPROCESSING_HOOKS": ["virtual_llms.openapi.add_plain_views"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SWAGGER_UI_SETTINGS": {"persistAuthorization": True},
    "TAGS": [  # in this order on the page (virtual_llms/openapi.py names them)
        {"name": "OpenAI-compatible", "description": "What clients call, with a client token."},
        {"name": "Publisher", "description": "What publishers call, with a publisher token."},
        {"name": "LLM rows", "description": "The registry: read it, add public rows, evict."},
        {"name": "Health", "description": "Liveness and readiness, for load balancers."},
    ],
    "ENUM_NAME_OVERRIDES": {
        "LlmStatusEnum": "virtual_llms.models.LlmStatus",
        "PublishedStatusEnum": ["active", "hibernating"],  # what a publisher may set
    },
}

# --- mcpd knobs (PROTOCOL.md "Operations") -------------------------------------------------
# A publisher heartbeats every 30 s; three missed beats (90 s) mean it is gone.
MCPD_HEARTBEAT_STALE_SECONDS = _env_int("MCPD_HEARTBEAT_STALE_SECONDS", 90)
# An inactive virtual row is kept 4 h so its publisher can come back and adopt it, then deleted.
MCPD_INACTIVE_RETENTION_SECONDS = _env_int("MCPD_INACTIVE_RETENTION_SECONDS", 14400)
# Longest wait for a publisher's first answer, and between two chunks of a stream.
MCPD_INFER_TIMEOUT_SECONDS = _env_float("MCPD_INFER_TIMEOUT_SECONDS", 120.0)
# Longest wait for a hibernating model to wake (loading weights takes minutes).
MCPD_WAKE_TIMEOUT_SECONDS = _env_float("MCPD_WAKE_TIMEOUT_SECONDS", 300.0)
# With this set, a failed wake is remembered this long: requests meanwhile get its 502 at
# once (with Retry-After) instead of waking a broken model again and again (SDKs retry 502s).
# 0, the default, is the contract's rule: the next request after a failed wake wakes again.
MCPD_WAKE_FAILURE_SECONDS = _env_float_or_zero("MCPD_WAKE_FAILURE_SECONDS", 0.0)
# A worker told to stop (SIGTERM) lets its requests in flight finish this long (drain.py).
MCPD_DRAIN_SECONDS = _env_float("MCPD_DRAIN_SECONDS", 30.0)
# Largest request body accepted from a client or a publisher.
MCPD_MAX_BODY_BYTES = _env_int("MCPD_MAX_BODY_BYTES", 10 * 1024 * 1024)
# A message between workers bigger than this (a task's body, an answer) does not ride Redis
# pub/sub, whose per-subscriber output limit (32 MB by default) would cut the receiving
# worker's subscription: it is stored under a key of its own and taken by its receiver
# (spill.py). Small messages, nearly all of them, ride pub/sub as ever.
MCPD_PUBSUB_INLINE_BYTES = _env_int("MCPD_PUBSUB_INLINE_BYTES", 64 * 1024)
# Deepest JSON accepted in a request body or a socket frame (deeper: 400 invalid_json).
# OpenAI bodies nest a dozen levels (a tool's JSON schema a few more); at most 500, since a
# task frame wraps the body in a few more levels and the channel layer's msgpack writes 511.
MCPD_MAX_JSON_DEPTH = _env_int("MCPD_MAX_JSON_DEPTH", 128)
if MCPD_MAX_JSON_DEPTH > 500:
    raise ValueError(f"MCPD_MAX_JSON_DEPTH must be at most 500, got {MCPD_MAX_JSON_DEPTH}")
# Requests waiting for a free slot of one LLM's backends (PROTOCOL.md "Routing, capacity
# and the queue"): at most this many per LLM (more: 503 queue_full), each at most this long
# (then 503 queue_timeout).
MCPD_QUEUE_MAX = _env_int("MCPD_QUEUE_MAX", 256)
MCPD_QUEUE_TIMEOUT_SECONDS = _env_float("MCPD_QUEUE_TIMEOUT_SECONDS", 60.0)
# Quotas per owner (issue 29): the names its tokens publish, and the sessions they hold
# (a register past either: 409 quota_exceeded). gcsweep deletes sessions that own nothing.
MCPD_MAX_NAMES_PER_OWNER = _env_int("MCPD_MAX_NAMES_PER_OWNER", 4096)
MCPD_MAX_SESSIONS_PER_OWNER = _env_int("MCPD_MAX_SESSIONS_PER_OWNER", 4096)
# Usage records (virtual_llms/usage.py) older than this are deleted by gcsweep.
MCPD_USAGE_RETENTION_DAYS = _env_int("MCPD_USAGE_RETENTION_DAYS", 90)
# The admin's Fleet page re-reads the fleet this often (one state read per open page each
# time): a change shows within it.
MCPD_FLEET_REFRESH_SECONDS = _env_int("MCPD_FLEET_REFRESH_SECONDS", 3)
# Peers that stop reading (backpressure.py). A response may have this many bytes wait in the
# worker behind a full send buffer (the kernel's, then Twisted's 64 KiB): past it the
# connection is closed and the call ends as if its client had left (a cancel frame to the
# publisher, its slot freed). 4 MiB is hundreds of ordinary chunks; 0: no bound.
MCPD_CLIENT_BUFFER_BYTES = _env_int_or_zero("MCPD_CLIENT_BUFFER_BYTES", 4 * 1024 * 1024)
# The same bound for a publisher's control stream (SSE or WebSocket), past which it is
# closed and unbound as if it had disconnected. Much higher: a publisher that reads slower
# than its tasks arrive is busy, not gone (200 tasks of 900 KB at once put 180 MB behind its
# buffer, and a 64 MiB bound cut a publisher that was reading them); one that stopped
# reading is the stall bound's, below. This one only caps a trickle. 0: no bound.
MCPD_PUBLISHER_BUFFER_BYTES = _env_int_or_zero("MCPD_PUBLISHER_BUFFER_BYTES", 1024 * 1024 * 1024)
# A control stream whose sent bytes the publisher leaves unread (its window shut) or
# unacknowledged this long is closed by the kernel (TCP_USER_TIMEOUT, Linux) and unbound.
# 10 s: longer than any pause of a box that still serves; 0: off.
MCPD_PUBLISHER_STALL_SECONDS = _env_float_or_zero("MCPD_PUBLISHER_STALL_SECONDS", 10.0)
# Idle control streams and waiting clients get a comment this often; proxies cut at 60 s.
MCPD_PING_SECONDS = _env_float("MCPD_PING_SECONDS", 15.0)
# daphne's access log, one line per HTTP request (every chunk batch a publisher posts too):
# off by default, since each client call already gets its line on mcpd.request; "-" for
# stdout, else a file to append to.
MCPD_ACCESS_LOG = os.environ.get("MCPD_ACCESS_LOG", "").strip()
# /metrics answers anyone with this set (a scraper on a private network); else an admin token.
MCPD_METRICS_PUBLIC = _env_bool("MCPD_METRICS_PUBLIC", False)
# "json": every log line is one JSON object (log shippers); else plain text.
MCPD_LOG_FORMAT = os.environ.get("MCPD_LOG_FORMAT", "").strip().lower() or "plain"
if MCPD_LOG_FORMAT not in ("plain", "json"):
    raise ValueError(f"MCPD_LOG_FORMAT must be plain or json, got {MCPD_LOG_FORMAT!r}")
# Optional key for encrypting public LLMs' API keys; derived from SECRET_KEY when unset.
MCPD_ENCRYPTION_KEY = os.environ.get("MCPD_ENCRYPTION_KEY", "")

# A CSRF refusal on /api/ or /v1/ (which take no cookies) is the contract's JSON 403.
CSRF_FAILURE_VIEW = "virtual_llms.edge.csrf_failure"

# Django refuses bodies over this when read through request.POST; ours are checked by size.
DATA_UPLOAD_MAX_MEMORY_SIZE = MCPD_MAX_BODY_BYTES

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        # One object per line: time, level, logger, message, and a request line's fields
        # (request_log.py) as keys of their own.
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        },
    },
    "filters": {
        "quiet_connection_errors": {
            "()": "virtual_llms.runtime.channels_layer.QuietConnectionErrors",
        },
        "contract_responses": {"()": "virtual_llms.logfilters.ContractResponses"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": MCPD_LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": os.environ.get("MCPD_LOG_LEVEL", "INFO")},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        # An expected 4xx/503 on /api/ and /v1/ is not an ERROR line (virtual_llms/logfilters).
        "django.request": {"filters": ["contract_responses"]},
        # A lost Redis connection: one line per outage, not a traceback (runtime/).
        "channels_redis.pubsub": {"filters": ["quiet_connection_errors"]},
    },
}
