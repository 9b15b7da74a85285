"""Host-side handles on the processes of one deployment: its template and its workers.

``Zygote`` starts the template with exec (never a fork of the multi-threaded host), hands it
a fresh socketpair and log buffer per worker, and gets back a pidfd, so the host can kill a
worker with no risk of hitting a recycled pid. ``WorkerHandle`` is one worker's socket,
pidfd and log.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from sandbox import cgroups
from sandbox.errors import WorkerCrashed
from sandbox.isolation import Isolation
from sandbox.logbuf import LogBuffer
from sandbox.policy import Limits, Policy
from sandbox.wire import HEADER, FrameReader, ProtocolError, encode, parse_worker_message

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from sandbox.zygote import main; main(int(sys.argv[2]))"
)
BOOT_TIMEOUT_S = 60.0
SPAWN_TIMEOUT_S = 10.0


class BootError(Exception):
    """The template process could not start the deployment."""


class LayersMissing(BootError):
    """The template started, but without a sandbox layer the policy requires."""


@dataclass
class WorkerHandle:
    pid: int
    pidfd: int
    sock: socket.socket
    reader: FrameReader
    log: LogBuffer
    spawned_at: float
    invocations: int = 0
    reaped: bool = False
    last_used: float = field(default_factory=time.monotonic)

    def kill(self) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        self.sock.close()
        os.close(self.pidfd)
        self.log.close()


def describe_exit(status: dict[str, Any]) -> tuple[str, str]:
    """(code, message) for how a worker ended mid-invocation."""
    sig = status.get("signal")
    if sig == signal.SIGXCPU:
        return "resource_limit", "CPU time limit exceeded"
    if sig == signal.SIGXFSZ:
        return "resource_limit", "file size limit exceeded"
    if isinstance(sig, int):
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return "worker_crashed", f"the worker crashed ({name})"
    return "worker_crashed", f"the worker exited unexpectedly (status {status.get('exit')})"


def _fields(path: str) -> dict[str, str]:
    """``Key:\tvalue`` lines of a /proc file; empty when it cannot be read."""
    try:
        with open(path) as f:
            return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
    except OSError:
        return {}


class Zygote:
    def __init__(
        self,
        files: dict[str, str],
        policy: Policy,
        limits: Limits,
        tmp_root: str,
        name: str = "deployment",
    ) -> None:
        self.name = name
        self.files = files
        self.policy = policy
        self.limits = limits
        self.tmp_root = tmp_root
        self.report = Isolation()
        self._cgroup: cgroups.Cgroup | None = None
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None

    @property
    def isolation(self) -> dict[str, bool]:
        """Which layers this deployment's processes run under."""
        return dict(self.report.on)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        host_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT, _PACKAGE_ROOT, str(child_end.fileno())],
                pass_fds=[child_end.fileno()],
                env={"LANG": "C.UTF-8", "PYTHONHASHSEED": "random"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
            )
        finally:
            child_end.close()
        self._ctl = host_end
        # Into its cgroup before it reads the boot request: everything it forks follows.
        cgroup_report = self._join_cgroup(self._proc.pid)
        boot = {
            "files": self.files,
            "policy": self.policy.to_dict(),
            "limits": self.limits.to_dict(),
            "tmp_root": self.tmp_root,
        }
        host_end.sendall(encode(boot, 256 * 1024 * 1024))
        try:
            reply = FrameReader(host_end, 65536).read(time.monotonic() + BOOT_TIMEOUT_S)
        except (EOFError, TimeoutError, ProtocolError) as exc:
            self.stop()
            raise BootError(f"template process did not start ({type(exc).__name__})") from None
        if not isinstance(reply, dict) or reply.get("ok") is not True:
            self.stop()
            error = reply.get("error") if isinstance(reply, dict) else None
            raise BootError(str(error)[:2000] if error else "template process failed to start")
        self.report = Isolation.from_dict(reply.get("isolation"))
        self.report.set("cgroup", *cgroup_report)
        missing = self.report.missing(self.policy.require)
        if missing:
            self.stop()
            raise LayersMissing(
                f"required sandbox layer(s) {', '.join(missing)} not available: "
                f"{self.report.describe(missing)}"
            )

    def _join_cgroup(self, pid: int) -> tuple[bool, str]:
        """Put the template (and so every worker) in a cgroup of its own, capping the
        deployment's memory and process count. Returns (on, why off or which version)."""
        if "cgroup" not in self.policy.layers:
            return False, "turned off by the policy"
        support = cgroups.detect()
        if support.backend is None:
            return False, support.reason
        limits = self.limits
        per_process = (limits.memory_mb + limits.file_size_mb) * 1024 * 1024
        name = re.sub(r"[^A-Za-z0-9._-]", "_", f"{self.name}-{pid}")[:200]
        try:
            self._cgroup = cgroups.create(
                name,
                memory_bytes=(limits.max_workers + 1) * per_process,
                # The template, the process waiting on it, the workers, and as many again
                # for workers being replaced while the old ones are reaped.
                pids=2 * limits.max_workers + 4,
            )
            self._cgroup.add(pid)
        except OSError as exc:
            if self._cgroup is not None:
                self._cgroup.remove()
                self._cgroup = None
            return False, str(exc)
        return True, f"cgroup {support.backend}"

    def _request(self, message: dict[str, Any], fds: list[int] | None = None) -> Any:
        ctl = self._ctl
        if ctl is None or not self.alive:
            raise WorkerCrashed("the deployment's template process is not running")
        frame = encode(message, 65536)
        if fds:
            socket.send_fds(ctl, [frame], fds)
        else:
            ctl.sendall(frame)
        data, rfds, _flags, _addr = socket.recv_fds(ctl, 65536, 2)
        if not data:
            raise WorkerCrashed("the deployment's template process died")
        (size,) = HEADER.unpack_from(data)
        return orjson.loads(data[4 : 4 + size]), rfds

    def spawn(self) -> WorkerHandle:
        host_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log, log_fd = LogBuffer.create(self.limits.log_bytes)
        started = time.monotonic()
        try:
            with self._lock:
                reply, fds = self._request({"op": "spawn"}, [worker_end.fileno(), log_fd])
        except BaseException:
            host_end.close()
            log.close()
            raise
        finally:
            worker_end.close()
            os.close(log_fd)
        if not reply.get("ok") or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            host_end.close()
            log.close()
            raise WorkerCrashed(f"could not start a worker: {reply.get('error', 'no pidfd')}")
        pid = reply.get("pid")
        if type(pid) is not int or not self._is_own_child(fds[0], pid):
            # The template runs dependency code: never signal a process it merely names.
            os.close(fds[0])
            host_end.close()
            log.close()
            self.stop()
            raise WorkerCrashed("the template process answered with a handle to another process")
        reader = FrameReader(host_end, self.limits.max_frame_bytes)
        handle = WorkerHandle(pid, fds[0], host_end, reader, log, started)
        try:
            parse_worker_message(reader.read(started + SPAWN_TIMEOUT_S))
        except (EOFError, TimeoutError, ProtocolError):
            handle.kill()
            self.reap(handle)
            raise WorkerCrashed("a new worker failed to start") from None
        return handle

    def _is_own_child(self, pidfd: int, pid: int) -> bool:
        """Does ``pidfd`` refer to a worker of this deployment, ``pid`` as the template
        sees it? (The host kills workers through these descriptors, as root.) A worker's
        parent is the process the host started, or, with a pid namespace, that process's
        child (the template, pid 1 there)."""
        proc = self._proc
        if proc is None:
            return False
        fdinfo = _fields(f"/proc/self/fdinfo/{pidfd}")
        host_pid = fdinfo.get("Pid", "")
        if not host_pid.isdigit() or fdinfo.get("NSpid", host_pid).split()[-1] != str(pid):
            return False
        parent = _fields(f"/proc/{host_pid}/status").get("PPid", "")
        if parent == str(proc.pid):
            return True
        return parent.isdigit() and _fields(f"/proc/{parent}/status").get("PPid") == str(proc.pid)

    def reap(self, handle: WorkerHandle, *, close: bool = True) -> dict[str, Any]:
        """Kill (if still running) and wait for one worker; returns how it ended."""
        handle.kill()
        status: dict[str, Any] = {"exit": None}
        try:
            with self._lock:
                reply, _ = self._request({"op": "reap", "pid": handle.pid})
            if isinstance(reply, dict):
                status = reply
        except (WorkerCrashed, OSError):
            pass
        if close:
            handle.close()
        return status

    def stop(self) -> None:
        try:
            self._stop_processes()
        finally:
            if self._cgroup is not None:
                self._cgroup.remove()
                self._cgroup = None

    def _stop_processes(self) -> None:
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
