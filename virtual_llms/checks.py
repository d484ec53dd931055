"""System checks for settings that are fine on a laptop and wrong in production."""

from typing import Any

from django.conf import settings
from django.core.checks import Warning, register


@register()
def check_production_settings(app_configs: Any, **kwargs: Any) -> list[Warning]:
    warnings: list[Warning] = []
    if settings.DEBUG:
        return warnings
    if not settings.REDIS_URL:
        warnings.append(
            Warning(
                "The in-memory channel layer serves one process only.",
                hint="Set REDIS_URL to run several daphne processes as one broker.",
                id="mcpd.W001",
            )
        )
    if not settings.MCPD_SECRET_KEY_FROM_ENV:
        warnings.append(
            Warning(
                "SECRET_KEY is the development key kept in .mcpd-dev/.",
                hint="Set SECRET_KEY (and MCPD_ENCRYPTION_KEY) in production.",
                id="mcpd.W002",
            )
        )
    if not settings.MCPD_STATIC_COLLECTED:
        warnings.append(
            Warning(
                "Static files are served from the apps' directories: uncompressed, without "
                "content-hashed names, and cached by browsers for a minute only.",
                hint="Run `python manage.py collectstatic --noinput` after each install.",
                id="mcpd.W003",
            )
        )
    return warnings
