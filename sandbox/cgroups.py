"""One cgroup per deployment: a memory limit and a process-count limit for a whole process tree.

Why: rlimits are per process (RLIMIT_AS) or per user (RLIMIT_NPROC), so a deployment whose
template forks many workers can use many times its memory budget, and per-process limits
say nothing about the tree as a whole. A cgroup holds the template and, because children
inherit their parent's cgroup, every worker it forks later; the kernel then enforces one
memory limit (the OOM killer acts inside the cgroup) and one pids limit (fork fails with
EAGAIN) for all of them together. This is a defence-in-depth layer: when the machine cannot
do it, ``detect`` says so with a reason and the caller falls back to rlimits.

Layout: every cgroup chatfn makes lives in ``chatfn-<host pid>`` directly below the server's
own cgroup, in each hierarchy used, so that chatfn only ever touches a subtree it created.
The server's own cgroup is read from /proc/self/cgroup and the mount points from
/proc/self/mountinfo (parsed by pure functions, so they can be tested on sample text).

Backends, in order of preference:

* cgroup v2: a cgroup2 mount whose cgroup for this process offers ``memory`` and ``pids``.
  A v2 cgroup hands a controller to its children only through ``cgroup.subtree_control``,
  and (the "no internal processes" rule) only while it holds no processes itself, the root
  cgroup excepted. So the controllers are enabled in the server's own cgroup (needed for
  ``chatfn-<pid>`` to have them; fails unless the kernel allows it there, and then v2 is
  reported off with what to do), and again in ``chatfn-<pid>``, which never holds a process;
  the per-deployment cgroups are below it. Limits: memory.max, memory.swap.max = 0, pids.max.
* cgroup v1: the ``memory`` and ``pids`` hierarchies, each mounted separately or together
  with other controllers. Limits: memory.limit_in_bytes (and memory.memsw.limit_in_bytes to
  the same value where swap accounting exists), pids.max; a process is added to both.

``detect`` really creates and removes a probe cgroup with limits, so "on" means it works.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Backend = Literal["v2", "v1"]

CONTROLLERS = ("memory", "pids")
REMOVE_TIMEOUT = 2.0  # seconds remove() keeps killing and retrying rmdir
_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")
_PROBE = "+probe"  # '+' is not allowed in create() names, so the probe never meets one
# Held while a parent directory is made or removed and while a child is made in it, so one
# thread never removes chatfn-<pid> just as another makes a cgroup inside it.
_lock = threading.Lock()


class CgroupError(OSError):
    """A cgroup file or directory could not be read, written, made or removed."""


@dataclass(frozen=True)
class Support:
    """Whether this process can put process trees into limited cgroups, and why (not)."""

    backend: Backend | None  # None: not available
    reason: str


# --- Parsing /proc/self/cgroup and /proc/self/mountinfo (pure functions) ------------------


@dataclass(frozen=True)
class Mount:
    """A mounted cgroup hierarchy: ``root`` is the cgroup shown at ``point``."""

    point: str
    root: str
    fstype: str  # "cgroup" (v1) or "cgroup2"
    options: frozenset[str]  # super options: the v1 controllers, e.g. {"rw", "memory"}


@dataclass(frozen=True)
class Membership:
    """One line of /proc/self/cgroup: a hierarchy's controllers (none for v2) and our path."""

    controllers: frozenset[str]
    path: str

    @property
    def v2(self) -> bool:
        return not self.controllers


@dataclass(frozen=True)
class Location:
    """The directories of this process's own cgroup in each hierarchy that matters."""

    v2: str | None
    memory: str | None
    pids: str | None


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts in /proc/self/mountinfo text, in order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        if len(fields) < dash + 4 or fields[dash + 1] not in ("cgroup", "cgroup2"):
            continue
        mounts.append(
            Mount(
                point=_unescape(fields[4]),
                root=_unescape(fields[3]),
                fstype=fields[dash + 1],
                options=frozenset(fields[dash + 3].split(",")),
            )
        )
    return mounts


def parse_proc_cgroup(text: str) -> list[Membership]:
    """The lines of /proc/self/cgroup text (``id:controllers:path``)."""
    memberships = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers = frozenset(c for c in parts[1].split(",") if c)
        memberships.append(Membership(controllers, parts[2]))
    return memberships


def directory(mount: Mount, path: str) -> str | None:
    """Where cgroup ``path`` appears below ``mount``; None when the mount does not show it."""
    if not path.startswith("/") or ".." in path.split("/"):
        return None
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return None
    relative = path[len(root) :].strip("/")
    return os.path.join(mount.point, relative) if relative else mount.point


def _find(mounts: list[Mount], path: str | None, fstype: str, option: str | None) -> str | None:
    if path is None:
        return None
    for mount in mounts:
        if mount.fstype == fstype and (option is None or option in mount.options):
            found = directory(mount, path)
            if found is not None:
                return found
    return None


def locate(proc_cgroup: str, mountinfo: str) -> Location:
    """This process's own cgroup directories, from /proc/self/cgroup and mountinfo text."""
    memberships = parse_proc_cgroup(proc_cgroup)
    mounts = parse_mountinfo(mountinfo)
    v2 = next((m.path for m in memberships if m.v2), None)

    def v1(controller: str) -> str | None:
        path = next((m.path for m in memberships if controller in m.controllers), None)
        return _find(mounts, path, "cgroup", controller)

    return Location(_find(mounts, v2, "cgroup2", None), v1("memory"), v1("pids"))


# --- Files -------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as err:
        raise CgroupError(err.errno, f"cannot read {path}: {err.strerror}") from err


def _write(path: str, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as err:
        raise CgroupError(err.errno, f"cannot write {value!r} to {path}: {err.strerror}") from err


def _mkdir(path: str) -> bool:
    """Make a directory; False when it already existed."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        return False
    except OSError as err:
        raise CgroupError(err.errno, f"cannot create {path}: {err.strerror}") from err
    return True


def _rmdir_quietly(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


# --- The layout below the server's own cgroups ------------------------------------------


@dataclass(frozen=True)
class _Layout:
    backend: Backend
    own: tuple[str, ...]  # the server's own cgroup: (v2,) or (memory, pids)

    def parents(self) -> tuple[str, ...]:
        return tuple(os.path.join(d, f"chatfn-{os.getpid()}") for d in self.own)


def _enable_controllers(cgroup_dir: str) -> None:
    """v2: let ``cgroup_dir``'s children have memory and pids limits."""
    path = os.path.join(cgroup_dir, "cgroup.subtree_control")
    if set(CONTROLLERS) <= set(_read(path).split()):
        return
    _write(path, " ".join(f"+{c}" for c in CONTROLLERS))


def _sweep_stale(layout: _Layout) -> None:
    """Remove what a server that is gone left behind: ``chatfn-<pid>`` directories whose
    pid no longer runs (their processes ended with it; empty cgroups can be removed)."""
    for own in layout.own:
        try:
            entries = os.listdir(own)
        except OSError:
            continue
        for entry in entries:
            pid = entry.removeprefix("chatfn-")
            if not entry.startswith("chatfn-") or not pid.isdigit() or _alive(int(pid)):
                continue
            stale = os.path.join(own, entry)
            with contextlib.suppress(OSError):
                for child in os.scandir(stale):
                    if child.is_dir(follow_symlinks=False):
                        _rmdir_quietly(child.path)
            _rmdir_quietly(stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ensure_parents(layout: _Layout) -> None:
    """Make ``chatfn-<pid>`` in each hierarchy (v2: with the controllers enabled in it),
    after sweeping away those of servers that are gone."""
    _sweep_stale(layout)
    made: list[str] = []
    try:
        for parent in layout.parents():
            if _mkdir(parent):
                made.append(parent)
            if layout.backend == "v2":
                _enable_controllers(parent)
    except CgroupError:
        for parent in made:
            _rmdir_quietly(parent)
        raise


def _make_children(layout: _Layout, name: str) -> tuple[str, ...]:
    made: list[str] = []
    try:
        for parent in layout.parents():
            child = os.path.join(parent, name)
            if not _mkdir(child):
                raise CgroupError(errno.EEXIST, f"cannot create {child}: it already exists")
            made.append(child)
    except CgroupError:
        for child in made:
            _rmdir_quietly(child)
        raise
    return tuple(made)


def _remove_parents_if_empty(parents: tuple[str, ...]) -> None:
    """Best effort: rmdir fails (and is ignored) while a parent still has a child cgroup."""
    with _lock:
        for parent in parents:
            _rmdir_quietly(parent)


def _write_limits(backend: Backend, paths: tuple[str, ...], memory_bytes: int, pids: int) -> None:
    if backend == "v2":
        (cgroup_dir,) = paths
        _write(os.path.join(cgroup_dir, "memory.max"), str(memory_bytes))
        swap = os.path.join(cgroup_dir, "memory.swap.max")
        if os.path.exists(swap):
            _write(swap, "0")
        _write(os.path.join(cgroup_dir, "pids.max"), str(pids))
        return
    memory_dir, pids_dir = paths
    _write(os.path.join(memory_dir, "memory.limit_in_bytes"), str(memory_bytes))
    memsw = os.path.join(memory_dir, "memory.memsw.limit_in_bytes")
    if os.path.exists(memsw):
        try:
            _write(memsw, str(memory_bytes))
        except CgroupError:
            pass  # swap accounting off or refused: memory.limit_in_bytes still holds
    _write(os.path.join(pids_dir, "pids.max"), str(pids))


# --- Detection ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Setup:
    support: Support
    layout: _Layout | None


def _probe(layout: _Layout) -> None:
    """Make a cgroup with limits below ``chatfn-<pid>`` and remove it again; raise if not."""
    with _lock:
        _ensure_parents(layout)
        try:
            for parent in layout.parents():
                _rmdir_quietly(os.path.join(parent, _PROBE))  # left by a crash, pid reused
            children = _make_children(layout, _PROBE)
            try:
                _write_limits(layout.backend, children, 1 << 30, 1024)
            finally:
                for child in children:
                    _rmdir_quietly(child)
        finally:
            for parent in layout.parents():
                _rmdir_quietly(parent)


def _try_v2(own: str | None) -> _Setup | str:
    """A working v2 setup, or why there is none."""
    if own is None:
        return "cgroup v2: this process's cgroup is not on any mounted cgroup2 filesystem"
    try:
        offered = set(_read(os.path.join(own, "cgroup.controllers")).split())
    except CgroupError as err:
        return f"cgroup v2 at {own}: {err.strerror}"
    missing = [c for c in CONTROLLERS if c not in offered]
    if missing:
        listed = " ".join(sorted(offered)) or "none"
        return (
            f"cgroup v2 at {own} does not offer the {' and '.join(missing)} controller(s) "
            f"(cgroup.controllers: {listed}; on a hybrid system they are bound to cgroup v1)"
        )
    try:
        _enable_controllers(own)
    except CgroupError as err:
        return (
            f"cgroup v2 at {own} cannot pass memory and pids on to child cgroups "
            f"({err.strerror}); v2 allows it only in the root cgroup or a cgroup that holds no "
            "processes itself, and only where this process may write; run chatfn in a "
            "delegated cgroup (e.g. a systemd unit with Delegate=yes) where it can enable them"
        )
    layout = _Layout("v2", (own,))
    try:
        _probe(layout)
    except CgroupError as err:
        return f"cgroup v2 at {own}: {err.strerror}"
    return _Setup(Support("v2", f"cgroup v2 at {own}"), layout)


def _try_v1(memory: str | None, pids: str | None) -> _Setup | str:
    """A working v1 setup, or why there is none."""
    missing = [c for c, d in (("memory", memory), ("pids", pids)) if d is None]
    if memory is None or pids is None:
        return f"cgroup v1: no mounted {' or '.join(missing)} hierarchy holds this process"
    layout = _Layout("v1", (memory, pids))
    try:
        _probe(layout)
    except CgroupError as err:
        return f"cgroup v1: {err.strerror}"
    return _Setup(Support("v1", f"cgroup v1: memory at {memory}, pids at {pids}"), layout)


def _detect() -> _Setup:
    try:
        location = locate(_read("/proc/self/cgroup"), _read("/proc/self/mountinfo"))
    except CgroupError as err:
        return _Setup(Support(None, f"cgroups: {err.strerror}"), None)
    v2 = _try_v2(location.v2)
    if isinstance(v2, _Setup):
        return v2
    v1 = _try_v1(location.memory, location.pids)
    if isinstance(v1, _Setup):
        reason = f"{v1.support.reason} (v2 not used: {v2})"
        return _Setup(Support("v1", reason), v1.layout)
    return _Setup(Support(None, f"{v2}; {v1}"), None)


@functools.cache
def _setup_for(pid: int) -> _Setup:
    try:
        return _detect()
    except Exception as err:  # detect() never raises: an unexpected failure is "off"
        return _Setup(Support(None, f"cgroups: unexpected error {err!r}"), None)


def detect() -> Support:
    """Whether this machine lets this process limit process trees with cgroups (cached)."""
    return _setup_for(os.getpid()).support


# --- Cgroups -----------------------------------------------------------------------------


def _open_pidfds(pids: list[int]) -> dict[int, int]:
    fds = {}
    for pid in pids:
        try:
            fds[pid] = os.pidfd_open(pid)
        except OSError:
            pass  # gone already
    return fds


def _kill_listed(pids: list[int], list_again: Callable[[], list[int]]) -> None:
    """SIGKILL ``pids``, never a process that reused one of them after it was listed: each
    is opened as a pidfd first, and signalled only if still listed after that (a pidfd
    keeps naming its process, and a pid is not reused while its process exists)."""
    fds = _open_pidfds(pids)
    try:
        still = set(list_again())
        for pid, fd in fds.items():
            if pid in still:
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                except OSError:
                    pass
    finally:
        for fd in fds.values():
            os.close(fd)


class Cgroup:
    """A cgroup made by ``create`` (one directory per hierarchy used)."""

    def __init__(self, backend: Backend, paths: tuple[str, ...]) -> None:
        self._backend: Backend = backend
        self._paths = paths

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def paths(self) -> tuple[str, ...]:
        """The cgroup's directories: (v2,) or (memory, pids)."""
        return self._paths

    def __repr__(self) -> str:
        return f"Cgroup({self._backend!r}, {self._paths!r})"

    def add(self, pid: int) -> None:
        """Move process ``pid`` (and so all the children it makes later) into this cgroup."""
        for path in self._paths:
            _write(os.path.join(path, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        """The processes in this cgroup now (none once it is removed)."""
        found: set[int] = set()
        for path in self._paths:
            try:
                text = _read(os.path.join(path, "cgroup.procs"))
            except CgroupError as err:
                if err.errno == errno.ENOENT:
                    continue
                raise
            found.update(int(line) for line in text.split())
        return sorted(found)

    def remove(self) -> None:
        """Kill every process left in the cgroup and remove its directories (and
        ``chatfn-<pid>`` once empty). Retries for up to REMOVE_TIMEOUT seconds, because the
        kernel frees a cgroup only shortly after its last process exits. Never raises."""
        deadline = time.monotonic() + REMOVE_TIMEOUT
        delay = 0.001
        while not self._remove_once() and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        _remove_parents_if_empty(tuple(os.path.dirname(p) for p in self._paths))

    def _remove_once(self) -> bool:
        """One round of killing and rmdir; True when every directory is gone."""
        try:
            self._kill_members()
        except OSError:
            pass
        gone = True
        for path in self._paths:
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError:
                gone = False
        return gone

    def _kill_members(self) -> None:
        listed = self.pids()
        if not listed:
            return
        kill_file = os.path.join(self._paths[0], "cgroup.kill")
        if self._backend == "v2" and os.path.exists(kill_file):
            try:
                _write(kill_file, "1")
                return
            except CgroupError:
                pass  # fall back to signals
        _kill_listed(listed, self.pids)


def _check(name: str, memory_bytes: int, pids: int) -> None:
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(
            f"cgroup name {name!r}: use 1 to 255 of A-Z a-z 0-9 . _ - (and not . or ..)"
        )
    if memory_bytes <= 0:
        raise ValueError(f"memory_bytes must be positive, not {memory_bytes}")
    if pids <= 0:
        raise ValueError(f"pids must be positive, not {pids}")


def create(name: str, *, memory_bytes: int, pids: int) -> Cgroup:
    """Make cgroup ``name`` below ``chatfn-<pid>`` with a memory limit (bytes, no swap) and a
    limit on the number of processes and threads in it. Raises ValueError for a bad name or
    limit, CgroupError (naming the file) when the kernel refuses or cgroups are off."""
    _check(name, memory_bytes, pids)
    setup = _setup_for(os.getpid())
    if setup.layout is None:
        raise CgroupError(errno.EOPNOTSUPP, f"cgroups unavailable: {setup.support.reason}")
    layout = setup.layout
    with _lock:
        _ensure_parents(layout)
        try:
            paths = _make_children(layout, name)
        except CgroupError:
            for parent in layout.parents():
                _rmdir_quietly(parent)
            raise
    cgroup = Cgroup(layout.backend, paths)
    try:
        _write_limits(layout.backend, paths, memory_bytes, pids)
    except CgroupError:
        cgroup.remove()
        raise
    return cgroup
