"""``chatfn serve`` at start: the sandbox layers it probes, and refusing to start without a
required one."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from runtime.cli import app
from runtime.server.serve import describe_layers, prepare
from sandbox import cgroups
from sandbox.errors import ChatfnError
from sandbox.isolation import SandboxSettings
from sandbox.policy import LAYERS


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("CHATFN_DATABASE_URL", raising=False)
    for name in ("CHATFN_SANDBOX_REQUIRE", "CHATFN_SANDBOX_LAYERS", "CHATFN_SANDBOX_UIDS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CHATFN_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_start_probes_and_describes_every_layer() -> None:
    state, _shown = prepare(None, example=None, sandbox=SandboxSettings())
    try:
        text = describe_layers(state.isolation)
    finally:
        state.close()
        state.runtime.close()
    lines = text.splitlines()
    assert [line.split()[0] for line in lines] == list(LAYERS)
    for line, layer in zip(lines, LAYERS, strict=True):
        on = state.isolation.on[layer]
        assert line.split()[1] == ("on" if on else "off"), line
        if not on:
            assert line.endswith(f"({state.isolation.why_off[layer]})")
        elif layer in state.isolation.detail:
            assert line.endswith(f"on ({state.isolation.detail[layer]})")


def test_a_missing_required_layer_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine lacks cgroups (as a machine without delegated cgroups would): with
    cgroup required, the server does not start, and says which layer and why."""
    monkeypatch.setattr(
        cgroups, "detect", lambda: cgroups.Support(None, "no writable cgroup hierarchy")
    )
    settings = SandboxSettings(require=frozenset({"cgroup", "seccomp"}))
    with pytest.raises(ChatfnError) as caught:
        prepare(None, example=None, sandbox=settings)
    assert caught.value.message == (
        "refusing to start: required sandbox layer(s) cgroup not available: "
        "cgroup: no writable cgroup hierarchy (CHATFN_SANDBOX_REQUIRE)"
    )


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"CHATFN_SANDBOX_REQUIRE": "seccomp,firewall"}, "unknown sandbox layer(s) firewall"),
        (
            {"CHATFN_SANDBOX_LAYERS": "seccomp", "CHATFN_SANDBOX_REQUIRE": "landlock"},
            "layer(s) landlock are required but turned off by CHATFN_SANDBOX_LAYERS",
        ),
        ({"CHATFN_SANDBOX_UIDS": "12"}, "CHATFN_SANDBOX_UIDS: expected FIRST-LAST"),
    ],
)
def test_bad_sandbox_settings_stop_serve_with_one_line(env: dict[str, str], fragment: str) -> None:
    result = CliRunner().invoke(app, ["serve", "--port", "1", "--no-example"], env=env)
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_require_sandbox_option_is_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cgroups, "detect", lambda: cgroups.Support(None, "none here"))
    result = CliRunner().invoke(
        app, ["serve", "--port", "1", "--no-example", "--require-sandbox", "all"]
    )
    assert result.exit_code == 2, result.output
    assert "refusing to start: required sandbox layer(s) cgroup not available" in result.stderr
