"""The ``chatfn`` command line: ``init``, ``invoke`` (the session outcome matrix, ``--json``,
exit codes) and ``users``/``settings --local`` against a local SQLite database.

Exit codes: 0 success, 1 the handler or the session failed, 2 bad input or any other error,
reported as one ``error: ...`` line on stderr and never a traceback.
(``tests/runtime/test_invoke.py`` covers the example project through ``invoke``;
``tests/runtime/test_client.py`` and ``tests/e2e/`` the commands that talk to a server.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner, Result

from runtime.cli import app
from runtime.core import Runtime

SCAFFOLD_FILES = (
    "chatfn.toml",
    "requirements.in",
    "user_attempted_start_session.py",
    "tests/test_user_attempted_start_session.py",
)

# UserAttemptedStartSession handlers for the outcome matrix.
ACCEPTS = """\
def handle_event(event, context):
    print("checked", event.username)
    return {"checked": event.username}
"""
CREATES = """\
def handle_event(event, context):
    if not context.users.check_user_exists(event.username):
        context.users.create_user(event.username, display_name="New " + event.username)
    return None
"""
REJECTS = """\
def handle_event(event, context):
    raise SessionRejected("No entry for " + event.username)
"""
CRASHES = """\
def handle_event(event, context):
    print("about to fail")
    raise ValueError("a detail for the log only")
"""
STARTED_ONLY = """\
def handle_event(event, context):
    context.log("started", event.session_id)
"""
ATTEMPTED = "user_attempted_start_session.py"


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never the developer's own database: the default location is under tmp_path."""
    monkeypatch.delenv("CHATFN_DATABASE_URL", raising=False)
    monkeypatch.setenv("CHATFN_DATA_DIR", str(tmp_path / "data"))


def chatfn(*args: str, env: Mapping[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def assert_error_line(result: Result, *fragments: str) -> str:
    """Exit 2 with exactly one ``error: ...`` line on stderr, nothing on stdout, and no
    exception other than the exit itself."""
    assert not isinstance(result.exception, Exception), repr(result.exception)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def project(root: Path, files: Mapping[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        (root / name).write_text(source, encoding="utf-8")
    return root


def json_outcome(result: Result) -> dict[str, Any]:
    """The one JSON object ``invoke --json`` prints, alone on stdout."""
    assert not isinstance(result.exception, Exception), repr(result.exception)
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    out = orjson.loads(lines[0])
    assert isinstance(out, dict)
    return out


# -- chatfn init ------------------------------------------------------------------------------


def test_init_creates_the_project_files(tmp_path: Path) -> None:
    target = tmp_path / "new" / "project"
    result = chatfn("init", str(target))
    assert result.exit_code == 0, result.output
    for name in SCAFFOLD_FILES:
        assert (target / name).is_file(), name
        assert f"created {target / name}" in result.stdout
    assert "chatfn invoke" in result.stdout  # what to do next


def test_init_into_an_existing_empty_directory(tmp_path: Path) -> None:
    result = chatfn("init", str(tmp_path))
    assert result.exit_code == 0, result.output
    written = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()]
    assert sorted(written) == sorted(SCAFFOLD_FILES)


def test_init_refuses_to_overwrite_and_names_the_file(tmp_path: Path) -> None:
    mine = tmp_path / ATTEMPTED
    mine.write_text("# my own handler\n", encoding="utf-8")
    result = chatfn("init", str(tmp_path))
    line = assert_error_line(result, ATTEMPTED, "not overwriting")
    assert "chatfn.toml" not in line
    assert mine.read_text(encoding="utf-8") == "# my own handler\n"
    # Nothing was written: the check comes before the first file.
    assert sorted(p.name for p in tmp_path.iterdir()) == [ATTEMPTED]


def test_init_refuses_a_path_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("x", encoding="utf-8")
    assert_error_line(chatfn("init", str(target)), "not a directory")


def test_the_scaffolded_project_runs_under_invoke(tmp_path: Path) -> None:
    assert chatfn("init", str(tmp_path)).exit_code == 0
    data = '{"username": "ada", "auth_params": {"password": "s3cret"}}'
    ok = chatfn(
        "invoke", str(tmp_path), "UserAttemptedStartSession", "--data", data,
        "--secret", "APP_PASSWORD=s3cret", "--guest-users", "disabled", "--json",
    )  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert json_outcome(ok)["status"] == "succeeded"
    wrong = chatfn(
        "invoke", str(tmp_path), "UserAttemptedStartSession", "--data", data,
        "--secret", "APP_PASSWORD=other", "--json",
    )  # fmt: skip
    assert wrong.exit_code == 1
    assert json_outcome(wrong)["error"] == {"code": "access_denied", "message": "Wrong password"}


def test_the_scaffolded_projects_own_tests_pass(tmp_path: Path) -> None:
    target = tmp_path / "project"
    assert chatfn("init", str(target)).exit_code == 0
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTEST_ADDOPTS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTEST_PLUGINS")
    }
    done = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-W", "error", "--strict-markers",
            "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'basetemp'}",
        ],
        cwd=target, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


# -- chatfn invoke: the outcome of a session start ----------------------------------------------


@pytest.mark.parametrize(
    ("handler", "guest_users", "users", "status", "code"),
    [
        # The handler accepts without creating the user: the user must exist afterwards.
        (ACCEPTS, "enabled", [], "succeeded", None),
        (ACCEPTS, "disabled", [], "failed", "user_not_found"),
        (ACCEPTS, "disabled", ["zed"], "succeeded", None),
        (ACCEPTS, "enabled", ["zed"], "succeeded", None),
        (ACCEPTS, "disabled", ["amy", "zed"], "succeeded", None),
        (ACCEPTS, "disabled", ["amy"], "failed", "user_not_found"),
        # The handler creates the user: guests disabled does not matter.
        (CREATES, "disabled", [], "succeeded", None),
        (CREATES, "disabled", ["zed"], "succeeded", None),
        # The handler rejects: nothing else matters.
        (REJECTS, "enabled", [], "failed", "access_denied"),
        (REJECTS, "disabled", ["zed"], "failed", "access_denied"),
        (CRASHES, "enabled", ["zed"], "failed", "function_error"),
        # No UserAttemptedStartSession handler: guests decide, an existing user or not.
        (None, "enabled", [], "succeeded", None),
        (None, "disabled", [], "failed", "access_denied"),
        (None, "disabled", ["zed"], "failed", "access_denied"),
    ],
)
def test_invoke_session_outcome_matrix(
    tmp_path: Path,
    handler: str | None,
    guest_users: str,
    users: list[str],
    status: str,
    code: str | None,
) -> None:
    files = {"user_started_session.py": STARTED_ONLY}
    if handler is not None:
        files[ATTEMPTED] = handler
    root = project(tmp_path / "p", files)
    args = ["invoke", str(root), "UserAttemptedStartSession", "--data", '{"username": "zed"}']
    args += ["--guest-users", guest_users, "--json"]
    for name in users:
        args += ["--user", name]
    result = chatfn(*args)
    out = json_outcome(result)
    assert result.exit_code == (0 if status == "succeeded" else 1)
    assert out["status"] == status
    if code is None:
        assert out["error"] is None
    else:
        assert out["error"]["code"] == code
    if handler is ACCEPTS:  # it ran, whatever happened after it
        assert out["result"] == {"checked": "zed"}
        assert out["logs"] == "checked zed\n"
    if handler is None:
        assert (out["result"], out["logs"]) == (None, "")


def test_invoke_json_has_exactly_the_documented_keys(tmp_path: Path) -> None:
    root = project(tmp_path / "p", {ATTEMPTED: REJECTS})
    result = chatfn(
        "invoke", str(root), "UserAttemptedStartSession", "--data", '{"username": "eve"}',
        "--json",
    )  # fmt: skip
    out = json_outcome(result)
    assert result.exit_code == 1
    assert set(out) == {"status", "error", "result", "logs", "duration_ms"}
    assert out["status"] == "failed"
    assert out["error"] == {"code": "access_denied", "message": "No entry for eve"}
    assert out["result"] is None
    assert out["logs"] == ""
    assert isinstance(out["duration_ms"], int | float) and out["duration_ms"] >= 0


def test_invoke_json_result_is_the_handlers_return_value(tmp_path: Path) -> None:
    handler = """\
def handle_event(event, context):
    print("ending", event.session_id)
    return {"reason": event.reason, "user": event.user["name"], "n": [1, 2.5, None, True]}
"""
    root = project(tmp_path / "p", {"user_ended_session.py": handler})
    data = '{"user": {"name": "kim"}, "session_id": "s-1", "reason": "disconnected"}'
    result = chatfn("invoke", str(root), "user_ended_session", "--data", data, "--json")
    out = json_outcome(result)
    assert result.exit_code == 0
    assert out == {
        "status": "succeeded",
        "error": None,
        "result": {"reason": "disconnected", "user": "kim", "n": [1, 2.5, None, True]},
        "logs": "ending s-1\n",
        "duration_ms": out["duration_ms"],
    }


def test_invoke_function_error_keeps_details_in_the_logs(tmp_path: Path) -> None:
    root = project(tmp_path / "p", {ATTEMPTED: CRASHES})
    result = chatfn(
        "invoke", str(root), "UserAttemptedStartSession", "--data", '{"username": "a"}', "--json"
    )
    out = json_outcome(result)
    assert result.exit_code == 1
    assert out["error"]["code"] == "function_error"
    assert "a detail for the log only" not in out["error"]["message"]
    assert "invocation" in out["error"]["message"]
    assert out["logs"].startswith("about to fail\n")
    assert "ValueError: a detail for the log only" in out["logs"]
    assert f'File "{ATTEMPTED}", line 3' in out["logs"]


def test_invoke_redacts_secrets_from_the_logs(tmp_path: Path) -> None:
    handler = """\
def handle_event(event, context):
    print("key is", context.secrets["API_KEY"])
    return len(context.secrets["API_KEY"])
"""
    root = project(tmp_path / "p", {"user_started_session.py": handler})
    data = '{"user": {"name": "a"}, "session_id": "s"}'
    result = chatfn(
        "invoke", str(root), "UserStartedSession", "--data", data,
        "--secret", "API_KEY=hunter2-very-secret", "--json",
    )  # fmt: skip
    assert result.exit_code == 0
    out = json_outcome(result)
    assert out["result"] == len("hunter2-very-secret")
    assert "hunter2-very-secret" not in result.stdout


def test_invoke_text_output_shows_logs_then_the_session(tmp_path: Path) -> None:
    root = project(tmp_path / "p", {ATTEMPTED: ACCEPTS})
    data = '{"username": "zed"}'
    guest = chatfn("invoke", str(root), "UserAttemptedStartSession", "--data", data)
    assert guest.exit_code == 0, guest.output
    logs, sep, summary = guest.stdout.partition("---\n")
    assert (logs, sep) == ("checked zed\n", "---\n")
    assert summary.startswith("succeeded in ") and " ms: " in summary
    session = orjson.loads(summary.split(" ms: ", 1)[1])
    assert session["user"]["name"] == "zed"
    assert session["user"]["is_guest"] is True

    existing = chatfn(
        "invoke", str(root), "UserAttemptedStartSession", "--data", data, "--user", "zed"
    )
    assert existing.exit_code == 0
    session = orjson.loads(existing.stdout.splitlines()[-1].split(" ms: ", 1)[1])
    assert session["user"]["is_guest"] is False

    refused = chatfn(
        "invoke", str(root), "UserAttemptedStartSession", "--data", data,
        "--guest-users", "disabled",
    )  # fmt: skip
    assert refused.exit_code == 1
    last = refused.stdout.splitlines()[-1]
    assert last.startswith("failed in ")
    assert last.endswith("user_not_found: the user does not exist and guest users are disabled")


def test_invoke_a_missing_non_blocking_handler_fails(tmp_path: Path) -> None:
    root = project(tmp_path / "p", {ATTEMPTED: ACCEPTS})
    data = '{"user": {"name": "a"}, "session_id": "s"}'
    result = chatfn("invoke", str(root), "UserStartedSession", "--data", data, "--json")
    assert result.exit_code == 1
    assert json_outcome(result)["error"]["code"] == "not_deployed"


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--data", "{"], ["--data is not valid JSON"]),
        (["--data", "[1, 2]"], ["--data must be a JSON object"]),
        (["--data", '"zed"'], ["--data must be a JSON object"]),
        (["--data", "{}"], ["username"]),
        (["--data", '{"username": 5}'], ["username"]),
        (["--data", '{"username": "a", "extra": 1}'], ["extra"]),
        (["--data", '{"username": "a", "auth_params": [1]}'], ["auth_params"]),
        (["--guest-users", "maybe"], ["guest_users must be 'enabled' or 'disabled'"]),
        (["--guest-users", "Disabled"], ["guest_users must be 'enabled' or 'disabled'"]),
        (["--secret", "NO_EQUALS_SIGN"], ["--secret expects NAME=VALUE"]),
        (["--secret", "=value"], ["--secret expects NAME=VALUE"]),
        (["--secret", "1BAD=value"], ["secret name"]),
        (["--user", "zed", "--user", "zed"], ["already exists"]),
        (["--user", ""], ["username must be 1 to 256 characters"]),
    ],
)
def test_invoke_bad_input_exits_2_with_one_line(
    tmp_path: Path, extra: list[str], fragments: list[str]
) -> None:
    root = project(tmp_path / "p", {ATTEMPTED: ACCEPTS})
    args = ["invoke", str(root), "UserAttemptedStartSession"]
    if "--data" not in extra:
        args += ["--data", '{"username": "zed"}']
    assert_error_line(chatfn(*args, *extra), *fragments)


def test_invoke_an_unknown_event_names_the_known_ones(tmp_path: Path) -> None:
    root = project(tmp_path / "p", {ATTEMPTED: ACCEPTS})
    result = chatfn("invoke", str(root), "UserDidSomething", "--data", "{}")
    assert_error_line(result, "unknown event type 'UserDidSomething'", "UserAttemptedStartSession")


def test_invoke_a_missing_directory(tmp_path: Path) -> None:
    result = chatfn("invoke", str(tmp_path / "nope"), "UserAttemptedStartSession")
    assert_error_line(result, "nope is not a directory")


def test_invoke_a_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    source = "def handle_event(event, context):\n    return (\n"
    root = project(tmp_path / "p", {ATTEMPTED: source})
    result = chatfn("invoke", str(root), "UserAttemptedStartSession", "--data", '{"username": "a"}')
    assert_error_line(result, f"{ATTEMPTED}:2", "SyntaxError")


def test_invoke_an_async_handler_is_rejected(tmp_path: Path) -> None:
    root = project(
        tmp_path / "p", {ATTEMPTED: "async def handle_event(event, context):\n    pass\n"}
    )
    result = chatfn("invoke", str(root), "UserAttemptedStartSession", "--data", '{"username": "a"}')
    assert_error_line(result, f"{ATTEMPTED}:1")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ('{"username": ""}', "username must be 1 to 256 characters"),
        ('{"username": "a\\u0007b"}', "control characters"),
        ('{"username": "' + "x" * 257 + '"}', "username must be 1 to 256 characters"),
        ('{"username": "a", "auth_params": {"k": "' + "x" * 70_000 + '"}}', "auth_params"),
    ],
    ids=["empty-username", "control-character", "long-username", "large-auth-params"],
)
def test_invoke_an_invalid_session_request_is_bad_input(
    tmp_path: Path, data: str, fragment: str
) -> None:
    """The payload is well-typed but breaks a session rule (DESIGN section 6, step 1): that is
    bad input, like an ill-typed payload, so exit 2 and one line, not a session failure."""
    root = project(tmp_path / "p", {ATTEMPTED: ACCEPTS})
    result = chatfn("invoke", str(root), "UserAttemptedStartSession", "--data", data)
    assert_error_line(result, fragment)


# -- chatfn users and chatfn settings against a local database ----------------------------------


def local(*args: str, env: Mapping[str, str | None] | None = None) -> Result:
    """A ``users``/``settings`` command on the local database (``--local``)."""
    return chatfn(*args, "--local", env=env)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/x.db"


def json_of(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    value = orjson.loads(result.stdout)
    assert isinstance(value, dict)
    return value


def listed(result: Result) -> list[list[str]]:
    assert result.exit_code == 0, result.output
    return [line.split("\t") for line in result.stdout.splitlines()]


def test_users_create_get_list_update_delete(db_url: str) -> None:
    db = ("--database-url", db_url)
    assert listed(local("users", "list", *db)) == []

    ada = json_of(
        local(
            "users", "create", "ada", "--display-name", "Ada L.",
            "--properties", '{"plan": "pro", "n": [1, 2]}', *db,
        )
    )  # fmt: skip
    assert ada["name"] == "ada" and ada["display_name"] == "Ada L."
    assert ada["is_guest"] is False
    assert ada["properties"] == {"plan": "pro", "n": [1, 2]}
    assert set(ada) == {"name", "display_name", "is_guest", "properties", "created_at"}

    bob = json_of(local("users", "create", "bob", "--guest", *db))
    assert (bob["display_name"], bob["is_guest"], bob["properties"]) == ("bob", True, {})

    # Each command opens the database afresh: the state is in the file.
    assert json_of(local("users", "get", "ada", *db)) == ada
    assert listed(local("users", "list", *db)) == [
        ["ada", "Ada L.", ada["created_at"]],
        ["bob", "bob (guest)", bob["created_at"]],
    ]
    assert [row[0] for row in listed(local("users", "list", "--limit", "1", *db))] == ["ada"]
    assert [row[0] for row in listed(local("users", "list", "--after", "ada", *db))] == ["bob"]

    renamed = json_of(local("users", "update", "ada", "--display-name", "Countess", *db))
    assert renamed == {**ada, "display_name": "Countess"}
    replaced = json_of(local("users", "update", "ada", "--properties", '{"plan": "free"}', *db))
    assert replaced == {**ada, "display_name": "Countess", "properties": {"plan": "free"}}
    assert json_of(local("users", "get", "ada", *db)) == replaced

    deleted = local("users", "delete", "bob", *db)
    assert deleted.exit_code == 0 and deleted.stdout == "deleted bob\n"
    assert [row[0] for row in listed(local("users", "list", *db))] == ["ada"]
    assert_error_line(local("users", "get", "bob", *db), "no user named 'bob'")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["users", "create", "ada"], ["user 'ada' already exists"]),
        (["users", "create", "new", "--properties", "{bad"], ["--properties is not valid JSON"]),
        (["users", "create", "new", "--properties", "[1]"], ["--properties must be a JSON object"]),
        (["users", "create", "a\tb"], ["control characters"]),
        (["users", "create", ""], ["username must be 1 to 256 characters"]),
        (["users", "update", "ada", "--properties", "nope"], ["--properties is not valid JSON"]),
        (["users", "update", "ada"], ["nothing to change"]),
        (["users", "update", "nobody", "--display-name", "X"], ["user 'nobody' does not exist"]),
        (["users", "get", "nobody"], ["no user named 'nobody'"]),
        (["users", "delete", "nobody"], ["user 'nobody' does not exist"]),
        (["users", "list", "--limit", "0"], ["limit must be 1 to 1000"]),
        (["users", "list", "--app", "other"], ["no app named 'other'"]),
        (["users", "list", "--app", "Not An App"], ["app name"]),
        (["settings", "--guest-users", "sometimes"], ["guest_users must be 'enabled' or"]),
        (["settings", "--app", "other"], ["no app named 'other'"]),
    ],
)
def test_local_database_errors_are_one_line(
    db_url: str, args: list[str], fragments: list[str]
) -> None:
    assert local("users", "create", "ada", "--database-url", db_url).exit_code == 0
    assert_error_line(local(*args, "--database-url", db_url), *fragments)
    # A failed command changes nothing.
    assert [row[0] for row in listed(local("users", "list", "--database-url", db_url))] == ["ada"]


def test_settings_show_and_change_guest_users(db_url: str) -> None:
    db = ("--database-url", db_url)
    assert json_of(local("settings", *db)) == {"guest_users": "enabled"}
    assert json_of(local("settings", "--guest-users", "disabled", *db)) == {
        "guest_users": "disabled"
    }
    assert json_of(local("settings", *db)) == {"guest_users": "disabled"}
    with Runtime(db_url) as runtime:
        assert runtime.app("default").settings() == {"guest_users": "disabled"}
    assert json_of(local("settings", "--guest-users", "enabled", *db)) == {"guest_users": "enabled"}
    assert json_of(local("settings", *db)) == {"guest_users": "enabled"}


def test_the_database_url_can_come_from_the_environment(tmp_path: Path) -> None:
    env = {"CHATFN_DATABASE_URL": f"sqlite:///{tmp_path}/env.db"}
    assert json_of(local("users", "create", "ada", env=env))["name"] == "ada"
    assert json_of(local("settings", "--guest-users", "disabled", env=env))
    assert json_of(local("users", "get", "ada", env=env))["name"] == "ada"
    assert (tmp_path / "env.db").is_file()
    # The same file through the option.
    other = ("--database-url", f"sqlite:///{tmp_path}/env.db")
    assert json_of(local("settings", *other)) == {"guest_users": "disabled"}
    assert not (tmp_path / "data").exists()  # the default location was never touched


def test_the_option_wins_over_the_environment(tmp_path: Path) -> None:
    env = {"CHATFN_DATABASE_URL": f"sqlite:///{tmp_path}/env.db"}
    option = ("--database-url", f"sqlite:///{tmp_path}/option.db")
    assert local("users", "create", "ada", *option, env=env).exit_code == 0
    assert listed(local("users", "list", env=env)) == []
    assert [row[0] for row in listed(local("users", "list", *option, env=env))] == ["ada"]


def test_without_a_url_the_database_is_in_the_data_dir(tmp_path: Path) -> None:
    assert local("users", "create", "ada").exit_code == 0
    assert (tmp_path / "data" / "chatfn.db").is_file()
    assert [row[0] for row in listed(local("users", "list"))] == ["ada"]


def test_users_are_per_app(db_url: str) -> None:
    with Runtime(db_url) as runtime:
        runtime.create_app("other")
    db = ("--database-url", db_url)
    assert local("users", "create", "ada", "--app", "other", *db).exit_code == 0
    assert local("users", "create", "bob", *db).exit_code == 0
    assert [row[0] for row in listed(local("users", "list", "--app", "other", *db))] == ["ada"]
    assert [row[0] for row in listed(local("users", "list", *db))] == ["bob"]
    assert json_of(local("settings", "--app", "other", "--guest-users", "disabled", *db))
    assert json_of(local("settings", *db)) == {"guest_users": "enabled"}


@pytest.mark.parametrize("command", [["users", "list"], ["settings"]], ids=["users", "settings"])
@pytest.mark.parametrize("kind", ["unparseable-url", "not-a-database-file", "a-directory"])
def test_a_database_that_cannot_be_opened_is_one_line(
    tmp_path: Path, kind: str, command: list[str]
) -> None:
    if kind == "unparseable-url":
        url = "not a url"
    elif kind == "not-a-database-file":
        garbage = tmp_path / "garbage.db"
        garbage.write_bytes(b"this is not a SQLite database file, not even close" * 100)
        url = f"sqlite:///{garbage}"
    else:
        url = f"sqlite:///{tmp_path}"
    assert_error_line(local(*command, "--database-url", url), "database")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["users", "list", "--database-url", "sqlite:///x.db"], "--database-url needs --local"),
        (["settings", "--database-url", "sqlite:///x.db"], "--database-url needs --local"),
        (["users", "list", "--local", "--url", "http://h:1"], "--url cannot be used with --local"),
        (["settings", "--local", "--url", "http://h:1"], "--url cannot be used with --local"),
    ],
)
def test_local_and_server_options_do_not_mix(
    tmp_path: Path, args: list[str], fragment: str
) -> None:
    """Without ``--local`` these commands talk to a server; a database option there (or a
    server option with ``--local``) is a mistake, not something to ignore silently."""
    assert_error_line(chatfn(*args, env={"CHATFN_ADMIN_KEY": "k" * 20}), fragment)
    assert not (tmp_path / "x.db").exists()


def test_the_database_url_environment_variable_does_not_make_a_command_local(
    tmp_path: Path,
) -> None:
    env = {"CHATFN_DATABASE_URL": f"sqlite:///{tmp_path}/env.db", "CHATFN_ADMIN_KEY": None}
    assert_error_line(chatfn("users", "list", env=env), "CHATFN_ADMIN_KEY is not set")
    assert not (tmp_path / "env.db").exists()
