"""The host side of users and secrets: the same validation as inside handlers, listing,
deleting, and redaction."""

from __future__ import annotations

import pytest

from runtime.core import Runtime
from runtime.secrets import redact
from sandbox.errors import AlreadyExists, InvalidRequest, NotFound, UserExists, UserNotFound


def test_users_crud_and_pagination(runtime: Runtime) -> None:
    users = runtime.create_app("crud").users
    for name in ["carol", "alice", "bob", "dave"]:
        users.create_user(name, properties={"n": name})
    assert [u["name"] for u in users.list_users(limit=2)] == ["alice", "bob"]
    assert [u["name"] for u in users.list_users(limit=2, after="bob")] == ["carol", "dave"]
    with pytest.raises(UserExists, match="user 'bob' already exists"):
        users.create_user("bob")
    updated = users.update_user("bob", display_name="Robert")
    assert updated["display_name"] == "Robert" and updated["properties"] == {"n": "bob"}
    users.delete_user("bob")
    assert users.get_user("bob") is None and not users.check_user_exists("bob")
    with pytest.raises(UserNotFound):
        users.delete_user("bob")
    with pytest.raises(UserNotFound):
        users.update_user("bob", display_name="x")
    with pytest.raises(InvalidRequest, match="limit must be 1 to 1000"):
        users.list_users(limit=0)


def test_deleting_a_user_deletes_their_sessions(runtime: Runtime) -> None:
    app = runtime.create_app("delete-with-session")
    session = app.start_session("temp")
    assert session.session is not None
    app.users.delete_user("temp")
    assert app.sessions() == []


def test_secrets_are_write_only(runtime: Runtime) -> None:
    secrets = runtime.create_app("secret-store").secrets
    secrets.set("API_KEY", "one")
    secrets.set("API_KEY", "two")
    secrets.set("other_1", "x")
    names = secrets.names()
    assert [n["name"] for n in names] == ["API_KEY", "other_1"]
    assert all(set(n) == {"name", "updated_at"} for n in names)
    assert secrets.values() == {"API_KEY": "two", "other_1": "x"}
    secrets.delete("other_1")
    with pytest.raises(NotFound, match="no secret named 'other_1'"):
        secrets.delete("other_1")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("", "v", "secret name must be"),
        ("1ABC", "v", "secret name must be"),
        ("A-B", "v", "secret name must be"),
        ("A" * 129, "v", "secret name must be"),
        ("OK", 5, "secret value must be a string"),
        ("OK", "x" * (64 * 1024 + 1), "secret value must be at most 64 KiB"),
    ],
)
def test_bad_secrets_are_refused(runtime: Runtime, name: str, value: object, message: str) -> None:
    secrets = runtime.ensure_app("bad-secrets").secrets
    with pytest.raises(InvalidRequest, match=message):
        secrets.set(name, value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "app name must be"),
        ("Upper", "app name must be"),
        ("-lead", "app name must be"),
        ("a" * 65, "app name must be"),
    ],
)
def test_bad_app_names_are_refused(runtime: Runtime, name: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        runtime.create_app(name)


def test_apps_are_unique_and_found_by_name(runtime: Runtime) -> None:
    runtime.create_app("unique-app")
    with pytest.raises(AlreadyExists, match="already exists"):
        runtime.create_app("unique-app")
    with pytest.raises(NotFound, match="no app named 'missing-app'"):
        runtime.app("missing-app")
    with pytest.raises(InvalidRequest, match="guest_users must be"):
        runtime.create_app("guest-typo", guest_users="on")
    assert runtime.ensure_app("unique-app").name == "unique-app"


def test_redact_replaces_longest_values_first() -> None:
    secrets = {"SHORT": "abc", "LONG": "abcdef", "EMPTY": ""}
    assert redact("x abcdef y abc z", secrets) == "x [secret LONG] y [secret SHORT] z"
    assert redact("nothing here", secrets) == "nothing here"
