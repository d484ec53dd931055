"""``manage.py gcsweep`` (cron): stale virtual rows go inactive, long-inactive ones go."""

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from virtual_llms.services import gc_sweep


class Command(BaseCommand):
    help = (
        "Mark virtual LLMs with a stale heartbeat inactive and delete those inactive past "
        "the retention window. Public LLMs are never touched. Safe to run concurrently."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dry-run", action="store_true", help="Report what would change; change nothing."
        )

    def handle(self, *args: Any, dry_run: bool, **options: Any) -> None:
        result = gc_sweep(dry_run=dry_run)
        prefix = "dryRun " if dry_run else ""
        self.stdout.write(
            f"{prefix}markedInactive={result.marked_inactive} deleted={result.deleted}"
        )
