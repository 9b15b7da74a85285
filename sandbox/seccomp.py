"""A seccomp filter for workers: a small classic-BPF program of our own, installed with
``prctl(PR_SET_SECCOMP)`` after ``PR_SET_NO_NEW_PRIVS`` and before any user code runs.

It answers ``EPERM`` to the system calls a chat function never needs and an escape would:
running programs (``execve``, ``execveat``), reading or steering other processes
(``ptrace``, ``process_vm_readv/writev``), namespaces and mounts (``unshare``, ``setns``,
``mount``, ``umount2``, ``pivot_root``, ``chroot``, ``clone`` with namespace flags), kernel
attack surface (``bpf``, ``perf_event_open``, ``userfaultfd``, ``keyctl`` and friends,
module loading, ``kexec``, ``reboot``, ``iopl``), and with ``network = "none"``,
``socket`` for internet and raw packet families (``EACCES``). ``clone3`` answers
``ENOSYS`` so the C library falls back to ``clone``, whose flags the filter can read.
A call from another ABI (x32, i386) kills the process.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

# BPF instruction classes and fields.
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06

_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2

# struct seccomp_data: int nr; u32 arch; u64 ip; u64 args[6]
_NR, _ARCH = 0, 4


def _arg_low(i: int) -> int:
    return 16 + 8 * i  # the low 32 bits of a little-endian u64 argument


# x86_64 system call numbers.
DENIED: dict[str, int] = {
    "execve": 59,
    "execveat": 322,
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "chroot": 161,
    "unshare": 272,
    "setns": 308,
    "bpf": 321,
    "perf_event_open": 298,
    "userfaultfd": 323,
    "keyctl": 250,
    "add_key": 248,
    "request_key": 249,
    "kexec_load": 246,
    "kexec_file_load": 320,
    "init_module": 175,
    "finit_module": 313,
    "delete_module": 176,
    "reboot": 169,
    "swapon": 167,
    "swapoff": 168,
    "iopl": 172,
    "ioperm": 173,
    "open_by_handle_at": 304,
    "name_to_handle_at": 303,
    "acct": 163,
    "settimeofday": 164,
    "quotactl": 179,
}
_CLONE, _CLONE3, _SOCKET = 56, 435, 41
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
_CLONE_NAMESPACE_FLAGS = (
    0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80
)
_AF_INET, _AF_INET6, _AF_PACKET = 2, 10, 17


def supported() -> bool:
    return platform.system() == "Linux" and platform.machine() == "x86_64"


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def program(*, network: str) -> bytes:
    """The filter as raw ``struct sock_filter`` entries."""
    eperm = _RET_ERRNO | errno.EPERM
    out = [
        _insn(_LD_W_ABS, 0, 0, _ARCH),
        _insn(_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),
        _insn(_RET_K, 0, 0, _RET_KILL_PROCESS),
        _insn(_LD_W_ABS, 0, 0, _NR),
        _insn(_JGE_K, 0, 1, _X32_SYSCALL_BIT),
        _insn(_RET_K, 0, 0, _RET_KILL_PROCESS),
    ]
    for nr in sorted(DENIED.values()):
        out += [_insn(_JEQ_K, 0, 1, nr), _insn(_RET_K, 0, 0, eperm)]
    out += [_insn(_JEQ_K, 0, 1, _CLONE3), _insn(_RET_K, 0, 0, _RET_ERRNO | errno.ENOSYS)]
    # clone: refuse namespace flags (args[0] is the flags word).
    out += [
        _insn(_JEQ_K, 0, 4, _CLONE),
        _insn(_LD_W_ABS, 0, 0, _arg_low(0)),
        _insn(_JSET_K, 0, 1, _CLONE_NAMESPACE_FLAGS),
        _insn(_RET_K, 0, 0, eperm),
        _insn(_RET_K, 0, 0, _RET_ALLOW),
    ]
    if network == "none":
        eacces = _RET_ERRNO | errno.EACCES
        out += [
            _insn(_JEQ_K, 0, 5, _SOCKET),
            _insn(_LD_W_ABS, 0, 0, _arg_low(0)),
            _insn(_JEQ_K, 2, 0, _AF_INET),
            _insn(_JEQ_K, 1, 0, _AF_INET6),
            _insn(_JEQ_K, 0, 1, _AF_PACKET),
            _insn(_RET_K, 0, 0, eacces),
        ]
    out.append(_insn(_RET_K, 0, 0, _RET_ALLOW))
    return b"".join(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(*, network: str) -> None:
    """Install the filter on this process (and its future threads). Needs no_new_privs.
    Raises OSError if the kernel refuses it."""
    code = program(network=network)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(code) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter refused: {errno.errorcode.get(err, err)}")
