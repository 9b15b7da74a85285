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
from dataclasses import dataclass

from sandbox.policy import MIB, Limits, Policy

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Isolation:
    """Which layers a template process could set up on this machine."""

    network_namespace: bool
    uid_drop: bool
    seccomp: bool = False

    def to_dict(self) -> dict[str, bool]:
        return {
            "network_namespace": self.network_namespace,
            "uid_drop": self.uid_drop,
            "seccomp": self.seccomp,
        }


def prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}) failed: {os.strerror(err)}")


def isolate_network() -> bool:
    """Move this (template) process into an empty network namespace, when allowed.

    Workers forked from it inherit the namespace: only a loopback that is down, so every
    connect fails. Needs CAP_SYS_ADMIN; without it the caller falls back to the import
    allowlist (``socket`` is not importable) until the seccomp layer adds a real block.
    """
    if os.geteuid() != 0:
        return False
    return bool(_libc.unshare(CLONE_NEWNET) == 0)


def current_address_space() -> int:
    with open("/proc/self/statm", "rb") as f:
        pages = int(f.read().split()[0])
    return pages * os.sysconf("SC_PAGE_SIZE")


def make_private_dir(
    root: str, uid: int | None, gid: int | None, *, prefix: str = "w", mode: int = 0o700
) -> str:
    path = os.path.join(root, f"{prefix}{os.getpid()}")
    os.mkdir(path, mode)
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
    """The template process (as root): become the sandbox uid/gid for good, with no way
    back (no_new_privs), and not dumpable. (No PDEATHSIG: it would fire when the host
    thread that started the template exits; the template exits when its control socket
    closes.)"""
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    os.setgroups([])
    os.setgid(policy.sandbox_gid)
    os.setuid(policy.sandbox_uid)
    # Cleared by the uid change: set after it.
    prctl(PR_SET_DUMPABLE, 0)


def no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def apply(limits: Limits) -> None:
    """Lock a worker down (it already runs as the template's uid). Raises OSError if a
    limit cannot be set."""
    parent = os.getppid()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    fsize = limits.file_size_mb * MIB
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    # A write past the limit then fails with EFBIG instead of killing the worker.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    memory = current_address_space() + limits.memory_mb * MIB
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
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
