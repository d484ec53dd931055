"""``mcpd-publish [run|check] --config publisher.toml [flags]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .config import BROKER_ENV, TOKEN_ENV, ConfigError, Overrides, load
from .logs import log


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mcpd-publish",
        description="Publish OpenAI-compatible model servers to an mcpd broker.",
        epilog=(
            f"Environment: {TOKEN_ENV} (the publisher token), {BROKER_ENV} (broker URLs, "
            "comma-separated). Guide: docs/publisher.md."
        ),
    )
    p.add_argument(
        "command",
        nargs="?",
        choices=("run", "check"),
        default="run",
        help="run: serve (default); check: verify the token and each upstream, then exit",
    )
    p.add_argument("-c", "--config", type=Path, help="TOML configuration file")
    p.add_argument(
        "--broker",
        action="append",
        default=[],
        metavar="URL",
        help="broker base URL; repeat for several workers (overrides the file)",
    )
    p.add_argument("--transport", choices=("sse", "ws"), help="control stream transport")
    p.add_argument(
        "--llm",
        action="append",
        default=[],
        metavar="SPEC",
        help="an LLM to publish, as comma-separated key=value pairs, e.g. "
        "name=qwen,upstream=http://127.0.0.1:8080/v1 (repeatable)",
    )
    p.add_argument("--state-file", type=Path, help="where the session id is kept")
    p.add_argument("-v", "--verbose", action="store_true", help="one log line per task")
    p.add_argument("--version", action="version", version=f"mcpd-publish {__version__}")
    return p


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    )
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    overrides = Overrides(
        config_path=args.config,
        brokers=args.broker,
        transport=args.transport,
        llms=args.llm,
        state_file=args.state_file,
    )
    try:
        config = load(overrides)
    except ConfigError as exc:
        if len(exc.problems) == 1:
            print(f"mcpd-publish: bad configuration: {exc}", file=sys.stderr)
        else:
            print(
                f"mcpd-publish: bad configuration ({len(exc.problems)} problems):", file=sys.stderr
            )
            for problem in exc.problems:
                print(f"  {problem}", file=sys.stderr)
        return 2
    if args.command == "check":
        from .check import check

        def say(ok: bool, line: str) -> None:
            print(f"{'ok  ' if ok else 'FAIL'}  {line}", flush=True)

        return 0 if asyncio.run(check(config, say)) else 1

    from .agent import Agent

    async def serve() -> int:
        return await Agent(config).run()

    log.info(
        "mcpd-publish %s: %d LLM(s) to %s over %s; state in %s",
        __version__,
        len(config.llms),
        ", ".join(config.brokers),
        config.transport,
        config.state_file,
    )
    return asyncio.run(serve())


if __name__ == "__main__":
    sys.exit(main())
