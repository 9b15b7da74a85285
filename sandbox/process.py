"""Host-side handles on the processes of one deployment: its template and its workers.

``Zygote`` starts the template with exec (never a fork of the multi-threaded host), hands it
a fresh socketpair and log buffer per worker, and gets back a pidfd, so the host can kill a
worker with no risk of hitting a recycled pid. ``WorkerHandle`` is one worker's socket,
pidfd and log.
"""

from __future__ import annotations

import os
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

from sandbox.errors import WorkerCrashed
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


class Zygote:
    def __init__(
        self, files: dict[str, str], policy: Policy, limits: Limits, tmp_root: str
    ) -> None:
        self.files = files
        self.policy = policy
        self.limits = limits
        self.tmp_root = tmp_root
        self.isolation: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None

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
        isolation = reply.get("isolation")
        self.isolation = dict(isolation) if isinstance(isolation, dict) else {}

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
        """Does ``pidfd`` refer to ``pid``, and is that a child of this template? (The host
        kills workers through these descriptors, as root.)"""
        proc = self._proc
        if proc is None:
            return False
        try:
            with open(f"/proc/self/fdinfo/{pidfd}") as f:
                fd_pid = next((ln.split()[1] for ln in f if ln.startswith("Pid:")), None)
            with open(f"/proc/{pid}/status") as f:
                ppid = next((ln.split()[1] for ln in f if ln.startswith("PPid:")), None)
        except (OSError, IndexError):
            return False
        return fd_pid == str(pid) and ppid == str(proc.pid)

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
