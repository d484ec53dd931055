"""Every patch of, or reliance on, a third-party library's internals, one module each.

Each module says what it relies on, why, and when it can go; ``tests/test_runtime.py`` fails
loudly as soon as an upgrade changes what a module relies on. :mod:`.redis_parser` imports
no Django (the settings module imports it).

- :mod:`.django_asgi` — Django's ASGI handler without its per-request thread, and the API's
  handler without middleware or request signals.
- :mod:`.static_files` — WhiteNoise's static file serving as an async-only middleware.
- :mod:`.daphne_server` — Twisted's form parsing and request log lines turned off in daphne.
- :mod:`.redis_parser` — redis-py's hiredis pub/sub parser without its discarded debug line.
- :mod:`.send_buffers` — what each connection's transport holds unsent, and a bound on it
  (daphne's ``send`` never blocks; Twisted buffers without limit).
- :mod:`.channels_layer` — the bytes channels-redis's pub/sub layer publishes (so a Redis
  script can publish them), and channels' consumer dispatch without a database check.
"""
