"""init.py (DESIGN section 4, "Initialization script"): compiled like a handler, run once in
each worker before its first invocation, its globals shared by that worker's invocations;
at deploy time it runs once in a fresh worker, and a failure rejects the deploy with file and
line while the previous version stays live. A failure in a later worker fails invocations
(``function_error`` and a log entry) without a crash loop, and recovers."""

from __future__ import annotations

import textwrap
import time

import pytest

from runtime.core import App, Runtime
from sandbox.errors import DeployRejected
from tests.runtime.conftest import ProjectFactory, invoke, served


def line_of(source: str, fragment: str) -> int:
    """The 1-based line of ``fragment`` in ``source`` as the project fixture writes it."""
    lines = textwrap.dedent(source).splitlines()
    matches = [i for i, line in enumerate(lines, 1) if fragment in line]
    assert len(matches) == 1, matches
    return matches[0]


V1 = "def handle_event(event, context):\n    return 'v1'\n"


def with_v1(runtime: Runtime, project: ProjectFactory, name: str) -> App:
    app = runtime.create_app(name)
    assert app.deploy(project(user_started_session=V1)).version == 1
    return app


def assert_v1_still_live(runtime: Runtime, app: App) -> None:
    failed = app.deployments.list()[0]
    assert failed.status == "failed"
    assert (app.name, failed.version) not in runtime.pool.pools()
    assert app.state().version == 1
    assert served(app) == "v1"


# -- once per worker, globals shared ------------------------------------------------------------


def test_init_runs_once_per_worker_before_its_first_invocation(
    runtime: Runtime, project: ProjectFactory
) -> None:
    app = runtime.create_app("init-once")
    app.secrets.set("GREETING", "hello")
    app.deploy(
        project(
            manifest="[runtime]\nmax_workers = 1\n",
            init="""
                CALLS = []
                GREETING = context.secrets["GREETING"]
                APP = context.app
                context.log("init ran for", context.app)
                print("init printed")
            """,
            user_started_session="""
                def handle_event(event, context):
                    CALLS.append(event.session_id)
                    return [len(CALLS), GREETING, APP]
            """,
        )
    )
    # init.py ran at deploy time in the warm worker, which now serves these invocations.
    first = [invoke(app, str(i)) for i in range(3)]
    assert [inv.result for inv in first] == [[n, "hello", "init-once"] for n in (1, 2, 3)]
    assert not any("init" in inv.logs for inv in first), [inv.logs for inv in first]
    # A new worker runs init.py again, before its first invocation, into that invocation's log.
    runtime.retire_app(app.name)
    fresh = invoke(app)
    assert fresh.succeeded, fresh.error
    assert fresh.result == [1, "hello", "init-once"]
    assert "init ran for init-once\n" in fresh.logs and "init printed\n" in fresh.logs
    again = invoke(app)
    assert again.result == [2, "hello", "init-once"] and "init" not in again.logs


def test_init_context_does_not_leak_into_handler_globals(
    runtime: Runtime, project: ProjectFactory
) -> None:
    app = runtime.create_app("init-no-leak")
    app.deploy(
        project(
            init="""
                SAVED = context
                APP = context.app
            """,
            user_started_session="""
                def handle_event(event, ctx):
                    found = []
                    try:
                        context
                        found.append("context")
                    except NameError:
                        pass
                    try:
                        SAVED
                        found.append("SAVED")
                    except NameError:
                        pass
                    return [found, APP, ctx.app]
            """,
        )
    )
    assert served(app) == [[], "init-no-leak", "init-no-leak"]


# -- failures at deploy time --------------------------------------------------------------------


def test_init_raising_at_deploy_time_is_rejected_with_file_and_line(
    runtime: Runtime, project: ProjectFactory
) -> None:
    app = with_v1(runtime, project, "init-raises")
    init = """
        LIMITS = {"a": 1}


        def load(name):
            return LIMITS[name]


        VALUE = load("missing")
    """
    line = line_of(init, "return LIMITS[name]")
    with pytest.raises(DeployRejected) as caught:
        app.deploy(project(init=init, user_started_session=V1))
    errors = caught.value.errors
    assert len(errors) == 1
    assert errors[0]["file"] == "init.py" and errors[0]["line"] == line
    assert "KeyError" in errors[0]["message"] and "missing" in errors[0]["message"]
    assert str(caught.value).startswith(f"init.py:{line}: ")
    assert app.deployments.list()[0].errors == errors
    assert_v1_still_live(runtime, app)


@pytest.mark.parametrize(
    ("init", "fragment"),
    [
        ("X = 1\nY = (\n", "(' was never closed"),
        ("X = 1\nY = ().__class__\n", "__class__"),
    ],
)
def test_init_that_does_not_compile_is_rejected_with_file_and_line(
    runtime: Runtime, project: ProjectFactory, init: str, fragment: str
) -> None:
    app = runtime.ensure_app("init-compile")
    if app.state().version is None:
        app.deploy(project(user_started_session=V1))
    with pytest.raises(DeployRejected) as caught:
        app.deploy(project(init=init, user_started_session=V1))
    assert [(e["file"], e["line"]) for e in caught.value.errors] == [("init.py", 2)]
    assert fragment in caught.value.errors[0]["message"]
    assert_v1_still_live(runtime, app)


def test_init_importing_an_undeclared_module_is_rejected(
    runtime: Runtime, project: ProjectFactory
) -> None:
    app = with_v1(runtime, project, "init-imports")
    with pytest.raises(DeployRejected) as caught:
        app.deploy(project(init="import json\nimport sqlalchemy\n", user_started_session=V1))
    [error] = caught.value.errors
    assert error["file"] == "init.py" and error["line"] == 2
    assert "import of 'sqlalchemy' is not allowed" in error["message"]
    assert "requirements.in" in error["message"]
    assert_v1_still_live(runtime, app)


def test_init_slower_than_the_timeout_is_rejected_as_a_timeout(
    runtime: Runtime, project: ProjectFactory
) -> None:
    app = with_v1(runtime, project, "init-slow")
    started = time.monotonic()
    with pytest.raises(DeployRejected) as caught:
        app.deploy(
            project(
                manifest="[runtime]\ntimeout_ms = 300\n",
                init="import time\ntime.sleep(5)\n",
                user_started_session=V1,
            )
        )
    assert time.monotonic() - started < 4  # the worker was killed, not waited for
    [error] = caught.value.errors
    assert error["file"] == "init.py"
    assert "timeout" in error["message"] and "300 ms" in error["message"]
    assert_v1_still_live(runtime, app)


# -- failures in later workers ------------------------------------------------------------------


def test_init_failing_in_a_later_worker_fails_invocations_and_recovers(
    runtime: Runtime, project: ProjectFactory
) -> None:
    app = runtime.create_app("init-secret")
    init = """
        context.log("init: loading the key")
        KEY = context.secrets["API_KEY"]
    """
    key_line = line_of(init, 'context.secrets["API_KEY"]')
    source = project(
        # Every invocation gets a fresh worker, so init.py runs before each one.
        manifest="[runtime]\nmax_invocations = 1\nmax_workers = 1\n",
        init=init,
        user_started_session="def handle_event(event, context):\n    return KEY\n",
    )
    # Without the secret, the deploy-time run fails: rejected, naming the line.
    with pytest.raises(DeployRejected) as caught:
        app.deploy(source)
    assert [(e["file"], e["line"]) for e in caught.value.errors] == [("init.py", key_line)]
    assert "API_KEY" in caught.value.errors[0]["message"]
    assert app.state().version is None

    app.secrets.set("API_KEY", "key-one")
    version = app.deploy(source).version
    ok = invoke(app)
    assert ok.succeeded and ok.result == "key-one", ok.error
    # The worker that ran init.py at deploy time serves the first invocation (the deploy
    # run is not an invocation), so init.py did not run again for it.
    assert "init: loading the key\n" not in ok.logs

    # The secret goes away: the next fresh workers' init.py fails, each invocation with it.
    app.secrets.delete("API_KEY")
    failures = [invoke(app) for _ in range(3)]
    for inv in failures:
        assert inv.failed and inv.error is not None
        assert inv.error.code == "function_error", inv.error
        assert "init.py" in inv.error.message and "API_KEY" in inv.error.message
        assert "init: loading the key\n" in inv.logs
        assert f'File "init.py", line {key_line}' in inv.logs
        assert inv.duration_ms < 2000
    logged = app.invocations(limit=3)
    assert [i.id for i in logged] == [i.id for i in reversed(failures)]
    assert all(i.status == "failed" and i.error is not None for i in logged)
    assert all(i.error.code == "function_error" for i in logged if i.error is not None)
    assert all('File "init.py"' in i.logs for i in logged)

    # No crash loop: the template lives on and nothing keeps spawning workers.
    pool = runtime.pool.pools()[(app.name, version)]
    time.sleep(1.1)
    spawned = len(pool.spawn_ms)
    time.sleep(1.1)
    assert len(pool.spawn_ms) == spawned
    assert pool.zygote.alive and pool.stats()["workers"] <= 1

    # The secret is back: the next worker's init.py passes.
    app.secrets.set("API_KEY", "key-two")
    assert served(app) == "key-two"
    assert app.state().version == version


def test_rolling_back_to_a_version_whose_init_now_fails_keeps_the_current_one(
    runtime: Runtime, project: ProjectFactory
) -> None:
    app = runtime.create_app("init-rollback")
    app.secrets.set("API_KEY", "k")
    app.deploy(
        project(
            init='KEY = context.secrets["API_KEY"]\n',
            user_started_session="def handle_event(event, context):\n    return KEY\n",
        )
    )
    app.deploy(project(user_started_session="def handle_event(event, context):\n    return 2\n"))
    assert served(app) == 2
    app.secrets.delete("API_KEY")
    with pytest.raises(DeployRejected) as caught:
        app.activate(1)
    assert [(e["file"], e["line"]) for e in caught.value.errors] == [("init.py", 1)]
    assert app.state().version == 2 and served(app) == 2
    app.secrets.set("API_KEY", "k2")
    assert app.activate(1).status == "active"
    assert served(app) == "k2"
