"""``manage.py createtoken ROLE LABEL [--owner OWNER] [--rpm N] [--tpm N]
[--max-concurrency N]``: make a token (a publisher token of an owner, a client token with
limits, if given); its plaintext is the last stdout line."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from virtual_llms.auth import token_create
from virtual_llms.models import Role


class Command(BaseCommand):
    help = "Create an API token (publisher, client or admin). The token is shown only once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("role", choices=Role.values)
        parser.add_argument("label")
        parser.add_argument(
            "--owner",
            default="",
            help="publisher tokens with the same owner share their names: one may adopt "
            "another's inactive row, and both may serve one name as a pool",
        )
        parser.add_argument("--rpm", type=int, help="client limit: requests per minute")
        parser.add_argument("--tpm", type=int, help="client limit: tokens per minute")
        parser.add_argument(
            "--max-concurrency", type=int, help="client limit: requests in flight at once"
        )

    def handle(
        self,
        *args: Any,
        role: str,
        label: str,
        owner: str = "",
        rpm: int | None = None,
        tpm: int | None = None,
        max_concurrency: int | None = None,
        **options: Any,
    ) -> None:
        try:
            token, plaintext = token_create(
                role=role,
                label=label,
                owner=owner,
                rpm=rpm,
                tpm=tpm,
                max_concurrency=max_concurrency,
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        owned = f" of owner '{owner}'" if owner else ""
        self.stderr.write(
            f"Created {role} token '{label}'{owned} (id {token.pk}). It is shown once:"
        )
        self.stdout.write(plaintext)
