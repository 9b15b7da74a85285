"""The HTTP API (DESIGN section 7): FastAPI routes over the blocking runtime core.

Every route body is one call into ``runtime.core`` run on the server's thread pool
(``State.call``), so the event loop never waits for the database or a sandbox worker.
Admin routes need ``Authorization: Bearer <admin key>``; errors are
``{"error": {"code", "message"}}`` (``runtime.server.errors``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import functools
import logging
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response, WebSocket
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, JsonValue, StrictBool
from starlette.types import ASGIApp, Receive, Scope, Send

from runtime.admin_keys import AdminKeys
from runtime.archive import MAX_ARCHIVE_BYTES, read_archive
from runtime.core import App, Runtime
from runtime.events import resolve
from runtime.server import errors
from runtime.server.metrics import Metrics
from runtime.server.ws import SessionEndpoint
from runtime.validation import check_auth_params, check_name
from sandbox.errors import InvalidRequest, NotFound, UserNotFound
from sandbox.isolation import Isolation

log = logging.getLogger("chatfn.server")
T = TypeVar("T")
ARCHIVE_TYPES = ("application/gzip", "application/x-gzip", "application/zip")


class State:
    """What the routes share: the runtime, the admin keys, and two thread pools (calls,
    and deployment builds, which may take minutes)."""

    def __init__(self, runtime: Runtime, keys: AdminKeys) -> None:
        self.runtime = runtime
        self.keys = keys
        # Small: every write queues on one lock anyway, and more threads only add switches.
        self.calls = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="chatfn-call")
        self.builds = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="chatfn-build")
        self.sessions = SessionEndpoint(runtime, self.call)
        # The sandbox layers this machine gives deployments (``chatfn serve`` probes them).
        self.isolation = Isolation()
        self.metrics = Metrics(runtime, lambda: len(self.sessions.connections))

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.calls, functools.partial(fn, *args, **kwargs))

    async def app(self, name: str) -> App:
        return await self.call(self.runtime.app, name)

    def build(self, app: App, version: int, project: Any) -> None:
        def run() -> None:
            try:
                app.build(version, project)
            except Exception as exc:  # stored on the version as failed; nothing to raise to
                log.info("deployment %s v%d failed: %s", app.name, version, type(exc).__name__)

        self.builds.submit(run)

    def close(self) -> None:
        self.builds.shutdown(wait=True)
        self.calls.shutdown(wait=True)


def check_authorization(header: str, keys: AdminKeys) -> str | None:
    """What is wrong with an Authorization header, or None when it carries the key."""
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return "missing admin key: send Authorization: Bearer <CHATFN_ADMIN_KEY>"
    if not keys.check(key.strip()):
        return "wrong admin key"
    return None


class AdminOnly:
    """ASGI middleware: admin HTTP routes (``/v1/...``, ``/metrics``) answer 401 before
    their body is read or parsed. WebSockets pass (sessions authenticate through the
    app's function)."""

    def __init__(self, app: ASGIApp, keys: AdminKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith("/v1/") or path == "/metrics"):
            header = ""
            for name, value in scope.get("headers", []):
                if name == b"authorization":
                    header = value.decode("latin-1")
                    break
            problem = check_authorization(header, self.keys)
            if problem is not None:
                await errors.error_response("unauthorized", problem)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- request bodies -------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateApp(_Body):
    name: str
    guest_users: Literal["enabled", "disabled"] = "enabled"


class SettingsPatch(_Body):
    guest_users: Literal["enabled", "disabled"] | None = None


class SecretValue(_Body):
    value: str


class CreateUser(_Body):
    name: str
    display_name: str | None = None
    is_guest: StrictBool = False
    properties: dict[str, JsonValue] | None = None


class PatchUser(_Body):
    display_name: str | None = None
    properties: dict[str, JsonValue] | None = None


# -- the application ------------------------------------------------------------------------


def create_app(state: State) -> FastAPI:
    api = FastAPI(
        title="chatfn",
        version="1",
        summary="Sandboxed chat functions: apps, deployments, secrets, users, sessions.",
        docs_url="/docs",
    )
    api.state.chatfn = state
    errors.install(api)
    api.add_middleware(AdminOnly, keys=state.keys)

    # Only documents the bearer key in OpenAPI: ``AdminOnly`` has already checked it,
    # once, before any body was read.
    admin = HTTPBearer(auto_error=False, description="The admin key (CHATFN_ADMIN_KEY).")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(admin)])
    _apps(v1, state)
    _deployments(v1, state)
    _secrets_and_users(v1, state)
    _invocations_and_hooks(v1, state)
    api.include_router(v1)

    @api.get("/healthz", tags=["server"])
    async def healthz() -> dict[str, Any]:
        apps = await state.call(state.runtime.apps)
        return {
            "status": "ok",
            "service": "chatfn",
            "apps": len(apps),
            "sandbox": dict(state.isolation.on),
            "sandbox_off": dict(state.isolation.why_off),
            "sandbox_detail": dict(state.isolation.detail),
        }

    @api.get("/metrics", tags=["server"], dependencies=[Depends(admin)])
    async def metrics() -> Response:
        body = await state.call(state.metrics.render)
        return PlainTextResponse(body, media_type="text/plain; version=0.0.4")

    @api.websocket("/v1/apps/{app}/session")
    async def session(websocket: WebSocket, app: str) -> None:
        await state.sessions.serve(websocket, app)

    return api


def _app_dict(app: App) -> dict[str, Any]:
    state = app.state(fresh=True)
    return {
        "name": app.name,
        "settings": {"guest_users": state.guest_users},
        "active_version": state.version,
    }


def _apps(router: APIRouter, state: State) -> None:
    @router.post("/apps", status_code=201, tags=["apps"])
    async def create_app_route(body: CreateApp) -> dict[str, Any]:
        app = await state.call(state.runtime.create_app, body.name, guest_users=body.guest_users)
        return await state.call(_app_dict, app)

    @router.get("/apps", tags=["apps"])
    async def list_apps() -> dict[str, Any]:
        def run() -> list[dict[str, Any]]:
            return [_app_dict(state.runtime.app(n)) for n in state.runtime.apps()]

        return {"apps": await state.call(run)}

    @router.get("/apps/{app}", tags=["apps"])
    async def get_app(app: str) -> dict[str, Any]:
        return await state.call(_app_dict, await state.app(app))

    @router.get("/apps/{app}/settings", tags=["apps"])
    async def get_settings(app: str) -> dict[str, Any]:
        target = await state.app(app)
        return await state.call(target.settings)

    @router.patch("/apps/{app}/settings", tags=["apps"])
    async def patch_settings(app: str, body: SettingsPatch) -> dict[str, Any]:
        target = await state.app(app)
        return await state.call(target.update_settings, guest_users=body.guest_users)

    @router.get("/apps/{app}/sessions", tags=["sessions"])
    async def list_sessions(
        app: str, active: bool = True, limit: Annotated[int, Query(ge=1, le=1000)] = 100
    ) -> dict[str, Any]:
        target = await state.app(app)
        return {"sessions": await state.call(target.sessions, active=active, limit=limit)}


def _deployments(router: APIRouter, state: State) -> None:
    archive_body = {
        "requestBody": {
            "required": True,
            "content": {
                kind: {"schema": {"type": "string", "format": "binary"}} for kind in ARCHIVE_TYPES
            },
        }
    }

    @router.post(
        "/apps/{app}/deployments", status_code=202, tags=["deployments"], openapi_extra=archive_body
    )
    async def upload(app: str, request: Request) -> dict[str, Any]:
        """Upload the project as tar.gz or zip; it builds in the background (poll it)."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ARCHIVE_TYPES:
            raise InvalidRequest("send the project as application/gzip (tar.gz) or application/zip")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_ARCHIVE_BYTES:
            raise InvalidRequest(f"the archive is larger than {MAX_ARCHIVE_BYTES // 2**20} MiB")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_ARCHIVE_BYTES:
                raise InvalidRequest(f"the archive is larger than {MAX_ARCHIVE_BYTES // 2**20} MiB")
        target = await state.app(app)
        project = await state.call(read_archive, bytes(data))
        version = await state.call(target.begin_deploy, project)
        state.build(target, version, project)
        return {"version": version, "status": "building"}

    @router.get("/apps/{app}/deployments", tags=["deployments"])
    async def list_deployments(app: str) -> dict[str, Any]:
        target = await state.app(app)
        infos = await state.call(target.deployments.list)
        return {"deployments": [i.to_dict() for i in infos]}

    @router.get("/apps/{app}/deployments/{version}", tags=["deployments"])
    async def get_deployment(app: str, version: int) -> dict[str, Any]:
        target = await state.app(app)
        return (await state.call(target.deployments.get, version)).to_dict()

    @router.post("/apps/{app}/deployments/{version}/activate", tags=["deployments"])
    async def activate(app: str, version: int) -> dict[str, Any]:
        """Make an earlier version live again (rollback): atomic."""
        target = await state.app(app)
        return (await state.call(target.activate, version)).to_dict()

    @router.get("/apps/{app}/functions", tags=["deployments"])
    async def functions(app: str) -> dict[str, Any]:
        """The active version's handlers with their sources."""
        target = await state.app(app)

        def run() -> dict[str, Any]:
            version = target.state(fresh=True).version
            if version is None:
                return {"version": None, "functions": [], "init": None}
            files = target.deployments.project(version).files
            handlers = [
                {"event": resolve(name.removesuffix(".py")).name, "file": name, "source": text}
                for name, text in sorted(files.items())
                if name != "init.py"
            ]
            return {"version": version, "functions": handlers, "init": files.get("init.py")}

        return await state.call(run)


def _secrets_and_users(router: APIRouter, state: State) -> None:
    @router.put("/apps/{app}/secrets/{name}", status_code=204, tags=["secrets"])
    async def set_secret(app: str, name: str, body: SecretValue) -> Response:
        target = await state.app(app)
        await state.call(target.secrets.set, name, body.value)
        return Response(status_code=204)

    @router.get("/apps/{app}/secrets", tags=["secrets"])
    async def list_secrets(app: str) -> dict[str, Any]:
        """Names and when each was set; values are never returned."""
        target = await state.app(app)
        return {"secrets": await state.call(target.secrets.names)}

    @router.delete("/apps/{app}/secrets/{name}", status_code=204, tags=["secrets"])
    async def delete_secret(app: str, name: str) -> Response:
        target = await state.app(app)
        await state.call(target.secrets.delete, name)
        return Response(status_code=204)

    @router.get("/apps/{app}/users", tags=["users"])
    async def list_users(
        app: str,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        after: Annotated[str | None, Query(max_length=256)] = None,
    ) -> dict[str, Any]:
        target = await state.app(app)
        users = await state.call(target.users.list_users, limit=limit, after=after)
        return {"users": users, "next": users[-1]["name"] if len(users) == limit else None}

    @router.post("/apps/{app}/users", status_code=201, tags=["users"])
    async def create_user(app: str, body: CreateUser) -> dict[str, Any]:
        target = await state.app(app)
        return await state.call(
            target.users.create_user, body.name, body.display_name, body.is_guest, body.properties
        )

    @router.get("/apps/{app}/users/{name}", tags=["users"])
    async def get_user(app: str, name: str) -> dict[str, Any]:
        target = await state.app(app)
        user = await state.call(target.users.get_user, name)
        if user is None:
            raise UserNotFound(f"user {name!r} does not exist")
        return user

    @router.patch("/apps/{app}/users/{name}", tags=["users"])
    async def patch_user(app: str, name: str, body: PatchUser) -> dict[str, Any]:
        target = await state.app(app)
        changes = {field: getattr(body, field) for field in body.model_fields_set}
        if changes.get("display_name", "") is None:
            raise InvalidRequest("display_name must be a string")
        if "properties" in changes and changes["properties"] is None:
            changes["properties"] = {}
        return await state.call(target.users.update_user, name, **changes)

    @router.delete("/apps/{app}/users/{name}", status_code=204, tags=["users"])
    async def delete_user(app: str, name: str) -> Response:
        target = await state.app(app)
        await state.call(target.users.delete_user, name)
        return Response(status_code=204)


def _invocations_and_hooks(router: APIRouter, state: State) -> None:
    @router.get("/apps/{app}/invocations", tags=["invocations"])
    async def list_invocations(
        app: str,
        event: str | None = None,
        status: Literal["succeeded", "failed"] | None = None,
        since: datetime.datetime | None = None,
        until: datetime.datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        before: Annotated[str | None, Query(max_length=200)] = None,
    ) -> dict[str, Any]:
        """The invocation log, newest first; ``next`` is the ``before`` of the next page."""
        for name, moment in (("since", since), ("until", until)):
            if moment is not None and moment.tzinfo is None:
                raise InvalidRequest(f"{name} must include a time zone (e.g. Z)")
        target = await state.app(app)
        found = await state.call(
            target.invocations,
            limit=limit,
            event=event,
            status=status,
            since=since,
            until=until,
            before=before,
        )
        return {
            "invocations": [i.to_dict() for i in found],
            "next": found[-1].cursor if len(found) == limit else None,
        }

    @router.get("/apps/{app}/invocations/{invocation_id}", tags=["invocations"])
    async def get_invocation(app: str, invocation_id: str) -> dict[str, Any]:
        target = await state.app(app)
        return (await state.call(target.invocation, invocation_id)).to_dict()

    @router.post("/apps/{app}/hooks/{event}", tags=["hooks"])
    async def hook(app: str, event: str, payload: dict[str, JsonValue]) -> dict[str, Any]:
        """Run an event's handler for an external session server; the outcome is in the
        body (200), bad input is 400."""
        target = await state.app(app)
        try:
            event_type = resolve(event)
        except InvalidRequest as exc:
            raise NotFound(exc.message) from None
        if event_type.name == "UserAttemptedStartSession":  # DESIGN 6, step 1, here too
            check_name(payload.get("username"))
            check_auth_params(payload.get("auth_params"))
        inv = await state.call(target.invoke, event_type.name, payload)
        if inv.error is not None and inv.error.code == "invalid_request":
            raise inv.error
        return {
            "invocation_id": inv.id,
            "status": inv.status,
            "error": inv.error.to_dict() if inv.error else None,
            "result": inv.result,
            "duration_ms": round(inv.duration_ms, 3),
        }
