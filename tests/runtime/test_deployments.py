"""Deploying a function project: every compile error reported, the previous version kept
live on failure, atomic activation, rollback, and state that survives a restart."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from runtime.core import Runtime
from runtime.invocations import Invocation
from runtime.models import DeploymentRow
from sandbox import Policy, cgroups
from sandbox.errors import DeployRejected, InvalidRequest, NotFound
from sandbox.isolation import SandboxSettings
from tests.runtime.conftest import ProjectFactory, served, version_project


def test_a_failed_deploy_reports_every_error_and_keeps_the_previous_version(
    runtime: Runtime, project: ProjectFactory
) -> None:
    app = runtime.create_app("keeps-previous")
    assert app.deploy(version_project(project, 1)).version == 1
    broken = project(
        user_started_session="def handle_event(event, context):\n    return (\n",
        user_ended_session="def handle_event(event):\n    return 1\n",
        init="x = = 1\n",
    )
    with pytest.raises(DeployRejected) as caught:
        app.deploy(broken)
    errors = caught.value.errors
    assert {e["file"] for e in errors} == {
        "user_started_session.py",
        "user_ended_session.py",
        "init.py",
    }
    assert all(isinstance(e["line"], int) and e["message"] for e in errors)
    failed = app.deployments.get(2)
    assert failed.status == "failed" and failed.errors == errors
    assert app.state().version == 1
    assert served(app) == 1


@pytest.mark.skipif(
    os.geteuid() != 0 or cgroups.detect().backend is None, reason="needs root and cgroups"
)
def test_a_deploy_without_a_required_layer_keeps_the_previous_version(
    tmp_path: Path, project: ProjectFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator requires the cgroup layer; when the machine stops offering it (say the
    server moved to an undelegated cgroup), a deploy is refused, naming the layer and the
    reason, and the live version keeps serving."""
    settings = SandboxSettings(require=frozenset({"cgroup", "seccomp"}))
    runtime = Runtime(f"sqlite:///{tmp_path / 'db.sqlite'}", sandbox=settings)
    try:
        app = runtime.create_app("required")
        assert app.deploy(version_project(project, 1)).version == 1
        monkeypatch.setattr(cgroups, "detect", lambda: cgroups.Support(None, "gone"))
        with pytest.raises(DeployRejected) as caught:
            app.deploy(version_project(project, 2))
        assert caught.value.message == (
            "required sandbox layer(s) cgroup not available: cgroup: gone"
        )
        assert app.deployments.get(2).status == "failed"
        assert app.state().version == 1
        assert served(app) == 1
    finally:
        runtime.close()


def test_rollback_activates_an_older_version(runtime: Runtime, project: ProjectFactory) -> None:
    app = runtime.create_app("rollback")
    app.deploy(version_project(project, 1))
    app.deploy(version_project(project, 2))
    assert served(app) == 2
    assert [(d.version, d.status) for d in app.deployments.list()] == [
        (2, "active"),
        (1, "inactive"),
    ]
    info = app.activate(1)
    assert info.status == "active" and info.activated_at is not None
    assert served(app) == 1
    assert app.activate(1).version == 1  # activating the active version is a no-op
    with pytest.raises(NotFound, match="no deployment version 9"):
        app.activate(9)
    with pytest.raises(DeployRejected):
        app.deploy(project(user_started_session="def handle_event(:\n"))
    with pytest.raises(InvalidRequest, match="version 3 is failed"):
        app.activate(3)
    assert served(app) == 1


def test_the_database_allows_one_active_deployment_per_app(
    runtime: Runtime, project: ProjectFactory
) -> None:
    app = runtime.create_app("one-active")
    app.deploy(version_project(project, 1))
    app.deploy(version_project(project, 2))
    with pytest.raises(IntegrityError), runtime.db.session() as s:
        s.execute(
            update(DeploymentRow)
            .where(DeploymentRow.app_id == app.id, DeploymentRow.version == 1)
            .values(status="active")
        )


@pytest.mark.parametrize(
    ("files", "manifest", "message"),
    [
        ({"helpers": "X = 1\n"}, None, "helpers.py is not an event handler or init.py"),
        ({"init": "X = 1\n"}, None, "the project has no event handler files"),
        (
            {"user_started_session": "def handle_event(e, c):\n    pass\n"},
            "[runtime]\ntimeout_ms = -1\n",
            r"chatfn.toml: \[runtime\] timeout_ms must be between",
        ),
        (
            {"user_started_session": "def handle_event(e, c):\n    pass\n"},
            "[runtime\n",
            "chatfn.toml:",
        ),
        (
            {"user_started_session": "def handle_event(e, c):\n    pass\n"},
            "[runtime]\ncolour = 1\n",
            "colour",
        ),
    ],
)
def test_a_bad_project_is_refused_before_anything_is_stored(
    runtime: Runtime,
    project: ProjectFactory,
    files: dict[str, str],
    manifest: str | None,
    message: str,
) -> None:
    app = runtime.ensure_app("bad-projects")
    before = app.deployments.list()
    with pytest.raises(InvalidRequest, match=message):
        app.deploy(project(manifest=manifest, **files))
    assert app.deployments.list() == before


def test_a_missing_directory_is_invalid(runtime: Runtime, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="is not a directory"):
        runtime.ensure_app("bad-projects").deploy(tmp_path / "nowhere")


def test_in_flight_invocations_finish_across_a_deploy(
    runtime: Runtime, project: ProjectFactory
) -> None:
    app = runtime.create_app("in-flight")
    app.deploy(
        project(
            user_started_session="""
                import time

                def handle_event(event, context):
                    time.sleep(0.6)
                    return 1
            """
        )
    )
    served(app)  # warm
    results: list[Invocation] = []
    worker = threading.Thread(
        target=lambda: results.append(
            app.invoke("UserStartedSession", {"user": {}, "session_id": "s"})
        )
    )
    worker.start()
    threading.Event().wait(0.2)
    app.deploy(version_project(project, 2))
    worker.join()
    assert results[0].succeeded and results[0].result == 1, results[0].error
    assert results[0].deployment_version == 1
    assert served(app) == 2


def test_state_survives_a_restart(
    tmp_path: Path, project: ProjectFactory, dependency_dir: Path
) -> None:
    url = f"sqlite:///{tmp_path}/restart.db"
    with Runtime(url) as first:
        app = first.create_app("durable")
        app.secrets.set("S", "v")
        app.users.create_user("kept", properties={"a": 1})
        app.deploy(
            project(
                user_started_session="""
                    def handle_event(event, context):
                        return [context.secrets["S"], context.users.get_user("kept")["name"]]
                """
            )
        )
        session = app.start_session("kept")
        assert session.session is not None
        app.update_settings(guest_users="disabled")
    with Runtime(url, policy=Policy()) as second:
        again = second.app("durable")
        assert again.settings() == {"guest_users": "disabled"}
        assert served(again) == ["v", "kept"]
        assert [s["id"] for s in again.sessions()] == [session.session["id"]]
        assert [i.event for i in again.invocations()][:1] == ["UserStartedSession"]


def test_changes_made_by_another_runtime_show_within_the_cache_time(
    tmp_path: Path, project: ProjectFactory
) -> None:
    from runtime.core import STATE_TTL_S
    from runtime.secrets import VALUES_TTL_S

    url = f"sqlite:///{tmp_path}/shared.db"
    with Runtime(url) as node_a, Runtime(url) as node_b:
        a = node_a.create_app("shared")
        a.deploy(
            project(
                user_started_session=(
                    "def handle_event(event, context):\n    return context.secrets.get('K')\n"
                )
            )
        )
        b = node_b.app("shared")
        assert served(b) is None and b.settings() == {"guest_users": "enabled"}
        a.update_settings(guest_users="disabled")
        a.secrets.set("K", "v2")
        a.deploy(version_project(project, 2))
        threading.Event().wait(max(STATE_TTL_S, VALUES_TTL_S) + 0.1)
        assert b.settings() == {"guest_users": "disabled"}
        assert served(b) == 2
        assert b.secrets.values() == {"K": "v2"}


def test_a_building_deployment_reports_its_progress(
    runtime: Runtime, project: ProjectFactory
) -> None:
    app = runtime.create_app("progress")
    seen: list[tuple[str, str | None, str]] = []

    def progress(message: str, _done: int | None, _total: int | None) -> None:
        building = app.deployments.list()[0]
        seen.append((message, building.progress, building.status))

    info = app.deploy(version_project(project, 1), progress=progress)
    assert seen == [("starting", "starting", "building")]
    assert info.status == "active" and info.progress is None


def test_a_hook_that_ran_on_an_older_version_does_not_retire_the_new_one(
    runtime: Runtime, project: ProjectFactory
) -> None:
    app = runtime.create_app("stale-hook")
    app.deploy(version_project(project, 1))
    app.deploy(version_project(project, 2))
    assert served(app) == 2
    runtime.went_live(app.name, 1)  # what an invocation queued before the deploy reports
    assert (app.name, 2) in runtime.pool.pools()
    assert served(app) == 2
