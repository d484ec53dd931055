from django.apps import AppConfig


class VirtualLlmsConfig(AppConfig):
    name = "virtual_llms"
    verbose_name = "Virtual LLMs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks  # noqa: F401 - registers the system checks
