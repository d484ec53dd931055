from typing import Any

from django.apps import AppConfig


class VirtualLlmsConfig(AppConfig):
    name = "virtual_llms"
    verbose_name = "Virtual LLMs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.models.signals import post_delete, post_save

        from . import (
            checks,  # noqa: F401 - registers the system checks
            inference,
            metrics,
            request_log,
            usage,
        )
        from .backends import mirror
        from .models import Llm
        from .services import llm_saved

        def touch(sender: type[Llm], instance: Llm, **kwargs: Any) -> None:
            llm_saved(llm=instance)

        def created(sender: type[Llm], instance: Llm, created: bool, **kwargs: Any) -> None:
            if created and not kwargs.get("raw"):
                mirror(instance)

        # Any save or delete of a row, wherever it comes from (admin, services, deletes of
        # whole querysets): every worker's cached copy is dropped (rowcache.llm_lookup).
        post_save.connect(touch, sender=Llm, weak=False, dispatch_uid="mcpd-llm-saved")
        post_delete.connect(touch, sender=Llm, weak=False, dispatch_uid="mcpd-llm-deleted")
        # A virtual row made without services gets the one backend v1 implied (backends.py).
        post_save.connect(created, sender=Llm, weak=False, dispatch_uid="mcpd-llm-mirror")
        # Every finished inference call becomes a usage record (written in batches).
        if usage.record not in inference.observers:
            inference.observers.append(usage.record)
        # The observers of every client call, stream and wake: /metrics and the request log.
        metrics.install()
        request_log.install()
