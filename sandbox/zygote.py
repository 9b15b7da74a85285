"""The template process of one deployment (runs as its own exec'd interpreter).

Started by ``sandbox.process.Zygote`` with a clean environment and one control socket. It
compiles the deployment's code, imports RestrictedPython and the allowlisted stdlib, moves
into an empty network namespace, drops to the sandbox uid (as root), and only then imports
the declared dependencies, whose import-time code is untrusted. It freezes the heap
(``gc.freeze``) and then only forks: each fork is a worker that locks itself down
(``oslimits``) and serves invocations (``worker``). It never runs handler code itself and
stays single-threaded, so forking it is safe and takes milliseconds.

Control requests (host -> template), one at a time, each answered:
    spawn  + fds [worker socket, log memfd]  ->  {pid} + fd [pidfd]
    reap   {pid}                             ->  {exit} | {signal}
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import os
import shutil
import signal
import socket
import sys
from typing import Any, NoReturn

import orjson

from sandbox import oslimits, seccomp
from sandbox.compiler import CompiledProject, compile_project
from sandbox.logbuf import LogBuffer
from sandbox.policy import Limits, Policy
from sandbox.wire import HEADER, FrameReader, encode
from sandbox.worker import Worker

EXIT_BOOT_FAILED = 2
EXIT_CHILD_SETUP = 70
_CONTROL_CAP = 256 * 1024 * 1024
# Modules the allowlisted stdlib imports lazily (idna for any host name lookup, _strptime
# for time.strptime). A worker that dropped to an unprivileged uid may be unable to read
# the interpreter's files, so everything it will need is imported here, before the fork.
_LAZY_STDLIB = ("encodings.idna", "encodings.punycode", "_strptime")


class _LogStream:
    """``sys.stdout``/``sys.stderr`` of a worker: Python-level output of dependencies goes to
    the invocation log too. The OS-level fds 1 and 2 point at /dev/null."""

    def __init__(self, log: LogBuffer) -> None:
        self._log = log

    def write(self, text: str) -> int:
        self._log.write(str(text))
        return len(text)

    def flush(self) -> None:
        pass


def _repoint_packages(moved: dict[str, str]) -> None:
    """Packages imported before the uid drop find their submodules through ``__path__``:
    point those at the same directories' ``/proc/self/fd`` paths too."""
    prefixes = sorted(moved, key=len, reverse=True)
    for module in list(sys.modules.values()):
        search = getattr(module, "__path__", None)
        if not isinstance(search, list):
            continue
        for i, entry in enumerate(search):
            for prefix in prefixes:
                if entry == prefix or entry.startswith(prefix + os.sep):
                    search[i] = moved[prefix] + entry[len(prefix) :]
                    break


class Template:
    def __init__(self, ctl: socket.socket, boot: dict[str, Any]) -> None:
        self.ctl = ctl
        self.policy = Policy.from_dict(boot["policy"])
        self.limits = Limits(**boot["limits"])
        self.files: dict[str, str] = boot["files"]
        self.tmp_root: str = boot["tmp_root"]
        self.drop_uid = os.geteuid() == 0
        self.project: CompiledProject | None = None
        self.path_fds: list[int] = []
        self.isolation = oslimits.Isolation(network_namespace=False, uid_drop=self.drop_uid)

    def boot(self) -> None:
        """Compile, import the trusted modules, isolate, and only then, with privileges
        dropped, import the declared dependencies: their import-time code is as untrusted
        as a handler and never runs as root or with the host's network."""
        compiled = compile_project(self.files)
        if not isinstance(compiled, CompiledProject):
            raise RuntimeError("; ".join(str(e) for e in compiled))
        self.project = compiled
        dependencies = set(self.policy.preload)
        for name in sorted(self.policy.allowed_modules - dependencies):
            try:
                importlib.import_module(name)
            except ImportError:
                pass
        for name in _LAZY_STDLIB:
            importlib.import_module(name)
        netns = self.limits.network == "none" and oslimits.isolate_network()
        self.isolation = oslimits.Isolation(network_namespace=netns, uid_drop=self.drop_uid)
        # Dependencies after the standard library, so one cannot shadow a stdlib module.
        paths = [*sys.path, *self.policy.module_paths]
        if self.drop_uid:
            originals = paths
            paths, self.path_fds = oslimits.paths_through_fds(originals)
            _repoint_packages(
                dict(zip([p for p in originals if p and os.path.isdir(p)], paths, strict=True))
            )
            self.tmp_root = oslimits.make_private_dir(
                self.tmp_root, self.policy.sandbox_uid, self.policy.sandbox_gid, prefix="z"
            )
            oslimits.drop_privileges(self.policy)
        sys.path[:] = paths
        sys.path_importer_cache.clear()
        # From here on, the template and every worker forked from it run under the
        # seccomp filter: the dependencies' import-time code included.
        if seccomp.supported():
            oslimits.no_new_privs()
            seccomp.install(network=self.limits.network)
            self.isolation = dataclasses.replace(self.isolation, seccomp=True)
        for name in self.policy.preload:
            importlib.import_module(name)
        gc.collect()
        gc.freeze()

    def serve(self) -> NoReturn:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.ctl, 65536, 4)
            except OSError:
                os._exit(0)
            if not data:
                os._exit(0)  # the host went away; workers follow through PDEATHSIG
            (size,) = HEADER.unpack_from(data)
            request = orjson.loads(data[4 : 4 + size])
            op = request.get("op")
            if op == "spawn" and len(fds) == 2:
                self._spawn(fds[0], fds[1])
            elif op == "reap":
                self._reply(self._reap(int(request["pid"])))
            else:
                for fd in fds:
                    os.close(fd)
                self._reply({"ok": False, "error": f"unknown request {op!r}"})

    def _reply(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        frame = encode(message, 65536)
        if fds:
            socket.send_fds(self.ctl, [frame], fds)
        else:
            self.ctl.sendall(frame)

    def _spawn(self, sock_fd: int, log_fd: int) -> None:
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(sock_fd)
            os.close(log_fd)
            self._reply({"ok": False, "error": f"fork failed: {exc}"})
            return
        if pid == 0:
            try:
                self._become_worker(sock_fd, log_fd)
            finally:
                os._exit(EXIT_CHILD_SETUP)
        os.close(sock_fd)
        os.close(log_fd)
        pidfd = os.pidfd_open(pid)
        try:
            self._reply({"ok": True, "pid": pid}, [pidfd])
        finally:
            os.close(pidfd)

    def _reap(self, pid: int) -> dict[str, Any]:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return {"ok": True, "exit": None}
        shutil.rmtree(os.path.join(self.tmp_root, f"w{pid}"), ignore_errors=True)
        if os.WIFSIGNALED(status):
            return {"ok": True, "signal": os.WTERMSIG(status)}
        return {"ok": True, "exit": os.waitstatus_to_exitcode(status)}

    def _become_worker(self, sock_fd: int, log_fd: int) -> NoReturn:
        self.ctl.close()
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        log = LogBuffer.attach(log_fd, self.limits.log_bytes)
        sock = socket.socket(fileno=sock_fd)
        oslimits.close_fds_except({sock_fd, *self.path_fds})
        # The template already runs as the sandbox uid: the directory is the worker's own.
        os.chdir(oslimits.make_private_dir(self.tmp_root, None, None))
        os.environ.clear()
        sys.stdout = sys.stderr = _LogStream(log)  # type: ignore[assignment,unused-ignore]
        oslimits.apply(self.limits)
        assert self.project is not None
        Worker(sock, log, self.project, self.files, self.policy, self.limits).serve()


def main(control_fd: int) -> NoReturn:
    ctl = socket.socket(fileno=control_fd)
    boot = FrameReader(ctl, _CONTROL_CAP).read()
    try:
        template = Template(ctl, boot)
        template.boot()
    except BaseException as exc:
        ctl.sendall(encode({"ok": False, "error": f"{type(exc).__name__}: {exc}"}, 65536))
        os._exit(EXIT_BOOT_FAILED)
    ctl.sendall(
        encode(
            {"ok": True, "pid": os.getpid(), "isolation": template.isolation.to_dict()},
            65536,
        )
    )
    template.serve()


if __name__ == "__main__":
    main(int(sys.argv[1]))
