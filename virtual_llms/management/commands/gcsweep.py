"""``manage.py gcsweep`` (cron): stale virtual rows go inactive, long-inactive ones go, and
usage records older than MCPD_USAGE_RETENTION_DAYS are deleted."""

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from virtual_llms import usage
from virtual_llms.services import gc_sweep


class Command(BaseCommand):
    help = (
        "Mark virtual LLMs with a stale heartbeat inactive and delete those inactive past "
        "the retention window, and usage records past MCPD_USAGE_RETENTION_DAYS. Public LLMs "
        "are never touched. Safe to run concurrently."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="Report what would change; change nothing."
        )

    def handle(self, *args: Any, dry_run: bool, **options: Any) -> None:
        result = gc_sweep(dry_run=dry_run)
        prefix = "dryRun " if dry_run else ""
        if not dry_run:
            # On stderr: stdout keeps its one line, which scripts read.
            self.stderr.write(f"usagePruned={usage.prune()}")
        self.stdout.write(
            f"{prefix}markedInactive={result.marked_inactive} deleted={result.deleted}"
        )
