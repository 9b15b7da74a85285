"""chatfn's pytest plugin, as a developer meets it: a project of their own, a test file that
asks for ``chatfn_app`` and no conftest, run by a separate pytest process (so the plugin is
found through its ``pytest11`` entry point, exactly as it would be in their checkout).
"""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ["pytester"]

ATTEMPTED = """\
def handle_event(event, context):
    print("checking", event.username)
    expected = context.secrets.get("PASSWORD")
    if expected is not None and event.auth_params.get("password") != expected:
        raise SessionRejected("Wrong password")
    if event.auth_params.get("boom"):
        raise ValueError("exploded")
    if event.auth_params.get("create") and not context.users.check_user_exists(event.username):
        context.users.create_user(event.username, display_name="Created", properties={"k": 1})
    return {"hello": event.username, "greeting": GREETING}
"""
STARTED = """\
def handle_event(event, context):
    context.log("started", event.session_id, "for", event.user["name"])
"""
ENDED = """\
def handle_event(event, context):
    print("ended", event.session_id, event.reason)
    return event.reason
"""
INIT = 'GREETING = "hi from init"\n'

# The developer's tests: each checks one thing the fixture promises.
TESTS = """\
from pathlib import Path

import pytest

from sandbox.errors import DeployRejected

HERE = Path(__file__).resolve().parent
PROJECT = HERE / "functions"


def test_factory_takes_guest_users(chatfn_app):
    closed = chatfn_app(PROJECT, guest_users="disabled")
    result = closed.start_session("zed")
    assert result.failed and result.error.code == "user_not_found"
    opened = chatfn_app(PROJECT)
    result = opened.start_session("zed")
    assert result.succeeded and result.session["user"]["is_guest"] is True


def test_users_are_the_context_users(chatfn_app):
    app = chatfn_app(PROJECT, guest_users="disabled")
    assert app.users.check_user_exists("ann") is False
    made = app.users.create_user("ann", display_name="Ann", properties={"plan": "pro"})
    assert made["display_name"] == "Ann" and made["is_guest"] is False
    assert app.users.check_user_exists("ann") is True
    assert app.users.get_user("ann") == made
    assert app.users.update_user("ann", display_name="Anne")["display_name"] == "Anne"
    result = app.start_session("ann")
    assert result.succeeded and result.session["user"]["display_name"] == "Anne"
    created = app.start_session("bea", {"create": True})
    assert created.succeeded and created.session["user"]["properties"] == {"k": 1}
    assert app.users.get_user("bea")["display_name"] == "Created"


def test_set_secret(chatfn_app):
    app = chatfn_app(PROJECT)
    assert app.start_session("cy", {"password": "anything"}).succeeded
    app.set_secret("PASSWORD", "pw")
    wrong = app.start_session("cy", {"password": "guess"})
    assert wrong.failed
    assert (wrong.error.code, wrong.error.message) == ("access_denied", "Wrong password")
    assert app.start_session("cy", {"password": "pw"}).succeeded


def test_secrets_given_to_the_factory(chatfn_app):
    app = chatfn_app(PROJECT, secrets={"PASSWORD": "pw"})
    assert app.start_session("cy", {"password": "guess"}).failed
    assert app.start_session("cy", {"password": "pw"}).succeeded


def test_invoke_returns_the_result_and_the_logs(chatfn_app):
    app = chatfn_app(PROJECT)
    run = app.invoke("UserAttemptedStartSession", {"username": "dee", "auth_params": {}})
    assert run.succeeded and not run.failed and run.error is None
    assert run.result == {"hello": "dee", "greeting": "hi from init"}
    assert run.logs == "checking dee\\n"
    by_stem = app.invoke("user_ended_session", {"user": {"name": "dee"}, "session_id": "s1",
                                                "reason": "disconnected"})
    assert by_stem.result == "disconnected" and by_stem.logs == "ended s1 disconnected\\n"
    # invoke runs the handler only: no session, no user.
    assert app.users.check_user_exists("dee") is False


def test_invoke_reports_a_failing_handler(chatfn_app):
    app = chatfn_app(PROJECT)
    run = app.invoke("UserAttemptedStartSession", {"username": "eve", "auth_params": {"boom": 1}})
    assert run.failed and not run.succeeded
    assert run.error.code == "function_error"
    assert "ValueError: exploded" in run.logs
    bad = app.invoke("UserAttemptedStartSession", {"username": 5})
    assert bad.failed and bad.error.code == "invalid_request"


def test_invocations_include_background_runs(chatfn_app):
    app = chatfn_app(PROJECT)
    session = app.start_session("fay").session
    runs = app.invocations()
    assert [r.event for r in runs] == ["UserAttemptedStartSession", "UserStartedSession"]
    assert all(r.succeeded for r in runs)
    assert runs[0].logs == "checking fay\\n"
    assert runs[1].logs == f"started {session['id']} for fay\\n"
    ended = app.end_session(session["id"])
    assert ended["end_reason"] == "ended"
    runs = app.invocations()
    assert [r.event for r in runs][2:] == ["UserEndedSession"]
    assert runs[2].logs == f"ended {session['id']} ended\\n"


def test_apps_are_isolated(chatfn_app):
    one, two = chatfn_app(PROJECT), chatfn_app(PROJECT)
    one.users.create_user("gil")
    one.set_secret("PASSWORD", "pw")
    assert two.users.check_user_exists("gil") is False
    assert two.start_session("hal", {"password": "other"}).succeeded
    assert two.invocations()[0].logs == "checking hal\\n"
    assert [r.event for r in one.invocations()] == []


def test_a_syntax_error_is_rejected_at_deploy(chatfn_app):
    with pytest.raises(DeployRejected) as rejected:
        chatfn_app(HERE / "broken")
    assert "user_attempted_start_session.py:3" in str(rejected.value)
    assert [(e["file"], e["line"]) for e in rejected.value.errors] == [
        ("user_attempted_start_session.py", 3)
    ]
"""
BROKEN = """\
def handle_event(event, context):
    x = 1
    return (x
"""
NUMBER_OF_TESTS = TESTS.count("\ndef test_")


def write_project(pytester: pytest.Pytester) -> None:
    functions = pytester.mkdir("functions")
    for name, source in {
        "user_attempted_start_session.py": ATTEMPTED,
        "user_started_session.py": STARTED,
        "user_ended_session.py": ENDED,
        "init.py": INIT,
    }.items():
        (functions / name).write_text(source, encoding="utf-8")
    (pytester.mkdir("broken") / "user_attempted_start_session.py").write_text(BROKEN)
    pytester.makepyfile(test_my_functions=TESTS)


@pytest.fixture(autouse=True)
def plugins_autoload(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point is the entry point: never let the environment switch autoloading off."""
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PYTEST_PLUGINS", raising=False)


def test_a_developers_project_tests_pass_with_the_fixture(pytester: pytest.Pytester) -> None:
    write_project(pytester)
    assert not list(pytester.path.glob("conftest.py"))
    result = pytester.runpytest_subprocess("-v", "-W", "error", "--strict-markers")
    result.assert_outcomes(passed=NUMBER_OF_TESTS)
    assert NUMBER_OF_TESTS == 9
    assert result.ret == pytest.ExitCode.OK
    result.stdout.no_fnmatch_line("*warning*")


def test_the_fixture_comes_from_the_chatfn_entry_point(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_needs_fixture=textwrap.dedent(
            """
            def test_it(chatfn_app):
                assert callable(chatfn_app)
            """
        )
    )
    listed = pytester.runpytest_subprocess("--fixtures")
    listed.stdout.fnmatch_lines(["*fixtures defined from runtime.pytest_plugin*", "chatfn_app*"])
    without = pytester.runpytest_subprocess("-p", "no:chatfn")
    without.assert_outcomes(errors=1)
    without.stdout.fnmatch_lines(["*fixture 'chatfn_app' not found*"])


def test_a_failing_expectation_is_a_failing_test(pytester: pytest.Pytester) -> None:
    """The harness reports what the handler did; it does not turn failures into passes."""
    write_project(pytester)
    pytester.makepyfile(
        test_wrong=textwrap.dedent(
            """
            from pathlib import Path

            def test_expects_a_rejection(chatfn_app):
                app = chatfn_app(Path(__file__).parent / "functions")
                result = app.start_session("ivy", {"boom": True})
                assert result.succeeded, result.error.code
            """
        )
    )
    result = pytester.runpytest_subprocess("test_wrong.py", "-W", "error")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: function_error*"])
