"""``manage.py devtokens``: for `make run` only. Makes a development client key and publisher
token the first time, keeps them in .mcpd-dev/tokens.env, and prints them every time."""

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand

from virtual_llms.auth import authenticate_token, token_create
from virtual_llms.errors import ApiError


class Command(BaseCommand):
    help = "Create (once) and print development tokens. Never use in production."

    def handle(self, *args: Any, **options: Any) -> None:
        path = Path(settings.DEV_DIR) / "tokens.env"
        tokens = self._read(path)
        for role, var in (("client", "MCPD_CLIENT_KEY"), ("publisher", "MCPD_PUBLISHER_TOKEN")):
            if var in tokens and self._valid(tokens[var]):
                continue
            _, tokens[var] = token_create(role=role, label=f"dev-{role}")
        path.parent.mkdir(exist_ok=True)
        # `export` lines: `source .mcpd-dev/tokens.env` then hands them to programs run after
        # it (mcpd-publish, the openai SDK), as the printed lines do.
        path.write_text("".join(f"export {k}={v}\n" for k, v in tokens.items()))
        path.chmod(0o600)
        self.stdout.write("Development tokens (also in .mcpd-dev/tokens.env):")
        for key, value in tokens.items():
            self.stdout.write(f"  export {key}={value}")

    @staticmethod
    def _read(path: Path) -> dict[str, str]:
        if not path.exists():
            return {}
        lines = (line.removeprefix("export ").strip() for line in path.read_text().splitlines())
        pairs = (line.split("=", 1) for line in lines if "=" in line)
        return {k: v for k, v in pairs}

    @staticmethod
    def _valid(plaintext: str) -> bool:
        try:
            authenticate_token(plaintext)
        except ApiError:
            return False
        return True
