"""The HTTP API of ``runtime.server.app`` (DESIGN section 7), route by route: exact status
codes and body shapes, the admin key on every admin route, app scoping, and errors always
in chatfn's ``{"error": {"code", "message"}}`` shape (never FastAPI's default 422)."""

from __future__ import annotations

import datetime
import itertools
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from runtime.server import app as server_app
from tests.server.conftest import (
    ACCEPT_ALL,
    ADMIN_KEY,
    GZIP,
    ZIP,
    Server,
    TestClient,
    create_app_named,
    deploy,
    sources,
    tar_gz,
    upload,
    wait_built,
    zip_bytes,
)

_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


def error_of(response: httpx.Response, status: int, code: str) -> str:
    """Assert chatfn's error shape with this status and code; returns the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message
    return message


@pytest.fixture(scope="module")
def client(server: Server) -> TestClient:
    return server.client


@pytest.fixture(scope="module")
def anon(server: Server) -> Iterator[TestClient]:
    """A client that sends no admin key."""
    with TestClient(server.api) as c:
        yield c


@pytest.fixture
def app(client: TestClient) -> str:
    """A fresh app (guests enabled) with nothing deployed."""
    name = unique("app")
    create_app_named(client, name)
    return name


# -- apps and settings ---------------------------------------------------------------------


def test_create_app_is_201_with_the_app_and_a_second_create_is_409(client: TestClient) -> None:
    name = unique("created")
    response = client.post("/v1/apps", json={"name": name})
    assert response.status_code == 201
    assert response.json() == {
        "name": name,
        "settings": {"guest_users": "enabled"},
        "active_version": None,
    }
    error_of(client.post("/v1/apps", json={"name": name}), 409, "already_exists")

    strict = unique("strict")
    response = client.post("/v1/apps", json={"name": strict, "guest_users": "disabled"})
    assert response.status_code == 201
    assert response.json()["settings"] == {"guest_users": "disabled"}


def test_apps_are_listed_and_fetched_by_name(client: TestClient) -> None:
    name = unique("listed")
    created = create_app_named(client, name)
    listed = client.get("/v1/apps")
    assert listed.status_code == 200
    assert set(listed.json()) == {"apps"}
    assert created in listed.json()["apps"]
    fetched = client.get(f"/v1/apps/{name}")
    assert fetched.status_code == 200
    assert fetched.json() == created


@pytest.mark.parametrize("name", ["Upper", "has space", "-leading", "a" * 65, ""])
def test_a_bad_app_name_is_400(client: TestClient, name: str) -> None:
    error_of(client.post("/v1/apps", json={"name": name}), 400, "invalid_request")


def test_settings_get_and_patch(client: TestClient, app: str) -> None:
    response = client.get(f"/v1/apps/{app}/settings")
    assert response.status_code == 200
    assert response.json() == {"guest_users": "enabled"}

    response = client.patch(f"/v1/apps/{app}/settings", json={"guest_users": "disabled"})
    assert response.status_code == 200
    assert response.json() == {"guest_users": "disabled"}
    assert client.get(f"/v1/apps/{app}/settings").json() == {"guest_users": "disabled"}
    assert client.get(f"/v1/apps/{app}").json()["settings"] == {"guest_users": "disabled"}

    # An empty patch changes nothing.
    response = client.patch(f"/v1/apps/{app}/settings", json={})
    assert response.status_code == 200
    assert response.json() == {"guest_users": "disabled"}


@pytest.mark.parametrize(
    "body", [{"guest_users": "sometimes"}, {"guest_users": 1}, {"unknown_setting": "x"}, []]
)
def test_a_bad_settings_patch_is_400_and_changes_nothing(
    client: TestClient, app: str, body: Any
) -> None:
    error_of(client.patch(f"/v1/apps/{app}/settings", json=body), 400, "invalid_request")
    assert client.get(f"/v1/apps/{app}/settings").json() == {"guest_users": "enabled"}


# -- deployments ---------------------------------------------------------------------------

DEPLOYMENT_KEYS = {
    "version",
    "status",
    "errors",
    "functions",
    "created_at",
    "activated_at",
    "progress",
}


def returns(value: int) -> str:
    return f"""
        def handle_event(event, context):
            return {{"v": {value}}}
    """


def test_upload_a_tar_gz_then_a_zip_each_202_building_then_active(
    client: TestClient, app: str
) -> None:
    first = upload(client, app, tar_gz(sources(user_attempted_start_session=returns(1))))
    assert first == 1
    info = wait_built(client, app, first)
    assert set(info) == DEPLOYMENT_KEYS
    assert info["status"] == "active"
    assert info["errors"] == []
    assert info["functions"] == ["UserAttemptedStartSession"]
    assert info["activated_at"] is not None

    # A zip with the project in one folder (the folder is stripped).
    project = sources(user_attempted_start_session=returns(2), user_started_session=returns(0))
    second = upload(client, app, zip_bytes(project, folder="functions"), kind="zip")
    assert second == 2
    info = wait_built(client, app, second)
    assert info["status"] == "active"
    assert info["functions"] == ["UserAttemptedStartSession", "UserStartedSession"]

    listed = client.get(f"/v1/apps/{app}/deployments")
    assert listed.status_code == 200
    deployments = listed.json()["deployments"]
    assert [(d["version"], d["status"]) for d in deployments] == [(2, "active"), (1, "inactive")]
    assert all(set(d) == DEPLOYMENT_KEYS for d in deployments)
    assert client.get(f"/v1/apps/{app}").json()["active_version"] == 2
    hook = client.post(
        f"/v1/apps/{app}/hooks/UserAttemptedStartSession", json={"username": "ann"}
    ).json()
    assert hook["result"] == {"v": 2}


SYNTAX_ERROR = """\
def handle_event(event, context):
    x = 1
    return (
"""


def test_a_project_with_a_syntax_error_fails_with_file_and_line_and_the_old_version_stays(
    client: TestClient, app: str
) -> None:
    deploy(client, app, sources(user_attempted_start_session=returns(1)))

    bad = upload(client, app, tar_gz({"user_attempted_start_session.py": SYNTAX_ERROR}))
    assert bad == 2
    info = wait_built(client, app, bad)
    assert info["status"] == "failed"
    assert info["activated_at"] is None
    assert info["errors"], info
    for error in info["errors"]:
        assert set(error) == {"file", "line", "message"}
        assert error["file"] == "user_attempted_start_session.py"
        assert isinstance(error["line"], int) and 1 <= error["line"] <= 4
        assert error["message"]

    assert client.get(f"/v1/apps/{app}").json()["active_version"] == 1
    assert client.get(f"/v1/apps/{app}/deployments/1").json()["status"] == "active"
    hook = client.post(f"/v1/apps/{app}/hooks/UserAttemptedStartSession", json={"username": "a"})
    assert hook.json()["result"] == {"v": 1}

    # A failed version cannot be activated.
    activate = client.post(f"/v1/apps/{app}/deployments/{bad}/activate")
    message = error_of(activate, 400, "invalid_request")
    assert "failed" in message
    assert client.get(f"/v1/apps/{app}").json()["active_version"] == 1


def test_a_handler_without_handle_event_fails_with_the_file_named(
    client: TestClient, app: str
) -> None:
    bad = upload(client, app, tar_gz(sources(user_started_session="def other(): pass\n")))
    info = wait_built(client, app, bad)
    assert info["status"] == "failed"
    assert [e["file"] for e in info["errors"]] == ["user_started_session.py"]
    assert client.get(f"/v1/apps/{app}").json()["active_version"] is None


def test_activate_an_earlier_version_rolls_back(client: TestClient, app: str) -> None:
    deploy(client, app, sources(user_attempted_start_session=returns(1)))
    deploy(client, app, sources(user_attempted_start_session=returns(2)))

    def run() -> Any:
        return client.post(
            f"/v1/apps/{app}/hooks/UserAttemptedStartSession", json={"username": "bob"}
        ).json()

    assert run()["result"] == {"v": 2}
    response = client.post(f"/v1/apps/{app}/deployments/1/activate")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == DEPLOYMENT_KEYS
    assert (body["version"], body["status"]) == (1, "active")
    assert client.get(f"/v1/apps/{app}").json()["active_version"] == 1
    assert client.get(f"/v1/apps/{app}/deployments/2").json()["status"] == "inactive"
    invocation = run()
    assert invocation["result"] == {"v": 1}
    logged = client.get(f"/v1/apps/{app}/invocations/{invocation['invocation_id']}").json()
    assert logged["deployment_version"] == 1

    # Activating the active version is a no-op that answers the same.
    again = client.post(f"/v1/apps/{app}/deployments/1/activate")
    assert again.status_code == 200
    assert again.json()["status"] == "active"
    # And forward again.
    assert client.post(f"/v1/apps/{app}/deployments/2/activate").status_code == 200
    assert run()["result"] == {"v": 2}


def test_unknown_deployment_versions_are_404(client: TestClient, app: str) -> None:
    error_of(client.get(f"/v1/apps/{app}/deployments/7"), 404, "not_found")
    error_of(client.post(f"/v1/apps/{app}/deployments/7/activate"), 404, "not_found")
    assert client.get(f"/v1/apps/{app}/deployments").json() == {"deployments": []}


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        pytest.param(b"not an archive", {"Content-Type": "application/gzip"}, id="garbage"),
        pytest.param(b"\x1f\x8b\x08\x00broken", {"Content-Type": "application/gzip"}, id="bad-gz"),
        pytest.param(b"", {"Content-Type": "application/gzip"}, id="empty"),
        pytest.param(
            tar_gz(sources(user_attempted_start_session=ACCEPT_ALL)),
            {"Content-Type": "application/json"},
            id="wrong-content-type",
        ),
        pytest.param(
            tar_gz(sources(user_attempted_start_session=ACCEPT_ALL)), {}, id="no-content-type"
        ),
        pytest.param(
            tar_gz(sources(helper="x = 1\n")), {"Content-Type": "application/gzip"}, id="unknown"
        ),
        pytest.param(
            tar_gz(
                {
                    "chatfn.toml": "[runtime]\ntimeout_ms = 'soon'\n",
                    **sources(user_attempted_start_session=ACCEPT_ALL),
                }
            ),
            {"Content-Type": "application/gzip"},
            id="bad-manifest",
        ),
        pytest.param(zip_bytes({"README.md": "hi"}), ZIP, id="no-handlers"),
    ],
)
def test_a_bad_upload_is_400_and_stores_no_version(
    client: TestClient, app: str, body: bytes, headers: dict[str, str]
) -> None:
    response = client.post(f"/v1/apps/{app}/deployments", content=body, headers=headers)
    error_of(response, 400, "invalid_request")
    assert client.get(f"/v1/apps/{app}/deployments").json() == {"deployments": []}


def test_an_upload_over_the_size_cap_is_400(
    client: TestClient, app: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tar_gz(sources(user_attempted_start_session=ACCEPT_ALL))
    monkeypatch.setattr(server_app, "MAX_ARCHIVE_BYTES", len(archive) - 1)
    response = client.post(f"/v1/apps/{app}/deployments", content=archive, headers=GZIP)
    assert "larger than" in error_of(response, 400, "invalid_request")

    # Without a Content-Length (a chunked upload), the cap holds while reading.
    def chunks() -> Iterator[bytes]:
        yield archive[:10]
        yield archive[10:]

    response = client.post(f"/v1/apps/{app}/deployments", content=chunks(), headers=GZIP)
    assert "larger than" in error_of(response, 400, "invalid_request")
    assert client.get(f"/v1/apps/{app}/deployments").json() == {"deployments": []}

    monkeypatch.setattr(server_app, "MAX_ARCHIVE_BYTES", len(archive))
    assert upload(client, app, archive) == 1


def test_functions_lists_the_active_handlers_with_their_sources(
    client: TestClient, app: str
) -> None:
    response = client.get(f"/v1/apps/{app}/functions")
    assert response.status_code == 200
    assert response.json() == {"version": None, "functions": [], "init": None}

    project = sources(
        init="GREETING = 'hello'\n",
        user_attempted_start_session=ACCEPT_ALL,
        user_ended_session=returns(3),
    )
    deploy(client, app, project)
    response = client.get(f"/v1/apps/{app}/functions")
    assert response.status_code == 200
    assert response.json() == {
        "version": 1,
        "functions": [
            {
                "event": "UserAttemptedStartSession",
                "file": "user_attempted_start_session.py",
                "source": project["user_attempted_start_session.py"],
            },
            {
                "event": "UserEndedSession",
                "file": "user_ended_session.py",
                "source": project["user_ended_session.py"],
            },
        ],
        "init": "GREETING = 'hello'\n",
    }


# -- secrets -------------------------------------------------------------------------------

SECRET_VALUE = "s3cr3t-value-9c1e44b0"

LEAKY = """
    def handle_event(event, context):
        print("token is", context.secrets["API_TOKEN"])
        context.log("again", context.secrets["API_TOKEN"])
        return {"length": len(context.secrets["API_TOKEN"])}
"""
LEAKY_ERROR = """
    def handle_event(event, context):
        raise ValueError("boom " + context.secrets["API_TOKEN"])
"""
LEAKY_REJECTION = """
    def handle_event(event, context):
        raise SessionRejected("nope " + context.secrets["API_TOKEN"])
"""


def test_secrets_are_write_only_and_no_response_ever_carries_a_value(
    client: TestClient, app: str
) -> None:
    seen: list[httpx.Response] = []

    def call(method: str, url: str, **kwargs: Any) -> httpx.Response:
        response: httpx.Response = client.request(method, url, **kwargs)
        seen.append(response)
        return response

    response = call("PUT", f"/v1/apps/{app}/secrets/API_TOKEN", json={"value": SECRET_VALUE})
    assert response.status_code == 204
    assert response.content == b""
    response = call("PUT", f"/v1/apps/{app}/secrets/OTHER", json={"value": "x" + SECRET_VALUE})
    assert response.status_code == 204

    listed = call("GET", f"/v1/apps/{app}/secrets")
    assert listed.status_code == 200
    secrets = listed.json()["secrets"]
    assert [s["name"] for s in secrets] == ["API_TOKEN", "OTHER"]
    assert all(set(s) == {"name", "updated_at"} for s in secrets)

    deploy(
        client,
        app,
        sources(
            user_attempted_start_session=LEAKY_REJECTION,
            user_started_session=LEAKY,
            user_ended_session=LEAKY_ERROR,
        ),
    )
    user = {
        "name": "u",
        "display_name": "u",
        "is_guest": False,
        "properties": {},
        "created_at": "2024-01-01T00:00:00+00:00",
    }
    started = call(
        "POST",
        f"/v1/apps/{app}/hooks/UserStartedSession",
        json={"user": user, "session_id": "s1"},
    )
    assert started.status_code == 200
    assert started.json()["status"] == "succeeded"
    ended = call(
        "POST",
        f"/v1/apps/{app}/hooks/user_ended_session",
        json={"user": user, "session_id": "s1", "reason": "ended"},
    )
    assert ended.json()["status"] == "failed"
    assert ended.json()["error"]["code"] == "function_error"
    rejected = call(
        "POST", f"/v1/apps/{app}/hooks/UserAttemptedStartSession", json={"username": "eve"}
    )
    assert rejected.json()["error"]["code"] == "access_denied"

    logs = call("GET", f"/v1/apps/{app}/invocations").json()["invocations"]
    assert len(logs) == 3
    started_log = next(i for i in logs if i["event"] == "UserStartedSession")
    assert "[secret API_TOKEN]" in started_log["logs"]
    for invocation in logs:
        call("GET", f"/v1/apps/{app}/invocations/{invocation['id']}")
    for url in ("", "/functions", "/deployments", "/deployments/1", "/settings", "/users"):
        assert call("GET", f"/v1/apps/{app}{url}").status_code == 200
    call("GET", "/metrics")

    for response in seen:
        assert SECRET_VALUE not in response.text, (response.request.url, response.text)
        assert SECRET_VALUE not in str(response.headers)

    # Overwrite, delete, and delete again (404).
    assert call("PUT", f"/v1/apps/{app}/secrets/API_TOKEN", json={"value": "v2"}).status_code == 204
    assert client.delete(f"/v1/apps/{app}/secrets/API_TOKEN").status_code == 204
    error_of(client.delete(f"/v1/apps/{app}/secrets/API_TOKEN"), 404, "not_found")
    assert [s["name"] for s in client.get(f"/v1/apps/{app}/secrets").json()["secrets"]] == ["OTHER"]


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("1STARTS_WITH_DIGIT", {"value": "x"}),
        ("has-dash", {"value": "x"}),
        ("OK_NAME", {"value": 5}),
        ("OK_NAME", {}),
        ("OK_NAME", {"value": "x", "extra": 1}),
        ("OK_NAME", {"value": "x" * (64 * 1024 + 1)}),
    ],
)
def test_a_bad_secret_is_400(client: TestClient, app: str, name: str, body: Any) -> None:
    error_of(client.put(f"/v1/apps/{app}/secrets/{name}", json=body), 400, "invalid_request")
    assert client.get(f"/v1/apps/{app}/secrets").json() == {"secrets": []}


# -- users ---------------------------------------------------------------------------------

USER_KEYS = {"name", "display_name", "is_guest", "properties", "created_at"}


def test_users_create_get_patch_delete(client: TestClient, app: str) -> None:
    response = client.post(f"/v1/apps/{app}/users", json={"name": "alice"})
    assert response.status_code == 201
    alice = response.json()
    assert set(alice) == USER_KEYS
    assert (alice["name"], alice["display_name"], alice["is_guest"], alice["properties"]) == (
        "alice",
        "alice",
        False,
        {},
    )
    datetime.datetime.fromisoformat(alice["created_at"])
    error_of(client.post(f"/v1/apps/{app}/users", json={"name": "alice"}), 409, "user_exists")

    full = {"name": "bob", "display_name": "Bob B", "is_guest": True, "properties": {"a": [1]}}
    response = client.post(f"/v1/apps/{app}/users", json=full)
    assert response.status_code == 201
    bob = response.json()
    assert {k: bob[k] for k in full} == full

    assert client.get(f"/v1/apps/{app}/users/alice").json() == alice
    error_of(client.get(f"/v1/apps/{app}/users/nobody"), 404, "user_not_found")

    response = client.patch(f"/v1/apps/{app}/users/alice", json={"display_name": "Alice A"})
    assert response.status_code == 200
    assert response.json() == {**alice, "display_name": "Alice A"}
    response = client.patch(f"/v1/apps/{app}/users/alice", json={"properties": {"k": "v"}})
    assert response.json() == {**alice, "display_name": "Alice A", "properties": {"k": "v"}}
    response = client.patch(f"/v1/apps/{app}/users/alice", json={"properties": None})
    assert response.status_code == 200
    assert response.json()["properties"] == {}
    error_of(
        client.patch(f"/v1/apps/{app}/users/alice", json={"display_name": None}),
        400,
        "invalid_request",
    )
    error_of(
        client.patch(f"/v1/apps/{app}/users/nobody", json={"display_name": "x"}),
        404,
        "user_not_found",
    )

    response = client.delete(f"/v1/apps/{app}/users/alice")
    assert response.status_code == 204
    assert response.content == b""
    error_of(client.get(f"/v1/apps/{app}/users/alice"), 404, "user_not_found")
    error_of(client.delete(f"/v1/apps/{app}/users/alice"), 404, "user_not_found")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": 5},
        {"name": ""},
        {"name": "x" * 257},
        {"name": "tab\there"},
        {"name": "ok", "is_guest": None},
        {"name": "ok", "properties": [1]},
        {"name": "ok", "unknown": 1},
        {"name": "ok", "display_name": "bell\x07"},
    ],
)
def test_a_bad_user_is_400(client: TestClient, app: str, body: Any) -> None:
    error_of(client.post(f"/v1/apps/{app}/users", json=body), 400, "invalid_request")
    assert client.get(f"/v1/apps/{app}/users").json() == {"users": [], "next": None}


@pytest.mark.parametrize("value", ["yes", 1])
def test_is_guest_must_be_a_json_boolean(client: TestClient, app: str, value: Any) -> None:
    """As ``context.users.create_user`` and the hook payloads (strict): no coercion of
    strings or numbers to booleans."""
    response = client.post(f"/v1/apps/{app}/users", json={"name": "ok", "is_guest": value})
    error_of(response, 400, "invalid_request")
    assert client.get(f"/v1/apps/{app}/users").json() == {"users": [], "next": None}


def test_users_are_paged_by_name_with_next(client: TestClient, app: str) -> None:
    for i in (3, 0, 4, 1, 2):
        assert client.post(f"/v1/apps/{app}/users", json={"name": f"u{i}"}).status_code == 201

    def page(**params: Any) -> tuple[list[str], str | None]:
        response = client.get(f"/v1/apps/{app}/users", params=params)
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"users", "next"}
        return [u["name"] for u in body["users"]], body["next"]

    assert page() == (["u0", "u1", "u2", "u3", "u4"], None)
    assert page(limit=2) == (["u0", "u1"], "u1")
    assert page(limit=2, after="u1") == (["u2", "u3"], "u3")
    assert page(limit=2, after="u3") == (["u4"], None)
    assert page(limit=5) == (["u0", "u1", "u2", "u3", "u4"], "u4")
    assert page(limit=5, after="u4") == ([], None)

    for params in ({"limit": 0}, {"limit": 1001}, {"limit": "x"}, {"after": "a" * 257}):
        error_of(client.get(f"/v1/apps/{app}/users", params=params), 400, "invalid_request")


# -- invocations ---------------------------------------------------------------------------

REJECT_BAD = """
    def handle_event(event, context):
        if event.username.startswith("bad"):
            raise SessionRejected("go away " + event.username)
        print("welcome", event.username)
        return {"ok": event.username}
"""
INVOCATION_KEYS = {
    "id",
    "app",
    "event",
    "deployment_version",
    "status",
    "duration_ms",
    "error",
    "logs",
    "logs_truncated",
    "created_at",
}


@pytest.fixture(scope="module")
def logged(client: TestClient) -> tuple[str, list[dict[str, Any]]]:
    """An app with six invocations (oldest first): good-0, bad-1, good-2, started,
    bad-4, good-5; and the invocation list as the API returns it (newest first)."""
    app = unique("logged")
    create_app_named(client, app)
    deploy(
        client, app, sources(user_attempted_start_session=REJECT_BAD, user_started_session=LEAKY)
    )
    assert (
        client.put(f"/v1/apps/{app}/secrets/API_TOKEN", json={"value": "tok-5d1"}).status_code
        == 204
    )
    user = {"name": "u"}
    for i, name in enumerate(["good-0", "bad-1", "good-2", None, "bad-4", "good-5"]):
        if name is None:
            body: dict[str, Any] = {"user": user, "session_id": f"s{i}"}
            url = f"/v1/apps/{app}/hooks/UserStartedSession"
        else:
            body, url = {"username": name}, f"/v1/apps/{app}/hooks/UserAttemptedStartSession"
        assert client.post(url, json=body).status_code == 200
    response = client.get(f"/v1/apps/{app}/invocations")
    assert response.status_code == 200
    listed = response.json()
    assert set(listed) == {"invocations", "next"}
    assert listed["next"] is None
    return app, listed["invocations"]


def test_invocations_are_listed_newest_first_with_their_shape(
    client: TestClient, logged: tuple[str, list[dict[str, Any]]]
) -> None:
    app, invocations = logged
    assert len(invocations) == 6
    assert all(set(i) == INVOCATION_KEYS for i in invocations)
    times = [datetime.datetime.fromisoformat(i["created_at"]) for i in invocations]
    assert all(t.tzinfo is not None for t in times)
    assert times == sorted(times, reverse=True)
    assert [i["status"] for i in invocations] == [
        "succeeded",
        "failed",
        "succeeded",
        "succeeded",
        "failed",
        "succeeded",
    ]
    assert invocations[0]["logs"] == "welcome good-5\n"
    assert invocations[1]["error"] == {"code": "access_denied", "message": "go away bad-4"}
    assert all(i["app"] == app and i["deployment_version"] == 1 for i in invocations)

    one = client.get(f"/v1/apps/{app}/invocations/{invocations[1]['id']}")
    assert one.status_code == 200
    assert one.json() == invocations[1]
    error_of(client.get(f"/v1/apps/{app}/invocations/{'0' * 32}"), 404, "not_found")


def test_invocations_filter_by_event_and_status(
    client: TestClient, logged: tuple[str, list[dict[str, Any]]]
) -> None:
    app, invocations = logged

    def ids(**params: Any) -> list[str]:
        response = client.get(f"/v1/apps/{app}/invocations", params=params)
        assert response.status_code == 200, response.text
        return [i["id"] for i in response.json()["invocations"]]

    attempted = [i["id"] for i in invocations if i["event"] == "UserAttemptedStartSession"]
    assert len(attempted) == 5
    assert ids(event="UserAttemptedStartSession") == attempted
    assert ids(event="user_attempted_start_session") == attempted
    assert ids(event="UserStartedSession") == [invocations[2]["id"]]
    assert ids(event="UserEndedSession") == []
    assert ids(status="failed") == [invocations[1]["id"], invocations[4]["id"]]
    assert ids(status="succeeded", event="UserStartedSession") == [invocations[2]["id"]]
    error_of(
        client.get(f"/v1/apps/{app}/invocations", params={"event": "Nope"}), 400, "invalid_request"
    )
    error_of(
        client.get(f"/v1/apps/{app}/invocations", params={"status": "maybe"}),
        400,
        "invalid_request",
    )


def test_invocations_filter_by_time_with_a_time_zone(
    client: TestClient, logged: tuple[str, list[dict[str, Any]]]
) -> None:
    app, invocations = logged

    def ids(**params: Any) -> list[str]:
        response = client.get(f"/v1/apps/{app}/invocations", params=params)
        assert response.status_code == 200, response.text
        return [i["id"] for i in response.json()["invocations"]]

    all_ids = [i["id"] for i in invocations]
    pivot = datetime.datetime.fromisoformat(invocations[2]["created_at"])
    plus_two = pivot.astimezone(datetime.timezone(datetime.timedelta(hours=2))).isoformat()
    minus_five = pivot.astimezone(datetime.timezone(datetime.timedelta(hours=-5))).isoformat()
    zulu = pivot.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")

    for moment in (pivot.isoformat(), plus_two, minus_five, zulu):
        assert ids(since=moment) == all_ids[:3], moment  # since is inclusive
        assert ids(until=moment) == all_ids[3:], moment  # until is exclusive
    newest = datetime.datetime.fromisoformat(invocations[0]["created_at"])
    oldest = datetime.datetime.fromisoformat(invocations[-1]["created_at"])
    assert ids(since=oldest.isoformat(), until=newest.isoformat()) == all_ids[1:]
    assert ids(since=(newest + datetime.timedelta(seconds=1)).isoformat()) == []
    assert ids(since=plus_two, status="failed") == [invocations[1]["id"]]

    for name in ("since", "until"):
        naive = pivot.replace(tzinfo=None).isoformat()
        message = error_of(
            client.get(f"/v1/apps/{app}/invocations", params={name: naive}),
            400,
            "invalid_request",
        )
        assert name in message and "time zone" in message
        error_of(
            client.get(f"/v1/apps/{app}/invocations", params={name: "yesterday"}),
            400,
            "invalid_request",
        )


def test_invocations_are_paged_with_the_before_cursor(
    client: TestClient, logged: tuple[str, list[dict[str, Any]]]
) -> None:
    app, invocations = logged
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 4}
    pages = 0
    while True:
        response = client.get(f"/v1/apps/{app}/invocations", params=params)
        assert response.status_code == 200
        body = response.json()
        seen += [i["id"] for i in body["invocations"]]
        pages += 1
        if body["next"] is None:
            break
        assert isinstance(body["next"], str)
        params = {"limit": 4, "before": body["next"]}
    assert pages == 2
    assert seen == [i["id"] for i in invocations]

    # Pages of one, through every invocation and then an empty page.
    seen, params = [], {"limit": 1}
    for _ in range(7):
        body = client.get(f"/v1/apps/{app}/invocations", params=params).json()
        seen += [i["id"] for i in body["invocations"]]
        if body["next"] is None:
            break
        params = {"limit": 1, "before": body["next"]}
    assert seen == [i["id"] for i in invocations]

    # Filters apply across pages too.
    first = client.get(f"/v1/apps/{app}/invocations", params={"limit": 1, "status": "failed"})
    cursor = first.json()["next"]
    second = client.get(
        f"/v1/apps/{app}/invocations", params={"limit": 1, "status": "failed", "before": cursor}
    )
    assert [i["id"] for i in first.json()["invocations"] + second.json()["invocations"]] == [
        invocations[1]["id"],
        invocations[4]["id"],
    ]

    for bad in ("garbage", "2024-01-01T00:00:00~", "2024-01-01T00:00:00~abc", "x" * 201):
        error_of(
            client.get(f"/v1/apps/{app}/invocations", params={"before": bad}),
            400,
            "invalid_request",
        )
    for limit in (0, 1001):
        error_of(
            client.get(f"/v1/apps/{app}/invocations", params={"limit": limit}),
            400,
            "invalid_request",
        )


# -- hooks ---------------------------------------------------------------------------------

HOOK_KEYS = {"invocation_id", "status", "error", "result", "duration_ms"}


def test_a_hook_answers_200_with_the_outcome(client: TestClient, app: str) -> None:
    deploy(client, app, sources(user_attempted_start_session=REJECT_BAD))
    response = client.post(
        f"/v1/apps/{app}/hooks/UserAttemptedStartSession",
        json={"username": "good", "auth_params": {"k": [1, None]}},
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == HOOK_KEYS
    assert body["status"] == "succeeded"
    assert body["error"] is None
    assert body["result"] == {"ok": "good"}
    assert isinstance(body["duration_ms"], float) and body["duration_ms"] >= 0
    logged = client.get(f"/v1/apps/{app}/invocations/{body['invocation_id']}").json()
    assert logged["status"] == "succeeded"
    assert logged["logs"] == "welcome good\n"

    rejected = client.post(
        f"/v1/apps/{app}/hooks/user_attempted_start_session", json={"username": "bad-x"}
    )
    assert rejected.status_code == 200
    assert rejected.json()["status"] == "failed"
    assert rejected.json()["error"] == {"code": "access_denied", "message": "go away bad-x"}
    assert rejected.json()["result"] is None


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"username": 5},
        {"username": "x", "auth_params": [1]},
        {"username": "x", "auth_params": "s"},
        {"username": "x", "extra": 1},
        [1, 2],
        "text",
        None,
    ],
)
def test_a_bad_hook_payload_is_400(client: TestClient, app: str, payload: Any) -> None:
    deploy(client, app, sources(user_attempted_start_session=ACCEPT_ALL))
    response = client.post(f"/v1/apps/{app}/hooks/UserAttemptedStartSession", json=payload)
    error_of(response, 400, "invalid_request")
    # Nothing ran, so nothing was logged.
    assert client.get(f"/v1/apps/{app}/invocations").json()["invocations"] == []


@pytest.mark.parametrize(
    "payload",
    [
        {"username": ""},
        {"username": "bell\x07"},
        {"username": "x" * 257},
        {"username": "x", "auth_params": {"k": "x" * (64 * 1024)}},
    ],
    ids=["empty-username", "control-character", "long-username", "auth-params-over-64k"],
)
def test_a_hook_payload_follows_the_start_session_rules(
    client: TestClient, app: str, payload: Any
) -> None:
    """DESIGN 6 step 1 (username 1-256 characters without control characters, auth_params
    at most 64 KiB) for the same event arriving through the hook API."""
    deploy(client, app, sources(user_attempted_start_session=ACCEPT_ALL))
    response = client.post(f"/v1/apps/{app}/hooks/UserAttemptedStartSession", json=payload)
    error_of(response, 400, "invalid_request")
    assert client.get(f"/v1/apps/{app}/invocations").json()["invocations"] == []


def test_a_hook_for_an_unknown_event_is_404(client: TestClient, app: str) -> None:
    deploy(client, app, sources(user_attempted_start_session=ACCEPT_ALL))
    response = client.post(f"/v1/apps/{app}/hooks/UserDidSomething", json={"username": "x"})
    error_of(response, 404, "not_found")


def test_a_hook_with_nothing_deployed_fails_not_deployed(client: TestClient, app: str) -> None:
    response = client.post(
        f"/v1/apps/{app}/hooks/UserAttemptedStartSession", json={"username": "x"}
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == HOOK_KEYS
    assert body["status"] == "failed"
    assert body["error"]["code"] == "not_deployed"
    assert body["result"] is None

    # Deployed, but without a handler for this event: the same.
    deploy(client, app, sources(user_attempted_start_session=ACCEPT_ALL))
    user = {"name": "x"}
    response = client.post(
        f"/v1/apps/{app}/hooks/UserEndedSession",
        json={"user": user, "session_id": "s", "reason": "ended"},
    )
    assert response.status_code == 200
    assert response.json()["status"] == "failed"
    assert response.json()["error"]["code"] == "not_deployed"


# -- sessions (listing; the WebSocket tests start them) -----------------------------------


def test_sessions_list_empty_and_bad_query(client: TestClient, app: str) -> None:
    params: dict[str, Any]
    for params in ({}, {"active": "false"}, {"active": "true", "limit": 5}):
        response = client.get(f"/v1/apps/{app}/sessions", params=params)
        assert response.status_code == 200
        assert response.json() == {"sessions": []}
    for params in ({"active": "maybe"}, {"limit": 0}, {"limit": 1001}):
        error_of(client.get(f"/v1/apps/{app}/sessions", params=params), 400, "invalid_request")


# -- the admin key -------------------------------------------------------------------------

ADMIN_ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/v1/apps", {"name": "never-created"}),
    ("GET", "/v1/apps", None),
    ("GET", "/v1/apps/{app}", None),
    ("GET", "/v1/apps/{app}/settings", None),
    ("PATCH", "/v1/apps/{app}/settings", {"guest_users": "disabled"}),
    ("GET", "/v1/apps/{app}/sessions", None),
    ("POST", "/v1/apps/{app}/deployments", b"archive"),
    ("GET", "/v1/apps/{app}/deployments", None),
    ("GET", "/v1/apps/{app}/deployments/{version}", None),
    ("POST", "/v1/apps/{app}/deployments/{version}/activate", None),
    ("GET", "/v1/apps/{app}/functions", None),
    ("GET", "/v1/apps/{app}/secrets", None),
    ("PUT", "/v1/apps/{app}/secrets/{name}", {"value": "v"}),
    ("DELETE", "/v1/apps/{app}/secrets/{name}", None),
    ("GET", "/v1/apps/{app}/users", None),
    ("POST", "/v1/apps/{app}/users", {"name": "mallory"}),
    ("GET", "/v1/apps/{app}/users/{name}", None),
    ("PATCH", "/v1/apps/{app}/users/{name}", {"display_name": "M"}),
    ("DELETE", "/v1/apps/{app}/users/{name}", None),
    ("GET", "/v1/apps/{app}/invocations", None),
    ("GET", "/v1/apps/{app}/invocations/{invocation_id}", None),
    ("POST", "/v1/apps/{app}/hooks/{event}", {"username": "mallory"}),
    ("GET", "/metrics", None),
]
OPEN_ROUTES = {("GET", "/healthz")}


def test_the_route_table_covers_every_http_route(server: Server) -> None:
    """So that a new route cannot skip the 401 tests below (the OpenAPI schema lists every
    HTTP route)."""
    paths = server.api.openapi()["paths"]
    routes = {(method.upper(), path) for path, item in paths.items() for method in item}
    assert routes == {(m, p) for m, p, _ in ADMIN_ROUTES} | OPEN_ROUTES


@pytest.fixture(scope="module")
def guarded(client: TestClient) -> dict[str, str]:
    """Real objects for the admin routes' path parameters (a 401 must not depend on
    whether the object exists)."""
    app = unique("guarded")
    create_app_named(client, app)
    deploy(client, app, sources(user_attempted_start_session=ACCEPT_ALL))
    assert client.put(f"/v1/apps/{app}/secrets/TOKEN", json={"value": "v"}).status_code == 204
    assert client.post(f"/v1/apps/{app}/users", json={"name": "bob"}).status_code == 201
    hook = client.post(f"/v1/apps/{app}/hooks/UserAttemptedStartSession", json={"username": "b"})
    return {
        "app": app,
        "version": "1",
        "name": "bob",
        "invocation_id": hook.json()["invocation_id"],
        "event": "UserAttemptedStartSession",
    }


def _send(
    c: TestClient, method: str, path: str, body: Any, headers: dict[str, str]
) -> httpx.Response:
    response: httpx.Response
    if isinstance(body, bytes):
        gzip = {**headers, "Content-Type": "application/gzip"}
        response = c.request(method, path, content=body, headers=gzip)
    elif body is None:
        response = c.request(method, path, headers=headers)
    else:
        response = c.request(method, path, json=body, headers=headers)
    return response


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong-key-0123456789abcdef",
        "Basic c2VydmVyOnRlc3Rz",
        "server-tests-admin-key-0123456789",  # the key without the scheme
    ],
    ids=["missing", "empty", "scheme-only", "blank-key", "wrong-key", "basic", "no-scheme"],
)
def test_every_admin_route_is_401_without_the_right_key(
    anon: TestClient,
    client: TestClient,
    guarded: dict[str, str],
    method: str,
    path: str,
    body: Any,
    authorization: str | None,
) -> None:
    url = path.format(**guarded)
    headers = {} if authorization is None else {"Authorization": authorization}
    before = client.get(f"/v1/apps/{guarded['app']}/invocations").json()
    response = _send(anon, method, url, body, headers)
    error_of(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    # Nothing happened.
    assert client.get(f"/v1/apps/{guarded['app']}/invocations").json() == before
    assert client.get(f"/v1/apps/{guarded['app']}/users/bob").status_code == 200
    secrets = client.get(f"/v1/apps/{guarded['app']}/secrets").json()["secrets"]
    assert [s["name"] for s in secrets] == ["TOKEN"]
    assert client.get("/v1/apps/never-created").status_code == 404


def test_the_bearer_scheme_is_case_insensitive(anon: TestClient) -> None:
    response = anon.get("/v1/apps", headers={"Authorization": f"bearer {ADMIN_KEY}"})
    assert response.status_code == 200


def test_healthz_needs_no_key(anon: TestClient, client: TestClient) -> None:
    response = anon.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["service"] == "chatfn"
    assert body["apps"] == len(client.get("/v1/apps").json()["apps"])


def test_metrics_count_invocations_and_need_the_key(
    anon: TestClient, client: TestClient, app: str
) -> None:
    deploy(client, app, sources(user_attempted_start_session=REJECT_BAD))
    for name in ("good", "bad", "good-2"):
        response = client.post(
            f"/v1/apps/{app}/hooks/UserAttemptedStartSession", json={"username": name}
        )
        assert response.status_code == 200

    error_of(anon.get("/metrics"), 401, "unauthorized")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    succeeded = (
        f'chatfn_invocations_total{{app="{app}",event="UserAttemptedStartSession",'
        f'outcome="succeeded"}} 2.0'
    )
    denied = (
        f'chatfn_invocations_total{{app="{app}",event="UserAttemptedStartSession",'
        f'outcome="access_denied"}} 1.0'
    )
    assert succeeded in text.splitlines()
    assert denied in text.splitlines()
    assert re.search(
        r'^chatfn_invocation_duration_seconds_count\{event="UserAttemptedStartSession"\} \d',
        text,
        re.MULTILINE,
    )
    assert re.search(r"^chatfn_active_sessions \d", text, re.MULTILINE)
    assert re.search(r"^chatfn_websocket_connections 0\.0$", text, re.MULTILINE)
    assert re.search(rf'^chatfn_workers\{{app="{app}",state="idle"\}} \d', text, re.MULTILINE)


# -- scoping: one app never sees another's objects -----------------------------------------


def test_objects_of_one_app_are_404_under_another(client: TestClient) -> None:
    a, b = unique("scope-a"), unique("scope-b")
    create_app_named(client, a)
    create_app_named(client, b)
    deploy(client, a, sources(user_attempted_start_session=ACCEPT_ALL))
    invocation = client.post(
        f"/v1/apps/{a}/hooks/UserAttemptedStartSession", json={"username": "x"}
    ).json()["invocation_id"]
    assert client.post(f"/v1/apps/{a}/users", json={"name": "carol"}).status_code == 201
    assert client.put(f"/v1/apps/{a}/secrets/ONLY_A", json={"value": "v"}).status_code == 204

    assert client.get(f"/v1/apps/{a}/invocations/{invocation}").status_code == 200
    error_of(client.get(f"/v1/apps/{b}/invocations/{invocation}"), 404, "not_found")
    error_of(client.get(f"/v1/apps/{b}/users/carol"), 404, "user_not_found")
    error_of(
        client.patch(f"/v1/apps/{b}/users/carol", json={"display_name": "C"}), 404, "user_not_found"
    )
    error_of(client.delete(f"/v1/apps/{b}/users/carol"), 404, "user_not_found")
    error_of(client.delete(f"/v1/apps/{b}/secrets/ONLY_A"), 404, "not_found")
    error_of(client.get(f"/v1/apps/{b}/deployments/1"), 404, "not_found")
    error_of(client.post(f"/v1/apps/{b}/deployments/1/activate"), 404, "not_found")
    assert client.get(f"/v1/apps/{b}/invocations").json() == {"invocations": [], "next": None}
    assert client.get(f"/v1/apps/{b}/users").json() == {"users": [], "next": None}
    assert client.get(f"/v1/apps/{b}/secrets").json() == {"secrets": []}
    assert client.get(f"/v1/apps/{b}/functions").json()["version"] is None
    # ... and A's objects are untouched.
    assert client.get(f"/v1/apps/{a}/users/carol").json()["display_name"] == "carol"
    assert client.get(f"/v1/apps/{a}/secrets").json()["secrets"][0]["name"] == "ONLY_A"
    # A user created in B with the same name is B's own.
    assert client.post(f"/v1/apps/{b}/users", json={"name": "carol"}).status_code == 201


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        (m, p, b)
        for m, p, b in ADMIN_ROUTES
        if "{app}" in p and not (m == "POST" and p == "/v1/apps")
    ],
)
def test_an_unknown_app_is_404(client: TestClient, method: str, path: str, body: Any) -> None:
    url = path.format(
        app="no-such-app",
        version=1,
        name="bob",
        invocation_id="0" * 32,
        event="UserAttemptedStartSession",
    )
    if isinstance(body, bytes):
        body = tar_gz(sources(user_attempted_start_session=ACCEPT_ALL))
    response = _send(client, method, url, body, {})
    message = error_of(response, 404, "not_found")
    assert "no-such-app" in message


# -- errors are always chatfn's shape -----------------------------------------------------


JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain"}


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("POST", "/v1/apps", {"json": {"name": 5}}),
        ("POST", "/v1/apps", {"json": {}}),
        ("POST", "/v1/apps", {"json": ["default"]}),
        ("POST", "/v1/apps", {"json": {"name": "ok-name", "extra": True}}),
        ("POST", "/v1/apps", {"content": b"{not json", "headers": JSON}),
        ("POST", "/v1/apps", {}),
        ("POST", "/v1/apps", {"content": b'{"name": "x"}', "headers": TEXT}),
        ("GET", "/v1/apps/default/deployments/abc", {}),
        ("GET", "/v1/apps/default/deployments/1.5", {}),
        ("POST", "/v1/apps/default/deployments/x/activate", {}),
        ("GET", "/v1/apps/default/users", {"params": {"limit": "many"}}),
        ("GET", "/v1/apps/default/sessions", {"params": {"limit": -1}}),
        ("GET", "/v1/apps/default/invocations", {"params": {"since": "not-a-time"}}),
        ("PATCH", "/v1/apps/default/users/bob", {"json": {"properties": "x"}}),
        ("POST", "/v1/apps/default/hooks/UserAttemptedStartSession", {"json": 3}),
    ],
)
def test_request_validation_errors_are_400_in_chatfn_shape(
    client: TestClient, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    error_of(client.request(method, path, **kwargs), 400, "invalid_request")


@pytest.mark.parametrize("path", ["/nope", "/v1/nope", "/v1/apps/default/nope", "/v2/apps"])
def test_unknown_paths_are_404_in_chatfn_shape(client: TestClient, path: str) -> None:
    error_of(client.get(path), 404, "not_found")


def test_a_wrong_method_is_405_in_chatfn_shape(client: TestClient) -> None:
    error_of(client.delete("/v1/apps"), 405, "invalid_request")
    error_of(client.put("/healthz"), 405, "invalid_request")


def test_the_openapi_schema_documents_the_api(anon: TestClient) -> None:
    response = anon.get("/openapi.json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert "/v1/apps/{app}/deployments" in paths
    upload_body = paths["/v1/apps/{app}/deployments"]["post"]["requestBody"]["content"]
    assert {"application/gzip", "application/zip"} <= set(upload_body)
