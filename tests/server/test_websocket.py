"""The WebSocket session endpoint ``/v1/apps/{app}/session`` (DESIGN sections 6 and 7)
through Starlette's test client: the message protocol, errors that leave the connection
usable, the app's handler deciding, and a dropped socket ending its session."""

from __future__ import annotations

import contextlib
import datetime
import json
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.websockets import WebSocketDisconnect

from runtime.archive import pack_project
from runtime.server.ws import CLOSE_UNKNOWN_APP, MAX_MESSAGE_BYTES
from tests.server.conftest import (
    Server,
    TestClient,
    create_app_named,
    deploy,
    poll,
    sources,
    upload,
    wait_built,
)
from tests.server.test_archive import FIXTURE

SECRET = "tok-7a1f2e9d"
ATTEMPT = """
    def handle_event(event, context):
        if event.username.startswith("bad"):
            raise SessionRejected("not you, " + event.username)
        if event.username.startswith("leak"):
            raise SessionRejected("the token is " + context.secrets["TOKEN"])
        if event.username.startswith("boom"):
            raise ValueError("the token is " + context.secrets["TOKEN"])
        if event.username.startswith("member"):
            context.users.create_user(event.username, properties={"member": True})
        return None
"""
ENDED = """
    def handle_event(event, context):
        print("ended", event.session_id, event.reason, event.user["name"])
"""


@pytest.fixture(scope="module")
def client(server: Server) -> TestClient:
    return server.client


@pytest.fixture(scope="module")
def app(client: TestClient) -> str:
    """Guests enabled; a UserAttemptedStartSession handler (rejects ``bad*``, fails on
    ``boom*``) and a UserEndedSession handler that logs the reason."""
    create_app_named(client, "ws")
    deploy(client, "ws", sources(user_attempted_start_session=ATTEMPT, user_ended_session=ENDED))
    assert client.put("/v1/apps/ws/secrets/TOKEN", json={"value": SECRET}).status_code == 204
    return "ws"


@pytest.fixture(scope="module")
def password_app(client: TestClient) -> str:
    """The password project of tests/fixtures, guests disabled, DEMO_PASSWORD set."""
    create_app_named(client, "pw", guest_users="disabled")
    info = wait_built(client, "pw", upload(client, "pw", pack_project(FIXTURE)))
    assert info["status"] == "active", info
    assert (
        client.put("/v1/apps/pw/secrets/DEMO_PASSWORD", json={"value": "letmein"}).status_code
        == 204
    )
    return "pw"


def url(app: str) -> str:
    return f"/v1/apps/{app}/session"


class Socket:
    """A client connection: one reply per message; remembers the sessions it started."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.started: list[str] = []

    def ask(self, message: Any) -> dict[str, Any]:
        """Send one message (a dict as JSON, a str as it is) and read the one reply."""
        self.ws.send_text(message if isinstance(message, str) else json.dumps(message))
        return self.reply()

    def send_bytes(self, data: bytes) -> None:
        self.ws.send_bytes(data)

    def reply(self) -> dict[str, Any]:
        raw = self.ws.receive_text()
        value = json.loads(raw)
        assert isinstance(value, dict), raw
        if value.get("type") == "session_started":
            self.started.append(value["session"]["id"])
        return value


@contextlib.contextmanager
def connect(client: TestClient, app: str) -> Iterator[Socket]:
    """A socket to ``app``'s session endpoint. On leaving, the client hangs up and waits
    until the server has ended every session the socket still held (the test client
    cancels the endpoint's task right after its own close, which could otherwise cut the
    server's clean-up short; uvicorn lets it finish)."""
    with client.websocket_connect(url(app)) as ws:
        socket = Socket(ws)
        yield socket
        ws.close(1000)

        def still_active() -> list[str]:
            active = {s["id"] for s in sessions(client, app, active=True)}
            return [i for i in socket.started if i in active]

        poll(still_active, lambda found: not found)


def error(answer: dict[str, Any], code: str, request_id: Any = None) -> str:
    assert answer["type"] == "error", answer
    assert set(answer) == {"type", "id", "error"}, answer
    assert answer["id"] == request_id, answer
    assert set(answer["error"]) == {"code", "message"}, answer
    assert answer["error"]["code"] == code, answer
    message = answer["error"]["message"]
    assert isinstance(message, str) and message
    return message


def sessions(client: TestClient, app: str, *, active: bool) -> list[dict[str, Any]]:
    response = client.get(f"/v1/apps/{app}/sessions", params={"active": active, "limit": 1000})
    assert response.status_code == 200
    found: list[dict[str, Any]] = response.json()["sessions"]
    return found


def started(answer: dict[str, Any], request_id: Any, username: str) -> dict[str, Any]:
    assert answer["type"] == "session_started", answer
    assert set(answer) == {"type", "id", "session"}, answer
    assert answer["id"] == request_id
    session: dict[str, Any] = answer["session"]
    assert set(session) == {"id", "user", "started_at"}
    assert isinstance(session["id"], str) and session["id"]
    assert session["user"]["name"] == username
    assert datetime.datetime.fromisoformat(session["started_at"]).tzinfo is not None
    return session


# -- the protocol --------------------------------------------------------------------------


def test_start_then_end_a_session(client: TestClient, app: str) -> None:
    with connect(client, app) as ws:
        answer = ws.ask({"type": "start_session", "id": 1, "username": "alice"})
        session = started(answer, 1, "alice")
        assert session["user"]["is_guest"] is True  # the handler did not create her
        assert set(session["user"]) == {
            "name",
            "display_name",
            "is_guest",
            "properties",
            "created_at",
        }
        active = sessions(client, app, active=True)
        assert session["id"] in [s["id"] for s in active]

        assert ws.ask({"type": "end_session", "id": 2}) == {"type": "session_ended", "id": 2}
        assert session["id"] not in [s["id"] for s in sessions(client, app, active=True)]
        ended = next(s for s in sessions(client, app, active=False) if s["id"] == session["id"])
        assert ended["end_reason"] == "ended"
        assert ended["ended_at"] >= ended["started_at"]

        # The connection can start another session once the first ended.
        again = ws.ask({"type": "start_session", "id": 3, "username": "alice"})
        assert started(again, 3, "alice")["id"] != session["id"]
        assert ws.ask({"type": "end_session", "id": 4})["type"] == "session_ended"


def test_a_user_created_by_the_handler_is_no_guest(client: TestClient, app: str) -> None:
    with connect(client, app) as ws:
        answer = ws.ask({"type": "start_session", "id": 1, "username": "member-1"})
        user = started(answer, 1, "member-1")["user"]
        assert user["is_guest"] is False
        assert user["properties"] == {"member": True}


def test_a_second_start_on_one_connection_is_session_active(client: TestClient, app: str) -> None:
    with connect(client, app) as ws:
        first = started(ws.ask({"type": "start_session", "id": 1, "username": "bo"}), 1, "bo")
        answer = ws.ask({"type": "start_session", "id": 2, "username": "other"})
        error(answer, "session_active", 2)
        # The first session is untouched, and ends normally.
        assert first["id"] in [s["id"] for s in sessions(client, app, active=True)]
        assert ws.ask({"type": "end_session", "id": 3}) == {"type": "session_ended", "id": 3}


def test_end_without_a_session_is_an_error(client: TestClient, app: str) -> None:
    with connect(client, app) as ws:
        error(ws.ask({"type": "end_session", "id": 7}), "invalid_request", 7)
        started(ws.ask({"type": "start_session", "id": 8, "username": "cy"}), 8, "cy")
        assert ws.ask({"type": "end_session", "id": 9})["type"] == "session_ended"
        error(ws.ask({"type": "end_session", "id": "again"}), "invalid_request", "again")


@pytest.mark.parametrize(
    ("message", "request_id"),
    [
        pytest.param("{not json", None, id="malformed-json"),
        pytest.param("", None, id="empty"),
        pytest.param("[1, 2]", None, id="array"),
        pytest.param('"start_session"', None, id="string"),
        pytest.param("null", None, id="null"),
        pytest.param("42", None, id="number"),
        pytest.param({"id": 1}, 1, id="no-type"),
        pytest.param({"type": "dance", "id": 2}, 2, id="unknown-type"),
        pytest.param({"type": 5, "id": "x"}, "x", id="type-not-a-string"),
        pytest.param({"type": "end_session", "id": [1]}, None, id="id-array"),
        pytest.param({"type": "end_session", "id": {"a": 1}}, None, id="id-object"),
        pytest.param({"type": "end_session", "id": 1.5}, None, id="id-float"),
        pytest.param({"type": "end_session", "id": True}, None, id="id-bool"),
        pytest.param({"type": "end_session", "id": "x" * 65}, None, id="id-long-string"),
        pytest.param({"type": "start_session", "id": 3}, 3, id="no-username"),
        pytest.param({"type": "start_session", "id": 4, "username": 5}, 4, id="username-int"),
        pytest.param({"type": "start_session", "id": 5, "username": ""}, 5, id="username-empty"),
        pytest.param(
            {"type": "start_session", "id": 6, "username": "x" * 257}, 6, id="username-long"
        ),
        pytest.param(
            {"type": "start_session", "id": 7, "username": "a\nb"}, 7, id="username-control"
        ),
        pytest.param(
            {"type": "start_session", "id": 8, "username": "u", "auth_params": [1]},
            8,
            id="auth-params-array",
        ),
        pytest.param(
            {"type": "start_session", "id": 9, "username": "u", "auth_params": "pw"},
            9,
            id="auth-params-string",
        ),
        pytest.param(
            {"type": "start_session", "id": 10, "username": "u", "auth_params": {"k": "x" * 65537}},
            10,
            id="auth-params-over-64k",
        ),
        pytest.param(
            {"type": "start_session", "id": 11, "username": "u", "password": "pw"},
            11,
            id="unknown-field",
        ),
        pytest.param("x" * (MAX_MESSAGE_BYTES + 1), None, id="oversize"),
        pytest.param(
            json.dumps({"type": "start_session", "id": 12, "username": "u", "pad": "x" * 140_000}),
            None,
            id="oversize-json",
        ),
    ],
)
def test_a_bad_message_gets_an_error_and_the_connection_stays_usable(
    client: TestClient, app: str, message: Any, request_id: Any
) -> None:
    with connect(client, app) as ws:
        error(ws.ask(message), "invalid_request", request_id)
        error(ws.ask(message), "invalid_request", request_id)  # and again
        answer = ws.ask({"type": "start_session", "id": "ok", "username": "dee"})
        started(answer, "ok", "dee")
        assert ws.ask({"type": "end_session", "id": "bye"})["type"] == "session_ended"


def test_binary_frames_are_read_as_utf8_text(client: TestClient, app: str) -> None:
    with connect(client, app) as ws:
        ws.send_bytes(json.dumps({"type": "start_session", "id": 1, "username": "bin"}).encode())
        started(ws.reply(), 1, "bin")
        ws.send_bytes(b"\xff\xfe not utf-8")
        error(ws.reply(), "invalid_request")
        ws.send_bytes(b'{"type": "end_session", "id": 2}')
        assert ws.reply() == {"type": "session_ended", "id": 2}


def test_ids_are_echoed_as_sent(client: TestClient, app: str) -> None:
    with connect(client, app) as ws:
        for request_id in (0, -5, 2**53, "", "abc", "x" * 64, None):
            answer = ws.ask({"type": "end_session", "id": request_id})
            error(answer, "invalid_request", request_id)
        answer = ws.ask({"type": "end_session"})
        error(answer, "invalid_request", None)


@pytest.mark.parametrize("name", ["no-such-app", "UPPER", "a" * 100])
def test_an_unknown_app_closes_with_4404(client: TestClient, name: str) -> None:
    with client.websocket_connect(url(name)) as ws, pytest.raises(WebSocketDisconnect) as closed:
        ws.receive_text()
    assert closed.value.code == CLOSE_UNKNOWN_APP


# -- what the handler and the settings decide ----------------------------------------------


def test_a_rejected_session_carries_the_handlers_message(
    client: TestClient, password_app: str
) -> None:
    with connect(client, password_app) as ws:
        for i, params in enumerate([{"password": "wrong"}, {}, {"password": 1234}, None]):
            message: dict[str, Any] = {"type": "start_session", "id": i, "username": "alice"}
            if params is not None:
                message["auth_params"] = params
            assert error(ws.ask(message), "access_denied", i) == "Wrong password"
        assert client.get(f"/v1/apps/{password_app}/users/alice").status_code == 404

        answer = ws.ask(
            {
                "type": "start_session",
                "id": "right",
                "username": "alice",
                "auth_params": {"password": "letmein"},
            }
        )
        user = started(answer, "right", "alice")["user"]
        assert user["display_name"] == "Alice"
        assert user["properties"] == {"source": "demo"}
        assert user["is_guest"] is False


def test_a_rejection_message_never_carries_a_secret(client: TestClient, app: str) -> None:
    with connect(client, app) as ws:
        message = error(
            ws.ask({"type": "start_session", "id": 1, "username": "bad-x"}), "access_denied", 1
        )
        assert message == "not you, bad-x"
        message = error(
            ws.ask({"type": "start_session", "id": 2, "username": "leak"}), "access_denied", 2
        )
        assert SECRET not in message
        assert message == "the token is [secret TOKEN]"


def test_a_failing_handler_is_function_error_with_the_invocation_id(
    client: TestClient, app: str
) -> None:
    with connect(client, app) as ws:
        answer = ws.ask({"type": "start_session", "id": 1, "username": "boom"})
        message = error(answer, "function_error", 1)
        assert SECRET not in message
        assert "ValueError" not in message
    invocations = client.get(
        f"/v1/apps/{app}/invocations", params={"status": "failed", "limit": 1000}
    ).json()["invocations"]
    ids = [i["id"] for i in invocations if i["error"]["code"] == "function_error"]
    assert any(i in message for i in ids), (message, ids)


def test_guests_disabled_without_a_handler_is_access_denied(client: TestClient) -> None:
    create_app_named(client, "closed", guest_users="disabled")
    with connect(client, "closed") as ws:
        error(ws.ask({"type": "start_session", "id": 1, "username": "eve"}), "access_denied", 1)
        # Even for a user that exists.
        assert client.post("/v1/apps/closed/users", json={"name": "eve"}).status_code == 201
        error(ws.ask({"type": "start_session", "id": 2, "username": "eve"}), "access_denied", 2)
    assert sessions(client, "closed", active=True) == []


def test_guests_disabled_with_a_handler_needs_the_user_to_exist(client: TestClient) -> None:
    create_app_named(client, "members", guest_users="disabled")
    deploy(client, "members", sources(user_attempted_start_session=ATTEMPT))
    with connect(client, "members") as ws:
        error(ws.ask({"type": "start_session", "id": 1, "username": "x"}), "user_not_found", 1)
        started(ws.ask({"type": "start_session", "id": 2, "username": "member-9"}), 2, "member-9")


def test_guests_enabled_without_a_handler_creates_a_guest(client: TestClient) -> None:
    create_app_named(client, "open")
    with connect(client, "open") as ws:
        user = started(ws.ask({"type": "start_session", "id": 1, "username": "g"}), 1, "g")["user"]
        assert user["is_guest"] is True
    assert client.get("/v1/apps/open/users/g").json()["is_guest"] is True


def test_deleting_the_user_of_an_active_session_leaves_the_connection_usable(
    client: TestClient, app: str
) -> None:
    with connect(client, app) as ws:
        started(ws.ask({"type": "start_session", "id": 1, "username": "gone"}), 1, "gone")
        assert client.delete(f"/v1/apps/{app}/users/gone").status_code == 204
        error(ws.ask({"type": "end_session", "id": 2}), "invalid_request", 2)
        started(ws.ask({"type": "start_session", "id": 3, "username": "gone"}), 3, "gone")
        assert ws.ask({"type": "end_session", "id": 4}) == {"type": "session_ended", "id": 4}


# -- a dropped socket ----------------------------------------------------------------------


def ended_log(client: TestClient, app: str, session_id: str) -> list[str]:
    invocations = client.get(
        f"/v1/apps/{app}/invocations", params={"event": "UserEndedSession", "limit": 1000}
    ).json()["invocations"]
    return [i["logs"] for i in invocations if session_id in i["logs"]]


def test_dropping_the_socket_ends_the_session_as_disconnected(client: TestClient, app: str) -> None:
    with connect(client, app) as ws:
        answer = ws.ask({"type": "start_session", "id": 1, "username": "dropper"})
        session_id = started(answer, 1, "dropper")["id"]
        assert session_id in [s["id"] for s in sessions(client, app, active=True)]
    # The client went away without end_session.

    def ended() -> list[dict[str, Any]]:
        return [s for s in sessions(client, app, active=False) if s["id"] == session_id]

    record = poll(ended, lambda found: bool(found and "end_reason" in found[0]))[0]
    assert record["end_reason"] == "disconnected"
    assert session_id not in [s["id"] for s in sessions(client, app, active=True)]
    logs = poll(lambda: ended_log(client, app, session_id), bool)
    assert logs == [f"ended {session_id} disconnected dropper\n"]


def test_end_session_runs_the_ended_handler_with_reason_ended(client: TestClient, app: str) -> None:
    with connect(client, app) as ws:
        answer = ws.ask({"type": "start_session", "id": 1, "username": "leaver"})
        session_id = started(answer, 1, "leaver")["id"]
        assert ws.ask({"type": "end_session", "id": 2})["type"] == "session_ended"
    logs = poll(lambda: ended_log(client, app, session_id), bool)
    assert logs == [f"ended {session_id} ended leaver\n"]


def test_open_sockets_are_counted_in_the_metrics(client: TestClient, app: str) -> None:
    def connections() -> str:
        text: str = client.get("/metrics").text
        return next(line for line in text.splitlines() if line.startswith("chatfn_websocket_conn"))

    assert poll(connections, lambda line: line == "chatfn_websocket_connections 0.0")
    with connect(client, app) as one, connect(client, app) as two:
        error(one.ask({"type": "end_session"}), "invalid_request")
        error(two.ask({"type": "end_session"}), "invalid_request")
        assert connections() == "chatfn_websocket_connections 2.0"
    assert poll(connections, lambda line: line == "chatfn_websocket_connections 0.0")


@pytest.fixture(scope="module", autouse=True)
def _no_session_left_behind(client: TestClient) -> Iterator[None]:
    """Every socket these tests opened ended its session when it closed."""
    yield

    def active() -> list[tuple[str, str]]:
        return [
            (app["name"], s["user"]["name"])
            for app in client.get("/v1/apps").json()["apps"]
            for s in sessions(client, app["name"], active=True)
        ]

    assert poll(active, lambda found: found == [], timeout=5) == []
