"""Each OS layer of the sandbox, proved on its own by native code in a worker, the way a real
attacker would run it: through a malicious declared dependency.

The wheel ``evil`` is built here and deployed through the real runtime (requirements.in,
a hashed lock, the content-addressed environment); dependencies run unrestricted Python, so
its module uses ctypes and os freely, and the handler (RestrictedPython) only calls it.
Every attack answers with a plain outcome, ``"refused: <errno name>"`` or ``"done: ..."``,
and the errno name tells which layer refused it (seccomp says EPERM to exec where Landlock
says EACCES, a pid namespace says ESRCH to ptrace where a uid says EPERM, ...).

For each layer alone (``SandboxSettings(layers=frozenset({layer}))``) the attacks that
layer is meant to stop are refused with that layer's errno; with every layer off (a
control) the harmless attacks really work, so each refusal is the layer's doing; with the
default settings every attack is refused and every layer the machine has is on. After each
attack the same app and another app still serve, the host process is not traced, and the
database is intact. ptrace and the fork bomb never run unconfined.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runtime.core import App, Runtime
from runtime.dependencies import ensure_environment, parse_lock, resolve
from runtime.invocations import Invocation
from sandbox import cgroups, landlock, seccomp
from sandbox.isolation import Isolation, SandboxSettings
from sandbox.policy import ALL_LAYERS, LAYERS, Limits
from tests.wheels import build_wheel, only_wheelhouse

ROOT = os.geteuid() == 0
SECRET = "the victim's secret"
BOMB = 64  # forks the fork bomb tries; children sleep 3 s
PIDS_MAX = 2 * Limits().max_workers + 4  # a deployment's cgroup pids.max (sandbox.process)

EVIL = """
    import ctypes
    import errno
    import os
    import signal
    import socket
    import time

    PTRACE_ATTACH, PTRACE_DETACH = 16, 17
    WALL = 0x40000000


    def _name(number):
        return errno.errorcode.get(number or 0, str(number))


    def _refused(exc):
        return "refused: " + errno.errorcode.get(exc.errno or 0, type(exc).__name__)


    def exec_sh(marker):
        try:
            os.execv("/bin/sh", ["/bin/sh", "-c", "echo pwned > " + marker])
        except OSError as exc:
            return _refused(exc)


    def ptrace(pid):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.ptrace.restype = ctypes.c_long
        libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        if libc.ptrace(PTRACE_ATTACH, pid, None, None) != 0:
            return "refused: " + _name(ctypes.get_errno())
        # Attached: let go at once (after the attach stop, or the tracee stays stopped).
        try:
            os.waitpid(pid, WALL)
        finally:
            libc.ptrace(PTRACE_DETACH, pid, None, None)
        return "done: attached"


    def read(path):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            return _refused(exc)
        return "done: " + data[:64].decode("latin-1")


    def plant(text):
        with open("secret.txt", "w") as f:
            f.write(text)
        return os.path.abspath("secret.txt")


    def connect(port):
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:
            return _refused(exc)
        try:
            s.settimeout(2)
            s.connect(("127.0.0.1", port))
        except OSError as exc:
            return _refused(exc)
        finally:
            s.close()
        return "done: connected"


    def fork_bomb(n):
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
        forked, error = 0, None
        for _ in range(n):
            try:
                pid = os.fork()
            except OSError as exc:
                error = _name(exc.errno)
                break
            if pid == 0:
                os.closerange(3, 65536)
                time.sleep(3)
                os._exit(0)
            forked += 1
        return {"forked": forked, "error": error}


    def write(path):
        try:
            with open(path, "x") as f:
                f.write("pwned")
        except OSError as exc:
            return _refused(exc)
        return "done: wrote " + path


    def signal_host(pid):
        try:
            os.kill(pid, 0)  # signal 0: only asks whether it could
        except OSError as exc:
            return _refused(exc)
        return "done: may signal"


    def hog(mib):
        block = bytearray(mib * 1024 * 1024)
        for i in range(0, len(block), 4096):
            block[i] = 1  # touch every page: charged to the cgroup
        return "done: %d MiB" % mib


    def _shmget(key, flags):
        libc = ctypes.CDLL(None, use_errno=True)
        shmid = libc.shmget(key, 4096, flags)
        return shmid, ctypes.get_errno()


    def shm_create(key):
        shmid, err = _shmget(key, 0o1000 | 0o666)  # IPC_CREAT, readable by everyone
        return shmid if shmid >= 0 else "refused: " + _name(err)


    def shm_find(key):
        shmid, err = _shmget(key, 0)
        return "done: found" if shmid >= 0 else "refused: " + _name(err)


    def shm_remove(key):
        shmid, _err = _shmget(key, 0)
        if shmid >= 0:
            ctypes.CDLL(None).shmctl(shmid, 0, None)  # IPC_RMID
        return "removed"
"""

HANDLER = """
    import evil

    def handle_event(event, context):
        what = event.user["what"]
        if what == "ping":
            return "pong"
        return getattr(evil, what)(*event.user["args"])
"""

MANIFEST = """
    [runtime]
    network = "none"
"""


# -- the dependency, installed once ------------------------------------------------------------


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheelhouse")
    build_wheel(root, "evil", "1.0", {"evil/__init__.py": EVIL})
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Path:
    """A project declaring ``evil``, with its lock (deploys do not resolve again)."""
    with only_wheelhouse(wheelhouse):
        lock = resolve("evil\n")
    root = tmp_path_factory.mktemp("evil-project")
    (root / "user_started_session.py").write_text(textwrap.dedent(HANDLER))
    (root / "chatfn.toml").write_text(textwrap.dedent(MANIFEST))
    (root / "requirements.in").write_text("evil\n")
    (root / "requirements.txt").write_text(lock)
    return root


@pytest.fixture(scope="module")
def envs_dir(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path, project: Path) -> Path:
    """One envs_dir for every Runtime here, with the lock's environment installed once."""
    envs = tmp_path_factory.mktemp("envs")
    with only_wheelhouse(wheelhouse):
        ensure_environment(parse_lock((project / "requirements.txt").read_text()), envs)
    return envs


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    """A loopback port the host listens on."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener.getsockname()[1]


# -- one Runtime per layer setting -------------------------------------------------------------


@dataclass
class Sandboxed:
    runtime: Runtime
    attacker: App
    victim: App
    database: Path  # the runtime's SQLite file, in a 0700 directory
    secret: str  # the victim's planted file, as its worker names it

    def report(self) -> Isolation:
        return self.runtime.pool.pools()[(self.attacker.name, 1)].zygote.report


def invoke(app: App, what: str, *args: Any) -> Invocation:
    """The handler calls ``evil.<what>(*args)`` (``ping`` answers ``"pong"`` itself)."""
    return app.invoke("UserStartedSession", {"user": {"what": what, "args": list(args)},
                                             "session_id": "s"})  # fmt: skip


def call(app: App, what: str, *args: Any) -> Any:
    """What that returned (the invocation must succeed)."""
    inv = invoke(app, what, *args)
    assert inv.succeeded, (inv.error, inv.logs)
    return inv.result


@contextlib.contextmanager
def sandboxed(
    layers: frozenset[str], tmp_path_factory: pytest.TempPathFactory, envs_dir: Path, project: Path
) -> Iterator[Sandboxed]:
    """A Runtime with only ``layers``, an attacker app and a victim app that planted a file
    in its own worker's temporary directory."""
    root = tmp_path_factory.mktemp("runtime")
    assert root.stat().st_mode & 0o777 == 0o700  # pytest's tree: root's only
    database = root / "chatfn.db"
    runtime = Runtime(
        f"sqlite:///{database}", sandbox=SandboxSettings(layers=layers), envs_dir=envs_dir
    )
    try:
        attacker, victim = runtime.create_app("attacker"), runtime.create_app("victim")
        for app in (attacker, victim):
            assert app.deploy(project).status == "active"
        attacker.users.create_user("alice")
        secret = call(victim, "plant", SECRET)
        assert isinstance(secret, str) and secret.endswith("/secret.txt")
        yield Sandboxed(runtime, attacker, victim, database, secret)
    finally:
        runtime.close()


def why_unsupported(layer: str) -> str | None:
    """Why this machine cannot give a deployment ``layer`` (None: it can)."""
    if layer in ("uid", "pid_namespace", "ipc_namespace", "mount_namespace", "network_namespace"):
        return None if ROOT else f"{layer} needs root"
    if layer == "landlock":
        return None if landlock.abi_version() > 0 else "the kernel has no Landlock"
    if layer == "seccomp":
        return None if seccomp.supported() else "the seccomp filter is written for x86_64 Linux"
    if layer == "cgroup":
        support = cgroups.detect()
        return None if support.backend is not None else f"no cgroups: {support.reason}"
    return None


class Runtimes:
    """One live Runtime at a time, per layer setting: booted when a test first asks for the
    setting, closed when a test asks for another one (tests come grouped by setting) or at
    the end of the module."""

    def __init__(
        self, tmp_path_factory: pytest.TempPathFactory, envs_dir: Path, project: Path
    ) -> None:
        self._args = (tmp_path_factory, envs_dir, project)
        self._layers: frozenset[str] | None = None
        self._live: Sandboxed | None = None
        self._stack = contextlib.ExitStack()

    def get(self, layers: frozenset[str]) -> Sandboxed:
        if self._live is None or self._layers != layers:
            self.close()
            self._live = self._stack.enter_context(sandboxed(layers, *self._args))
            self._layers = layers
        return self._live

    def close(self) -> None:
        self._live = self._layers = None
        self._stack.close()


@pytest.fixture(scope="module")
def runtimes(
    tmp_path_factory: pytest.TempPathFactory, envs_dir: Path, project: Path
) -> Iterator[Runtimes]:
    held = Runtimes(tmp_path_factory, envs_dir, project)
    yield held
    held.close()


@pytest.fixture
def alone(request: pytest.FixtureRequest, runtimes: Runtimes) -> tuple[str, Sandboxed]:
    """(layer, a Runtime with that layer only), for ``indirect`` parametrization."""
    layer: str = request.param
    why = why_unsupported(layer)
    if why is not None:
        pytest.skip(why)
    s = runtimes.get(frozenset({layer}))
    assert s.report().on == {name: name == layer for name in LAYERS}, s.report()
    return layer, s


# -- after every attack ------------------------------------------------------------------------


def tracer_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return int(fields["TracerPid"])


def assert_unharmed(s: Sandboxed) -> None:
    """The attacker's next invocation and another app work, the host process is not being
    traced, and the database is intact and still read by the runtime."""
    assert call(s.attacker, "ping") == "pong"
    assert call(s.victim, "ping") == "pong"
    assert tracer_of(os.getpid()) == 0
    with contextlib.closing(sqlite3.connect(f"file:{s.database}?mode=ro", uri=True)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert {"attacker", "victim"} <= set(s.runtime.apps())
    user = s.attacker.users.get_user("alice")
    assert user is not None and user["name"] == "alice"


# -- the attacks -------------------------------------------------------------------------------


@dataclass
class Host:
    """What the host sets up for one test: a scratch directory (the control's evidence
    goes there) and the loopback port it listens on."""

    scratch: Path
    port: int

    @property
    def marker(self) -> Path:
        return self.scratch / "marker"

    def outside(self, s: Sandboxed) -> Path:
        """A new file next to the database, named per test."""
        return s.database.parent / f"pwned-{self.scratch.name}.txt"


@pytest.fixture
def host(tmp_path: Path, port: int) -> Host:
    return Host(tmp_path, port)


def run_attack(s: Sandboxed, attack: str, host: Host) -> Any:
    """One attack by the attacker app; what evil answered."""
    if attack == "exec_sh":
        return call(s.attacker, "exec_sh", str(host.marker))
    if attack == "ptrace":
        return call(s.attacker, "ptrace", os.getpid())
    if attack == "signal_host":
        return call(s.attacker, "signal_host", os.getpid())
    if attack == "read_db":
        return call(s.attacker, "read", str(s.database))
    if attack == "read_victim":
        return call(s.attacker, "read", s.secret)
    if attack == "connect":
        return call(s.attacker, "connect", host.port)
    if attack == "write_outside":
        return call(s.attacker, "write", str(host.outside(s)))
    if attack == "fork_bomb":
        return call(s.attacker, "fork_bomb", BOMB)
    raise AssertionError(attack)


def assert_no_evidence(s: Sandboxed, host: Host) -> None:
    assert not host.marker.exists()
    assert not host.outside(s).exists()


# Layer -> {attack: the errno name with which that layer alone refuses it}. Layer by layer,
# so each layer's Runtime boots once for all of its cells.
MATRIX: dict[str, dict[str, str]] = {
    "uid": {
        "ptrace": "EPERM",  # another uid's process (and no CAP_SYS_PTRACE)
        "signal_host": "EPERM",
        "read_db": "EACCES",  # the 0700 directory of the database
        "read_victim": "EACCES",  # the victim's own 0700 temporary directory
        "write_outside": "EACCES",
    },
    "pid_namespace": {
        "ptrace": "ESRCH",
        "signal_host": "ESRCH",
    },  # the host's pid does not exist in there
    "mount_namespace": {
        "read_victim": "ENOENT",  # a private tmpfs over the temporary root
        "write_outside": "EROFS",  # everything else read-only
    },
    "network_namespace": {"connect": "ENETUNREACH"},  # a downed loopback, nothing else
    "landlock": {
        "exec_sh": "EACCES",  # no execute right anywhere
        "ptrace": "EPERM",  # a process outside the domain
        "signal_host": "EPERM",  # ABI 6 scope: no signal leaves the domain
        "read_db": "EACCES",
        "read_victim": "EACCES",
        "connect": "EACCES",  # TCP connect refused for network "none"
        "write_outside": "EACCES",
    },
    "seccomp": {
        "exec_sh": "EPERM",
        "ptrace": "EPERM",
        "connect": "EACCES",  # socket(AF_INET) itself
    },
}
CELLS = [(layer, attack) for layer, attacks in MATRIX.items() for attack in attacks]


@pytest.mark.parametrize(
    ("alone", "attack"),
    CELLS,
    indirect=["alone"],
    ids=[f"{layer}-{attack}" for layer, attack in CELLS],
)
def test_one_layer_alone_refuses_the_attack(
    alone: tuple[str, Sandboxed], attack: str, host: Host
) -> None:
    layer, s = alone
    if layer == "landlock" and attack == "connect" and landlock.abi_version() < 4:
        pytest.skip("Landlock refuses TCP connect from ABI 4 on")
    if layer == "landlock" and attack == "signal_host" and landlock.abi_version() < 6:
        pytest.skip("Landlock scopes signals from ABI 6 on")
    assert run_attack(s, attack, host) == f"refused: {MATRIX[layer][attack]}"
    assert_no_evidence(s, host)
    assert_unharmed(s)


@pytest.mark.parametrize("alone", ["cgroup"], indirect=True)
def test_the_cgroup_alone_stops_a_fork_bomb(alone: tuple[str, Sandboxed], host: Host) -> None:
    _layer, s = alone
    outcome = run_attack(s, "fork_bomb", host)
    # The deployment's cgroup pids.max, shared with the template and the worker (which runs
    # as root here: RLIMIT_NPROC does not hold it back, the cgroup does).
    assert outcome["error"] == "EAGAIN" and 0 < outcome["forked"] <= PIDS_MAX - 2, outcome
    assert_unharmed(s)


def test_rlimits_stop_a_fork_bomb_of_a_worker_that_is_not_root(
    runtimes: Runtimes, host: Host
) -> None:
    """RLIMIT_NPROC = 0: not one process more. The kernel exempts uid 0 from it, so as root
    the layer needs the app's own uid, and says so when it is alone."""
    if ROOT:
        alone = runtimes.get(frozenset({"rlimits"})).report()
        assert not alone.on["rlimits"]
        assert alone.why_off["rlimits"] == "RLIMIT_NPROC does not bind uid 0: needs uid"
        # The uid alone does not stop forks (a small bomb: 3 children, gone in 3 s) ...
        uid_only = runtimes.get(frozenset({"uid"}))
        assert call(uid_only.attacker, "fork_bomb", 3) == {"forked": 3, "error": None}
        assert_unharmed(uid_only)
    # ... the rlimits do.
    s = runtimes.get(frozenset({"uid", "rlimits"}) if ROOT else frozenset({"rlimits"}))
    assert s.report().on["rlimits"], s.report().why_off
    assert run_attack(s, "fork_bomb", host) == {"forked": 0, "error": "EAGAIN"}
    assert_unharmed(s)


def test_rlimits_cap_a_workers_address_space(
    runtimes: Runtimes, project: Path, tmp_path: Path
) -> None:
    s = runtimes.get(frozenset({"uid", "rlimits"}) if ROOT else frozenset({"rlimits"}))
    hog = deploy_hog(s, project, tmp_path)
    inv = invoke(hog, "hog", HOG_MIB)
    assert inv.failed and inv.error is not None, inv.result
    assert inv.error.code == "resource_limit", inv.error
    assert call(hog, "ping") == "pong"
    assert_unharmed(s)


HOG_MANIFEST = """
[runtime]
network = "none"
memory_mb = 64
max_workers = 1
"""
HOG_MIB = 400  # well over the hog app's cgroup: (1 + 1) x (64 + 16) MiB = 160 MiB


def deploy_hog(s: Sandboxed, project: Path, tmp_path: Path) -> App:
    """An app with small limits, from the same project (so the same locked ``evil``)."""
    small = tmp_path / "hog-project"
    if not small.exists():
        shutil.copytree(project, small)
        (small / "chatfn.toml").write_text(HOG_MANIFEST)
    app = s.runtime.ensure_app("hog")
    if app.state().version is None:
        assert app.deploy(small).status == "active"
    return app


@pytest.mark.parametrize("alone", ["cgroup"], indirect=True)
def test_the_cgroup_alone_caps_a_deployments_memory(
    alone: tuple[str, Sandboxed], runtimes: Runtimes, project: Path, tmp_path: Path
) -> None:
    """No RLIMIT_AS here: the cgroup's memory limit is all that stops the allocation (the
    kernel's OOM killer ends the worker); with every layer off, it succeeds."""
    _layer, s = alone
    hog = deploy_hog(s, project, tmp_path)
    inv = invoke(hog, "hog", HOG_MIB)
    assert inv.failed and inv.error is not None, inv.result
    assert inv.error.code == "worker_crashed" and "SIGKILL" in inv.error.message, inv.error
    assert call(hog, "ping") == "pong"  # the next invocation, on a new worker
    assert_unharmed(s)
    control = runtimes.get(frozenset())
    unlimited = deploy_hog(control, project, tmp_path)
    assert call(unlimited, "hog", HOG_MIB) == f"done: {HOG_MIB} MiB"


SHM_KEY = 0x43484654  # "CHFT"


def host_sees_shm(key: int) -> bool:
    with open("/proc/sysvipc/shm") as f:
        return any(line.split()[0] == str(key) for line in f.readlines()[1:])


@pytest.mark.parametrize("alone", ["ipc_namespace"], indirect=True)
def test_the_ipc_namespace_alone_keeps_shared_memory_private(
    alone: tuple[str, Sandboxed], runtimes: Runtimes
) -> None:
    """A System V segment one app creates (readable by everyone) is invisible to another app
    and to the host; with every layer off, the other app finds it."""
    _layer, s = alone
    assert isinstance(call(s.attacker, "shm_create", SHM_KEY), int)
    assert call(s.victim, "shm_find", SHM_KEY) == "refused: ENOENT"
    assert not host_sees_shm(SHM_KEY)
    assert_unharmed(s)
    control = runtimes.get(frozenset())
    assert isinstance(call(control.attacker, "shm_create", SHM_KEY), int)
    try:
        assert call(control.victim, "shm_find", SHM_KEY) == "done: found"
        assert host_sees_shm(SHM_KEY)
    finally:
        call(control.attacker, "shm_remove", SHM_KEY)
    assert not host_sees_shm(SHM_KEY)


# -- the control: nothing stops the harmless attacks -------------------------------------------


@pytest.fixture
def unconfined(runtimes: Runtimes) -> Sandboxed:
    return runtimes.get(frozenset())


def test_with_every_layer_off_the_harmless_attacks_work(unconfined: Sandboxed, host: Host) -> None:
    s = unconfined
    assert s.report().on == dict.fromkeys(LAYERS, False)
    assert run_attack(s, "read_db", host).startswith("done: SQLite format 3\x00")
    assert run_attack(s, "read_victim", host) == f"done: {SECRET}"
    assert run_attack(s, "connect", host) == "done: connected"
    assert run_attack(s, "signal_host", host) == "done: may signal"
    target = host.outside(s)
    assert run_attack(s, "write_outside", host) == f"done: wrote {target}"
    assert target.read_text() == "pwned"
    target.unlink()
    assert_unharmed(s)
    # exec replaces the worker with the shell: the invocation fails, the marker appears.
    inv = invoke(s.attacker, "exec_sh", str(host.marker))
    assert inv.failed and inv.error is not None and inv.error.code == "worker_crashed", inv.error
    assert host.marker.read_text() == "pwned\n"
    assert_unharmed(s)


# -- the default settings: every layer at once -------------------------------------------------


@pytest.fixture
def defaults(runtimes: Runtimes) -> Sandboxed:
    assert SandboxSettings().layers == ALL_LAYERS  # what an operator gets by default
    return runtimes.get(ALL_LAYERS)


# What answers first when every layer is on: seccomp before exec, ptrace and socket; the
# app's uid on the 0700 directories (before the read-only mount is reached); the mount
# namespace hides the other app's directory; RLIMIT_NPROC before the cgroup.
EVERYTHING_ON = {
    "exec_sh": "refused: EPERM",
    "ptrace": "refused: EPERM",
    "signal_host": "refused: ESRCH",  # the pid namespace: the host's pid is not there
    "read_db": "refused: EACCES",
    "read_victim": "refused: ENOENT",
    "connect": "refused: EACCES",
    "write_outside": "refused: EACCES",
    "fork_bomb": {"forked": 0, "error": "EAGAIN"},
}


def test_with_the_default_settings_every_attack_is_refused(defaults: Sandboxed, host: Host) -> None:
    s = defaults
    supported = {layer: why_unsupported(layer) is None for layer in LAYERS}
    assert s.report().on == supported, s.report().why_off
    outcomes: dict[str, Any] = {}
    for attack in EVERYTHING_ON:
        outcomes[attack] = run_attack(s, attack, host)
        assert_no_evidence(s, host)
        assert_unharmed(s)
    if all(supported.values()):
        assert outcomes == EVERYTHING_ON
    else:
        refused = {a: o for a, o in outcomes.items() if a != "fork_bomb"}
        assert all(str(o).startswith("refused: ") for o in refused.values()), outcomes
        assert outcomes["fork_bomb"]["error"] == "EAGAIN", outcomes
