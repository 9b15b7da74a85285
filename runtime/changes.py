"""Telling the other nodes that an app changed (DESIGN section 8).

On PostgreSQL, a change to an app's deployments, settings or secrets is announced with
``NOTIFY chatfn_changes, '<app id>'``; every node LISTENs on its own connection and drops
that app's cached state and secrets at once, then warms the newly active version. The
caches' own expiry (0.5 s) is the fallback when a notification is lost (a node that was
reconnecting). On SQLite there is one node and nothing to announce.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg
from sqlalchemy import text

from runtime.db import Database

log = logging.getLogger("chatfn.changes")
CHANNEL = "chatfn_changes"
_RECONNECT_S = (0.1, 0.5, 1.0, 2.0)


class Changes:
    def __init__(self, db: Database, on_change: Callable[[int], None]) -> None:
        self._db = db
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if db.dialect == "postgresql":
            self._thread = threading.Thread(target=self._listen, name="chatfn-listen", daemon=True)
            self._thread.start()

    def announce(self, app_id: int) -> None:
        """Tell every node (this one included) that ``app_id`` changed."""
        if self._thread is None:
            return
        try:
            with self._db.write() as c:
                c.execute(text("SELECT pg_notify(:channel, :payload)"),
                          {"channel": CHANNEL, "payload": str(app_id)})  # fmt: skip
        except Exception as exc:  # the cache expiry still propagates the change
            log.warning("could not announce a change: %s", type(exc).__name__)

    def _listen(self) -> None:
        attempt = 0
        url = self._db.engine.url.set(drivername="postgresql")
        dsn = url.render_as_string(hide_password=False)
        while not self._stop.is_set():
            try:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    attempt = 0
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5, stop_after=64):
                            if note.payload.isdigit():
                                self._on_change(int(note.payload))
            except Exception as exc:
                log.info("change listener reconnecting: %s", type(exc).__name__)
                self._stop.wait(_RECONNECT_S[min(attempt, len(_RECONNECT_S) - 1)])
                attempt += 1

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(3)
