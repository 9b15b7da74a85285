"""End to end: a real ``chatfn serve`` subprocess (one per module, its own SQLite file and
data directory), driven through the client SDK and the CLI as a user would.

Each test works on its own app, so the tests do not depend on each other's state.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from typer.testing import CliRunner, Result

from runtime.cli import app as cli_app
from runtime.client import (
    AdminClient,
    ChatfnClientError,
    ChatfnConnectionError,
    SessionAlreadyActive,
    SessionClient,
    connect_sync,
    pack_project,
)
from sandbox.policy import LAYERS

KEY = "e2e-admin-key-0123456789abcdef"
STARTUP_TIMEOUT_S = 60.0

GATE = """\
def handle_event(event, context):
    print("checking", event.username)
    if event.auth_params.get("password") != context.secrets["PASSWORD"]:
        raise SessionRejected("Wrong password for " + event.username)
    if not context.users.check_user_exists(event.username):
        context.users.create_user(event.username, display_name="Member " + event.username)
"""
ACCEPTS = """\
def handle_event(event, context):
    print("version", VERSION)
    return VERSION
"""


@dataclass(frozen=True)
class Server:
    url: str
    log: Path

    def admin(self, app: str = "default", key: str | None = KEY) -> AdminClient:
        return AdminClient(self.url, key, app)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("e2e")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATFN_")}
    env.update(CHATFN_ADMIN_KEY=KEY, CHATFN_DATA_DIR=str(tmp))
    log = tmp / "serve.log"
    command = [
        sys.executable, "-m", "runtime.cli", "serve", "--port", str(port),
        "--database", f"sqlite:///{tmp}/x.db", "--no-example",
    ]  # fmt: skip
    with log.open("wb") as out:
        child = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        with AdminClient(url, KEY) as probe:
            while True:
                assert child.poll() is None, log.read_text(errors="replace")
                try:
                    probe.health()
                    break
                except ChatfnConnectionError:
                    assert time.monotonic() < deadline, log.read_text(errors="replace")
                    time.sleep(0.05)
        yield Server(url, log)
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert child.returncode in (0, -signal.SIGTERM), log.read_text(errors="replace")
    assert "Traceback" not in log.read_text(errors="replace")


@pytest.fixture(autouse=True)
def no_ambient_chatfn_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CHATFN_ADMIN_KEY", "CHATFN_URL", "CHATFN_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)


def chatfn(server: Server, *args: str, stdin: str | None = None, key: str | None = KEY) -> Result:
    env = {"CHATFN_ADMIN_KEY": key, "CHATFN_URL": server.url}
    return CliRunner().invoke(cli_app, list(args), input=stdin, env=env)


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result.stdout


def error_line(result: Result) -> str:
    assert not isinstance(result.exception, Exception), repr(result.exception)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def project(root: Path, **sources: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for stem, text in sources.items():
        (root / f"{stem}.py").write_text(text, encoding="utf-8")
    return root


def new_app(server: Server, name: str, **settings: str) -> AdminClient:
    client = server.admin(name)
    created = client.create_app(name, **settings)
    assert created == {
        "name": name,
        "settings": {"guest_users": settings.get("guest_users", "enabled")},
        "active_version": None,
    }
    return client


# -- health, metrics, keys ------------------------------------------------------------------


def test_health_needs_no_key_and_metrics_do(server: Server) -> None:
    with server.admin(key=None) as anonymous:
        health = anonymous.health()
        assert health["status"] == "ok"
        # The sandbox layers the server probed at start (all of them, on this machine).
        assert set(health["sandbox"]) == set(LAYERS)
        assert health["sandbox"]["seccomp"] and health["sandbox"]["landlock"]
        assert set(health["sandbox_off"]) == {k for k, on in health["sandbox"].items() if not on}
        if os.geteuid() == 0:
            assert all(health["sandbox"].values()), health["sandbox"]
        with pytest.raises(ChatfnClientError) as caught:
            anonymous.metrics()
    assert (caught.value.code, caught.value.status) == ("unauthorized", 401)
    with server.admin() as admin:
        text = admin.metrics()
    assert "chatfn_invocations" in text


def test_a_wrong_or_missing_key_is_401(server: Server) -> None:
    with server.admin(key="not-the-key-but-long-enough") as wrong:
        with pytest.raises(ChatfnClientError) as caught:
            wrong.list_apps()
        assert (caught.value.code, caught.value.status) == ("unauthorized", 401)
        assert caught.value.message == "wrong admin key"
    with server.admin(key=None) as missing:
        with pytest.raises(ChatfnClientError) as caught:
            missing.settings()
        assert (caught.value.code, caught.value.status) == ("unauthorized", 401)
        assert "missing admin key" in caught.value.message
    with httpx.Client() as http:
        raw = http.get(f"{server.url}/v1/apps", headers={"Authorization": "Basic abc"})
    assert raw.status_code == 401
    assert raw.json()["error"]["code"] == "unauthorized"
    # The CLI: one line, never the key.
    line = error_line(chatfn(server, "secrets", "list", key="not-the-key-but-long-enough"))
    assert line == "error: wrong admin key"
    assert "CHATFN_ADMIN_KEY is not set" in error_line(chatfn(server, "logs", key=None))


def test_creating_an_app_twice_is_409(server: Server) -> None:
    new_app(server, "twice").close()
    with server.admin() as admin, pytest.raises(ChatfnClientError) as caught:
        admin.create_app("twice")
    assert (caught.value.code, caught.value.status) == ("already_exists", 409)
    with server.admin() as admin:
        names = [a["name"] for a in admin.list_apps()]
    assert "twice" in names and "default" in names


# -- sessions -------------------------------------------------------------------------------


def test_a_guest_session_over_the_websocket(server: Server) -> None:
    with new_app(server, "guests") as admin:
        with connect_sync(server.url, "guests") as client:
            result = client.start_session("alice")
            assert result.succeeded, result.error
            assert result.session is not None
            assert result.session["user"]["name"] == "alice"
            assert result.session["user"]["is_guest"] is True
            with pytest.raises(SessionAlreadyActive):
                client.start_session("alice")
            active = admin.sessions()
            assert [s["id"] for s in active] == [result.session["id"]]
            client.end_session()
            assert admin.sessions() == []
        assert admin.get_user("alice")["is_guest"] is True
        ended = admin.sessions(active=False)
        assert [s.get("end_reason") for s in ended] == ["ended"]


def test_a_dropped_connection_ends_its_session(server: Server) -> None:
    async def scenario() -> str:
        client = await SessionClient.connect(server.url, "guests-drop")
        result = await client.start_session("bob")
        assert result.session is not None
        await client.close()
        return str(result.session["id"])

    with new_app(server, "guests-drop") as admin:
        session_id = asyncio.run(scenario())
        deadline = time.monotonic() + 10
        while admin.sessions():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (ended,) = admin.sessions(active=False)
        assert (ended["id"], ended["end_reason"]) == (session_id, "disconnected")


def test_a_rejected_session_carries_the_handlers_message(server: Server, tmp_path: Path) -> None:
    root = project(tmp_path / "gate", user_attempted_start_session=GATE)
    with new_app(server, "gate") as admin:
        assert ok(chatfn(server, "secrets", "set", "PASSWORD", "--app", "gate", stdin="pw\n"))
        assert ok(chatfn(server, "deploy", str(root), "--app", "gate")) == "version 1 is live\n"
        with connect_sync(server.url, "gate") as client:
            rejected = client.start_session("bob", {"password": "guess"})
            assert rejected.failed and rejected.error is not None
            assert (rejected.error.code, rejected.error.message) == (
                "access_denied",
                "Wrong password for bob",
            )
            accepted = client.start_session("bob", {"password": "pw"})
            assert accepted.succeeded and accepted.session is not None
            assert accepted.session["user"]["display_name"] == "Member bob"
            assert accepted.session["user"]["is_guest"] is False
            client.end_session()

        # The invocation log, through the SDK and the CLI.
        page = admin.invocations(event="UserAttemptedStartSession", status="failed")
        (failed,) = page["invocations"]
        assert failed["error"] == {"code": "access_denied", "message": "Wrong password for bob"}
        assert failed["logs"] == "checking bob\n"
        assert admin.invocation(failed["id"]) == failed
        out = ok(chatfn(server, "logs", "--app", "gate", "--event", "user_attempted_start_session"))
        lines = out.splitlines()
        assert len(lines) == 4, out
        assert lines[0].endswith("  access_denied: Wrong password for bob")
        assert f"  {failed['id']}  UserAttemptedStartSession  failed  " in lines[0]
        assert lines[1] == "    checking bob"
        assert "  UserAttemptedStartSession  succeeded  " in lines[2]
        assert lines[3] == "    checking bob"
        only_failed = ok(chatfn(server, "logs", "--app", "gate", "--status", "failed"))
        assert len(only_failed.splitlines()) == 2

        # The hook API runs the same handler for an external session server.
        hook = admin.invoke_hook(
            "UserAttemptedStartSession", {"username": "carol", "auth_params": {"password": "no"}}
        )
        assert hook["status"] == "failed"
        assert hook["error"] == {"code": "access_denied", "message": "Wrong password for carol"}
        with pytest.raises(ChatfnClientError) as caught:
            admin.invoke_hook("UserAttemptedStartSession", {"nope": 1})
        assert (caught.value.code, caught.value.status) == ("invalid_request", 400)


def test_guests_disabled(server: Server, tmp_path: Path) -> None:
    with new_app(server, "closed") as admin:
        settings = chatfn(server, "settings", "--app", "closed", "--guest-users", "disabled")
        assert orjson.loads(ok(settings)) == {"guest_users": "disabled"}
        assert orjson.loads(ok(chatfn(server, "settings", "--app", "closed"))) == {
            "guest_users": "disabled"
        }
        with connect_sync(server.url, "closed") as client:
            nobody = client.start_session("zed")
            assert nobody.error is not None and nobody.error.code == "access_denied"
            # A handler that accepts without creating the user: the user must exist.
            root = project(tmp_path / "p", user_attempted_start_session=ACCEPTS)
            (root / "init.py").write_text("VERSION = 1\n", encoding="utf-8")
            assert ok(chatfn(server, "deploy", str(root), "--app", "closed"))
            missing = client.start_session("zed")
            assert missing.error is not None and missing.error.code == "user_not_found"
            ok(chatfn(server, "users", "create", "zed", "--app", "closed"))
            assert client.start_session("zed").succeeded
        assert [u["name"] for u in admin.list_users()["users"]] == ["zed"]


def test_an_unknown_app_closes_the_socket(server: Server) -> None:
    with (
        pytest.raises(ChatfnConnectionError) as caught,
        connect_sync(server.url, "no-such-app") as client,
    ):
        client.start_session("ada")
    assert caught.value.code == "not_found"
    assert "no app named 'no-such-app'" in caught.value.message


# -- deployments ----------------------------------------------------------------------------


def test_deploy_a_failure_then_rollback(server: Server, tmp_path: Path) -> None:
    root = project(tmp_path / "p", user_attempted_start_session=ACCEPTS)
    init = root / "init.py"
    with new_app(server, "versions") as admin:
        init.write_text("VERSION = 1\n", encoding="utf-8")
        assert ok(chatfn(server, "deploy", str(root), "--app", "versions")) == "version 1 is live\n"
        init.write_text("VERSION = (\n", encoding="utf-8")
        broken = chatfn(server, "deploy", str(root), "--app", "versions")
        assert broken.exit_code == 1, broken.output
        first, last = broken.stdout.splitlines()
        assert first.startswith("init.py:1: SyntaxError")
        assert last == "version 2 failed; version 1 is live"
        init.write_text("VERSION = 3\n", encoding="utf-8")
        assert ok(chatfn(server, "deploy", str(root), "--app", "versions")) == "version 3 is live\n"
        assert admin.functions()["init"] == "VERSION = 3\n"

        assert ok(chatfn(server, "rollback", "1", "--app", "versions")) == (
            "version 1 is live (was 3)\n"
        )
        assert admin.get_app()["active_version"] == 1
        code = admin.functions()
        assert (code["version"], code["init"]) == (1, "VERSION = 1\n")
        assert [f["event"] for f in code["functions"]] == ["UserAttemptedStartSession"]
        payload = {"username": "u", "auth_params": {}}
        assert admin.invoke_hook("UserAttemptedStartSession", payload)["result"] == 1
        statuses = {d["version"]: d["status"] for d in admin.deployments()}
        assert statuses == {1: "active", 2: "failed", 3: "inactive"}
        assert [d["version"] for d in admin.deployments()] == [3, 2, 1]

        assert "is failed" in error_line(chatfn(server, "rollback", "2", "--app", "versions"))
        assert "no deployment version 9" in error_line(
            chatfn(server, "rollback", "9", "--app", "versions")
        )


def test_a_bad_archive_is_400(server: Server, tmp_path: Path) -> None:
    with new_app(server, "archives") as admin:
        for body, kind in ((b"not an archive", "application/gzip"), (b"PK\x03\x04", None)):
            with pytest.raises(ChatfnClientError) as caught:
                admin.deploy(body, content_type=kind or "application/zip")
            assert (caught.value.code, caught.value.status) == ("invalid_request", 400)
        with pytest.raises(ChatfnClientError) as caught:
            admin.deploy(pack_project(project(tmp_path / "p", user_started_session=ACCEPTS)),
                         content_type="text/plain")  # fmt: skip
        assert caught.value.status == 400
        assert admin.deployments() == []


# -- isolation between apps -----------------------------------------------------------------


def test_one_apps_objects_are_not_found_through_another(server: Server, tmp_path: Path) -> None:
    root = project(tmp_path / "p", user_attempted_start_session=ACCEPTS)
    (root / "init.py").write_text("VERSION = 1\n", encoding="utf-8")
    with new_app(server, "iso-a") as a, new_app(server, "iso-b") as b:
        assert ok(chatfn(server, "deploy", str(root), "--app", "iso-a"))
        a.create_user("ada")
        a.set_secret("TOKEN", "value-of-a")
        inv = a.invoke_hook("UserAttemptedStartSession", {"username": "ada"})
        with connect_sync(server.url, "iso-a") as client:
            session = client.start_session("ada").session
            assert session is not None

            checks: list[tuple[Callable[[], object], str]] = [
                (lambda: b.get_user("ada"), "user_not_found"),
                (lambda: b.delete_user("ada"), "user_not_found"),
                (lambda: b.invocation(inv["invocation_id"]), "not_found"),
                (lambda: b.deployment(1), "not_found"),
                (lambda: b.activate(1), "not_found"),
                (lambda: b.delete_secret("TOKEN"), "not_found"),
            ]
            for call, code in checks:
                with pytest.raises(ChatfnClientError) as caught:
                    call()
                assert (caught.value.code, caught.value.status) == (code, 404)
            assert b.list_users()["users"] == []
            assert b.list_secrets() == []
            assert b.sessions() == []
            assert b.invocations()["invocations"] == []
            assert b.functions()["version"] is None
        # And it is all still there in its own app.
        assert a.get_user("ada")["name"] == "ada"
        assert [s["name"] for s in a.list_secrets()] == ["TOKEN"]
        assert a.invocation(inv["invocation_id"])["app"] == "iso-a"
    with server.admin("no-such-app") as ghost, pytest.raises(ChatfnClientError) as caught:
        ghost.settings()
    assert (caught.value.code, caught.value.status) == ("not_found", 404)


# -- CLI users and secrets against the server -----------------------------------------------


def test_cli_users_and_secrets(server: Server) -> None:
    new_app(server, "people").close()
    ada = orjson.loads(
        ok(chatfn(server, "users", "create", "ada", "--app", "people", "--properties", '{"a": 1}'))
    )
    assert (ada["name"], ada["properties"], ada["is_guest"]) == ("ada", {"a": 1}, False)
    ok(chatfn(server, "users", "create", "bob", "--guest", "--app", "people"))
    assert [line.split("\t")[0] for line in ok(
        chatfn(server, "users", "list", "--app", "people")
    ).splitlines()] == ["ada", "bob"]  # fmt: skip
    page = chatfn(server, "users", "list", "--app", "people", "--limit", "1")
    assert ok(page).startswith("ada\t") and page.stderr == "more: --after ada\n"
    renamed = ok(chatfn(server, "users", "update", "ada", "--display-name", "A", "--app", "people"))
    assert orjson.loads(renamed)["display_name"] == "A"
    assert "user 'ada' already exists" in error_line(
        chatfn(server, "users", "create", "ada", "--app", "people")
    )
    assert ok(chatfn(server, "users", "delete", "bob", "--app", "people")) == "deleted bob\n"
    assert "'bob'" in error_line(chatfn(server, "users", "get", "bob", "--app", "people"))

    assert ok(chatfn(server, "secrets", "set", "K1", "v1", "--app", "people"))
    assert ok(chatfn(server, "secrets", "set", "K2", "--app", "people", stdin="v2"))
    listed = ok(chatfn(server, "secrets", "list", "--app", "people"))
    assert [line.split("\t")[0] for line in listed.splitlines()] == ["K1", "K2"]
    assert "v1" not in listed and "v2" not in listed
    assert ok(chatfn(server, "secrets", "delete", "K1", "--app", "people"))
    assert ok(chatfn(server, "secrets", "list", "--app", "people")).startswith("K2\t")
