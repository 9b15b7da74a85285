"""Operating-system limits a worker puts on itself right after fork, before any user code.

Order matters: everything that needs privilege (the private directory's owner, groups, uid)
happens before the uid drop; RLIMIT_NPROC = 0 comes last, so that from then on the worker
can create neither processes nor threads. Each step that the machine cannot do is reported
in ``Isolation`` rather than silently skipped.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import struct

from sandbox.policy import MIB, Limits, Policy

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_MS_REC, _MS_PRIVATE = 0x4000, 1 << 18
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_SYS_MOUNT_SETATTR = 442

_libc = ctypes.CDLL(None, use_errno=True)


def prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}) failed: {os.strerror(err)}")


def unshare(flags: int) -> None:
    """Move this process into new namespaces (``CLONE_NEW*`` flags). With CLONE_NEWPID it
    is this process's next child that starts the new pid namespace, as its pid 1."""
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str) -> None:
    def c(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    if _libc.mount(c(source), c(target), c(fstype), ctypes.c_ulong(flags), c(data) or None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or source or ''} on {target}: {os.strerror(err)}")


def _set_mount_attributes(set_flags: int, clear_flags: int) -> None:
    attr = struct.pack("QQQQ", set_flags, clear_flags, _MS_PRIVATE, 0)
    buffer = ctypes.create_string_buffer(attr, len(attr))
    _libc.syscall.restype = ctypes.c_long
    result = _libc.syscall(
        _SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE, buffer, ctypes.c_size_t(len(attr))
    )
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount_setattr /: {os.strerror(err)}")


def private_mounts(tmp_root: str, tmp_bytes: int) -> str:
    """In a new mount namespace (as root): make every mount private to it and read-only, a
    size-capped tmpfs over ``tmp_root`` so that other deployments' temporary directories
    are not even visible, and a fresh /proc for its pid namespace. Returns a note on what
    fell short (an empty string when nothing did); raises OSError, with the filesystem as
    it was, when the read-only view or the tmpfs cannot be had."""
    read_only = _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV
    _set_mount_attributes(read_only, 0)
    size = max(1, tmp_bytes // 4096) * 4096
    try:
        _mount("tmpfs", tmp_root, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={size},mode=0711")
    except OSError:
        _set_mount_attributes(0, _MOUNT_ATTR_RDONLY)  # a writable temporary root again
        raise
    try:
        _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "")
    except OSError as exc:
        return f"the host's /proc stays visible ({exc})"
    return ""


def address_space(statm_fd: int) -> int:
    """The address-space size of the process whose /proc/<pid>/statm ``statm_fd`` is
    (opened early: a Landlock-confined process cannot open it later)."""
    pages = int(os.pread(statm_fd, 256, 0).split()[0])
    return pages * os.sysconf("SC_PAGE_SIZE")


def make_private_dir(root: str, name: str, uid: int | None, gid: int | None) -> str:
    """``root/name``, mode 0700, owned by ``uid``/``gid`` when given."""
    path = os.path.join(root, name)
    os.mkdir(path, 0o700)
    if uid is not None and gid is not None:
        os.chown(path, uid, gid)
    return path


def paths_through_fds(paths: list[str]) -> tuple[list[str], list[int]]:
    """Import paths a process keeps after it drops to an unprivileged uid.

    Each existing directory is opened (O_PATH) while still privileged and replaced by
    ``/proc/self/fd/N``: the kernel resolves that link to the directory without checking
    the search permission of its ancestors, so the interpreter's own library (installed,
    say, under a 0700 /root) and a dependency environment stay importable, and nothing
    else below those ancestors becomes reachable. Returns the new paths and the fds, which
    workers keep open.
    """
    new_paths, fds = [], []
    for path in paths:
        if not path or not os.path.isdir(path):
            continue
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        fds.append(fd)
        new_paths.append(f"/proc/self/fd/{fd}")
    return new_paths, fds


def close_fds_except(keep: set[int]) -> None:
    """Close every descriptor from 3 up, except ``keep``."""
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 65536)


def drop_privileges(policy: Policy) -> None:
    """The template process (as root): become the app's uid/gid for good, with no
    supplementary groups and no way back (no_new_privs), and not dumpable."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    os.setgroups([])
    os.setgid(policy.sandbox_gid)
    os.setuid(policy.sandbox_uid)
    # Cleared by the uid change: set after it.
    prctl(PR_SET_DUMPABLE, 0)


def no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def apply(limits: Limits, *, base_address_space: int, rlimits: bool) -> None:
    """Lock a worker down (it already runs as the template's uid). ``rlimits`` adds the
    isolation limits (no new processes, capped address space) to the per-invocation ones
    (CPU, file size, open files, no core dumps). Raises OSError if a limit cannot be set."""
    parent = os.getppid()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    fsize = limits.file_size_mb * MIB
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    # A write past the limit then fails with EFBIG instead of killing the worker.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    if rlimits:
        memory = base_address_space + limits.memory_mb * MIB
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    cpu = limits.effective_cpu_seconds
    lifetime_cpu = min(cpu * limits.max_invocations + cpu, 10_000_000)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, lifetime_cpu))
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    # Not dumpable: no ptrace from other workers running as the same uid.
    prctl(PR_SET_DUMPABLE, 0)
    # Die with the template process.
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)
    if rlimits:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
