"""The agent's one logger and how it writes durations.

INFO: one line per connect, register, wake, sleep and error, with durations. DEBUG
(``--verbose``): one line per task, and the output of wake and sleep commands.
"""

from __future__ import annotations

import logging

log = logging.getLogger("mcpd.publish")


def human(seconds: float) -> str:
    """0.03 s, 12.3 s, 1m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
