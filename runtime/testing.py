"""The local test harness: a deployed function project with sync methods, on the real
sandbox and a real (throwaway) database. The pytest plugin hands these out through the
``chatfn_app`` fixture; they also work on their own:

    with Runtime("sqlite:////tmp/t.db") as rt:
        app = FunctionApp.deploy(rt, "functions/", guest_users="disabled")
        assert app.start_session("alice", {"password": "..."}).succeeded
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from runtime.core import App, Runtime
from runtime.deployments import DeploymentInfo
from runtime.invocations import Invocation
from runtime.sessions import SessionResult
from runtime.users import Users

_numbers = itertools.count(1)


class FunctionApp:
    """One app with a function project deployed on it."""

    def __init__(self, runtime: Runtime, app: App, deployment: DeploymentInfo) -> None:
        self.runtime = runtime
        self.app = app
        self.deployment = deployment

    @classmethod
    def deploy(
        cls,
        runtime: Runtime,
        directory: str | Path,
        *,
        guest_users: str = "enabled",
        secrets: dict[str, str] | None = None,
        name: str | None = None,
    ) -> FunctionApp:
        """A new app on ``runtime`` with ``directory`` deployed. Secrets given here are
        set before the deploy, so init.py can read them."""
        app = runtime.create_app(name or f"test-{next(_numbers)}", guest_users=guest_users)
        for key, value in (secrets or {}).items():
            app.secrets.set(key, value)
        return cls(runtime, app, app.deploy(directory))

    @property
    def name(self) -> str:
        return self.app.name

    @property
    def users(self) -> Users:
        """The app's users: ``check_user_exists``, ``get_user``, ``create_user``,
        ``update_user``, as in ``context.users``."""
        return self.app.users

    def start_session(self, username: Any, auth_params: Any = None) -> SessionResult:
        return self.app.start_session(username, auth_params)

    def end_session(self, session_id: str) -> dict[str, Any]:
        return self.app.end_session(session_id)

    def invoke(self, event_type: str, payload: Any) -> Invocation:
        """Run one handler; the result has ``succeeded``, ``failed``, ``error``,
        ``result`` (the handler's return value) and ``logs``."""
        return self.app.invoke(event_type, payload)

    def set_secret(self, name: str, value: str) -> None:
        self.app.secrets.set(name, value)

    def set_guest_users(self, value: str) -> None:
        self.app.update_settings(guest_users=value)

    def invocations(self) -> list[Invocation]:
        """Every invocation so far, oldest first, after background events finished."""
        self.runtime.drain()
        return list(reversed(self.app.invocations(limit=1000)))

    def close(self) -> None:
        self.runtime.drain()
        self.runtime.retire_app(self.app.name)
