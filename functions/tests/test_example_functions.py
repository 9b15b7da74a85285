"""Tests of the example function project, written the way its developer would: plain pytest
with the ``chatfn_app`` fixture from chatfn's pytest plugin, which deploys this directory on
a fresh app and runs it in the real sandbox."""

from pathlib import Path

FUNCTIONS = Path(__file__).resolve().parents[1]


def test_the_right_password_creates_the_user_on_first_sign_in(chatfn_app):
    app = chatfn_app(FUNCTIONS, guest_users="disabled")
    app.set_secret("DEMO_PASSWORD", "letmein")

    result = app.start_session("alice", {"password": "letmein"})

    assert result.succeeded
    user = result.session["user"]
    assert user["name"] == "alice"
    assert user["display_name"] == "Alice"
    assert user["properties"] == {"source": "demo"}
    assert user["is_guest"] is False
    assert app.users.get_user("alice") == user


def test_the_handler_returns_a_welcome_and_logs_the_new_user(chatfn_app):
    app = chatfn_app(FUNCTIONS, secrets={"DEMO_PASSWORD": "letmein"})

    run = app.invoke(
        "UserAttemptedStartSession", {"username": "alice", "auth_params": {"password": "letmein"}}
    )

    assert run.succeeded
    assert run.result == {"welcome": "alice"}
    assert "created user alice" in run.logs


def test_a_wrong_password_is_rejected_and_no_user_is_created(chatfn_app):
    app = chatfn_app(FUNCTIONS, guest_users="disabled")
    app.set_secret("DEMO_PASSWORD", "letmein")

    for auth_params in ({"password": "guess"}, {}, {"password": 1234}):
        result = app.start_session("mallory", auth_params)
        assert result.failed
        assert result.error.code == "access_denied"
        assert result.error.message == "Wrong password"
    assert not app.users.check_user_exists("mallory")


def test_without_the_secret_any_password_is_accepted(chatfn_app):
    app = chatfn_app(FUNCTIONS, guest_users="disabled")

    assert app.start_session("bob", {"password": "anything at all"}).succeeded
    assert app.start_session("carol").succeeded
    assert app.users.check_user_exists("bob")
    assert app.users.get_user("carol")["display_name"] == "Carol"


def test_an_existing_user_is_not_recreated(chatfn_app):
    app = chatfn_app(FUNCTIONS, guest_users="disabled")
    before = app.users.create_user("dave", display_name="David", properties={"team": "blue"})

    result = app.start_session("dave")

    assert result.succeeded
    assert result.session["user"] == before
    assert app.users.get_user("dave") == before
    assert "created user" not in result.invocation.logs


def test_a_second_sign_in_reuses_the_user_created_by_the_first(chatfn_app):
    app = chatfn_app(FUNCTIONS, guest_users="disabled")

    first = app.start_session("erin")
    second = app.start_session("erin")

    assert first.succeeded and second.succeeded
    assert first.session["id"] != second.session["id"]
    assert second.session["user"] == first.session["user"]
    assert "created user erin" in first.invocation.logs
    assert "created user" not in second.invocation.logs


def test_user_started_session_logs_the_session(chatfn_app):
    app = chatfn_app(FUNCTIONS)

    session = app.start_session("frank").session

    started = [run for run in app.invocations() if run.event == "UserStartedSession"]
    assert len(started) == 1
    assert started[0].succeeded
    assert f"session {session['id']} started for frank" in started[0].logs


def test_with_guests_disabled_the_handler_creates_a_real_user(chatfn_app):
    app = chatfn_app(FUNCTIONS, guest_users="disabled")

    result = app.start_session("grace")

    assert result.succeeded
    assert result.session["user"]["is_guest"] is False
    assert app.users.check_user_exists("grace")
