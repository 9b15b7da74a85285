"""Several nodes on one PostgreSQL (DESIGN section 8): changes on one node are live on the
others within a second, races are decided by the database, and a database that goes away
fails requests clearly and serves again when it is back, without restarting chatfn."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from runtime.core import App, Runtime
from sandbox.errors import StorageError, UserExists
from tests.postgres import PostgresServer
from tests.runtime.conftest import ProjectFactory, served, version_project


def within(seconds: float, check: Callable[[], bool]) -> float:
    """How long until ``check()`` held (fails after ``seconds``)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > seconds:
            pytest.fail(f"not within {seconds} s")
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def nodes(postgres: PostgresServer) -> Iterator[tuple[Runtime, Runtime]]:
    url = postgres.new_database("nodes")
    with Runtime(url) as a, Runtime(url) as b:
        yield a, b


def test_a_deploy_rollback_settings_and_secrets_on_one_node_are_live_on_the_other(
    nodes: tuple[Runtime, Runtime], project: ProjectFactory
) -> None:
    a, b = nodes
    on_a = a.create_app("shared")
    on_a.deploy(version_project(project, 1))
    on_b = b.app("shared")
    assert served(on_b) == 1
    on_a.deploy(version_project(project, 2))
    assert within(1.0, lambda: served(on_b) == 2) < 1.0
    on_a.activate(1)
    assert within(1.0, lambda: served(on_b) == 1) < 1.0
    on_a.update_settings(guest_users="disabled")
    assert within(1.0, lambda: on_b.settings()["guest_users"] == "disabled") < 1.0
    on_a.secrets.set("K", "v")
    assert within(1.0, lambda: on_b.secrets.values() == {"K": "v"}) < 1.0


def create(app: App, name: str, barrier: threading.Barrier, outcomes: list[str]) -> None:
    barrier.wait()
    try:
        app.users.create_user(name)
        outcomes.append("created")
    except UserExists:
        outcomes.append("exists")


def test_two_nodes_creating_the_same_user_give_one_success(
    nodes: tuple[Runtime, Runtime],
) -> None:
    a, b = nodes
    a.create_app("race")
    apps = [a.app("race"), b.app("race")]
    for round_ in range(10):
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        threads = [
            threading.Thread(target=create, args=(app, f"user-{round_}", barrier, outcomes))
            for app in apps
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["created", "exists"]


def test_two_deploys_at_once_give_two_versions_and_one_active(
    nodes: tuple[Runtime, Runtime], project: ProjectFactory
) -> None:
    a, b = nodes
    a.create_app("deploy-race")
    apps = [a.app("deploy-race"), b.app("deploy-race")]
    barrier = threading.Barrier(2)

    def deploy(app: App, n: int) -> None:
        barrier.wait()
        app.deploy(version_project(project, n))

    threads = [threading.Thread(target=deploy, args=(app, n)) for n, app in enumerate(apps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted((d.version, d.status) for d in apps[0].deployments.list())
    assert [v for v, _ in statuses] == [1, 2]
    assert sorted(s for _, s in statuses) == ["active", "inactive"]


def test_a_database_restart_fails_requests_clearly_then_serves_again(
    project: ProjectFactory,
) -> None:
    server = PostgresServer()  # its own, so stopping it disturbs no other test
    try:
        with Runtime(server.new_database()) as node:
            app = node.create_app("restart")
            app.deploy(version_project(project, 1))
            assert app.start_session("before").succeeded
            server.stop()
            down = app.start_session("during")
            assert down.error is not None and down.error.code == "storage_error"
            assert "is unavailable" in down.error.message
            with pytest.raises(StorageError):
                app.users.list_users()
            server.start()
            assert app.start_session("after").succeeded, "no reconnect after the restart"
            assert served(app) == 1
    finally:
        server.close()
