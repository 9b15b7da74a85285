"""sandbox/cgroups.py: real cgroups where the machine has them (root, v1 or v2), and the
/proc parsing that finds them, on sample text for layouts this machine does not have.

Processes are put in a cgroup before they do anything that counts: each test script waits
for a line on stdin, which the test sends only after ``add``. Every cgroup a test makes is
removed, and every process it starts is killed and reaped, even when the test fails.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox import cgroups
from sandbox.cgroups import Cgroup, CgroupError, Location, Mount

MIB = 1024 * 1024
_names = itertools.count()

MakeCgroup = Callable[..., Cgroup]
Spawn = Callable[[str], "subprocess.Popen[bytes]"]


# --- Fixtures ----------------------------------------------------------------------------


@pytest.fixture
def make_cgroup() -> Iterator[MakeCgroup]:
    """``create`` with a unique name; skips unless root on a machine with cgroups."""
    if os.geteuid() != 0:
        pytest.skip("cgroups: the tests need root")
    support = cgroups.detect()
    if support.backend is None:
        pytest.skip(f"cgroups not available: {support.reason}")
    made: list[Cgroup] = []

    def make(*, memory_bytes: int = 256 * MIB, pids: int = 64) -> Cgroup:
        name = f"test-{os.getpid()}-{next(_names)}"
        cgroup = cgroups.create(name, memory_bytes=memory_bytes, pids=pids)
        made.append(cgroup)
        return cgroup

    yield make
    for cgroup in made:
        cgroup.remove()


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start ``python -c script`` with pipes; killed and reaped at the end of the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(script: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def go(proc: subprocess.Popen[bytes]) -> None:
    """Tell a script waiting on stdin to start."""
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()


def read_line(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> str:
    """One line of a script's stdout, failing the test instead of hanging."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], f"no line; got {data!r}"
        chunk = os.read(fd, 4096)
        assert chunk, f"script exited; got {data!r}"
        data += chunk
    return data.decode()


def is_dead(pid: int) -> bool:
    """Gone, or a zombie (dead, waiting for a parent that may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_dead(pid: int, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not is_dead(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# --- Real cgroups ------------------------------------------------------------------------

FORK_TEN = """
    import json, os, sys, time
    sys.stdin.readline()
    children, errors = [], []
    for _ in range(10):
        try:
            pid = os.fork()
        except OSError as err:
            errors.append(type(err).__name__)
            continue
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        children.append(pid)
    print(json.dumps({"children": children, "errors": errors}), flush=True)
    time.sleep(30)
"""


def test_pids_limit_stops_forks_in_the_cgroup_only(make_cgroup: MakeCgroup, spawn: Spawn) -> None:
    cgroup = make_cgroup(pids=3)
    proc = spawn(FORK_TEN)
    cgroup.add(proc.pid)
    go(proc)
    result = json.loads(read_line(proc))
    # The script itself is one of the 3.
    assert len(result["children"]) == 2
    assert result["errors"] == ["BlockingIOError"] * 8
    assert cgroup.pids() == sorted([proc.pid, *result["children"]])
    # The test process is outside, and can still start processes while the cgroup is full.
    assert os.getpid() not in cgroup.pids()
    for _ in range(3):
        subprocess.run(["true"], check=True)


ALLOCATE_200_MIB = """
    import sys
    sys.stdin.readline()
    try:
        data = bytearray(200 * 1024 * 1024)
        data[::4096] = b"\\1" * len(range(0, len(data), 4096))
    except MemoryError:
        sys.exit(3)
    print("allocated", flush=True)
"""


def test_memory_limit_stops_a_large_allocation(make_cgroup: MakeCgroup, spawn: Spawn) -> None:
    cgroup = make_cgroup(memory_bytes=64 * MIB)
    proc = spawn(ALLOCATE_200_MIB)
    cgroup.add(proc.pid)
    go(proc)
    out, _ = proc.communicate(timeout=10)
    assert b"allocated" not in out
    assert proc.returncode in (-signal.SIGKILL, 3), proc.returncode


def test_limits_are_written(make_cgroup: MakeCgroup) -> None:
    cgroup = make_cgroup(memory_bytes=64 * MIB, pids=7)
    if cgroup.backend == "v2":
        (path,) = (Path(p) for p in cgroup.paths)
        assert (path / "memory.max").read_text().strip() == str(64 * MIB)
        assert (path / "pids.max").read_text().strip() == "7"
        swap = path / "memory.swap.max"
        assert not swap.exists() or swap.read_text().strip() == "0"
    else:
        memory, pids = (Path(p) for p in cgroup.paths)
        assert (memory / "memory.limit_in_bytes").read_text().strip() == str(64 * MIB)
        assert (pids / "pids.max").read_text().strip() == "7"
    for directory in cgroup.paths:
        assert Path(directory).parent.name == f"chatfn-{os.getpid()}"


FORK_ONE = """
    import os, sys, time
    sys.stdin.readline()
    pid = os.fork()
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    print(pid, flush=True)
    time.sleep(30)
"""


def test_remove_kills_what_is_left_and_deletes_the_directories(
    make_cgroup: MakeCgroup, spawn: Spawn
) -> None:
    cgroup = make_cgroup()
    proc = spawn(FORK_ONE)
    cgroup.add(proc.pid)
    go(proc)
    grandchild = int(read_line(proc))
    assert cgroup.pids() == sorted([proc.pid, grandchild])

    started = time.monotonic()
    cgroup.remove()
    assert time.monotonic() - started < 1.5
    assert proc.wait(timeout=2) == -signal.SIGKILL
    assert wait_dead(grandchild)
    for path in cgroup.paths:
        assert not os.path.exists(path)
    assert cgroup.pids() == []

    cgroup.remove()  # idempotent
    for path in cgroup.paths:
        assert not os.path.exists(path)


def test_parent_directory_goes_with_the_last_cgroup(make_cgroup: MakeCgroup) -> None:
    first = make_cgroup()
    parents = [os.path.dirname(p) for p in first.paths]
    others = {name for parent in parents for name in os.listdir(parent) if _is_dir(parent, name)}
    if others != {os.path.basename(first.paths[0])}:
        pytest.skip(f"other chatfn cgroups exist in this process: {sorted(others)}")
    second = make_cgroup()
    first.remove()
    assert all(os.path.isdir(parent) for parent in parents)
    second.remove()
    assert not any(os.path.exists(parent) for parent in parents)


def test_a_gone_servers_cgroups_are_swept(make_cgroup: MakeCgroup) -> None:
    """A server that died leaves empty ``chatfn-<pid>`` cgroups; the next one removes them."""
    first = make_cgroup()
    owns = [os.path.dirname(os.path.dirname(p)) for p in first.paths]
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    stale = [os.path.join(own, f"chatfn-{gone}") for own in owns]
    for path in stale:
        os.makedirs(os.path.join(path, "app-1-77"))
    try:
        make_cgroup()
        assert not any(os.path.exists(path) for path in stale)
        assert all(os.path.isdir(p) for p in first.paths)  # our own, alive, stay
    finally:
        for path in stale:
            for leftover in (os.path.join(path, "app-1-77"), path):
                if os.path.isdir(leftover):
                    os.rmdir(leftover)


def _is_dir(parent: str, name: str) -> bool:
    return os.path.isdir(os.path.join(parent, name))


def test_errors_name_the_file(make_cgroup: MakeCgroup) -> None:
    cgroup = make_cgroup()
    no_such_pid = 2**22 + 1  # above the largest possible pid_max
    with pytest.raises(CgroupError, match=r"cgroup\.procs"):
        cgroup.add(no_such_pid)
    name = os.path.basename(cgroup.paths[0])
    with pytest.raises(CgroupError, match="already exists") as info:
        cgroups.create(name, memory_bytes=MIB * 64, pids=4)
    assert name in str(info.value)
    assert isinstance(info.value, OSError)
    assert all(os.path.isdir(p) for p in cgroup.paths)  # the failed create left it alone


# --- Without the kernel ------------------------------------------------------------------


def test_detect_is_cached_and_explains_itself() -> None:
    support = cgroups.detect()
    assert support is cgroups.detect()
    assert support.reason
    if support.backend is not None:
        assert f"cgroup {support.backend}" in support.reason


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a b", "x+", "é", "a" * 256])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="cgroup name"):
        cgroups.create(name, memory_bytes=64 * MIB, pids=4)


@pytest.mark.parametrize(("memory", "pids"), [(0, 4), (-1, 4), (MIB, 0)])
def test_bad_limits_are_refused(memory: int, pids: int) -> None:
    with pytest.raises(ValueError):
        cgroups.create("ok-name", memory_bytes=memory, pids=pids)


def test_v2_limits_written_to_files(tmp_path: Path) -> None:
    for name in ("memory.max", "memory.swap.max", "pids.max"):
        (tmp_path / name).touch()
    cgroups._write_limits("v2", (str(tmp_path),), 64 * MIB, 9)
    assert (tmp_path / "memory.max").read_text() == str(64 * MIB)
    assert (tmp_path / "memory.swap.max").read_text() == "0"
    assert (tmp_path / "pids.max").read_text() == "9"


def test_v2_refusals_explain_themselves(tmp_path: Path) -> None:
    """The v2 decisions in detect(), on a plain directory standing in for a cgroup."""
    assert "not on any mounted cgroup2" in str(cgroups._try_v2(None))
    (tmp_path / "cgroup.controllers").write_text("cpu io hugetlb\n")
    reason = cgroups._try_v2(str(tmp_path))
    assert isinstance(reason, str)
    assert "does not offer the memory and pids controller(s)" in reason
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").mkdir()  # any refusal to enable them
    reason = cgroups._try_v2(str(tmp_path))
    assert isinstance(reason, str)
    assert "cgroup.subtree_control" in reason and "Delegate=yes" in reason
    assert sorted(os.listdir(tmp_path)) == ["cgroup.controllers", "cgroup.subtree_control"]


def test_write_failure_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    with pytest.raises(CgroupError, match=f"to {missing}/memory.max"):
        cgroups._write_limits("v2", (str(missing),), 64 * MIB, 9)


# This machine: hybrid, v2 without controllers, memory in a cgroup of its own.
HYBRID_CGROUP = """\
9:name=systemd:/
8:pids:/
7:blkio:/
6:freezer:/
5:devices:/
4:memory:/process_api/aaad0c4b71841d20f892e46216e592c1
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
"""
HYBRID_MOUNTINFO = """\
22 1 253:0 / / rw,relatime - ext4 /dev/vda rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_locate_hybrid() -> None:
    assert cgroups.locate(HYBRID_CGROUP, HYBRID_MOUNTINFO) == Location(
        v2="/sys/fs/cgroup/unified",
        memory="/sys/fs/cgroup/memory/process_api/aaad0c4b71841d20f892e46216e592c1",
        pids="/sys/fs/cgroup/pids",
    )


# A systemd machine with only cgroup v2 (optional fields in mountinfo, nsdelegate).
PURE_V2_CGROUP = "0::/system.slice/chatfn.service\n"
PURE_V2_MOUNTINFO = """\
24 29 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:13 - proc proc rw
27 22 0:25 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 \
rw,nsdelegate,memory_recursiveprot
"""


def test_locate_pure_v2() -> None:
    assert cgroups.locate(PURE_V2_CGROUP, PURE_V2_MOUNTINFO) == Location(
        v2="/sys/fs/cgroup/system.slice/chatfn.service", memory=None, pids=None
    )


def test_locate_v1_with_joined_controllers_and_an_escaped_mount_point() -> None:
    proc_cgroup = "3:memory:/user.slice\n2:cpu,cpuacct,pids:/user.slice/u\n1:name=systemd:/\n"
    mountinfo = (
        "30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "31 25 0:27 / /cg\\040roups/cpu,pids rw - cgroup cgroup rw,cpu,cpuacct,pids\n"
    )
    assert cgroups.locate(proc_cgroup, mountinfo) == Location(
        v2=None,
        memory="/sys/fs/cgroup/memory/user.slice",
        pids="/cg roups/cpu,pids/user.slice/u",
    )


def test_locate_bind_mounted_subtree() -> None:
    """A container that sees only its own subtree of the host's hierarchy, mounted at
    /sys/fs/cgroup: the mount's root is stripped from our path."""
    proc_cgroup = "0::/docker/abc/app\n"
    mountinfo = "40 30 0:30 /docker/abc /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n"
    assert cgroups.locate(proc_cgroup, mountinfo).v2 == "/sys/fs/cgroup/app"
    at_root = cgroups.locate("0::/docker/abc\n", mountinfo)
    assert at_root.v2 == "/sys/fs/cgroup"


def test_locate_skips_mounts_that_do_not_show_our_cgroup() -> None:
    proc_cgroup = "0::/elsewhere\n"
    mountinfo = (
        "40 30 0:30 /docker/abc /mnt/a rw - cgroup2 cgroup2 rw\n"
        "41 30 0:30 / /mnt/b rw - cgroup2 cgroup2 rw\n"
    )
    assert cgroups.locate(proc_cgroup, mountinfo).v2 == "/mnt/b/elsewhere"
    assert cgroups.locate("0::/elsewhere\n", mountinfo.splitlines()[0]).v2 is None
    assert cgroups.locate("0::/../escape\n", mountinfo).v2 is None


def test_locate_without_cgroups() -> None:
    assert cgroups.locate("", "22 1 253:0 / / rw - ext4 /dev/vda rw\n") == Location(
        None, None, None
    )


def test_parse_mountinfo_fields() -> None:
    (mount,) = cgroups.parse_mountinfo(
        "35 31 0:32 /a\\040b /sys/fs/cgroup/memory rw shared:5 master:2 - cgroup cg rw,memory\n"
    )
    assert mount == Mount(
        point="/sys/fs/cgroup/memory",
        root="/a b",
        fstype="cgroup",
        options=frozenset({"rw", "memory"}),
    )


def test_parse_proc_cgroup_keeps_colons_in_paths() -> None:
    (v1, v2) = cgroups.parse_proc_cgroup("4:memory:/a:b\n0::/x:y\n")
    assert (v1.controllers, v1.path, v1.v2) == (frozenset({"memory"}), "/a:b", False)
    assert (v2.controllers, v2.path, v2.v2) == (frozenset(), "/x:y", True)
