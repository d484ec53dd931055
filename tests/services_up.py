"""Exit 0 when the PostgreSQL and Redis of MCPD_TEST_PG_URL / MCPD_TEST_REDIS_URL answer."""

import os
import sys

import psycopg
import redis


def services_up() -> tuple[bool, str]:
    pg_url = os.environ.get("MCPD_TEST_PG_URL", "postgres://postgres@127.0.0.1:5432/mcpd")
    redis_url = os.environ.get("MCPD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    base, _, _ = pg_url.rpartition("/")
    try:
        psycopg.connect(f"{base}/postgres", connect_timeout=3).close()
    except psycopg.Error as exc:
        return False, f"PostgreSQL unreachable: {exc}"
    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        return False, f"Redis unreachable: {exc}"
    return True, ""


if __name__ == "__main__":
    ok, why = services_up()
    if not ok:
        print(why, file=sys.stderr)
    sys.exit(0 if ok else 1)
