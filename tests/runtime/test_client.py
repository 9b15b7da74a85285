"""The client SDK (``runtime.client``) and the CLI commands that talk to a server, without
a real server: ``AdminClient`` and the CLI against an in-memory fake of the HTTP API
(``httpx.MockTransport``), ``SessionClient`` against a tiny fake WebSocket server. The real
server is exercised end to end in ``tests/e2e/test_server_e2e.py``.
"""

from __future__ import annotations

import asyncio
import io
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from typer.testing import CliRunner, Result
from websockets.asyncio.server import ServerConnection, serve

from runtime import cli
from runtime.archive import read_archive
from runtime.client import (
    AdminClient,
    ChatfnClientError,
    ChatfnConnectionError,
    NoActiveSession,
    SessionAlreadyActive,
    SessionClient,
    SessionStartInProgress,
    connect_sync,
    pack_project,
    session_url,
)
from sandbox.errors import InvalidRequest

KEY = "test-admin-key-0123456789"
HANDLER = "def handle_event(event, context):\n    return None\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def write_project(root: Path, files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {"user_attempted_start_session.py": HANDLER}).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


# -- URLs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "app", "expected"),
    [
        ("http://127.0.0.1:8080", "default", "ws://127.0.0.1:8080/v1/apps/default/session"),
        ("https://chat.example.com/", "a", "wss://chat.example.com/v1/apps/a/session"),
        ("ws://h:1", "default", "ws://h:1/v1/apps/default/session"),
        ("wss://h", "default", "wss://h/v1/apps/default/session"),
        ("https://h/prefix/", "my-app", "wss://h/prefix/v1/apps/my-app/session"),
        ("HTTP://h:2", "a b/c", "ws://h:2/v1/apps/a%20b%2Fc/session"),
    ],
)
def test_session_url(url: str, app: str, expected: str) -> None:
    assert session_url(url, app) == expected


@pytest.mark.parametrize("url", ["ftp://h", "127.0.0.1:8080", "http://", ""])
def test_a_bad_url_is_a_clear_error(url: str) -> None:
    with pytest.raises(ChatfnClientError) as caught:
        session_url(url, "default")
    assert caught.value.code == "invalid_request"
    with pytest.raises(ChatfnClientError, match="not an http"):
        AdminClient(url, KEY)


# -- packing --------------------------------------------------------------------------------


def test_pack_project_holds_exactly_the_project_files(tmp_path: Path) -> None:
    root = write_project(
        tmp_path / "p",
        {
            "user_attempted_start_session.py": HANDLER,
            "init.py": "X = 1\n",
            "chatfn.toml": "[runtime]\ntimeout_ms = 1000\n",
            "requirements.in": "",
            "requirements.txt": "",
            "README.md": "not packed",
            "tests/test_it.py": "def test(): pass\n",
            ".env": "SECRET=1",
        },
    )
    data = pack_project(root)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = sorted(m.name for m in tar.getmembers())
        assert all(m.isfile() and m.mode == 0o644 and m.mtime == 0 for m in tar.getmembers())
    assert names == [
        "chatfn.toml",
        "init.py",
        "requirements.in",
        "requirements.txt",
        "user_attempted_start_session.py",
    ]
    # The server's reader gets the same project back.
    project = read_archive(data)
    assert project.files == {"init.py": "X = 1\n", "user_attempted_start_session.py": HANDLER}
    assert project.manifest == "[runtime]\ntimeout_ms = 1000\n"
    assert (project.requirements, project.lock) == ("", "")


def test_pack_project_is_deterministic(tmp_path: Path) -> None:
    root = write_project(tmp_path / "p")
    first = pack_project(root)
    time.sleep(0.01)
    (root / "user_attempted_start_session.py").write_text(HANDLER, encoding="utf-8")  # new mtime
    assert pack_project(root) == first


@pytest.mark.parametrize(
    ("files", "fragment"),
    [
        ({}, "no event handler files"),
        ({"helper.py": "X = 1\n"}, "helper.py is not an event handler"),
        (
            {"user_started_session.py": HANDLER, "chatfn.toml": "[runtime]\nbogus = 1\n"},
            "bogus",
        ),
    ],
)
def test_pack_project_checks_the_project_first(
    tmp_path: Path, files: dict[str, str], fragment: str
) -> None:
    root = tmp_path / "p"
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    with pytest.raises(InvalidRequest, match=fragment):
        pack_project(root)


def test_pack_project_of_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="is not a directory"):
        pack_project(tmp_path / "nope")


# -- a fake HTTP API ------------------------------------------------------------------------

Reply = tuple[int, Any]
Route = Callable[[httpx.Request], Reply]


class FakeApi:
    """Routes by (method, path): a callable, or a list of replies served in order (the
    last one repeats). Every request is recorded; a wrong key is a 401 as on the server."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route | list[Reply]] = {}
        self.requests: list[httpx.Request] = []

    def on(self, method: str, path: str, *replies: Reply | Route) -> None:
        if len(replies) == 1 and callable(replies[0]):
            self.routes[(method, path)] = replies[0]
        else:
            self.routes[(method, path)] = [r for r in replies if not callable(r)]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path != "/healthz" and request.headers.get("authorization") != (
            f"Bearer {KEY}"
        ):
            return error(401, "unauthorized", "wrong admin key")
        route = self.routes.get((request.method, request.url.raw_path.decode().split("?")[0]))
        if route is None:
            return error(404, "not_found", f"no route {request.method} {request.url.path}")
        if callable(route):
            status, body = route(request)
        else:
            status, body = route.pop(0) if len(route) > 1 else route[0]
        if body is None:
            return httpx.Response(status)
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    def sent(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path == path]

    def client(self, key: str | None = KEY, app: str = "default") -> AdminClient:
        return AdminClient("http://chatfn.test:8080", key, app, transport=httpx.MockTransport(self))


def error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


def body_of(request: httpx.Request) -> Any:
    return orjson.loads(request.content)


@pytest.fixture
def api() -> FakeApi:
    return FakeApi()


# -- AdminClient ----------------------------------------------------------------------------

USER = {
    "name": "ada",
    "display_name": "Ada",
    "is_guest": False,
    "properties": {},
    "created_at": "t",
}


@pytest.mark.parametrize(
    ("call", "method", "path", "body", "query"),
    [
        (lambda c: c.create_app("x"), "POST", "/v1/apps", {"name": "x"}, {}),
        (
            lambda c: c.create_app("x", guest_users="disabled"),
            "POST",
            "/v1/apps",
            {"name": "x", "guest_users": "disabled"},
            {},
        ),
        (lambda c: c.list_apps(), "GET", "/v1/apps", None, {}),
        (lambda c: c.get_app(), "GET", "/v1/apps/default", None, {}),
        (lambda c: c.get_app("other"), "GET", "/v1/apps/other", None, {}),
        (lambda c: c.settings(), "GET", "/v1/apps/default/settings", None, {}),
        (
            lambda c: c.update_settings(guest_users="disabled"),
            "PATCH",
            "/v1/apps/default/settings",
            {"guest_users": "disabled"},
            {},
        ),
        (lambda c: c.deployments(), "GET", "/v1/apps/default/deployments", None, {}),
        (lambda c: c.deployment(3), "GET", "/v1/apps/default/deployments/3", None, {}),
        (lambda c: c.activate(2), "POST", "/v1/apps/default/deployments/2/activate", None, {}),
        (lambda c: c.functions(), "GET", "/v1/apps/default/functions", None, {}),
        (
            lambda c: c.set_secret("API_KEY", "v"),
            "PUT",
            "/v1/apps/default/secrets/API_KEY",
            {"value": "v"},
            {},
        ),
        (lambda c: c.list_secrets(), "GET", "/v1/apps/default/secrets", None, {}),
        (lambda c: c.delete_secret("K"), "DELETE", "/v1/apps/default/secrets/K", None, {}),
        (lambda c: c.list_users(), "GET", "/v1/apps/default/users", None, {}),
        (
            lambda c: c.list_users(limit=5, after="bob"),
            "GET",
            "/v1/apps/default/users",
            None,
            {"limit": "5", "after": "bob"},
        ),
        (
            lambda c: c.create_user("ada", "Ada", properties={"p": 1}),
            "POST",
            "/v1/apps/default/users",
            {"name": "ada", "display_name": "Ada", "is_guest": False, "properties": {"p": 1}},
            {},
        ),
        (
            lambda c: c.create_user("g", is_guest=True),
            "POST",
            "/v1/apps/default/users",
            {"name": "g", "is_guest": True},
            {},
        ),
        (lambda c: c.get_user("a/b c"), "GET", "/v1/apps/default/users/a%2Fb%20c", None, {}),
        (
            lambda c: c.update_user("ada", display_name="A"),
            "PATCH",
            "/v1/apps/default/users/ada",
            {"display_name": "A"},
            {},
        ),
        (lambda c: c.delete_user("ada"), "DELETE", "/v1/apps/default/users/ada", None, {}),
        (lambda c: c.invocations(), "GET", "/v1/apps/default/invocations", None, {}),
        (
            lambda c: c.invocations(
                event="UserStartedSession",
                status="failed",
                since="2026-01-01T00:00:00+00:00",
                limit=7,
                before="cur~x",
            ),
            "GET",
            "/v1/apps/default/invocations",
            None,
            {
                "event": "UserStartedSession",
                "status": "failed",
                "since": "2026-01-01T00:00:00+00:00",
                "limit": "7",
                "before": "cur~x",
            },
        ),
        (lambda c: c.invocation("abc"), "GET", "/v1/apps/default/invocations/abc", None, {}),
        (lambda c: c.sessions(), "GET", "/v1/apps/default/sessions", None, {"active": "true"}),
        (
            lambda c: c.sessions(active=False),
            "GET",
            "/v1/apps/default/sessions",
            None,
            {"active": "false"},
        ),
        (
            lambda c: c.invoke_hook("UserStartedSession", {"session_id": "s"}),
            "POST",
            "/v1/apps/default/hooks/UserStartedSession",
            {"session_id": "s"},
            {},
        ),
        (lambda c: c.metrics(), "GET", "/metrics", None, {}),
        (lambda c: c.health(), "GET", "/healthz", None, {}),
    ],
)
def test_admin_client_routes(
    call: Callable[[AdminClient], Any],
    method: str,
    path: str,
    body: Any,
    query: dict[str, str],
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method in ("PUT", "DELETE"):
            return httpx.Response(204)
        if path == "/metrics":
            return httpx.Response(200, text="chatfn_x 1\n")
        return httpx.Response(200, json={"sessions": [], "apps": [], "deployments": []})

    with AdminClient("http://h:1", KEY, transport=httpx.MockTransport(handler)) as client:
        call(client)
    (request,) = seen
    assert (request.method, request.url.raw_path.decode().split("?")[0]) == (method, path)
    assert dict(request.url.params) == query
    assert request.headers["authorization"] == f"Bearer {KEY}"
    if body is None:
        assert request.content == b""
    else:
        assert body_of(request) == body
        assert request.headers["content-type"] == "application/json"


def test_admin_client_unwraps_lists_and_returns_json(api: FakeApi) -> None:
    api.on("GET", "/v1/apps/default/users", (200, {"users": [USER], "next": "ada"}))
    api.on("GET", "/v1/apps/default/secrets", (200, {"secrets": [{"name": "K"}]}))
    api.on("GET", "/metrics", (200, "chatfn_invocations_total 3\n"))
    with api.client() as client:
        assert client.list_users() == {"users": [USER], "next": "ada"}
        assert client.list_secrets() == [{"name": "K"}]
        assert client.metrics() == "chatfn_invocations_total 3\n"


def test_deploy_sends_a_directory_a_file_or_bytes(api: FakeApi, tmp_path: Path) -> None:
    api.on("POST", "/v1/apps/default/deployments", (202, {"version": 1, "status": "building"}))
    root = write_project(tmp_path / "p")
    archive = tmp_path / "p.zip"
    archive.write_bytes(b"PK\x03\x04zip")
    with api.client() as client:
        assert client.deploy(root) == {"version": 1, "status": "building"}
        client.deploy(archive)
        client.deploy(b"\x1f\x8bdata")
        with pytest.raises(ChatfnClientError, match="cannot read"):
            client.deploy(tmp_path / "missing.tar.gz")
    packed, zipped, raw = api.requests
    assert packed.content == pack_project(root)
    assert packed.headers["content-type"] == "application/gzip"
    assert (zipped.content, zipped.headers["content-type"]) == (b"PK\x03\x04zip", "application/zip")
    assert (raw.content, raw.headers["content-type"]) == (b"\x1f\x8bdata", "application/gzip")


def test_server_errors_become_client_errors(api: FakeApi) -> None:
    api.on(
        "GET",
        "/v1/apps/default/users/ghost",
        (404, {"error": {"code": "user_not_found", "message": "user 'ghost' does not exist"}}),
    )
    api.on("GET", "/v1/apps/default/settings", (502, "<html>Bad Gateway</html>"))
    api.on("GET", "/v1/apps/default/functions", (200, "not json"))
    api.on(
        "POST",
        "/v1/apps/default/deployments",
        (422, {"error": {"code": "deploy_rejected", "message": "m", "errors": [{"line": 1}]}}),
    )
    with api.client() as client:
        with pytest.raises(ChatfnClientError) as caught:
            client.get_user("ghost")
        assert (caught.value.code, caught.value.status) == ("user_not_found", 404)
        assert caught.value.message == str(caught.value) == "user 'ghost' does not exist"
        assert repr(caught.value) == (
            "ChatfnClientError('user_not_found', \"user 'ghost' does not exist\", status=404)"
        )
        with pytest.raises(ChatfnClientError) as caught:
            client.settings()
        assert (caught.value.code, caught.value.status) == ("http_error", 502)
        assert "HTTP 502" in caught.value.message and "Bad Gateway" in caught.value.message
        with pytest.raises(ChatfnClientError) as caught:
            client.functions()
        assert caught.value.code == "bad_response"
        with pytest.raises(ChatfnClientError) as caught:
            client.deploy(b"\x1f\x8b")
        assert caught.value.details == {"errors": [{"line": 1}]}


def test_the_key_comes_from_the_environment(api: FakeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    api.on("GET", "/v1/apps/default/settings", (200, {"guest_users": "enabled"}))
    monkeypatch.setenv("CHATFN_ADMIN_KEY", KEY)
    with api.client(key=None) as client:
        assert client.settings() == {"guest_users": "enabled"}
    monkeypatch.delenv("CHATFN_ADMIN_KEY")
    with api.client(key=None) as client, pytest.raises(ChatfnClientError) as caught:
        client.settings()
    assert "authorization" not in api.requests[-1].headers
    assert (caught.value.code, caught.value.status) == ("unauthorized", 401)


def test_the_key_is_never_in_a_repr_or_an_error(api: FakeApi) -> None:
    secret_key = "do-not-print-this-key-4242"
    texts: list[str] = []
    with api.client(key=secret_key) as client:
        texts += [repr(client), str(vars(client).get("_http"))]
        with pytest.raises(ChatfnClientError) as caught:
            client.settings()  # 401: the fake wants KEY
        texts += [str(caught.value), repr(caught.value)]
    closed = free_port()
    with AdminClient(f"http://127.0.0.1:{closed}", secret_key, timeout=2) as client:
        with pytest.raises(ChatfnConnectionError) as refused:
            client.settings()
        texts += [repr(client), str(refused.value), repr(refused.value)]
    assert refused.value.code == "connection_failed"
    assert f"cannot connect to http://127.0.0.1:{closed}" in refused.value.message
    assert "connection refused" in refused.value.message
    assert refused.value.__cause__ is None and refused.value.__suppress_context__
    for text in texts:
        assert secret_key not in text


def test_a_timeout_is_a_clear_error() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    transport = httpx.MockTransport(slow)
    with (
        AdminClient("http://h:1", KEY, transport=transport, timeout=3) as client,
        pytest.raises(ChatfnConnectionError) as caught,
    ):
        client.list_apps()
    assert caught.value.code == "timeout"
    assert caught.value.message == "http://h:1 did not answer GET /v1/apps within 3 s"


def deployment(status: str, **extra: Any) -> dict[str, Any]:
    info = {
        "version": 3,
        "status": status,
        "errors": [],
        "functions": ["UserAttemptedStartSession"],
        "created_at": "2026-01-01T00:00:00+00:00",
        "activated_at": None,
        "progress": None,
    }
    return {**info, **extra}


def test_wait_for_deployment_polls_until_active(api: FakeApi) -> None:
    path = "/v1/apps/default/deployments/3"
    api.on(
        "GET",
        path,
        (200, deployment("building", progress="installing 2 distributions")),
        (200, deployment("building", progress="starting")),
        (200, deployment("inactive")),  # built, a moment before it is activated
        (200, deployment("active", activated_at="2026-01-01T00:00:01+00:00")),
    )
    updates: list[str] = []
    with api.client() as client:
        final = client.wait_for_deployment(
            3, interval=0.001, on_update=lambda d: updates.append(d["progress"] or d["status"])
        )
    assert final["status"] == "active"
    assert updates == ["installing 2 distributions", "starting", "inactive", "active"]


def test_wait_for_deployment_returns_a_failure_and_gives_up_in_time(api: FakeApi) -> None:
    path = "/v1/apps/default/deployments/3"
    failed = deployment("failed", errors=[{"file": "a.py", "line": 1, "message": "bad"}])
    api.on("GET", path, (200, failed))
    with api.client() as client:
        assert client.wait_for_deployment(3, interval=0.001) == failed
        api.on("GET", path, (200, deployment("building")))
        with pytest.raises(ChatfnClientError, match=r"version 3 is still building after 0\.05 s"):
            client.wait_for_deployment(3, timeout=0.05, interval=0.01)
        # Replaced by a newer version before this poll: it was live once, so it is done.
        api.on("GET", path, (200, deployment("inactive", activated_at="t")))
        assert client.wait_for_deployment(3, interval=0.001)["status"] == "inactive"


# -- the CLI against the fake API -----------------------------------------------------------


@pytest.fixture
def server(api: FakeApi, monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    """The CLI's server commands talk to ``api``, with the right key in the environment."""

    def make(url: str, key: str, app_name: str) -> AdminClient:
        return AdminClient(url, key, app_name, transport=httpx.MockTransport(api))

    monkeypatch.setattr(cli, "make_admin_client", make)
    monkeypatch.setenv("CHATFN_ADMIN_KEY", KEY)
    monkeypatch.delenv("CHATFN_URL", raising=False)
    return api


def chatfn(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(cli.app, list(args), input=stdin)


def error_line(result: Result, *fragments: str) -> str:
    assert not isinstance(result.exception, Exception), repr(result.exception)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_deploy_uploads_the_project_and_waits_until_live(server: FakeApi, tmp_path: Path) -> None:
    root = write_project(tmp_path / "p")
    server.on("POST", "/v1/apps/default/deployments", (202, {"version": 3, "status": "building"}))
    server.on(
        "GET",
        "/v1/apps/default/deployments/3",
        (200, deployment("building", progress="starting")),
        (200, deployment("active")),
    )
    result = chatfn("deploy", str(root))
    assert result.exit_code == 0, result.output
    assert result.stdout == "version 3 is live\n"
    (upload,) = server.sent("POST", "/v1/apps/default/deployments")
    assert upload.content == pack_project(root)
    assert upload.headers["content-type"] == "application/gzip"
    assert str(upload.url).startswith("http://127.0.0.1:8080/")


def test_deploy_uses_url_and_app(
    server: FakeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_project(tmp_path / "p")
    server.on("POST", "/v1/apps/other/deployments", (202, {"version": 1, "status": "building"}))
    server.on("GET", "/v1/apps/other/deployments/1", (200, deployment("active", version=1)))
    monkeypatch.setenv("CHATFN_URL", "http://from-env:1")
    result = chatfn("deploy", str(root), "--app", "other")
    assert result.exit_code == 0, result.output
    assert str(server.requests[0].url).startswith("http://from-env:1/v1/apps/other/")
    result = chatfn("deploy", str(root), "--app", "other", "--url", "https://option:2")
    assert result.exit_code == 0, result.output
    assert str(server.requests[-1].url).startswith("https://option:2/v1/apps/other/")


def test_a_failed_deploy_prints_each_error_and_exits_1(server: FakeApi, tmp_path: Path) -> None:
    root = write_project(tmp_path / "p")
    server.on("POST", "/v1/apps/default/deployments", (202, {"version": 3, "status": "building"}))
    errors = [
        {"file": "user_attempted_start_session.py", "line": 2, "message": "SyntaxError: nope"},
        {"file": "init.py", "line": None, "message": "init.py failed"},
        {"file": None, "line": None, "message": "version 3 failed to start"},
    ]
    server.on("GET", "/v1/apps/default/deployments/3", (200, deployment("failed", errors=errors)))
    server.on("GET", "/v1/apps/default", (200, {"name": "default", "active_version": 2}))
    result = chatfn("deploy", str(root))
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "user_attempted_start_session.py:2: SyntaxError: nope",
        "init.py: init.py failed",
        "version 3 failed to start",
        "version 3 failed; version 2 is live",
    ]


def test_a_bad_project_is_refused_before_anything_is_sent(server: FakeApi, tmp_path: Path) -> None:
    root = write_project(tmp_path / "p", {"notes.py": "x = 1\n"})
    error_line(chatfn("deploy", str(root)), "notes.py is not an event handler")
    error_line(chatfn("deploy", str(tmp_path / "nope")), "is not a directory")
    assert server.requests == []


def test_a_refused_upload_is_one_line(server: FakeApi, tmp_path: Path) -> None:
    root = write_project(tmp_path / "p")
    server.on(
        "POST",
        "/v1/apps/default/deployments",
        (400, {"error": {"code": "invalid_request", "message": "the archive is not valid"}}),
    )
    error_line(chatfn("deploy", str(root)), "the archive is not valid")


@pytest.mark.parametrize(
    "args",
    [
        ["deploy", "DIR"],
        ["rollback", "1"],
        ["logs"],
        ["secrets", "set", "K", "v"],
        ["secrets", "list"],
        ["secrets", "delete", "K"],
        ["users", "list"],
        ["users", "get", "ada"],
        ["settings"],
    ],
)
def test_server_commands_need_the_admin_key(
    server: FakeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    monkeypatch.delenv("CHATFN_ADMIN_KEY")
    root = str(write_project(tmp_path / "p"))
    error_line(chatfn(*[root if a == "DIR" else a for a in args]), "CHATFN_ADMIN_KEY is not set")
    assert server.requests == []


@pytest.mark.parametrize("args", [["logs"], ["settings"], ["users", "list"], ["rollback", "2"]])
def test_a_server_that_is_not_running_is_one_line(
    monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    monkeypatch.setenv("CHATFN_ADMIN_KEY", KEY)
    url = f"http://127.0.0.1:{free_port()}"
    line = error_line(chatfn(*args, "--url", url), f"cannot connect to {url}", "chatfn serve")
    assert KEY not in line


def test_a_wrong_key_is_one_line(server: FakeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATFN_ADMIN_KEY", "a-wrong-key-but-long-enough")
    line = error_line(chatfn("secrets", "list"), "wrong admin key")
    assert "a-wrong-key" not in line


INVOCATIONS = [
    {
        "id": "b2",
        "app": "default",
        "event": "UserAttemptedStartSession",
        "deployment_version": 3,
        "status": "failed",
        "duration_ms": 2.345,
        "error": {"code": "access_denied", "message": "Wrong password"},
        "logs": "checking bob\nno match\n",
        "logs_truncated": False,
        "created_at": "2026-01-02T10:00:01.250000+00:00",
    },
    {
        "id": "a1",
        "app": "default",
        "event": "UserStartedSession",
        "deployment_version": 3,
        "status": "succeeded",
        "duration_ms": 1,
        "error": None,
        "logs": "",
        "logs_truncated": False,
        "created_at": "2026-01-02T10:00:00+00:00",
    },
]


def test_logs_prints_the_newest_invocations_oldest_first(server: FakeApi) -> None:
    server.on("GET", "/v1/apps/default/invocations", (200, {"invocations": INVOCATIONS}))
    result = chatfn("logs", "--event", "user_attempted_start_session", "--status", "failed")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "2026-01-02 10:00:00.000  a1  UserStartedSession  succeeded  1.0 ms",
        "2026-01-02 10:00:01.250  b2  UserAttemptedStartSession  failed  2.3 ms"
        "  access_denied: Wrong password",
        "    checking bob",
        "    no match",
    ]
    (request,) = server.requests
    assert dict(request.url.params) == {
        "event": "UserAttemptedStartSession",
        "status": "failed",
        "limit": "20",
    }


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--event", "UserDidSomething"], "unknown event type 'UserDidSomething'"),
        (["--status", "ok"], "--status must be 'succeeded' or 'failed'"),
        (["--limit", "0"], "--limit must be 1 to 1000"),
    ],
)
def test_logs_bad_options_are_one_line(server: FakeApi, args: list[str], fragment: str) -> None:
    error_line(chatfn("logs", *args), fragment)
    assert server.requests == []


def test_logs_follow_prints_new_invocations_until_interrupted(server: FakeApi) -> None:
    newer = {**INVOCATIONS[1], "id": "c3", "created_at": "2026-01-02T10:00:05+00:00"}
    pages = [
        {"invocations": [INVOCATIONS[1]], "next": None},
        # Polls repeat what was shown (the overlap); only c3 is new.
        {"invocations": [newer, INVOCATIONS[1]], "next": None},
        {"invocations": [newer], "next": None},
    ]

    def route(request: httpx.Request) -> Reply:
        if not pages:
            raise KeyboardInterrupt
        return 200, pages.pop(0)

    server.on("GET", "/v1/apps/default/invocations", route)
    result = chatfn("logs", "--follow", "--interval", "0.001")
    assert result.exit_code == 0, result.output
    assert [line.split("  ")[1] for line in result.stdout.splitlines()] == ["a1", "c3"]
    first, second, third = (dict(r.url.params) for r in server.requests[:3])
    assert "since" not in first
    assert second["since"] == "2026-01-02T09:59:55+00:00"  # the newest seen, less the overlap
    assert third["since"] == "2026-01-02T10:00:00+00:00"


def test_rollback(server: FakeApi) -> None:
    server.on("GET", "/v1/apps/default", (200, {"name": "default", "active_version": 3}))
    server.on(
        "POST",
        "/v1/apps/default/deployments/1/activate",
        (200, deployment("active", version=1)),
    )
    result = chatfn("rollback", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout == "version 1 is live (was 3)\n"
    server.on(
        "POST",
        "/v1/apps/default/deployments/9/activate",
        (404, {"error": {"code": "not_found", "message": "no deployment version 9"}}),
    )
    error_line(chatfn("rollback", "9"), "no deployment version 9")


def test_secrets_set_from_the_argument_or_stdin(server: FakeApi) -> None:
    server.on("PUT", "/v1/apps/default/secrets/API_KEY", (204, None))
    for args, stdin, value in (
        (["v-from-argument"], None, "v-from-argument"),
        ([], "v-from-stdin\n", "v-from-stdin"),
        ([], "two\nlines", "two\nlines"),
    ):
        result = chatfn("secrets", "set", "API_KEY", *args, stdin=stdin)
        assert result.exit_code == 0, result.output
        assert result.stdout == "set secret API_KEY\n"
        assert value not in result.output
        assert body_of(server.requests[-1]) == {"value": value}
    error_line(chatfn("secrets", "set", "API_KEY", stdin=""), "no value")
    assert len(server.requests) == 3


def test_secrets_list_and_delete(server: FakeApi) -> None:
    server.on(
        "GET",
        "/v1/apps/default/secrets",
        (200, {"secrets": [{"name": "A", "updated_at": "t1"}, {"name": "B", "updated_at": "t2"}]}),
    )
    server.on("DELETE", "/v1/apps/default/secrets/A", (204, None))
    assert chatfn("secrets", "list").stdout == "A\tt1\nB\tt2\n"
    deleted = chatfn("secrets", "delete", "A")
    assert (deleted.exit_code, deleted.stdout) == (0, "deleted secret A\n")


def test_users_and_settings_talk_to_the_server_by_default(server: FakeApi) -> None:
    guest = {**USER, "name": "g", "display_name": "g", "is_guest": True}
    server.on("GET", "/v1/apps/default/users", (200, {"users": [USER, guest], "next": "g"}))
    server.on("GET", "/v1/apps/default/users/ada", (200, USER))
    server.on(
        "GET",
        "/v1/apps/default/users/ghost",
        (404, {"error": {"code": "user_not_found", "message": "user 'ghost' does not exist"}}),
    )
    server.on("POST", "/v1/apps/default/users", (201, USER))
    server.on("PATCH", "/v1/apps/default/users/ada", (200, USER))
    server.on("DELETE", "/v1/apps/default/users/ada", (204, None))
    server.on("GET", "/v1/apps/default/settings", (200, {"guest_users": "enabled"}))
    server.on("PATCH", "/v1/apps/default/settings", (200, {"guest_users": "disabled"}))

    listed = chatfn("users", "list", "--limit", "2")
    assert listed.stdout == "ada\tAda\tt\ng\tg (guest)\tt\n"
    assert listed.stderr == "more: --after g\n"
    assert dict(server.requests[-1].url.params) == {"limit": "2"}
    assert orjson.loads(chatfn("users", "get", "ada").stdout) == USER
    error_line(chatfn("users", "get", "ghost"), "user 'ghost' does not exist")
    created = chatfn("users", "create", "ada", "--display-name", "Ada", "--properties", '{"a": 1}')
    assert created.exit_code == 0, created.output
    assert body_of(server.requests[-1]) == {
        "name": "ada",
        "display_name": "Ada",
        "is_guest": False,
        "properties": {"a": 1},
    }
    assert chatfn("users", "update", "ada", "--display-name", "A").exit_code == 0
    assert body_of(server.requests[-1]) == {"display_name": "A"}
    assert chatfn("users", "delete", "ada").stdout == "deleted ada\n"
    assert orjson.loads(chatfn("settings").stdout) == {"guest_users": "enabled"}
    changed = chatfn("settings", "--guest-users", "disabled")
    assert orjson.loads(changed.stdout) == {"guest_users": "disabled"}
    assert body_of(server.requests[-1]) == {"guest_users": "disabled"}


def test_dev_watches_exactly_what_a_deploy_packs(tmp_path: Path) -> None:
    root = write_project(tmp_path / "p", {"user_started_session.py": HANDLER, "README.md": "x"})
    before = cli.project_snapshot(root)
    assert sorted(before) == ["user_started_session.py"]
    (root / "README.md").write_text("changed", encoding="utf-8")
    (root / "sub").mkdir()
    (root / "sub" / "x.py").write_text("", encoding="utf-8")
    assert cli.project_snapshot(root) == before
    (root / "chatfn.toml").write_text("", encoding="utf-8")
    (root / "user_started_session.py").write_text(HANDLER + "\n", encoding="utf-8")
    after = cli.project_snapshot(root)
    assert cli.changed_files(before, after) == ["chatfn.toml", "user_started_session.py"]
    (root / "user_started_session.py").unlink()
    assert cli.changed_files(after, cli.project_snapshot(root)) == ["user_started_session.py"]
    assert cli.project_snapshot(tmp_path / "gone") == {}


def test_dev_refuses_a_port_in_use_and_a_missing_directory(tmp_path: Path) -> None:
    root = write_project(tmp_path / "p")
    error_line(chatfn("dev", str(tmp_path / "nope")), "is not a directory")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        error_line(chatfn("dev", str(root), "--port", str(port)), f"port {port} is in use")


# -- SessionClient against a fake WebSocket server ------------------------------------------


class FakeSessionServer:
    """Answers like the real endpoint, with a few usernames that misbehave on purpose:
    ``slow`` is answered after 0.3 s, ``mute`` never, ``drop`` closes the socket (1011),
    ``rejected`` is refused. Before each ``session_started`` it sends a reply with a foreign
    id, which the client must ignore. App ``nope`` is closed with 4404."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.port = 0
        self.url = ""

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        if ws.request.path == "/v1/apps/nope/session":
            await ws.close(4404, "no app named 'nope'")
            return
        async for raw in ws:
            message = orjson.loads(raw)
            self.received.append(message)
            request_id = message.get("id")
            if message["type"] == "start_session":
                username = message["username"]
                if username == "mute":
                    continue
                if username == "drop":
                    await ws.close(1011, "boom")
                    return
                if username == "slow":
                    await asyncio.sleep(0.3)
                if username == "rejected":
                    error = {"code": "access_denied", "message": "No entry for rejected"}
                    await ws.send(orjson.dumps({"type": "error", "id": request_id, "error": error}))
                    continue
                await ws.send(orjson.dumps({"type": "session_started", "id": 999, "session": {}}))
                session = {"id": "s-1", "user": {"name": username}, "started_at": "t"}
                reply = {"type": "session_started", "id": request_id, "session": session}
                await ws.send(orjson.dumps(reply).decode())
            elif message["type"] == "end_session":
                await ws.send(orjson.dumps({"type": "session_ended", "id": request_id}).decode())


@pytest.fixture
def ws_server() -> Iterator[FakeSessionServer]:
    """The fake, on its own event loop thread (so the sync facade can use it too)."""
    fake = FakeSessionServer()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: list[asyncio.Future[None]] = []

    async def main() -> None:
        async with serve(fake.handler, "127.0.0.1", 0) as server:
            fake.port = next(iter(server.sockets)).getsockname()[1]
            fake.url = f"http://127.0.0.1:{fake.port}"
            stop.append(loop.create_future())
            ready.set()
            await stop[0]

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield fake
    loop.call_soon_threadsafe(stop[0].set_result, None)
    thread.join(10)
    loop.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_start_and_end_a_session(ws_server: FakeSessionServer) -> None:
    async def scenario() -> None:
        async with await SessionClient.connect(ws_server.url, "default") as client:
            result = await client.start_session("ada", {"password": "pw"})
            assert result.succeeded and not result.failed and result.error is None
            assert result.session == {"id": "s-1", "user": {"name": "ada"}, "started_at": "t"}
            assert client.session == result.session
            assert await client.end_session() is None
            assert client.session is None
            again = await client.start_session("ada")  # a new session after the end
            assert again.succeeded
        assert client.closed

    run(scenario())
    assert ws_server.received == [
        {"type": "start_session", "id": 1, "username": "ada", "auth_params": {"password": "pw"}},
        {"type": "end_session", "id": 2},
        {"type": "start_session", "id": 3, "username": "ada", "auth_params": {}},
    ]


def test_a_rejected_session_is_a_failed_result(ws_server: FakeSessionServer) -> None:
    async def scenario() -> None:
        async with await SessionClient.connect(ws_server.url) as client:
            result = await client.start_session("rejected")
            assert result.failed and not result.succeeded and result.session is None
            assert result.error is not None
            assert (result.error.code, result.error.message) == (
                "access_denied",
                "No entry for rejected",
            )
            assert str(result.error) == "access_denied: No entry for rejected"
            assert client.session is None
            with pytest.raises(NoActiveSession):
                await client.end_session()
            assert (await client.start_session("ada")).succeeded  # the connection is still good

    run(scenario())


def test_state_rules_raise_before_anything_is_sent(ws_server: FakeSessionServer) -> None:
    async def scenario() -> None:
        async with await SessionClient.connect(ws_server.url) as client:
            with pytest.raises(NoActiveSession) as no_session:
                await client.end_session()
            assert no_session.value.code == "no_active_session"
            starting = asyncio.create_task(client.start_session("slow"))
            await asyncio.sleep(0.05)
            with pytest.raises(SessionStartInProgress) as in_progress:
                await client.start_session("other")
            assert in_progress.value.code == "session_start_in_progress"
            with pytest.raises(SessionStartInProgress):
                await client.end_session()
            assert (await starting).succeeded
            with pytest.raises(SessionAlreadyActive) as active:
                await client.start_session("other")
            assert active.value.code == "session_active"
            await client.end_session()
            with pytest.raises(NoActiveSession):
                await client.end_session()

    run(scenario())
    assert [m["type"] for m in ws_server.received] == ["start_session", "end_session"]
    assert ws_server.received[0]["username"] == "slow"


def test_a_dropped_connection_fails_the_pending_call(ws_server: FakeSessionServer) -> None:
    async def scenario() -> None:
        client = await SessionClient.connect(ws_server.url)
        with pytest.raises(ChatfnConnectionError) as caught:
            await client.start_session("drop")
        assert caught.value.code == "connection_closed"
        assert caught.value.message == "the server closed the connection with code 1011 (boom)"
        assert client.closed and client.session is None
        with pytest.raises(ChatfnConnectionError, match="code 1011"):
            await client.start_session("ada")
        await client.close()
        await client.close()  # idempotent

    run(scenario())


def test_an_unknown_app_is_not_found(ws_server: FakeSessionServer) -> None:
    async def scenario() -> None:
        client = await SessionClient.connect(ws_server.url, "nope")
        try:
            with pytest.raises(ChatfnConnectionError) as caught:
                await client.start_session("ada")
            assert caught.value.code == "not_found"
            assert caught.value.message == f"no app named 'nope' on {ws_server.url}"
        finally:
            await client.close()

    run(scenario())


def test_a_call_without_an_answer_times_out_and_closes(ws_server: FakeSessionServer) -> None:
    async def scenario() -> None:
        client = await SessionClient.connect(ws_server.url, timeout=0.2)
        with pytest.raises(ChatfnClientError) as caught:
            await client.start_session("mute")
        assert caught.value.code == "timeout"
        assert caught.value.message == "no answer to start_session within 0.2 s"
        assert client.closed
        with pytest.raises(ChatfnConnectionError, match="closed by the client"):
            await client.start_session("ada")

    run(scenario())


def test_closing_the_client_fails_a_pending_call(ws_server: FakeSessionServer) -> None:
    async def scenario() -> None:
        client = await SessionClient.connect(ws_server.url)
        pending = asyncio.create_task(client.start_session("mute"))
        await asyncio.sleep(0.05)
        await client.close()
        with pytest.raises(ChatfnConnectionError, match="closed by the client"):
            await pending

    run(scenario())


def test_connecting_to_nothing_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"

    async def scenario() -> None:
        with pytest.raises(ChatfnConnectionError) as caught:
            await SessionClient.connect(url)
        assert caught.value.code == "connection_failed"
        assert caught.value.message.startswith(f"cannot connect to {url}: ")

    run(scenario())
    with pytest.raises(ChatfnConnectionError, match=f"cannot connect to {url}"):
        connect_sync(url)


def test_the_sync_facade(ws_server: FakeSessionServer) -> None:
    with connect_sync(ws_server.url, "default") as client:
        assert repr(client).startswith("SyncSessionClient(")
        result = client.start_session("ada", {"k": "v"})
        assert result.succeeded and client.session == result.session
        with pytest.raises(SessionAlreadyActive):
            client.start_session("ada")
        client.end_session()
        with pytest.raises(NoActiveSession):
            client.end_session()
        rejected = client.start_session("rejected")
        assert rejected.failed and rejected.error is not None
        assert rejected.error.code == "access_denied"
    assert client.closed
    with pytest.raises(ChatfnConnectionError):
        client.start_session("ada")
    client.close()  # idempotent
