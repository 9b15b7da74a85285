"""What a handler reaches through ``context``: users and secrets of its own app only, with
validation errors raised inside the handler; and what comes back from ``App.invoke``."""

from __future__ import annotations

import pytest

from runtime.core import App, Runtime
from tests.runtime.conftest import ProjectFactory

PROBE = """
    def handle_event(event, context):
        op = event.user["op"]
        users = context.users
        if op == "exists":
            return users.check_user_exists(event.user["name"])
        if op == "get":
            return users.get_user(event.user["name"])
        if op == "create":
            try:
                return users.create_user(event.user["name"], **event.user.get("kw", {}))
            except UserExistsError as exc:
                return "UserExistsError: " + str(exc)
            except ValueError as exc:
                return "ValueError: " + str(exc)
        if op == "update":
            try:
                return users.update_user(event.user["name"], **event.user.get("kw", {}))
            except ValueError as exc:
                return "ValueError: " + str(exc)
            except LookupError as exc:
                return "LookupError: " + str(exc)
        if op == "secrets":
            return {"names": list(context.secrets), "value": context.secrets.get("KEY")}
        if op == "context":
            return {"app": context.app, "id": context.invocation_id,
                    "left": 0 < context.remaining_time_ms() <= 5000}
        if op == "junk":
            return {1, 2}
        if op == "flood":
            for i in range(3000):
                print("line", i, "x" * 40)
            return "flooded"
        if op == "leak":
            print("the key is", context.secrets["KEY"])
            raise SessionRejected("bad key " + context.secrets["KEY"])
"""


@pytest.fixture(scope="module")
def pair(runtime: Runtime, project: ProjectFactory) -> tuple[App, App]:
    source = project(user_started_session=PROBE)
    a, b = runtime.create_app("iso-a"), runtime.create_app("iso-b")
    a.secrets.set("KEY", "alpha-secret-value")
    for app in (a, b):
        app.deploy(source)
    return a, b


def call(app: App, op: str, **extra: object) -> object:
    inv = app.invoke("UserStartedSession", {"user": {"op": op, **extra}, "session_id": "s-1"})
    assert inv.succeeded, inv.error
    return inv.result


def test_apps_do_not_see_each_others_users_or_secrets(pair: tuple[App, App]) -> None:
    a, b = pair
    created = call(a, "create", name="ann", kw={"display_name": "Ann", "properties": {"k": 1}})
    assert isinstance(created, dict) and created["display_name"] == "Ann"
    assert call(a, "exists", name="ann") is True
    assert call(b, "exists", name="ann") is False
    assert call(b, "get", name="ann") is None
    assert a.users.get_user("ann") is not None and b.users.get_user("ann") is None
    assert call(a, "secrets") == {"names": ["KEY"], "value": "alpha-secret-value"}
    assert call(b, "secrets") == {"names": [], "value": None}
    # b may create its own ann: names are unique per app, not globally.
    assert isinstance(call(b, "create", name="ann"), dict)


def test_creating_an_existing_user_raises_user_exists_error(pair: tuple[App, App]) -> None:
    a, _ = pair
    call(a, "create", name="dup")
    assert call(a, "create", name="dup") == "UserExistsError: user 'dup' already exists"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"display_name": ""}, "display_name must be 1 to 256 characters (got 0)"),
        ({"display_name": "a\tb"}, "display_name must not contain control characters"),
        ({"properties": [1]}, "properties must be a JSON object"),
        ({"properties": {"b": "x" * 70000}}, "properties must be at most 64 KiB"),
        ({"is_guest": "yes"}, "is_guest must be true or false"),
    ],
)
def test_bad_user_fields_raise_value_error_inside_the_handler(
    pair: tuple[App, App], kw: dict[str, object], message: str
) -> None:
    a, _ = pair
    result = call(a, "create", name="val-user", kw=kw)
    assert isinstance(result, str) and result.startswith("ValueError: ")
    assert message in result
    assert a.users.get_user("val-user") is None


def test_an_over_long_name_is_refused_inside_the_handler(pair: tuple[App, App]) -> None:
    a, _ = pair
    result = call(a, "create", name="n" * 300)
    assert result == "ValueError: username must be 1 to 256 characters (got 300)"


def test_update_user_changes_only_what_is_given(pair: tuple[App, App]) -> None:
    a, _ = pair
    call(a, "create", name="upd", kw={"display_name": "Old", "properties": {"a": 1}})
    updated = call(a, "update", name="upd", kw={"properties": {"b": 2}})
    assert isinstance(updated, dict)
    assert (updated["display_name"], updated["properties"]) == ("Old", {"b": 2})
    unknown = call(a, "update", name="upd", kw={"colour": "red"})
    assert isinstance(unknown, str) and unknown.startswith("ValueError: ")
    assert "unexpected keyword argument 'colour'" in unknown
    missing = call(a, "update", name="ghost", kw={"display_name": "G"})
    assert missing == "LookupError: user 'ghost' does not exist"


def test_context_carries_app_invocation_id_and_clock(pair: tuple[App, App]) -> None:
    a, _ = pair
    inv = a.invoke("user_started_session", {"user": {"op": "context"}, "session_id": "s"})
    assert inv.result == {"app": "iso-a", "id": inv.id, "left": True}


def test_a_handler_returning_junk_is_a_function_error(pair: tuple[App, App]) -> None:
    a, _ = pair
    inv = a.invoke("UserStartedSession", {"user": {"op": "junk"}, "session_id": "s"})
    assert inv.failed and inv.error is not None
    assert inv.error.code == "function_error"
    assert "not JSON-serializable" in inv.error.message


def test_logs_are_capped_with_a_marker(pair: tuple[App, App]) -> None:
    a, _ = pair
    inv = a.invoke("UserStartedSession", {"user": {"op": "flood"}, "session_id": "s"})
    assert inv.succeeded and inv.result == "flooded"
    assert inv.logs_truncated
    assert inv.logs.endswith("\n[log truncated: the limit is 64 KiB]\n")
    assert len(inv.logs.encode()) <= 64 * 1024 + 100
    stored = a.invocation(inv.id)
    assert stored.logs == inv.logs and stored.logs_truncated


def test_secret_values_never_reach_logs_or_messages(pair: tuple[App, App]) -> None:
    a, _ = pair
    inv = a.invoke("UserStartedSession", {"user": {"op": "leak"}, "session_id": "s"})
    assert inv.error is not None and inv.error.code == "access_denied"
    assert inv.error.message == "bad key [secret KEY]"
    assert inv.logs == "the key is [secret KEY]\n"
    stored = a.invocation(inv.id)
    assert "alpha-secret-value" not in stored.logs + (stored.error.message if stored.error else "")


@pytest.mark.parametrize(
    ("event", "payload", "code", "message"),
    [
        ("UserSentMessage", {}, "invalid_request", "unknown event type 'UserSentMessage'"),
        ("UserStartedSession", {"session_id": "s"}, "invalid_request", "user: Field required"),
        ("UserStartedSession", [], "invalid_request", "invalid UserStartedSession payload"),
        (
            "UserEndedSession",
            {"user": {}, "session_id": "s", "reason": "bored"},
            "invalid_request",
            "reason",
        ),
        (
            "UserEndedSession",
            {"user": {}, "session_id": "s", "reason": "ended"},
            "not_deployed",
            "no UserEndedSession function is deployed",
        ),
    ],
)
def test_invoke_bad_input_and_missing_handlers(
    pair: tuple[App, App], event: str, payload: object, code: str, message: str
) -> None:
    a, _ = pair
    inv = a.invoke(event, payload)
    assert inv.failed and inv.error is not None
    assert inv.error.code == code and message in inv.error.message


def test_invoke_on_an_app_with_nothing_deployed_is_not_deployed(runtime: Runtime) -> None:
    app = runtime.create_app("empty")
    inv = app.invoke("UserAttemptedStartSession", {"username": "x"})
    assert inv.error is not None and inv.error.code == "not_deployed"
