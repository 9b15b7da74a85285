"""The worker pool: runs invocations on workers and owns every invocation's deadline.

One ``DeploymentPool`` per (app, version): a template process, up to ``max_workers``
workers, and a bounded wait queue; past that, ``overloaded`` comes back at once. The
invoking thread itself waits on the worker's socket with the deadline, answers host calls
as they arrive, and on expiry kills the worker (SIGKILL through its pidfd) and returns
``timeout``; a janitor thread reaps killed workers, retires idle ones, and keeps one warm.

Flow of one invocation:
    acquire a worker -> send invoke -> [call -> dispatch -> reply]* -> result -> release
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sandbox.compiler import CompiledProject, SourceError, compile_project
from sandbox.errors import (
    ChatfnError,
    DeployRejected,
    InvalidRequest,
    InvocationTimeout,
    NotDeployed,
    Overloaded,
    SandboxViolation,
    WorkerCrashed,
)
from sandbox.isolation import Isolation
from sandbox.policy import DEFAULT_LIMITS, DEFAULT_POLICY, Limits, Policy
from sandbox.process import BootError, LayersMissing, WorkerHandle, Zygote, describe_exit
from sandbox.wire import (
    FrameTooLarge,
    HostCall,
    ProtocolError,
    Result,
    encode,
    parse_worker_message,
)

HostCallFn = Callable[..., Any]
# Outcomes after which a worker is not trusted with another invocation.
_RETIRE_CODES = frozenset({"resource_limit", "sandbox_violation", "worker_crashed", "timeout"})
_JANITOR_PERIOD_S = 0.5


@dataclass(frozen=True)
class Deployment:
    """One version of an app's function project, as plain data."""

    app: str
    version: int
    files: Mapping[str, str]
    limits: Limits = DEFAULT_LIMITS
    policy: Policy = DEFAULT_POLICY

    @property
    def key(self) -> tuple[str, int]:
        return (self.app, self.version)


@dataclass(frozen=True)
class InvocationResult:
    invocation_id: str
    ok: bool
    value: Any = None
    error: ChatfnError | None = None
    logs: str = ""
    logs_truncated: bool = False
    duration_ms: float = 0.0

    @property
    def succeeded(self) -> bool:
        return self.ok

    @property
    def failed(self) -> bool:
        return not self.ok


def validate(deployment: Deployment) -> CompiledProject:
    """Compile a deployment's files; DeployRejected listing every error otherwise."""
    compiled = compile_project(dict(deployment.files))
    if isinstance(compiled, CompiledProject):
        return compiled
    raise rejected(compiled)


def rejected(errors: list[SourceError]) -> DeployRejected:
    return DeployRejected("; ".join(str(e) for e in errors), errors=[e.to_dict() for e in errors])


_TRACEBACK_LINE = re.compile(r'File "([a-z_]+\.py)", line (\d+)')


def init_rejected(error: ChatfnError) -> DeployRejected:
    """DeployRejected for an init.py that failed at deploy time, with the file and line of
    the innermost user frame when the traceback has one."""
    where = _TRACEBACK_LINE.findall(error.detail or "")
    file, line = (where[-1][0], int(where[-1][1])) if where else ("init.py", None)
    message = error.message if error.code == "function_error" else f"{error.code}: {error.message}"
    return DeployRejected(
        f"{file}:{line}: {message}" if line else f"{file}: {message}",
        errors=[{"file": file, "line": line, "message": message}],
    )


class DeploymentPool:
    def __init__(self, deployment: Deployment, tmp_root: str) -> None:
        self.deployment = deployment
        self.limits = deployment.limits
        self.handlers = {
            name.removesuffix(".py")
            for name in deployment.files
            if name.endswith(".py") and name != "init.py"
        }
        self.zygote = Zygote(
            dict(deployment.files),
            deployment.policy,
            self.limits,
            tmp_root,
            name=f"{deployment.app}-{deployment.version}",
        )
        self._cond = threading.Condition()
        self._idle: list[WorkerHandle] = []
        self._total = 0
        self._waiting = 0
        self._closed = False
        self._doomed: list[WorkerHandle] = []
        self.spawn_ms: list[float] = []

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, warm: int = 1) -> None:
        try:
            self.zygote.start()
        except LayersMissing as exc:
            raise DeployRejected(str(exc)) from None
        except BootError as exc:
            raise DeployRejected(f"deployment failed to start: {exc}") from None
        for _ in range(warm):
            with self._cond:
                self._total += 1
            self._release(self._spawn_counted())

    def close(self, wait_s: float = 0.0) -> None:
        """Stop taking invocations; give busy workers up to ``wait_s`` to finish (stopping
        the template kills its workers), then stop everything."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._total -= len(idle)
            self._cond.notify_all()
        for worker in idle:
            self.zygote.reap(worker)
        deadline = time.monotonic() + wait_s
        with self._cond:
            while self._total > 0 and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
        self.housekeep()
        self.zygote.stop()

    # -- acquiring workers ------------------------------------------------------------------

    def _spawn_counted(self) -> WorkerHandle:
        """Spawn for a slot already counted in ``_total``; gives the slot back on failure.
        Killed workers waiting for the janitor are reaped first: until then they still
        count against the deployment's process limits (cgroup pids)."""
        with self._cond:
            doomed, self._doomed = self._doomed, []
        for dead in doomed:
            self.zygote.reap(dead)
        try:
            if not self.zygote.alive:
                self.zygote.stop()
                try:
                    self.zygote.start()
                except BootError as exc:  # one invocation fails, not the caller
                    raise WorkerCrashed(f"the template process could not restart: {exc}") from None
            worker = self.zygote.spawn()
        except BaseException:
            with self._cond:
                self._total -= 1
                self._cond.notify()
            raise
        self.spawn_ms.append((time.monotonic() - worker.spawned_at) * 1000)
        del self.spawn_ms[:-100]
        return worker

    def _acquire(self, deadline: float) -> WorkerHandle:
        with self._cond:
            while True:
                if self._closed:
                    raise NotDeployed("this deployment is no longer active")
                if self._idle:
                    return self._idle.pop()
                if self._total < self.limits.max_workers:
                    self._total += 1
                    break
                if self._waiting >= self.limits.max_queue:
                    raise Overloaded(
                        f"all {self.limits.max_workers} workers are busy and "
                        f"{self._waiting} invocations are queued"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Overloaded(f"no worker became free within {self.limits.timeout_ms} ms")
                self._waiting += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiting -= 1
        return self._spawn_counted()

    def _release(self, worker: WorkerHandle) -> None:
        worker.last_used = time.monotonic()
        with self._cond:
            if not self._closed:
                self._idle.append(worker)
                self._cond.notify()
                return
            self._total -= 1
            self._cond.notify_all()
        self.zygote.reap(worker)

    def _discard(self, worker: WorkerHandle) -> None:
        """Kill now (fast), reap later on the janitor."""
        worker.kill()
        with self._cond:
            self._total -= 1
            self._doomed.append(worker)
            self._cond.notify()

    # -- invoking ---------------------------------------------------------------------------

    def invoke(
        self,
        handler: str,
        event: Mapping[str, Any],
        *,
        capabilities: Mapping[str, HostCallFn],
        invocation_id: str,
    ) -> InvocationResult:
        start = time.monotonic()
        timeout_s = self.limits.timeout_ms / 1000.0
        deadline = start + timeout_s
        if handler not in self.handlers:
            return _failure(
                invocation_id, NotDeployed(f"no {handler}.py in this deployment"), start
            )
        try:
            frame = encode(
                {
                    "t": "invoke",
                    "handler": handler,
                    "event": event,
                    "ctx": self._ctx(invocation_id),
                },
                self.limits.max_frame_bytes,
            )
        except (FrameTooLarge, TypeError) as exc:
            return _failure(invocation_id, InvalidRequest(f"event payload rejected: {exc}"), start)
        return self._exchange(frame, capabilities, invocation_id, start, deadline)

    def run_init(
        self, *, capabilities: Mapping[str, HostCallFn], invocation_id: str
    ) -> InvocationResult:
        """Run init.py in a worker now (deploy time); the worker stays warm if it passed."""
        start = time.monotonic()
        frame = encode({"t": "init", "ctx": self._ctx(invocation_id)}, self.limits.max_frame_bytes)
        return self._exchange(
            frame,
            capabilities,
            invocation_id,
            start,
            start + self.limits.timeout_ms / 1000,
            counts=False,
        )

    def _ctx(self, invocation_id: str) -> dict[str, Any]:
        return {
            "app": self.deployment.app,
            "invocation_id": invocation_id,
            "timeout_ms": self.limits.timeout_ms,
        }

    def _exchange(
        self,
        frame: bytes,
        capabilities: Mapping[str, HostCallFn],
        invocation_id: str,
        start: float,
        deadline: float,
        *,
        counts: bool = True,
    ) -> InvocationResult:
        """One request on a worker: acquire, send, answer host calls, read the result and
        the log, then release the worker or retire it. ``counts``: toward the worker's
        ``max_invocations`` (the deploy-time init.py run does not)."""
        try:
            worker = self._acquire(deadline)
        except ChatfnError as exc:
            return _failure(invocation_id, exc, start)
        worker.log.reset()
        error: ChatfnError | None = None
        value: Any = None
        try:
            worker.sock.sendall(frame)
            value, error = self._converse(worker, capabilities, deadline)
        except OSError:
            error = self._crashed(worker)
        logs, truncated = worker.log.read()
        worker.invocations += counts
        if worker.reaped:
            worker.close()
        elif (
            error is not None and error.code in _RETIRE_CODES
        ) or worker.invocations >= self.limits.max_invocations:
            self._discard(worker)
        else:
            self._release(worker)
        return InvocationResult(
            invocation_id=invocation_id,
            ok=error is None,
            value=value,
            error=error,
            logs=logs,
            logs_truncated=truncated,
            duration_ms=(time.monotonic() - start) * 1000,
        )

    def _converse(
        self, worker: WorkerHandle, capabilities: Mapping[str, HostCallFn], deadline: float
    ) -> tuple[Any, ChatfnError | None]:
        while True:
            try:
                msg = parse_worker_message(worker.reader.read(deadline))
            except TimeoutError:
                worker.kill()
                return None, InvocationTimeout(
                    f"the function did not finish within {self.limits.timeout_ms} ms"
                )
            except EOFError:
                return None, self._crashed(worker)
            except ProtocolError as exc:
                worker.kill()
                return None, SandboxViolation(f"the worker broke the protocol: {exc}")
            if type(msg) is Result:
                return (msg.value, None) if msg.ok else (None, msg.error)
            if type(msg) is not HostCall:
                worker.kill()
                return None, SandboxViolation("the worker sent an unexpected message")
            worker.sock.sendall(self._dispatch(msg, capabilities))

    def _dispatch(self, call: HostCall, capabilities: Mapping[str, HostCallFn]) -> bytes:
        fn = capabilities.get(call.name)
        try:
            if fn is None:
                raise InvalidRequest(f"unknown host call {call.name!r}")
            reply: dict[str, Any] = {
                "t": "reply",
                "ok": True,
                "value": fn(*call.args, **call.kwargs),
            }
        except ChatfnError as exc:
            reply = {"t": "reply", "ok": False, "error": exc.to_dict()}
        except TypeError as exc:
            error = {"code": "invalid_request", "message": f"{call.name}: {exc}"}
            reply = {"t": "reply", "ok": False, "error": error}
        try:
            return encode(reply, self.limits.max_frame_bytes)
        except (FrameTooLarge, TypeError):
            return encode(
                {"t": "reply", "ok": False,
                 "error": {"code": "internal", "message": f"{call.name} returned bad data"}},
                65536,
            )  # fmt: skip

    def _crashed(self, worker: WorkerHandle) -> ChatfnError:
        with self._cond:
            self._total -= 1
            self._cond.notify()
        code, message = describe_exit(self.zygote.reap(worker, close=False))
        worker.reaped = True
        return ChatfnError.from_dict({"code": code, "message": message})

    # -- housekeeping (janitor thread) ------------------------------------------------------

    def housekeep(self) -> None:
        now = time.monotonic()
        with self._cond:
            doomed, self._doomed = self._doomed, []
            stale = [w for w in self._idle if now - w.last_used > self.limits.idle_timeout_s]
            for w in stale:
                self._idle.remove(w)
            self._total -= len(stale)
            # After a kill, keep one warm worker so the next caller does not pay for a spawn.
            replace = bool(doomed) and not self._closed and self._total == 0
            if replace:
                self._total += 1
        for worker in doomed + stale:
            self.zygote.reap(worker)
        if replace:
            try:
                self._release(self._spawn_counted())
            except ChatfnError:
                pass

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "workers": self._total,
                "idle": len(self._idle),
                "waiting": self._waiting,
                "isolation": dict(self.zygote.isolation),
            }


def _failure(invocation_id: str, error: ChatfnError, start: float) -> InvocationResult:
    return InvocationResult(
        invocation_id=invocation_id,
        ok=False,
        error=error,
        duration_ms=(time.monotonic() - start) * 1000,
    )


@dataclass
class WorkerPool:
    """All deployments' pools, and the janitor that looks after them."""

    tmp_root: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="chatfn-sandbox-"))
    _pools: dict[tuple[str, int], DeploymentPool] = field(default_factory=dict)
    _booting: dict[tuple[str, int], threading.Event] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _janitor: threading.Thread | None = None

    def __post_init__(self) -> None:
        # Workers that dropped to an unprivileged uid must reach their own directory below.
        os.chmod(self.tmp_root, 0o711)

    def prepare(
        self,
        deployment: Deployment,
        warm: int = 1,
        *,
        init_capabilities: Mapping[str, HostCallFn] | None = None,
    ) -> DeploymentPool:
        """Validate and boot a deployment (its template and ``warm`` workers). With
        ``init_capabilities``, init.py also runs once now, in a fresh worker, and a failure
        is DeployRejected with its file and line (the deploy-time check). Concurrent calls
        for one deployment boot it once: the others wait for that boot."""
        while True:
            with self._lock:
                existing = self._pools.get(deployment.key)
                if existing is not None:
                    return existing
                booting = self._booting.get(deployment.key)
                if booting is None:
                    done = self._booting[deployment.key] = threading.Event()
                    break
            booting.wait()  # then look again: the pool, or our turn to try
        try:
            pool = self._boot(deployment, warm, init_capabilities)
            with self._lock:
                self._pools[deployment.key] = pool
                self._ensure_janitor()
            return pool
        finally:
            with self._lock:
                del self._booting[deployment.key]
            done.set()

    def _boot(
        self,
        deployment: Deployment,
        warm: int,
        init_capabilities: Mapping[str, HostCallFn] | None,
    ) -> DeploymentPool:
        validate(deployment)
        pool = DeploymentPool(deployment, self.tmp_root)
        pool.start(warm)
        if init_capabilities is not None and "init.py" in deployment.files:
            result = pool.run_init(capabilities=init_capabilities, invocation_id=uuid.uuid4().hex)
            if result.error is not None:
                pool.close()
                raise init_rejected(result.error)
        return pool

    def invoke(
        self,
        deployment: Deployment,
        handler: str,
        event: Mapping[str, Any],
        *,
        capabilities: Mapping[str, HostCallFn] | None = None,
        invocation_id: str | None = None,
    ) -> InvocationResult:
        invocation_id = invocation_id or uuid.uuid4().hex
        pool = self._pools.get(deployment.key)
        if pool is None:
            try:
                pool = self.prepare(deployment)
            except ChatfnError as exc:
                return _failure(invocation_id, exc, time.monotonic())
        return pool.invoke(
            handler, event, capabilities=capabilities or {}, invocation_id=invocation_id
        )

    def probe_isolation(self, policy: Policy = DEFAULT_POLICY) -> Isolation:
        """Which isolation layers this machine gives a deployment under ``policy`` (booted
        and retired once: a template process reports what it could set up). Raises
        DeployRejected when a layer the policy requires is missing."""
        probe = Deployment(
            "chatfn-probe",
            0,
            {"user_started_session.py": "def handle_event(event, context):\n    return None\n"},
            policy=policy,
        )
        try:
            return self.prepare(probe, warm=0).zygote.report
        finally:
            self.retire(probe.key)

    def retire(self, key: tuple[str, int], *, grace_s: float = 0.0) -> None:
        """Stop a deployment's pool. With ``grace_s``, in-flight invocations get that long
        to finish, on a background thread, so the caller does not wait."""
        with self._lock:
            pool = self._pools.pop(key, None)
        if pool is None:
            return
        if grace_s <= 0:
            pool.close()
            return
        threading.Thread(
            target=pool.close, args=(grace_s,), name=f"chatfn-retire-{key[0]}", daemon=True
        ).start()

    def pools(self) -> dict[tuple[str, int], DeploymentPool]:
        with self._lock:
            return dict(self._pools)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()
        if self._janitor is not None:
            self._janitor.join(5)
        shutil.rmtree(self.tmp_root, ignore_errors=True)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure_janitor(self) -> None:
        if self._janitor is None:
            self._janitor = threading.Thread(
                target=self._janitor_loop, name="chatfn-janitor", daemon=True
            )
            self._janitor.start()

    def _janitor_loop(self) -> None:
        while not self._stop.wait(_JANITOR_PERIOD_S):
            for pool in self.pools().values():
                try:
                    pool.housekeep()
                except Exception:
                    pass
