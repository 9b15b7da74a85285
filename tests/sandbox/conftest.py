"""Shared fixtures for the sandbox tests: one pool per module, dependency folders."""

from __future__ import annotations

import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox import WorkerPool


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    with WorkerPool() as p:
        yield p


@pytest.fixture(scope="module")
def dependency_dir() -> Iterator[Path]:
    """A folder of 'declared dependencies': plain modules that run unrestricted, the way an
    installed package would, so tests can act like native code inside a worker. Outside
    pytest's 0700 temp tree, so that a worker running as an unprivileged uid can read it."""
    root = Path(tempfile.mkdtemp(prefix="chatfn-deps-"))
    root.chmod(0o755)
    (root / "crashy.py").write_text(
        textwrap.dedent(
            """
            import ctypes, os

            def exit_now(code):
                os._exit(code)

            def segfault():
                ctypes.string_at(0)
            """
        )
    )
    (root / "probe.py").write_text(
        textwrap.dedent(
            """
            import os, resource, socket

            def environment():
                return dict(os.environ)

            def identity():
                return {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
                        "cwd": os.getcwd(), "cwd_entries": os.listdir(".")}

            def try_fork():
                try:
                    pid = os.fork()
                except OSError as exc:
                    return "refused: " + exc.strerror
                if pid == 0:
                    os._exit(0)
                return "forked"

            def try_read(path):
                try:
                    with open(path, "rb") as f:
                        return "read %d bytes" % len(f.read())
                except OSError as exc:
                    return "refused: " + exc.strerror

            def try_connect(port):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return "connected"
                except OSError as exc:
                    return "refused: " + str(exc.strerror or exc)

            def try_connect_name(host, port):
                try:
                    socket.create_connection((host, port), timeout=1).close()
                    return "connected"
                except OSError as exc:
                    return "refused: " + str(exc.strerror or exc)

            def write_bytes(n):
                with open("big.bin", "wb") as f:
                    f.write(b"x" * n)
                return n

            def try_exec(path):
                try:
                    os.execv(path, [path, "-c", "true"])
                except OSError as exc:
                    return "refused: " + exc.strerror
                return "executed"

            def _libc():
                import ctypes
                return ctypes.CDLL(None, use_errno=True)

            def try_ptrace(pid):
                import ctypes
                libc = _libc()
                if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
                    return "refused: " + os.strerror(ctypes.get_errno())
                return "attached"

            def try_unshare():
                import ctypes
                libc = _libc()
                if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
                    return "refused: " + os.strerror(ctypes.get_errno())
                return "unshared"

            def try_socket(family):
                try:
                    socket.socket(family, socket.SOCK_STREAM).close()
                    return "created"
                except OSError as exc:
                    return "refused: " + exc.strerror

            def _seccomp_mode():
                import ctypes
                return str(ctypes.CDLL(None).prctl(21, 0, 0, 0, 0))  # PR_GET_SECCOMP

            _SECCOMP_AT_IMPORT = _seccomp_mode()

            def imported_under_seccomp():
                return _SECCOMP_AT_IMPORT

            def limits():
                return {name: resource.getrlimit(getattr(resource, name))
                        for name in ("RLIMIT_NPROC", "RLIMIT_CORE", "RLIMIT_NOFILE",
                                     "RLIMIT_FSIZE", "RLIMIT_AS")}
            """
        )
    )
    for f in root.iterdir():
        f.chmod(0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)
