"""``chatfn invoke`` and the example project in functions/, through the real sandbox."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from runtime.cli import app
from runtime.invoke import invoke_project
from sandbox.errors import InvalidRequest

EXAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "password_functions"


def test_example_accepts_the_right_password_and_creates_the_user() -> None:
    result = invoke_project(
        EXAMPLE,
        "UserAttemptedStartSession",
        {"username": "alice", "auth_params": {"password": "pw"}},
        secrets={"DEMO_PASSWORD": "pw"},
    )
    assert result.succeeded and result.result == {"welcome": "alice"}
    assert "created user alice" in result.logs


def test_example_rejects_a_wrong_password_with_its_message() -> None:
    result = invoke_project(
        EXAMPLE,
        "user_attempted_start_session",
        {"username": "alice", "auth_params": {"password": "guess"}},
        secrets={"DEMO_PASSWORD": "pw"},
    )
    assert result.error is not None
    assert (result.error.code, result.error.message) == ("access_denied", "Wrong password")


def test_example_does_not_recreate_an_existing_user() -> None:
    result = invoke_project(
        EXAMPLE, "UserAttemptedStartSession", {"username": "bob"}, users=["bob"]
    )
    assert result.succeeded and "created" not in result.logs


@pytest.mark.parametrize(
    ("event", "payload", "message"),
    [
        ("Nope", {}, "unknown event type"),
        ("UserAttemptedStartSession", {"username": 5}, "username"),
        ("UserAttemptedStartSession", {"username": "a", "auth_params": []}, "auth_params"),
        ("UserEndedSession", {"user": {}, "session_id": "s", "reason": "x"}, "reason"),
    ],
)
def test_bad_inputs_are_invalid_requests(event: str, payload: object, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        invoke_project(EXAMPLE, event, payload)


def test_cli_json_output_and_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(
        app, ["invoke", str(EXAMPLE), "UserAttemptedStartSession", "--data",
              '{"username": "carol"}', "--json"],
    )  # fmt: skip
    assert ok.exit_code == 0, ok.output
    out = orjson.loads(ok.stdout)
    assert out["status"] == "succeeded" and out["error"] is None
    assert set(out) == {"status", "error", "result", "logs", "duration_ms"}
    rejected = runner.invoke(
        app, ["invoke", str(EXAMPLE), "UserAttemptedStartSession", "--data",
              '{"username": "c", "auth_params": {"password": "x"}}', "--secret",
              "DEMO_PASSWORD=y"],
    )  # fmt: skip
    assert rejected.exit_code == 1 and "access_denied: Wrong password" in rejected.stdout
    (tmp_path / "helper.py").write_text("X = 1\n")
    bad = runner.invoke(
        app, ["invoke", str(tmp_path), "UserAttemptedStartSession", "--data", '{"username": "a"}']
    )
    assert bad.exit_code == 2 and "helper.py is not an event handler" in bad.output
    bad_json = runner.invoke(app, ["invoke", str(EXAMPLE), "UserStartedSession", "--data", "{"])
    assert bad_json.exit_code == 2 and "not valid JSON" in bad_json.output
