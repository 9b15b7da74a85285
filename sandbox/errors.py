"""Every error chatfn reports, each with a stable string code.

The codes are the contract (DESIGN section 5): they cross the process boundary as
``{"code": ..., "message": ...}`` and reach clients unchanged. The classes exist so host
code can ``except`` them; ``to_dict``/``from_dict`` are the only way they travel.

    ChatfnError                      (no code of its own: never raised directly)
     +-- AccessDenied                access_denied      the handler raised SessionRejected,
     |                                                   or guests are disabled and no handler
     +-- FunctionError               function_error     the handler raised anything else,
     |                                                   returned junk, or init.py failed
     +-- InvocationTimeout           timeout            wall clock ran out; worker killed
     +-- ResourceLimit               resource_limit     memory, CPU, file size, recursion
     +-- WorkerCrashed               worker_crashed     the worker died mid-invocation
     +-- SandboxViolation            sandbox_violation  a guard refused an operation, or the
     |                                                   worker broke the wire protocol
     +-- Overloaded                  overloaded         every worker busy and the queue full
     +-- InvalidRequest              invalid_request    bad input from a caller
     +-- UserNotFound                user_not_found     no such user and guests disabled
     +-- UserExists                  user_exists        create_user for a name that exists
     +-- NotDeployed                 not_deployed       no active deployment / no such handler
     +-- SessionActive               session_active     a second start on one connection
     +-- DeployRejected              deploy_rejected    compile or init errors at upload
     +-- NotFound                    not_found          no such app, deployment version or
     |                                                   active session
     +-- StorageError                storage_error      the database cannot be opened or used
     +-- AlreadyExists               already_exists     creating an app that exists
     +-- Unauthorized                unauthorized       a missing or wrong admin key

``message`` is safe to show to whoever made the request; ``detail`` (a user traceback) is
for the invocation log only and is never part of ``to_dict``.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ChatfnError(Exception):
    """Base of every chatfn error. Subclasses set ``code``."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    @staticmethod
    def from_dict(data: Any) -> ChatfnError:
        """Rebuild an error from plain data; anything malformed becomes a WorkerCrashed."""
        if not isinstance(data, dict):
            return WorkerCrashed("malformed error record")
        code, message = data.get("code"), data.get("message")
        if not isinstance(code, str) or not isinstance(message, str):
            return WorkerCrashed("malformed error record")
        cls = ERRORS_BY_CODE.get(code, FunctionError)
        detail = data.get("detail")
        return cls(message[:MAX_MESSAGE_CHARS], detail=detail if isinstance(detail, str) else None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


# Messages that come from user code are cut to this length before they go anywhere.
MAX_MESSAGE_CHARS = 1000


class AccessDenied(ChatfnError):
    code = "access_denied"


class FunctionError(ChatfnError):
    code = "function_error"


class InvocationTimeout(ChatfnError):
    code = "timeout"


class ResourceLimit(ChatfnError):
    code = "resource_limit"


class WorkerCrashed(ChatfnError):
    code = "worker_crashed"


class SandboxViolation(ChatfnError):
    code = "sandbox_violation"


class Overloaded(ChatfnError):
    code = "overloaded"


class InvalidRequest(ChatfnError):
    code = "invalid_request"


class UserNotFound(ChatfnError):
    code = "user_not_found"


class UserExists(ChatfnError):
    code = "user_exists"


class NotDeployed(ChatfnError):
    code = "not_deployed"


class SessionActive(ChatfnError):
    code = "session_active"


class DeployRejected(ChatfnError):
    code = "deploy_rejected"

    def __init__(
        self,
        message: str,
        *,
        detail: str | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message, detail=detail)
        # Every problem found, each {"file", "line", "message"}.
        self.errors: list[dict[str, Any]] = errors or [
            {"file": None, "line": None, "message": message}
        ]


class NotFound(ChatfnError):
    code = "not_found"


class StorageError(ChatfnError):
    code = "storage_error"


class AlreadyExists(ChatfnError):
    code = "already_exists"


class Unauthorized(ChatfnError):
    code = "unauthorized"


ERRORS_BY_CODE: dict[str, type[ChatfnError]] = {
    cls.code: cls
    for cls in (
        AccessDenied,
        FunctionError,
        InvocationTimeout,
        ResourceLimit,
        WorkerCrashed,
        SandboxViolation,
        Overloaded,
        InvalidRequest,
        UserNotFound,
        UserExists,
        NotDeployed,
        SessionActive,
        DeployRejected,
        NotFound,
        StorageError,
        AlreadyExists,
        Unauthorized,
    )
}
