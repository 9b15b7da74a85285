"""The worker's main loop (inside the sandbox): receive an invocation, run the handler, answer.

Runs in a process forked from the template, after ``oslimits`` dropped its privileges. It
speaks only frames on its socket; user output goes to the shared log buffer. Errors become
``{"code", "message", "detail"}`` records with user frames only in the traceback.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import traceback
from collections.abc import Callable, Mapping
from types import CodeType
from typing import Any, NoReturn

from sandbox.compiler import HANDLER_NAME, INIT_FILE, CompiledProject
from sandbox.errors import MAX_MESSAGE_CHARS
from sandbox.guards import ForbiddenImport, Guards, Violation
from sandbox.handler_api import (
    HOST_CALL_ERRORS,
    Context,
    Event,
    InitContext,
    SessionRejected,
    UserExistsError,
)
from sandbox.logbuf import LogBuffer
from sandbox.policy import Limits, Policy
from sandbox.wire import FrameReader, FrameTooLarge, encode

EXIT_PROTOCOL = 3


class InitFailed(Exception):
    """init.py raised; carries the user-facing error record."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(record["message"])
        self.record = record


class Worker:
    def __init__(
        self,
        sock: socket.socket,
        log: LogBuffer,
        project: CompiledProject,
        sources: Mapping[str, str],
        policy: Policy,
        limits: Limits,
    ) -> None:
        self.sock = sock
        self.log = log
        self.project = project
        self.limits = limits
        self.reader = FrameReader(sock, max(limits.max_frame_bytes, 1 << 20) * 2)
        self.guards = Guards(policy, log.write)
        self.sources = {name: text.splitlines() for name, text in sources.items()}
        self.init_globals: dict[str, Any] | None = None
        self.handlers: dict[str, Callable[..., Any]] = {}
        self._cpu_mark = -1
        self._ctx: dict[str, Any] = {}

    # -- the loop ---------------------------------------------------------------------------

    def serve(self) -> NoReturn:
        self.sock.sendall(encode({"t": "ready", "pid": os.getpid()}, 4096))
        while True:
            try:
                msg = self.reader.read()
            except EOFError:
                os._exit(0)
            if type(msg) is not dict or msg.get("t") not in ("invoke", "init", "exit"):
                os._exit(EXIT_PROTOCOL)
            if msg["t"] == "exit":
                os._exit(0)
            self.sock.sendall(self.invoke(msg) if msg["t"] == "invoke" else self.init(msg))

    def init(self, msg: dict[str, Any]) -> bytes:
        """Run init.py now (at deploy time) rather than before the first invocation."""
        self.log.reset()
        self.guards.violations.clear()
        self._arm_cpu_limit()
        self._ctx = msg["ctx"]
        try:
            self._ensure_init()
        except InitFailed as exc:
            return self._record(exc.record)
        return encode({"t": "result", "ok": True, "value": None}, 4096)

    def invoke(self, msg: dict[str, Any]) -> bytes:
        self.log.reset()
        self.guards.violations.clear()
        self._arm_cpu_limit()
        ctx = msg["ctx"]
        self._ctx = ctx
        try:
            handler = self._handler(msg["handler"])
            context = Context(
                app=ctx["app"],
                invocation_id=ctx["invocation_id"],
                timeout_ms=ctx["timeout_ms"],
                call=self.call,
                log=self.log.write,
            )
            value = handler(Event(msg["event"]), context)
            if self.guards.violations:
                return self._error("sandbox_violation", self.guards.violations[0])
            try:
                return encode(
                    {"t": "result", "ok": True, "value": value}, self.limits.max_frame_bytes
                )
            except FrameTooLarge:
                return self._error(
                    "function_error",
                    f"{HANDLER_NAME} returned a value larger than "
                    f"{self.limits.max_frame_bytes} bytes",
                )
            except TypeError as exc:
                return self._error(
                    "function_error",
                    f"{HANDLER_NAME} returned a value that is not JSON-serializable ({exc})",
                )
        except InitFailed as exc:
            return self._record(exc.record)
        except BaseException as exc:
            return self._record(self._classify(exc))

    # -- user code --------------------------------------------------------------------------

    def _api_globals(self) -> dict[str, Any]:
        return {"SessionRejected": SessionRejected, "UserExistsError": UserExistsError}

    def _run_module(self, name: str, code: CodeType, base: dict[str, Any]) -> dict[str, Any]:
        namespace = self.guards.namespace(name, base)
        exec(code, namespace)
        return namespace

    def _ensure_init(self) -> dict[str, Any]:
        """init.py's public globals (once per worker; retried after a failure, so a worker
        whose init failed recovers when, say, the missing secret is set again)."""
        if self.init_globals is None:
            base = self._api_globals()
            if self.project.init is not None:
                init_context = InitContext(
                    app=self._ctx.get("app", ""), call=self.call, log=self.log.write
                )
                try:
                    ns = self._run_module(
                        "init", self.project.init, {**base, "context": init_context}
                    )
                    if self.guards.violations:
                        raise Violation(self.guards.violations[0])
                except BaseException as exc:
                    record = self._classify(exc)
                    record["message"] = f"init.py failed: {record['message']}"
                    raise InitFailed(record) from None
                base = {
                    k: v for k, v in ns.items() if not k.startswith("_") and v is not init_context
                }
            self.init_globals = base
        return self.init_globals

    def _handler(self, stem: str) -> Callable[..., Any]:
        handler = self.handlers.get(stem)
        if handler is None:
            code = self.project.handlers.get(stem)
            if code is None:
                raise LookupError(f"no handler module {stem!r} in this deployment")
            ns = self._run_module(stem, code, dict(self._ensure_init()))
            handler = ns.get(HANDLER_NAME)
            if not callable(handler):
                raise TypeError(f"{stem}.py does not define a callable {HANDLER_NAME}")
            self.handlers[stem] = handler
        return handler

    # -- host calls -------------------------------------------------------------------------

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        try:
            frame = encode(
                {"t": "call", "name": name, "args": list(args), "kwargs": kwargs},
                self.limits.max_frame_bytes,
            )
        except TypeError:
            raise TypeError(f"arguments of {name} must be JSON values") from None
        except FrameTooLarge:
            raise ValueError(f"arguments of {name} are too large") from None
        self.sock.sendall(frame)
        try:
            reply = self.reader.read()
        except EOFError:
            os._exit(0)
        if type(reply) is not dict or reply.get("t") != "reply":
            os._exit(EXIT_PROTOCOL)
        if reply.get("ok"):
            return reply.get("value")
        error = reply.get("error") or {}
        exc_type = HOST_CALL_ERRORS.get(error.get("code", ""), RuntimeError)
        raise exc_type(str(error.get("message", "host call failed")))

    # -- outcomes ---------------------------------------------------------------------------

    def _arm_cpu_limit(self) -> None:
        """RLIMIT_CPU counts a process's whole life: re-arm it for this invocation."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        used = int(usage.ru_utime + usage.ru_stime)
        if used != self._cpu_mark:
            self._cpu_mark = used
            _, hard = resource.getrlimit(resource.RLIMIT_CPU)
            soft = used + self.limits.effective_cpu_seconds
            if hard != resource.RLIM_INFINITY:
                soft = min(soft, hard)
            resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))

    def _classify(self, exc: BaseException) -> dict[str, Any]:
        detail = self._user_traceback(exc)
        if self.guards.violations:
            return {"code": "sandbox_violation", "message": self.guards.violations[0],
                    "detail": detail}  # fmt: skip
        if isinstance(exc, Violation | ForbiddenImport):
            return {"code": "sandbox_violation", "message": _text(exc), "detail": detail}
        if isinstance(exc, SessionRejected):
            message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else ""
            return {"code": "access_denied", "message": message[:MAX_MESSAGE_CHARS]}
        if isinstance(exc, MemoryError):
            return {"code": "resource_limit",
                    "message": f"out of memory (limit {self.limits.memory_mb} MiB)",
                    "detail": detail}  # fmt: skip
        if isinstance(exc, RecursionError):
            return {"code": "resource_limit", "message": "maximum recursion depth exceeded",
                    "detail": detail}  # fmt: skip
        if isinstance(exc, OSError) and exc.errno == errno.EFBIG:
            return {"code": "resource_limit",
                    "message": f"file size limit exceeded ({self.limits.file_size_mb} MiB)",
                    "detail": detail}  # fmt: skip
        return {"code": "function_error", "message": f"{type(exc).__name__}: {_text(exc)}",
                "detail": detail}  # fmt: skip

    def _user_traceback(self, exc: BaseException) -> str:
        frames = traceback.StackSummary.extract(
            traceback.walk_tb(exc.__traceback__), lookup_lines=False
        )
        lines = ["Traceback (most recent call last):"]
        previous, repeats = None, 0
        for frame in frames:
            if frame.filename not in self.sources:
                continue
            where = (frame.filename, frame.lineno, frame.name)
            if where == previous:
                repeats += 1
                continue
            if repeats:
                lines.append(f"  [Previous line repeated {repeats} more times]")
            previous, repeats = where, 0
            lines.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}')
            source = self.sources[frame.filename]
            if frame.lineno and 0 < frame.lineno <= len(source):
                lines.append(f"    {source[frame.lineno - 1].strip()}")
        if repeats:
            lines.append(f"  [Previous line repeated {repeats} more times]")
        lines.append(f"{type(exc).__name__}: {_text(exc)}")
        return "\n".join(lines)

    def _record(self, record: dict[str, Any]) -> bytes:
        detail = record.get("detail")
        if detail:
            self.log.write(detail + "\n")
        return encode({"t": "result", "ok": False, "error": record}, self.limits.max_frame_bytes)

    def _error(self, code: str, message: str) -> bytes:
        return self._record({"code": code, "message": message[:MAX_MESSAGE_CHARS]})


def _text(exc: BaseException) -> str:
    try:
        text = str(exc)
    except BaseException:  # a str() that raises anything still yields a message
        return "<unprintable error>"
    return text[:MAX_MESSAGE_CHARS] if type(text) is str else "<unprintable error>"


__all__ = ["INIT_FILE", "Worker"]
