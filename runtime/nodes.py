"""Nodes: the processes that hold connections, and what happens to their sessions when one
stops without ending them.

A session started on a connection belongs to that connection's node. A node registers
itself when it opens its first connection and then beats (``seen_at``) every few seconds.
When a node crashes, is killed or loses the database, its connections are gone but their
sessions would stay active forever; so every node, when it registers and at each beat,
ends the sessions of nodes not seen for ``lost_after_s`` as ``disconnected`` (running
UserEndedSession, as a dropped connection does) and forgets those nodes. One UPDATE per
session decides it, so nodes reaping at once end each session once.

Times are the nodes' own clocks: nodes on different machines must agree to well within
``lost_after_s`` (NTP does).
"""

from __future__ import annotations

import datetime
import logging
import threading
import uuid
from typing import TYPE_CHECKING

from sqlalchemy import delete, insert, select, update

from runtime.models import AppRow, NodeRow, SessionRow, utcnow
from sandbox.errors import ChatfnError, NotFound

if TYPE_CHECKING:
    from runtime.core import Runtime

log = logging.getLogger("chatfn.nodes")

HEARTBEAT_S = 5.0
LOST_AFTER_S = 30.0


class Node:
    """This process's node on the runtime's database."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        lost_after_s: float = LOST_AFTER_S,
    ) -> None:
        if not 0 < heartbeat_s < lost_after_s:
            raise ValueError("heartbeat_s must be positive and shorter than lost_after_s")
        self.runtime = runtime
        self.id = uuid.uuid4().hex
        self.heartbeat_s = heartbeat_s
        self.lost_after_s = lost_after_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Register, end what lost nodes left behind, and beat from now on."""
        with self._lock:
            if self._thread is not None:
                return
            now = utcnow()
            with self.runtime.db.write() as c:
                c.execute(insert(NodeRow).values(id=self.id, started_at=now, seen_at=now))
            self._thread = threading.Thread(target=self._run, name="chatfn-node", daemon=True)
            self._thread.start()
        self.reap()

    def beat(self) -> None:
        with self.runtime.db.write() as c:
            found = c.execute(
                update(NodeRow).where(NodeRow.id == self.id).values(seen_at=utcnow())
            ).rowcount
            if not found:
                # Taken for lost (a long pause, a partition) and reaped: its sessions were
                # ended; register again for the ones to come.
                now = utcnow()
                c.execute(insert(NodeRow).values(id=self.id, started_at=now, seen_at=now))

    def reap(self) -> int:
        """End the active sessions whose node is not live (not seen for ``lost_after_s``,
        or gone from the registry), and forget lost nodes with nothing left active. Returns
        how many sessions were ended."""
        cutoff = utcnow() - datetime.timedelta(seconds=self.lost_after_s)
        live = select(NodeRow.id).where(NodeRow.seen_at >= cutoff)
        with self.runtime.db.read() as c:
            orphans = c.execute(
                select(SessionRow.id, AppRow.name)
                .join(AppRow, AppRow.id == SessionRow.app_id)
                .where(
                    SessionRow.ended_at.is_(None)
                    & SessionRow.node_id.is_not(None)
                    & SessionRow.node_id.not_in(live)
                )
            ).all()
        ended = 0
        for session_id, app_name in orphans:
            try:
                self.runtime.app(app_name).end_session(session_id, "disconnected")
                ended += 1
            except NotFound:  # ended meanwhile (another reaper, an admin)
                pass
        active = select(SessionRow.node_id).where(
            SessionRow.ended_at.is_(None) & SessionRow.node_id.is_not(None)
        )
        with self.runtime.db.write() as c:
            c.execute(delete(NodeRow).where((NodeRow.seen_at < cutoff) & NodeRow.id.not_in(active)))
        if ended:
            log.info("ended %d session(s) of lost nodes", ended)
        return ended

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.beat()
                self.reap()
            except ChatfnError as exc:  # the database is away: try again at the next beat
                log.warning("node heartbeat failed: %s", exc.code)
            except Exception:
                log.warning("node heartbeat failed", exc_info=False)

    def stop(self) -> None:
        """Stop beating and leave the registry (the node's connections were closed, which
        ended their sessions)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.join(self.heartbeat_s + 5)
        try:
            with self.runtime.db.write() as c:
                c.execute(delete(NodeRow).where(NodeRow.id == self.id))
        except ChatfnError:
            pass  # another node reaps it later
