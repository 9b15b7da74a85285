"""``chatfn invoke``: run one event of a project directory in the real sandbox, against a
throwaway store. The command-line layer only parses and prints; this is the function.

UserAttemptedStartSession runs the whole session start (DESIGN section 6), so
``guest_users`` and the users that already exist decide the outcome as they would live.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.core import Runtime
from runtime.dependencies import Progress, no_progress
from runtime.events import resolve
from runtime.project import read_project
from runtime.sessions import ATTEMPTED
from runtime.validation import check_auth_params, check_name
from sandbox import ChatfnError, WorkerPool


@dataclass(frozen=True)
class Outcome:
    """What ``chatfn invoke`` prints."""

    error: ChatfnError | None
    result: Any
    logs: str
    duration_ms: float
    session: dict[str, Any] | None = None

    @property
    def succeeded(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": "succeeded" if self.succeeded else "failed",
            "error": self.error.to_dict() if self.error else None,
            "result": self.result,
            "logs": self.logs,
            "duration_ms": round(self.duration_ms, 3),
        }


def invoke_project(
    directory: str | Path,
    event_name: str,
    payload: Any,
    *,
    secrets: dict[str, str] | None = None,
    users: list[str] | None = None,
    guest_users: str = "enabled",
    pool: WorkerPool | None = None,
    progress: Progress = no_progress,
) -> Outcome:
    """Deploy ``directory`` into a fresh store and run one event; errors in the project or
    the arguments raise ChatfnError, the handler's own outcome is returned."""
    event = resolve(event_name)
    project = read_project(directory)
    data = event.validate(payload)
    if event is ATTEMPTED:  # bad session input is the caller's mistake, not an outcome
        check_name(data["username"])
        check_auth_params(data["auth_params"])
    with (
        tempfile.TemporaryDirectory(prefix="chatfn-invoke-") as tmp,
        Runtime(f"sqlite:///{tmp}/store.db", pool=pool) as runtime,
    ):
        app = runtime.create_app("local", guest_users=guest_users)
        for name, value in (secrets or {}).items():
            app.secrets.set(name, value)
        for name in users or []:
            app.users.create_user(name)
        app.deploy(project, progress=progress)
        if event is ATTEMPTED:
            start = time.monotonic()
            result = app.start_session(data["username"], data["auth_params"])
            inv = result.invocation
            return Outcome(
                error=result.error,
                result=inv.result if inv else None,
                logs=inv.logs if inv else "",
                duration_ms=inv.duration_ms if inv else (time.monotonic() - start) * 1000,
                session=result.session,
            )
        inv = app.invoke(event.name, payload)
        return Outcome(inv.error, inv.result, inv.logs, inv.duration_ms)
