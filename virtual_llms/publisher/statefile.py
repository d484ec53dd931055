"""The state file: the provider session id, kept across restarts so that a restarted agent
re-registers the same session (PROTOCOL.md "sticky reconnect") and keeps its rows."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from .logs import log

VERSION = 1
# The broker's rule for session ids (a UUID by default).
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load_session(self) -> str | None:
        """The stored session id; None when there is none or the file is unreadable."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring the state file %s: %s", self.path, exc)
            return None
        session = data.get("providerSessionId") if isinstance(data, dict) else None
        if not isinstance(session, str) or not SESSION_ID_RE.match(session):
            log.warning("ignoring the state file %s: no valid providerSessionId in it", self.path)
            return None
        return session

    def save_session(self, session_id: str) -> None:
        """Write atomically (a temporary file renamed over the old one), readable by the owner
        only. A failure is logged, not raised: the agent still serves, just not stickily."""
        data = {
            "version": VERSION,
            "providerSessionId": session_id,
            "savedAt": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".session-", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(data, handle)
                    handle.write("\n")
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            log.error("could not write the state file %s: %s", self.path, exc)

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
