"""The layer settings and report: parsing the operator's settings, each layer turned off by
the policy being reported so, and a required layer that is off refusing the boot."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox import Deployment, Policy, WorkerPool, cgroups, landlock, seccomp
from sandbox.errors import DeployRejected
from sandbox.isolation import (
    Isolation,
    SandboxSettings,
    UidRange,
    parse_layers,
)
from sandbox.policy import ALL_LAYERS, LAYERS, PolicyError
from sandbox.process import LayersMissing, Zygote

CODE = {"h.py": "def handle_event(event, context):\n    return 'ok'\n"}
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and the uid need root")


def test_layer_lists() -> None:
    assert parse_layers("all") == ALL_LAYERS
    assert parse_layers("none") == parse_layers("") == frozenset()
    assert parse_layers(" seccomp, landlock ") == {"seccomp", "landlock"}
    with pytest.raises(PolicyError, match=r"unknown sandbox layer.*selinux.*known: all, none"):
        parse_layers("seccomp,selinux")


def test_uid_range() -> None:
    uids = UidRange.parse("200000-200009")
    assert uids.for_app(1) == 200001 and uids.for_app(9) == 200009
    with pytest.raises(PolicyError, match="app id 10 does not fit the uid range 200000-200009"):
        uids.for_app(10)
    for bad in ("200000", "a-b", "-5-10", "10-20", "300-200000", "5000-4000"):
        with pytest.raises(PolicyError, match="CHATFN_SANDBOX_UIDS"):
            UidRange.parse(bad)


def test_settings_from_the_environment() -> None:
    settings = SandboxSettings.from_env({})
    assert settings.layers == ALL_LAYERS and settings.require == frozenset()
    settings = SandboxSettings.from_env(
        {
            "CHATFN_SANDBOX_LAYERS": "seccomp,landlock,uid",
            "CHATFN_SANDBOX_REQUIRE": "seccomp",
            "CHATFN_SANDBOX_UIDS": "500000-599999",
        }
    )
    assert settings.layers == {"seccomp", "landlock", "uid"}
    assert settings.require == {"seccomp"} and settings.uids.first == 500000
    with pytest.raises(PolicyError, match=r"CHATFN_SANDBOX_REQUIRE: layer.*cgroup.*turned off"):
        SandboxSettings.from_env(
            {"CHATFN_SANDBOX_LAYERS": "seccomp", "CHATFN_SANDBOX_REQUIRE": "seccomp,cgroup"}
        )
    with pytest.raises(PolicyError, match="CHATFN_SANDBOX_REQUIRE: unknown sandbox layer"):
        SandboxSettings.from_env({"CHATFN_SANDBOX_REQUIRE": "firewall"})


def test_a_report_from_a_template_is_read_as_untrusted_data() -> None:
    report = Isolation.from_dict(
        {
            "on": {"seccomp": True, "landlock": "yes", "made_up": True},
            "why_off": {"uid": "x" * 10_000, "cgroup": 5},
            "detail": {"seccomp": "y" * 1000, "landlock": "ABI 9", "uid": "z"},
        }
    )
    assert report.detail == {"seccomp": "y" * 300}  # only for layers that are on
    assert report.on["seccomp"] and not report.on["landlock"]
    assert set(report.on) == set(LAYERS)
    assert len(report.why_off["uid"]) == 300
    assert report.why_off["cgroup"] == "not reported"
    assert Isolation.from_dict("junk").missing(["seccomp"]) == ["seccomp"]


def test_the_report_names_what_is_on_and_why_the_rest_is_off(tmp_path: Path) -> None:
    zygote = Zygote(CODE, Policy(), Deployment("a", 1, CODE).limits, str(tmp_path))
    tmp_path.chmod(0o711)
    zygote.start()
    try:
        report = zygote.report
    finally:
        zygote.stop()
    assert set(report.on) == set(LAYERS)
    for layer in LAYERS:
        assert report.on[layer] or report.why_off[layer], layer
    assert report.on["rlimits"]
    assert report.on["landlock"] == (landlock.abi_version() > 0)
    if report.on["landlock"]:
        assert report.detail["landlock"] == f"ABI {landlock.abi_version()}"
    if report.on["cgroup"]:
        assert report.detail["cgroup"] == f"cgroup {cgroups.detect().backend}"
    assert report.on["cgroup"] == (os.geteuid() == 0 and cgroups.detect().backend is not None)
    if os.geteuid() == 0:
        for layer in ("uid", "pid_namespace", "ipc_namespace", "mount_namespace", "seccomp"):
            assert report.on[layer], report.why_off.get(layer)
    else:
        assert report.why_off["uid"] == "needs root"


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_the_policy_turns_off_is_reported_off(layer: str) -> None:
    policy = Policy().with_layers(ALL_LAYERS - {layer})
    with WorkerPool() as pool:
        d = Deployment("a", 1, CODE, policy=policy)
        assert pool.invoke(d, "h", {}).value == "ok"
        report = pool.pools()[d.key].zygote.report
    assert not report.on[layer]
    assert report.why_off[layer] == "turned off by the policy"


def test_outbound_apps_get_no_network_namespace() -> None:
    with WorkerPool() as pool:
        d = Deployment("a", 1, CODE, Deployment("a", 1, CODE).limits.with_(network="outbound"))
        assert pool.invoke(d, "h", {}).value == "ok"
        report = pool.pools()[d.key].zygote.report
    assert report.why_off["network_namespace"] == 'the app\'s network is "outbound"'


@root_only
def test_a_required_layer_that_is_off_refuses_the_boot() -> None:
    policy = Policy().with_layers(ALL_LAYERS - {"landlock"}, require={"landlock", "seccomp"})
    with WorkerPool() as pool:
        with pytest.raises(DeployRejected) as caught:
            pool.prepare(Deployment("a", 1, CODE, policy=policy))
        assert pool.pools() == {}
        message = caught.value.message
        assert "required sandbox layer(s) landlock not available" in message
        assert "landlock: turned off by the policy" in message
        # Everything required and present: boots.
        ok = Policy().with_layers(ALL_LAYERS, require={"seccomp", "uid", "pid_namespace"})
        assert pool.invoke(Deployment("a", 2, CODE, policy=ok), "h", {}).value == "ok"


@root_only
def test_no_layers_at_all_still_runs_handlers() -> None:
    with WorkerPool() as pool:
        d = Deployment("a", 1, CODE, policy=Policy().with_layers(frozenset()))
        assert pool.invoke(d, "h", {}).value == "ok"
        assert not any(pool.pools()[d.key].zygote.report.on.values())


UNPRIVILEGED = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from sandbox import Deployment, WorkerPool
with WorkerPool() as pool:
    d = Deployment("a", 1, {"h.py": "def handle_event(event, context):\\n    return 7\\n"})
    result = pool.invoke(d, "h", {})
    report = pool.pools()[d.key].zygote.report
    print(json.dumps({"euid": os.geteuid(), "value": result.value, "on": report.on,
                      "why_off": report.why_off}))
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare")
def test_without_root_the_unprivileged_layers_still_hold() -> None:
    """Run by an unprivileged uid (in a user namespace of its own, so it can still read this
    checkout): Landlock and seccomp need no privilege; what needs root says so."""
    home = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        ["unshare", "--user", sys.executable, "-c", UNPRIVILEGED, home],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"no user namespaces here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["euid"] != 0 and out["value"] == 7
    assert out["on"]["seccomp"] == seccomp.supported()
    assert out["on"]["landlock"] == (landlock.abi_version() > 0)
    for layer in ("uid", "pid_namespace", "ipc_namespace", "mount_namespace"):
        assert not out["on"][layer] and out["why_off"][layer] == "needs root"


def test_a_dead_template_takes_its_workers_and_restarts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The template dies (the OOM killer, an operator's kill): its workers die with it
    (PDEATHSIG, set again after the uid drop, which clears it), one invocation fails, the
    next restarts it; a restart that fails (a required layer gone) fails invocations with
    the reason, never the caller."""
    with WorkerPool() as pool:
        d = Deployment("a", 1, CODE, policy=Policy().with_layers(ALL_LAYERS, {"seccomp"}))
        assert pool.invoke(d, "h", {}).value == "ok"
        zygote = pool.pools()[d.key].zygote

        def kill_template() -> None:
            workers = list(pool.pools()[d.key]._idle)
            assert workers
            proc = zygote._proc
            assert proc is not None
            proc.kill()
            proc.wait()
            for worker in workers:  # a pidfd turns readable when its process has exited
                assert select.select([worker.pidfd], [], [], 10)[0], "the worker outlived it"

        kill_template()
        lost = pool.invoke(d, "h", {})
        assert lost.error is not None and lost.error.code == "worker_crashed", lost
        assert pool.invoke(d, "h", {}).value == "ok"  # restarted

        def refuse() -> None:
            raise LayersMissing("required sandbox layer(s) seccomp not available: seccomp: gone")

        kill_template()
        monkeypatch.setattr(zygote, "start", refuse)
        first, second = pool.invoke(d, "h", {}), pool.invoke(d, "h", {})
        assert first.error is not None and first.error.code == "worker_crashed"
        assert second.error is not None and second.error.code == "worker_crashed"
        assert second.error.message == (
            "the template process could not restart: "
            "required sandbox layer(s) seccomp not available: seccomp: gone"
        )
