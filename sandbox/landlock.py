"""Landlock: unprivileged, path-based access control that a process puts on itself.

A template process restricts itself before it imports the declared dependencies, and each
worker adds a second, narrower layer right after the fork (layers only ever narrow). Both
grant read access to the import paths (the interpreter's library, the deployment's
environment) and to public system files listed by ``read_paths``, and write access to one
private directory; nothing may be executed. With network ``none`` and ABI 4 or later, TCP
bind and connect are refused too; with ABI 6 or later, signals and abstract Unix sockets
cannot reach outside the domain.

Rules are given as paths or as ``O_PATH`` descriptors opened earlier (a process that
dropped its uid may no longer be able to open the path itself).
"""

from __future__ import annotations

import ctypes
import os
import platform
import stat
import struct
from collections.abc import Iterable, Sequence

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
# Rights that make sense on a file (the kernel refuses directory rights on one).
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1

READ = READ_FILE | READ_DIR
WRITE = (
    READ
    | WRITE_FILE
    | REMOVE_DIR
    | REMOVE_FILE
    | MAKE_DIR
    | MAKE_REG
    | MAKE_SYM
    | MAKE_SOCK
    | MAKE_FIFO
    | REFER
    | TRUNCATE
)

# Public, read-only parts of the system a worker may need after the fork: shared libraries
# (a dependency loading one lazily, ctypes' libffi), time zones, the null and random
# devices. Nothing here is secret on a server.
SYSTEM_READ = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/share/zoneinfo")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
# What name resolution and TLS read, for network "outbound" only.
NETWORK_READ = (
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/host.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/usr/share/ca-certificates",
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is not available."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return 0
    version = _libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), _CREATE_RULESET_VERSION)
    return max(0, int(version))


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock {what}: {os.strerror(err)}")
    return result


def _open_path(path: str) -> int | None:
    try:
        return os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None  # rules for what does not exist are skipped


class Ruleset:
    """One Landlock ruleset being built; ``restrict_self`` enforces it on this process."""

    def __init__(self, abi: int, *, deny_tcp: bool) -> None:
        self.abi = abi
        self.fs = _FS_BY_ABI[max(k for k in _FS_BY_ABI if k <= abi)]
        net = NET_BIND_TCP | NET_CONNECT_TCP if deny_tcp and abi >= 4 else 0
        scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
        attr = struct.pack("QQQ", self.fs, net, scoped)
        size = 24 if abi >= 6 else 16
        buffer = ctypes.create_string_buffer(attr[:size], size)
        self.fd = _check(
            _libc.syscall(_SYS_CREATE_RULESET, buffer, ctypes.c_size_t(size), 0), "create_ruleset"
        )

    def allow(self, target: str | int, access: int) -> None:
        """Allow ``access`` beneath a path or an open (``O_PATH``) descriptor."""
        fd = _open_path(target) if isinstance(target, str) else target
        if fd is None:
            return
        try:
            access &= self.fs
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                access &= _FILE_RIGHTS
            if not access:
                return
            attr = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)
            _check(_libc.syscall(_SYS_ADD_RULE, self.fd, _RULE_PATH_BENEATH, attr, 0), "add_rule")
        finally:
            if isinstance(target, str):
                os.close(fd)

    def restrict_self(self) -> None:
        """Enforce the ruleset on this process and its future children (needs
        no_new_privs, which the caller has set)."""
        try:
            _check(_libc.syscall(_SYS_RESTRICT_SELF, self.fd, 0), "restrict_self")
        finally:
            os.close(self.fd)


def restrict(
    *,
    read: Iterable[str | int],
    write: Sequence[str | int],
    network: str,
    list_only: Iterable[str | int] = (),
    devices: Iterable[str] = DEVICES,
) -> int:
    """Confine this process: read beneath ``read``, read and write beneath ``write``, list
    (but not read files in) ``list_only``, the devices, nothing else of the filesystem, and
    no execution. Returns the ABI used. Raises OSError if the kernel refuses (or has no
    Landlock)."""
    abi = abi_version()
    if abi < 1:
        raise OSError("the kernel has no Landlock")
    rules = Ruleset(abi, deny_tcp=network == "none")
    try:
        for target in read:
            rules.allow(target, READ)
        for target in list_only:
            rules.allow(target, READ_DIR)
        for path in SYSTEM_READ + (NETWORK_READ if network != "none" else ()):
            rules.allow(path, READ)
        for device in devices:
            rules.allow(device, READ_FILE | WRITE_FILE)
        for target in write:
            rules.allow(target, WRITE)
    except BaseException:
        os.close(rules.fd)
        raise
    rules.restrict_self()
    return abi
