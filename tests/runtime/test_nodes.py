"""Nodes and their sessions: a node that stops without ending its connections' sessions
(a crash, a kill, a lost database) leaves them active; the live nodes, or the next start,
end them as ``disconnected``, running UserEndedSession, exactly once."""

from __future__ import annotations

import datetime
from collections.abc import Iterator

import pytest
from sqlalchemy import select, update

from runtime.core import App, Runtime
from runtime.models import NodeRow, SessionRow, utcnow
from runtime.nodes import Node
from tests.runtime.conftest import ProjectFactory

ENDED = """
def handle_event(event, context):
    print("ended", event.session_id, event.reason)
"""


@pytest.fixture(scope="module")
def app(runtime: Runtime, project: ProjectFactory) -> App:
    app = runtime.create_app("nodes")
    app.deploy(project(user_ended_session=ENDED))
    return app


@pytest.fixture
def other(database_url: str) -> Iterator[Runtime]:
    """A second node on the same database (another server process)."""
    rt = Runtime(database_url)
    try:
        yield rt
    finally:
        rt.close()


def crash(node: Node) -> None:
    """The node's process dies: no more beats, nothing ended, its row left behind."""
    node._stop.set()
    if node._thread is not None:
        node._thread.join(10)
    node._thread = None


def backdate(runtime: Runtime, node_id: str, seconds: float) -> None:
    with runtime.db.write() as c:
        c.execute(
            update(NodeRow)
            .where(NodeRow.id == node_id)
            .values(seen_at=utcnow() - datetime.timedelta(seconds=seconds))
        )


def session_row(runtime: Runtime, session_id: str) -> SessionRow:
    with runtime.db.reading() as s:
        row = s.scalar(select(SessionRow).where(SessionRow.id == session_id))
        assert row is not None
        s.expunge(row)
        return row


def node_ids(runtime: Runtime) -> set[str]:
    with runtime.db.read() as c:
        return set(c.execute(select(NodeRow.id)).scalars())


def ended_logs(runtime: Runtime, app: App) -> list[str]:
    runtime.drain()
    return [i.logs for i in app.invocations(limit=200, event="UserEndedSession")]


def test_a_connections_session_belongs_to_its_node(runtime: Runtime, app: App) -> None:
    connection = app.connect()
    try:
        result = connection.start_session("ada")
        assert result.session is not None
        assert session_row(runtime, result.session["id"]).node_id == runtime.node.id
        assert runtime.node.id in node_ids(runtime)
        # Sessions started without a connection belong to no node and are never reaped.
        plain = app.start_session("bea").session
        assert plain is not None and session_row(runtime, plain["id"]).node_id is None
        app.end_session(plain["id"])
    finally:
        connection.close()


def test_a_lost_nodes_sessions_are_ended_as_disconnected_once(
    runtime: Runtime, app: App, other: Runtime
) -> None:
    theirs = other.app("nodes").connect()
    result = theirs.start_session("cid")
    assert result.session is not None
    session_id = result.session["id"]
    mine = app.connect()
    kept = mine.start_session("dan").session
    assert kept is not None
    try:
        crash(other.node)
        assert runtime.node.reap() == 0  # not lost yet: seen a moment ago
        assert session_row(runtime, session_id).ended_at is None
        backdate(runtime, other.node.id, runtime.node.lost_after_s + 1)
        assert runtime.node.reap() == 1
        row = session_row(runtime, session_id)
        assert row.ended_at is not None and row.end_reason == "disconnected"
        assert f"ended {session_id} disconnected\n" in ended_logs(runtime, app)
        assert other.node.id not in node_ids(runtime)  # forgotten
        assert runtime.node.reap() == 0  # once
        # The live node's own session is untouched.
        assert session_row(runtime, kept["id"]).ended_at is None
    finally:
        mine.close()
        theirs.close()


def test_a_node_that_comes_back_registers_again(runtime: Runtime, other: Runtime) -> None:
    """Taken for lost during a long pause, a node finds its row gone at its next beat and
    registers again (its old sessions were ended; new ones are its own)."""
    connection = other.app("nodes").connect()
    assert connection.start_session("fay").session is not None  # registers the node
    connection.close()
    backdate(runtime, other.node.id, runtime.node.lost_after_s + 1)
    runtime.node.reap()
    assert other.node.id not in node_ids(runtime)
    other.node.beat()
    assert other.node.id in node_ids(runtime)


def test_the_next_start_ends_what_a_closed_runtime_left_active(
    runtime: Runtime, app: App, other: Runtime
) -> None:
    """An embedder closing its runtime without closing connections: the node leaves the
    registry, and its sessions are ended by the next node that starts or beats."""
    left = other.app("nodes").connect().start_session("eve").session
    assert left is not None
    other.close()
    assert session_row(runtime, left["id"]).ended_at is None
    fresh = Node(runtime)
    try:
        fresh.start()  # reaps at once
        assert session_row(runtime, left["id"]).end_reason == "disconnected"
    finally:
        fresh.stop()


def test_the_heartbeat_keeps_a_node_seen(runtime: Runtime) -> None:
    node = Node(runtime, heartbeat_s=0.05, lost_after_s=5)
    node.start()
    try:
        backdate(runtime, node.id, 60)
        deadline = utcnow() + datetime.timedelta(seconds=5)
        while utcnow() < deadline:
            with runtime.db.read() as c:
                seen = c.execute(select(NodeRow.seen_at).where(NodeRow.id == node.id)).scalar()
            if seen is not None and utcnow() - seen < datetime.timedelta(seconds=1):
                break
        else:
            pytest.fail("the heartbeat did not update seen_at")
    finally:
        node.stop()
    assert node.id not in node_ids(runtime)  # a clean stop leaves the registry


def test_a_connection_without_a_session_registers_nothing(database_url: str) -> None:
    with Runtime(database_url) as rt:
        rt.ensure_app("quiet").connect().close()
        assert rt.node.id not in node_ids(rt)


def test_bad_timings_are_refused(runtime: Runtime) -> None:
    with pytest.raises(ValueError, match="heartbeat_s must be positive and shorter"):
        Node(runtime, heartbeat_s=30, lost_after_s=10)
