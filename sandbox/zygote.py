"""The template process of one deployment (runs as its own exec'd interpreter).

Started by ``sandbox.process.Zygote`` with a clean environment and one control socket. As
root it first enters new pid, IPC, mount and (network ``none``) network namespaces: the
process the host started stays outside and only waits, its child is pid 1 of the new pid
namespace and is the template. That makes the filesystem read-only for itself, mounts a
fresh /proc and a private tmpfs for temporary directories, compiles the deployment's code,
imports RestrictedPython and the allowlisted stdlib, drops to the app's own uid, confines
itself with Landlock and seccomp, and only then imports the declared dependencies, whose
import-time code is untrusted. It freezes the heap (``gc.freeze``) and then only forks:
each fork is a worker that adds its own, narrower Landlock layer and rlimits
(``oslimits``) and serves invocations (``worker``). It never runs handler code itself and
stays single-threaded, so forking it is safe and takes milliseconds. Every layer is
optional (``Policy.layers``) and reported on or off, with the reason, in the boot reply.

Control requests (host -> template), one at a time, each answered:
    spawn  + fds [worker socket, log memfd]  ->  {pid} + fd [pidfd]
    reap   {pid}                             ->  {exit} | {signal}
"""

from __future__ import annotations

import gc
import importlib
import os
import shutil
import signal
import socket
import sys
from typing import Any, NoReturn

import orjson

from sandbox import landlock, oslimits, seccomp
from sandbox.compiler import CompiledProject, compile_project
from sandbox.isolation import Isolation
from sandbox.logbuf import LogBuffer
from sandbox.policy import LAYERS, MIB, Limits, Policy
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
        self.root = os.geteuid() == 0
        self.project: CompiledProject | None = None
        self.path_fds: list[int] = []
        self.read_rules: list[int] = []
        self.list_rules: list[int] = []
        self.statm_fd = -1
        self.parent_alive_fd = -1
        self.isolation = Isolation()
        for layer in LAYERS:
            if not self.wants(layer):
                self.isolation.set(layer, False, "turned off by the policy")

    def wants(self, layer: str) -> bool:
        return layer in self.policy.layers

    def enter_namespaces(self) -> None:
        """As root: unshare the wanted namespaces. With a new pid namespace this process
        forks; the child (pid 1 there) returns and goes on as the template, this process
        only waits for it and exits with its status."""
        flags = {
            "pid_namespace": oslimits.CLONE_NEWPID,
            "ipc_namespace": oslimits.CLONE_NEWIPC,
            "mount_namespace": oslimits.CLONE_NEWNS,
            "network_namespace": oslimits.CLONE_NEWNET,
        }
        for layer, flag in flags.items():
            if not self.wants(layer):
                continue
            if layer == "network_namespace" and self.limits.network != "none":
                self.isolation.set(layer, False, 'the app\'s network is "outbound"')
            elif not self.root:
                self.isolation.set(layer, False, "needs root")
            else:
                try:
                    oslimits.unshare(flag)
                    self.isolation.set(layer, True)
                except OSError as exc:
                    self.isolation.set(layer, False, str(exc))
        if self.isolation.on["pid_namespace"]:
            self._fork_into_pid_namespace()
        if self.isolation.on["mount_namespace"]:
            tmp_bytes = (self.limits.max_workers + 1) * max(self.limits.file_size_mb, 1) * MIB
            try:
                note = oslimits.private_mounts(self.tmp_root, tmp_bytes)
                self.isolation.set("mount_namespace", True, note)
            except OSError as exc:
                self.isolation.set("mount_namespace", False, f"namespace made, but {exc}")

    def _fork_into_pid_namespace(self) -> None:
        # The child cannot see its parent from inside the namespace (getppid() is 0): it
        # learns whether the parent is still there from a pipe only the parent writes to.
        alive_r, alive_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            # The template: dies with the process the host started (and with it, being pid
            # 1 of the namespace, every worker).
            os.close(alive_w)
            os.set_blocking(alive_r, False)
            self.parent_alive_fd = alive_r
            self.die_with_parent()
            return
        os.close(alive_r)
        self.ctl.close()
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF)

    def die_with_parent(self) -> None:
        """(Again) ask for SIGKILL when the parent exits, then check it has not already: a
        uid change clears the request, so the uid drop calls this once more."""
        if self.parent_alive_fd < 0:
            return
        oslimits.prctl(oslimits.PR_SET_PDEATHSIG, signal.SIGKILL)
        try:
            os.read(self.parent_alive_fd, 1)
            os._exit(0)  # end of file: the parent already exited
        except BlockingIOError:
            pass

    def boot(self) -> None:
        """Compile, import the trusted modules, isolate, and only then, with privileges
        dropped, import the declared dependencies: their import-time code is as untrusted
        as a handler and never runs as root, unconfined or with the host's network."""
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
        self.statm_fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        # Dependencies after the standard library, so one cannot shadow a stdlib module.
        originals = [p for p in [*sys.path, *self.policy.module_paths] if p and os.path.isdir(p)]
        paths, self.path_fds = oslimits.paths_through_fds(originals)
        self._landlock_rules(originals)
        _repoint_packages(dict(zip(originals, paths, strict=True)))
        drop = self.root and self.wants("uid")
        uid = self.policy.sandbox_uid if drop else None
        gid = self.policy.sandbox_gid if drop else None
        # Not named by pid: templates in pid namespaces of their own all have pid 1.
        name = f"z{os.getpid()}-{os.urandom(6).hex()}"
        self.tmp_root = oslimits.make_private_dir(self.tmp_root, name, uid, gid)
        if drop:
            oslimits.drop_privileges(self.policy)
            self.die_with_parent()
            self.isolation.set("uid", True)
        elif self.wants("uid"):
            self.isolation.set("uid", False, "needs root")
        sys.path[:] = paths
        sys.path_importer_cache.clear()
        oslimits.no_new_privs()
        # From here on, the template and every worker forked from it are confined: the
        # dependencies' import-time code included.
        self._landlock(self.tmp_root)
        self._seccomp()
        if self.wants("rlimits"):
            if os.getuid() == 0:
                # The kernel exempts uid 0 from RLIMIT_NPROC: set, but no fork-bomb guard.
                why = "RLIMIT_NPROC does not bind uid 0: needs uid"
                self.isolation.set("rlimits", False, why)
            else:
                self.isolation.set("rlimits", True)
        for name in self.policy.preload:
            importlib.import_module(name)
        gc.collect()
        gc.freeze()

    def _landlock_rules(self, originals: list[str]) -> None:
        """What Landlock lets this template and its workers read: every import path, except
        that of the checkout or site directory holding chatfn itself only the ``sandbox``
        package (the rest of a checkout is not the workers' business)."""
        package = os.path.dirname(os.path.abspath(__file__))
        home = os.path.dirname(package)
        self.read_rules, self.list_rules = [], []
        for path, fd in zip(originals, self.path_fds, strict=True):
            if os.path.abspath(path) == home:
                self.list_rules.append(fd)
                self.read_rules.append(os.open(package, os.O_PATH | os.O_CLOEXEC))
            else:
                self.read_rules.append(fd)

    def _landlock_confine(self, writable: str) -> int:
        """A Landlock layer on this process: read the import paths, write ``writable``."""
        return landlock.restrict(
            read=self.read_rules,
            list_only=self.list_rules,
            write=[writable],
            network=self.limits.network,
        )

    def _landlock(self, writable: str) -> None:
        if not self.wants("landlock"):
            return
        try:
            abi = self._landlock_confine(writable)
            self.isolation.set("landlock", True, f"ABI {abi}")
        except OSError as exc:
            self.isolation.set("landlock", False, str(exc))

    def _seccomp(self) -> None:
        if not self.wants("seccomp"):
            return
        if not seccomp.supported():
            self.isolation.set("seccomp", False, "the filter is written for x86_64 Linux")
        else:
            seccomp.install(network=self.limits.network)
            self.isolation.set("seccomp", True)

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
        base = oslimits.address_space(self.statm_fd)
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(sock_fd)
            os.close(log_fd)
            self._reply({"ok": False, "error": f"fork failed: {exc}"})
            return
        if pid == 0:
            try:
                self._become_worker(sock_fd, log_fd, base)
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
            # Its own process group (setsid) too: anything it managed to start.
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return {"ok": True, "exit": None}
        shutil.rmtree(os.path.join(self.tmp_root, f"w{pid}"), ignore_errors=True)
        if os.WIFSIGNALED(status):
            return {"ok": True, "signal": os.WTERMSIG(status)}
        return {"ok": True, "exit": os.waitstatus_to_exitcode(status)}

    def _become_worker(self, sock_fd: int, log_fd: int, base_address_space: int) -> NoReturn:
        self.ctl.close()
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        log = LogBuffer.attach(log_fd, self.limits.log_bytes)
        sock = socket.socket(fileno=sock_fd)
        oslimits.close_fds_except({sock_fd, *self.path_fds, *self.read_rules})
        # The template already runs as the app's uid: the directory is the worker's own.
        private = oslimits.make_private_dir(self.tmp_root, f"w{os.getpid()}", None, None)
        os.chdir(private)
        if self.isolation.on["landlock"]:
            # A second layer: of the template's directory, only this worker's own part.
            self._landlock_confine(private)
        os.environ.clear()
        sys.stdout = sys.stderr = _LogStream(log)  # type: ignore[assignment,unused-ignore]
        oslimits.apply(
            self.limits,
            base_address_space=base_address_space,
            rlimits=self.wants("rlimits"),
        )
        assert self.project is not None
        Worker(sock, log, self.project, self.files, self.policy, self.limits).serve()


def main(control_fd: int) -> NoReturn:
    # No signal handlers at all (Python installs one for SIGINT): as pid 1 of its pid
    # namespace, the template then ignores every signal its workers could send it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctl = socket.socket(fileno=control_fd)
    boot = FrameReader(ctl, _CONTROL_CAP).read()
    try:
        template = Template(ctl, boot)
        template.enter_namespaces()
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
