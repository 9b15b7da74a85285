"""The embedding API: a Python session server opens the runtime and calls it directly.

    from runtime import open_runtime

    async with open_runtime("sqlite:///chat.db") as rt:
        app = await rt.ensure_app("default")
        await app.deploy("functions/")
        result = await app.start_session("alice", {"password": "..."})
        if result.succeeded:
            ...
            await app.end_session(result.session["id"])

Every method runs the blocking core (``runtime.core``) on the runtime's own thread pool, so
the event loop never waits on the database or a sandbox worker. From sync code, use the
core directly: ``runtime.open_runtime_sync(url)`` returns a ``runtime.core.Runtime`` whose
apps have the same methods without ``await``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from runtime.core import App, Runtime
from runtime.deployments import DeploymentInfo
from runtime.invocations import Invocation
from runtime.project import Project
from runtime.sessions import Connection, SessionResult
from sandbox import WorkerPool

T = TypeVar("T")


class _Offload:
    def __init__(self, executor: concurrent.futures.Executor) -> None:
        self._executor = executor

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))


class AsyncUsers(_Offload):
    """``app.users``: the same methods as ``context.users``, awaitable."""

    def __init__(self, app: App, executor: concurrent.futures.Executor) -> None:
        super().__init__(executor)
        self._users = app.users

    async def check_user_exists(self, name: str) -> bool:
        return await self._call(self._users.check_user_exists, name)

    async def get_user(self, name: str) -> dict[str, Any] | None:
        return await self._call(self._users.get_user, name)

    async def create_user(
        self,
        name: str,
        display_name: str | None = None,
        is_guest: bool = False,
        properties: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return await self._call(self._users.create_user, name, display_name, is_guest, properties)

    async def update_user(self, name: str, **changes: Any) -> dict[str, Any]:
        return await self._call(self._users.update_user, name, **changes)

    async def delete_user(self, name: str) -> None:
        await self._call(self._users.delete_user, name)

    async def list_users(
        self, *, limit: int = 100, after: str | None = None
    ) -> list[dict[str, Any]]:
        return await self._call(self._users.list_users, limit=limit, after=after)


class AsyncConnection(_Offload):
    """One client connection (see ``runtime.sessions.Connection``)."""

    def __init__(self, connection: Connection, executor: concurrent.futures.Executor) -> None:
        super().__init__(executor)
        self.sync = connection

    @property
    def session_id(self) -> str | None:
        return self.sync.session_id

    async def start_session(self, username: Any, auth_params: Any = None) -> SessionResult:
        return await self._call(self.sync.start_session, username, auth_params)

    async def end_session(self) -> dict[str, Any]:
        return await self._call(self.sync.end_session)

    async def close(self) -> None:
        await self._call(self.sync.close)


class AsyncApp(_Offload):
    def __init__(self, app: App, executor: concurrent.futures.Executor) -> None:
        super().__init__(executor)
        self.sync = app
        self.name = app.name
        self.users = AsyncUsers(app, executor)

    async def deploy(self, source: str | Path | Project) -> DeploymentInfo:
        return await self._call(self.sync.deploy, source)

    async def activate(self, version: int) -> DeploymentInfo:
        return await self._call(self.sync.activate, version)

    async def deployments(self) -> list[DeploymentInfo]:
        return await self._call(self.sync.deployments.list)

    async def start_session(self, username: Any, auth_params: Any = None) -> SessionResult:
        return await self._call(self.sync.start_session, username, auth_params)

    async def end_session(self, session_id: str, reason: str = "ended") -> dict[str, Any]:
        return await self._call(self.sync.end_session, session_id, reason)

    def connect(self) -> AsyncConnection:
        return AsyncConnection(self.sync.connect(), self._executor)

    async def invoke(self, event_type: str, payload: Any) -> Invocation:
        return await self._call(self.sync.invoke, event_type, payload)

    async def settings(self) -> dict[str, Any]:
        return await self._call(self.sync.settings)

    async def update_settings(self, *, guest_users: str | None = None) -> dict[str, Any]:
        return await self._call(self.sync.update_settings, guest_users=guest_users)

    async def set_secret(self, name: str, value: str) -> None:
        await self._call(self.sync.secrets.set, name, value)

    async def delete_secret(self, name: str) -> None:
        await self._call(self.sync.secrets.delete, name)

    async def secret_names(self) -> list[dict[str, Any]]:
        return await self._call(self.sync.secrets.names)

    async def sessions(self, *, active: bool = True, limit: int = 100) -> list[dict[str, Any]]:
        return await self._call(self.sync.sessions, active=active, limit=limit)

    async def invocations(
        self, *, limit: int = 50, event: str | None = None, status: str | None = None
    ) -> list[Invocation]:
        return await self._call(self.sync.invocations, limit=limit, event=event, status=status)


class AsyncRuntime(_Offload):
    """The async runtime. ``open_runtime`` makes one; ``async with`` closes it."""

    def __init__(self, runtime: Runtime, threads: int = 32) -> None:
        super().__init__(
            concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="chatfn-call")
        )
        self.sync = runtime

    async def app(self, name: str) -> AsyncApp:
        return AsyncApp(await self._call(self.sync.app, name), self._executor)

    async def create_app(self, name: str, *, guest_users: str = "enabled") -> AsyncApp:
        app = await self._call(self.sync.create_app, name, guest_users=guest_users)
        return AsyncApp(app, self._executor)

    async def ensure_app(self, name: str = "default") -> AsyncApp:
        return AsyncApp(await self._call(self.sync.ensure_app, name), self._executor)

    async def apps(self) -> list[str]:
        return await self._call(self.sync.apps)

    async def drain(self) -> None:
        await self._call(self.sync.drain)

    async def close(self) -> None:
        await self._call(self.sync.close)
        assert isinstance(self._executor, concurrent.futures.ThreadPoolExecutor)
        self._executor.shutdown(wait=False)

    async def __aenter__(self) -> AsyncRuntime:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _Opener:
    """``await open_runtime(...)`` or ``async with open_runtime(...) as rt``."""

    def __init__(self, database_url: str | None, pool: WorkerPool | None) -> None:
        self._args = (database_url, pool)
        self._runtime: AsyncRuntime | None = None

    async def _open(self) -> AsyncRuntime:
        url, pool = self._args
        loop = asyncio.get_running_loop()
        core = await loop.run_in_executor(None, functools.partial(Runtime, url, pool=pool))
        self._runtime = AsyncRuntime(core)
        return self._runtime

    def __await__(self) -> Any:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncRuntime:
        return await self._open()

    async def __aexit__(self, *exc: object) -> None:
        if self._runtime is not None:
            await self._runtime.close()


def open_runtime(database_url: str | None = None, *, pool: WorkerPool | None = None) -> _Opener:
    """Open the runtime on ``database_url`` (default: ``CHATFN_DATABASE_URL`` or the SQLite
    file in the data directory), migrating its schema first."""
    return _Opener(database_url, pool)


def open_runtime_sync(
    database_url: str | None = None, *, pool: WorkerPool | None = None
) -> Runtime:
    """The same runtime for sync code: every method blocks instead of being awaited."""
    return Runtime(database_url, pool=pool)
