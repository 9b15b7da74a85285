"""start_session / end_session as DESIGN section 6 states them, through the real sandbox
and a real SQLite database.

The matrix: (handler deployed or not) x (guest users enabled/disabled) x (user exists or
not) x (handler accepts / raises SessionRejected / raises anything else / times out /
crashes), each row with its expected outcome written out by hand.
"""

from __future__ import annotations

import itertools
import threading
from pathlib import Path
from typing import Any

import pytest

from runtime.core import App, Runtime
from runtime.sessions import SessionResult
from runtime.validation import MAX_AUTH_PARAMS_BYTES
from tests.runtime.conftest import ProjectFactory

TOKEN = "tok-9f8e7d6c5b4a"

HANDLERS = {
    "accepts": """
        def handle_event(event, context):
            return {"ok": event.username}
    """,
    "rejects": """
        def handle_event(event, context):
            raise SessionRejected("no entry for " + event.username)
    """,
    "raises": """
        def handle_event(event, context):
            print("checking", event.username)
            raise ValueError("boom " + context.secrets["TOKEN"])
    """,
    "times_out": """
        def handle_event(event, context):
            while True:
                pass
    """,
    "crashes": """
        import crashy

        def handle_event(event, context):
            crashy.exit_now(3)
    """,
}
FAST_TIMEOUT = "[runtime]\ntimeout_ms = 400\n"

_names = itertools.count()


def unique(prefix: str = "user") -> str:
    return f"{prefix}-{next(_names)}"


@pytest.fixture(scope="module")
def apps(runtime: Runtime, project: ProjectFactory) -> dict[str, App]:
    """One app per handler behaviour, plus 'none' (nothing deployed) and 'other_events'
    (deployed, but without a UserAttemptedStartSession handler)."""
    out: dict[str, App] = {}
    for behaviour, source in HANDLERS.items():
        app = runtime.create_app(f"matrix-{behaviour.replace('_', '-')}")
        app.secrets.set("TOKEN", TOKEN)
        app.deploy(project(user_attempted_start_session=source, manifest=FAST_TIMEOUT))
        out[behaviour] = app
    out["none"] = runtime.create_app("matrix-none")
    other = runtime.create_app("matrix-other-events")
    other.deploy(
        project(user_started_session="def handle_event(event, context):\n    return None\n")
    )
    out["other_events"] = other
    return out


# (handler, guest_users, user exists) -> expected error code, or None for a session.
OK, GUEST = None, "guest"  # GUEST: succeeds with a user created as a guest
MATRIX: list[tuple[str, str, bool, str | None]] = [
    ("none", "enabled", True, OK),
    ("none", "enabled", False, GUEST),
    ("none", "disabled", True, "access_denied"),
    ("none", "disabled", False, "access_denied"),
    ("other_events", "enabled", False, GUEST),
    ("other_events", "disabled", True, "access_denied"),
    ("accepts", "enabled", True, OK),
    ("accepts", "enabled", False, GUEST),
    ("accepts", "disabled", True, OK),
    ("accepts", "disabled", False, "user_not_found"),
    ("rejects", "enabled", True, "access_denied"),
    ("rejects", "enabled", False, "access_denied"),
    ("rejects", "disabled", True, "access_denied"),
    ("rejects", "disabled", False, "access_denied"),
    ("raises", "enabled", True, "function_error"),
    ("raises", "enabled", False, "function_error"),
    ("raises", "disabled", True, "function_error"),
    ("raises", "disabled", False, "function_error"),
    ("times_out", "enabled", True, "timeout"),
    ("times_out", "enabled", False, "timeout"),
    ("times_out", "disabled", True, "timeout"),
    ("times_out", "disabled", False, "timeout"),
    ("crashes", "enabled", True, "worker_crashed"),
    ("crashes", "enabled", False, "worker_crashed"),
    ("crashes", "disabled", True, "worker_crashed"),
    ("crashes", "disabled", False, "worker_crashed"),
]


@pytest.mark.parametrize(
    ("handler", "guest_users", "exists", "expected"),
    MATRIX,
    ids=[f"{h}-guests_{g}-{'existing' if e else 'new'}" for h, g, e, _ in MATRIX],
)
def test_session_matrix(
    apps: dict[str, App], handler: str, guest_users: str, exists: bool, expected: str | None
) -> None:
    app = apps[handler]
    app.update_settings(guest_users=guest_users)
    name = unique()
    if exists:
        app.users.create_user(name, display_name="Existing")
    result = app.start_session(name, {"password": "pw"})

    if expected in (OK, GUEST):
        assert result.succeeded and not result.failed and result.error is None, result.error
        assert result.session is not None
        user = result.session["user"]
        assert user["name"] == name
        assert user["is_guest"] is (expected == GUEST)
        assert user["display_name"] == ("Existing" if exists else name)
        assert result.session["id"] in {s["id"] for s in app.sessions()}
        return

    assert result.failed and result.session is None and result.error is not None
    assert result.error.code == expected
    assert name not in {s["user"]["name"] for s in app.sessions()}
    # A failed start never leaves a guest user behind.
    assert app.users.check_user_exists(name) is exists
    message = result.error.message
    assert "Traceback" not in message and TOKEN not in message
    if handler == "rejects":
        assert message == f"no entry for {name}"
    elif handler == "none" or handler == "other_events":
        assert "guest users are disabled" in message
    elif expected == "user_not_found":
        assert "does not exist" in message
    else:
        assert result.invocation is not None
        assert f"(invocation {result.invocation.id})" in message
        if handler == "raises":
            assert "boom" not in message and "ValueError" not in message


def test_a_raising_handler_logs_its_traceback_with_secrets_redacted(apps: dict[str, App]) -> None:
    app = apps["raises"]
    app.update_settings(guest_users="enabled")
    result = app.start_session("tracy")
    assert result.invocation is not None
    stored = app.invocation(result.invocation.id)
    assert stored.status == "failed" and stored.error is not None
    assert stored.error.code == "function_error"
    assert stored.error.message == "ValueError: boom [secret TOKEN]"
    assert "checking tracy" in stored.logs
    assert "Traceback (most recent call last):" in stored.logs
    assert "user_attempted_start_session.py" in stored.logs
    assert "ValueError: boom [secret TOKEN]" in stored.logs
    assert TOKEN not in stored.logs
    assert stored.deployment_version == 1 and stored.event == "UserAttemptedStartSession"


def test_after_a_crash_or_timeout_the_next_session_is_served(
    runtime: Runtime, project: ProjectFactory
) -> None:
    app = runtime.create_app("flaky")
    app.deploy(
        project(
            user_attempted_start_session="""
                import crashy

                def handle_event(event, context):
                    if event.auth_params.get("crash"):
                        crashy.exit_now(3)
                    if event.auth_params.get("hang"):
                        while True:
                            pass
            """,
            manifest=FAST_TIMEOUT,
        )
    )
    assert app.start_session("a", {"crash": True}).error.code == "worker_crashed"  # type: ignore[union-attr]
    assert app.start_session("a").succeeded
    assert app.start_session("a", {"hang": True}).error.code == "timeout"  # type: ignore[union-attr]
    assert app.start_session("a").succeeded


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("username", "auth_params", "message"),
    [
        ("", None, "username must be 1 to 256 characters (got 0)"),
        ("x" * 257, None, "username must be 1 to 256 characters (got 257)"),
        ("a\x00b", None, "username must not contain control characters"),
        ("line\nbreak", None, "username must not contain control characters"),
        ("del\x7f", None, "username must not contain control characters"),
        (5, None, "username must be a string"),
        (None, None, "username must be a string"),
        ("ann", [1, 2], "auth_params must be a JSON object"),
        ("ann", "password", "auth_params must be a JSON object"),
        ("ann", {"k": {1, 2}}, "auth_params must hold only JSON values"),
        ("ann", {"blob": "x" * MAX_AUTH_PARAMS_BYTES},
         "auth_params must be at most 64 KiB (got 65547 bytes)"),
    ],
    ids=[
        "empty", "too-long", "nul", "newline", "del", "int", "none", "list", "string",
        "set-inside", "oversize",
    ],
)  # fmt: skip
def test_bad_input_is_invalid_request_and_runs_nothing(
    apps: dict[str, App], username: Any, auth_params: Any, message: str
) -> None:
    app = apps["accepts"]
    before = len(app.invocations(limit=1000))
    result = app.start_session(username, auth_params)
    assert result.failed and result.error is not None
    assert (result.error.code, result.error.message) == ("invalid_request", message)
    assert result.invocation is None
    assert len(app.invocations(limit=1000)) == before


def test_a_username_of_exactly_256_characters_and_unicode_is_fine(apps: dict[str, App]) -> None:
    app = apps["none"]
    app.update_settings(guest_users="enabled")
    assert app.start_session("é" * 256).succeeded
    assert app.start_session("名前 with spaces").succeeded


# -- connections, ending, background events ---------------------------------------------------


@pytest.fixture(scope="module")
def hooks_app(runtime: Runtime, project: ProjectFactory) -> App:
    app = runtime.create_app("hooks")
    app.deploy(
        project(
            user_attempted_start_session="""
                def handle_event(event, context):
                    print("attempt", event.type, event.username, len(event.id))
            """,
            user_started_session="""
                def handle_event(event, context):
                    print("started", event.type, event.session_id, event.user["name"])
            """,
            user_ended_session="""
                def handle_event(event, context):
                    print("ended", event.session_id, event.reason, event.user["is_guest"])
            """,
        )
    )
    return app


def logs_of(runtime: Runtime, app: App, event: str) -> list[str]:
    runtime.drain()
    return [i.logs for i in app.invocations(limit=1000, event=event)]


def test_started_and_ended_sessions_run_their_hooks(runtime: Runtime, hooks_app: App) -> None:
    result = hooks_app.start_session("hana")
    assert result.session is not None and result.invocation is not None
    assert result.invocation.logs == "attempt UserAttemptedStartSession hana 32\n"
    session_id = result.session["id"]
    assert f"started UserStartedSession {session_id} hana\n" in logs_of(
        runtime, hooks_app, "UserStartedSession"
    )
    ended = hooks_app.end_session(session_id)
    assert ended["end_reason"] == "ended" and "ended_at" in ended
    assert f"ended {session_id} ended True\n" in logs_of(runtime, hooks_app, "UserEndedSession")
    assert session_id not in {s["id"] for s in hooks_app.sessions()}
    assert session_id in {s["id"] for s in hooks_app.sessions(active=False)}


def test_background_hooks_beyond_the_cap_are_shed_and_logged(
    runtime: Runtime, hooks_app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full background queue sheds a hook as ``overloaded``, visibly: the invocation log
    has it, and the session itself still starts."""
    release = threading.Event()
    monkeypatch.setattr(runtime, "max_background", 1)
    try:

        def hold() -> None:
            release.wait(30)

        assert runtime.background(hold)  # fills the one place
        result = hooks_app.start_session("shed")
        assert result.session is not None
        shed = hooks_app.invocations(limit=5, event="UserStartedSession", status="failed")
        assert shed and shed[0].error is not None
        assert shed[0].error.code == "overloaded"
        assert shed[0].error.message == (
            "UserStartedSession not run: 1 background invocations are already waiting"
        )
        assert shed[0].deployment_version == hooks_app.state().version
        assert not runtime.background(lambda: None)
    finally:
        release.set()
        runtime.drain()
    assert runtime.background(lambda: None)  # room again


def test_ending_an_unknown_or_ended_session_is_not_found(hooks_app: App) -> None:
    from sandbox.errors import InvalidRequest, NotFound

    result = hooks_app.start_session("once")
    assert result.session is not None
    hooks_app.end_session(result.session["id"])
    with pytest.raises(NotFound, match="no active session"):
        hooks_app.end_session(result.session["id"])
    with pytest.raises(NotFound):
        hooks_app.end_session("0" * 32)
    with pytest.raises(InvalidRequest, match="reason"):
        hooks_app.end_session("0" * 32, reason="bored")


def test_one_connection_holds_one_session(runtime: Runtime, hooks_app: App) -> None:
    connection = hooks_app.connect()
    first = connection.start_session("conn-user")
    assert first.succeeded
    attempts = len(hooks_app.invocations(limit=1000, event="UserAttemptedStartSession"))
    second = connection.start_session("conn-user")
    assert second.error is not None and second.error.code == "session_active"
    # The second start was refused before the handler ran.
    assert len(hooks_app.invocations(limit=1000, event="UserAttemptedStartSession")) == attempts
    connection.end_session()
    third = connection.start_session("conn-user")
    assert third.succeeded and third.session is not None
    connection.close()
    assert f"ended {third.session['id']} disconnected True\n" in logs_of(
        runtime, hooks_app, "UserEndedSession"
    )
    after_close = connection.start_session("conn-user")
    assert after_close.error is not None and after_close.error.code == "invalid_request"


def test_concurrent_starts_on_one_connection_give_one_session(hooks_app: App) -> None:
    connection = hooks_app.connect()
    results: list[SessionResult] = []
    threads = [
        threading.Thread(target=lambda: results.append(connection.start_session("racer")))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.error.code if r.error else "ok" for r in results)
    assert codes == ["ok"] + ["session_active"] * 5
    connection.close()


def test_concurrent_guest_starts_create_one_user(runtime: Runtime) -> None:
    app = runtime.create_app("guest-race")
    results: list[SessionResult] = []
    threads = [
        threading.Thread(target=lambda: results.append(app.start_session("newcomer")))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.succeeded for r in results), [r.error for r in results]
    assert len({r.session["user"]["created_at"] for r in results if r.session}) == 1
    assert [u["name"] for u in app.users.list_users()] == ["newcomer"]


def test_the_example_project_end_to_end(runtime: Runtime) -> None:
    example = Path(__file__).resolve().parents[1] / "fixtures" / "password_functions"
    app = runtime.create_app("example", guest_users="disabled")
    app.secrets.set("DEMO_PASSWORD", "letmein")
    app.deploy(example)
    wrong = app.start_session("alice", {"password": "nope"})
    assert wrong.error is not None
    assert (wrong.error.code, wrong.error.message) == ("access_denied", "Wrong password")
    right = app.start_session("alice", {"password": "letmein"})
    assert right.session is not None, right.error
    assert right.session["user"]["display_name"] == "Alice"
    assert right.session["user"]["properties"] == {"source": "demo"}


def test_the_session_state_machine_refuses_illegal_moves(runtime: Runtime) -> None:
    from runtime.sessions import IllegalTransition, SessionState

    connection = runtime.ensure_app("state-machine").connect()

    def state() -> SessionState:  # read afresh each time (no narrowing across calls)
        return connection.state

    assert state() is SessionState.IDLE
    with pytest.raises(IllegalTransition, match="from idle to active"):
        connection._move(SessionState.ACTIVE)
    assert connection.start_session("sm-user").succeeded
    assert state() is SessionState.ACTIVE
    with pytest.raises(IllegalTransition, match="from active to starting"):
        connection._move(SessionState.STARTING)
    connection.end_session()
    assert state() is SessionState.IDLE
    connection.close()
    assert state() is SessionState.CLOSED
    with pytest.raises(IllegalTransition, match="from closed to starting"):
        connection._move(SessionState.STARTING)
