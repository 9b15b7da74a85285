"""The seccomp layer, proved from inside a worker by native code the way an attacker would
run it: through a declared dependency, which runs unrestricted Python (ctypes, os)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

import pytest

import sandbox
from sandbox import Deployment, Limits, Policy, WorkerPool, landlock, seccomp

pytestmark = pytest.mark.skipif(not seccomp.supported(), reason="seccomp filter is x86_64 Linux")

PROBE = (
    "import probe\n\n"
    "def handle_event(event, context):\n    return getattr(probe, event.what)(*event.args)\n"
)


def prober(
    pool: WorkerPool, dependency_dir: Path, version: int, network: Literal["none", "outbound"]
) -> Any:
    policy = Policy().with_modules(["probe"], paths=[str(dependency_dir)])
    d = Deployment("hardening", version, {"h.py": PROBE}, Limits(network=network), policy)

    def probe(what: str, *args: Any) -> Any:
        result = pool.invoke(d, "h", {"what": what, "args": list(args)})
        assert result.ok, result.error
        return result.value

    return probe


def test_seccomp_refuses_exec_ptrace_namespaces_and_internet_sockets(
    pool: WorkerPool, dependency_dir: Path
) -> None:
    probe = prober(pool, dependency_dir, 1, "none")
    assert probe("imported_under_seccomp") == "2"  # filter mode, already at import time
    assert probe("try_exec", "/bin/sh") == "refused: Operation not permitted"
    assert probe("try_ptrace", os.getpid()) == "refused: Operation not permitted"
    assert probe("try_ptrace", 1) == "refused: Operation not permitted"
    assert probe("try_unshare") == "refused: Operation not permitted"
    assert probe("try_socket", int(socket.AF_INET)) == "refused: Permission denied"
    assert probe("try_socket", int(socket.AF_INET6)) == "refused: Permission denied"
    assert probe("try_socket", int(socket.AF_UNIX)) == "created"
    # The worker is still usable, and so is the host.
    assert probe("environment") == {}


def test_outbound_network_apps_may_create_internet_sockets(
    pool: WorkerPool, dependency_dir: Path
) -> None:
    probe = prober(pool, dependency_dir, 2, "outbound")
    assert probe("try_socket", int(socket.AF_INET)) == "created"
    assert probe("try_exec", "/bin/sh") == "refused: Operation not permitted"


def test_outbound_apps_connect_and_resolve_names_under_every_layer(
    pool: WorkerPool, dependency_dir: Path
) -> None:
    """Landlock still lets an outbound app read what name resolution needs, and connect."""
    probe = prober(pool, dependency_dir, 3, "outbound")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert probe("try_connect", port) == "connected"
        assert probe("try_connect_name", "localhost", port) == "connected"
    report = pool.pools()[("hardening", 3)].zygote.report
    assert report.on["landlock"] == (landlock.abi_version() > 0)


@pytest.mark.skipif(landlock.abi_version() < 1, reason="the kernel has no Landlock")
def test_of_the_checkout_workers_read_only_the_sandbox_package(
    pool: WorkerPool, dependency_dir: Path
) -> None:
    """chatfn's own directory is an import path (for ``sandbox``); Landlock keeps the rest of
    it (a checkout may hold a database, a .env) out of reach."""
    probe = prober(pool, dependency_dir, 4, "none")
    home = Path(sandbox.__file__).resolve().parent.parent
    assert probe("try_read", str(home / "sandbox" / "policy.py")).startswith("read ")
    assert probe("try_read", str(home / "pyproject.toml")) == "refused: Permission denied"


def test_the_filter_program_denies_what_it_lists() -> None:
    code = seccomp.program(network="none")
    assert len(code) % 8 == 0 and len(code) // 8 < 4096
    assert {"execve", "ptrace", "mount", "unshare", "setns", "bpf", "kexec_load"} <= set(
        seccomp.DENIED
    )
