"""The runtime: apps on a database, their deployments on a worker pool, and invocations.

This is the blocking core. ``runtime.embed`` is the async face of the same objects, and the
pytest plugin, the CLI and the server all go through here. Thread-safe.

Flow of one invocation (``App.invoke``, and the hooks inside ``start_session``):
    validate payload -> read app state (settings, active version) -> cached Deployment ->
    WorkerPool.invoke with this app's host calls -> redact -> store in the invocation log
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import and_, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError

from runtime import sessions
from runtime.changes import Changes
from runtime.db import Database, data_dir
from runtime.dependencies import (
    DependencyError,
    Progress,
    check_lock_covers,
    check_requirements,
    check_shadowing,
    ensure_environment,
    no_progress,
    parse_lock,
)
from runtime.dependencies import resolve as resolve_lock
from runtime.deployments import DeploymentInfo, Deployments
from runtime.events import EventType, resolve
from runtime.invocations import Invocation, from_result, get_invocation, list_invocations, store
from runtime.models import AppRow, DeploymentRow, SessionRow
from runtime.nodes import Node
from runtime.project import Project, read_project
from runtime.secrets import Secrets
from runtime.users import Users
from runtime.validation import check_app_name, check_guest_users
from sandbox import DEFAULT_POLICY, ChatfnError, Deployment, Policy, WorkerPool, validate
from sandbox.errors import AlreadyExists, DeployRejected, NotDeployed, NotFound, Overloaded
from sandbox.isolation import SandboxSettings
from sandbox.policy import PolicyError

log = logging.getLogger("chatfn.runtime")

DEFAULT_APP = "default"
# How long an app's settings and active version are reused before being read again.
STATE_TTL_S = 0.5

_STATE_QUERY = (
    select(AppRow.guest_users, DeploymentRow.version)
    .outerjoin(
        DeploymentRow,
        and_(DeploymentRow.app_id == AppRow.id, DeploymentRow.status == "active"),
    )
    .where(AppRow.id == bindparam("app_id"))
)


@dataclass(frozen=True)
class AppState:
    """What one invocation needs to know about its app, read in one query."""

    guest_users: str
    version: int | None


class App:
    """One app: its settings, users, secrets, deployments, sessions and invocations."""

    def __init__(self, runtime: Runtime, app_id: int, name: str) -> None:
        self.runtime = runtime
        self.id = app_id
        self.name = name
        self.users = Users(runtime.db, app_id)
        self.secrets = Secrets(
            runtime.db, app_id, on_change=lambda: runtime.changes.announce(app_id)
        )
        self.deployments = Deployments(runtime.db, app_id)
        self._capabilities: dict[str, Callable[..., Any]] = {
            **self.users.capabilities(),
            "secrets.all": self.secrets.values,
        }
        self._state: tuple[float, AppState] | None = None

    def __repr__(self) -> str:
        return f"App({self.name!r})"

    # -- settings ---------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        return {"guest_users": self.state().guest_users}

    def update_settings(self, *, guest_users: str | None = None) -> dict[str, Any]:
        if guest_users is not None:
            check_guest_users(guest_users)
            with self.runtime.db.session() as s:
                s.execute(
                    update(AppRow).where(AppRow.id == self.id).values(guest_users=guest_users)
                )
            self.forget_state()
        return self.settings()

    def state(self, *, fresh: bool = False) -> AppState:
        """Settings and active version. Cached for ``STATE_TTL_S``: changes made through
        this runtime show at once, changes made elsewhere within that time."""
        cached = self._state
        now = time.monotonic()
        if cached is not None and not fresh and now - cached[0] < STATE_TTL_S:
            return cached[1]
        with self.runtime.db.read() as c:
            row = c.execute(_STATE_QUERY, {"app_id": self.id}).one_or_none()
        if row is None:
            raise NotFound(f"app {self.name!r} no longer exists")
        state = AppState(guest_users=row[0], version=row[1])
        self._state = (now, state)
        return state

    def forget_state(self, *, announce: bool = True) -> None:
        """Drop the cached state (and secrets); with ``announce``, other nodes do too."""
        self._state = None
        self.secrets.forget()
        if announce:
            self.runtime.changes.announce(self.id)

    # -- deployments ------------------------------------------------------------------------

    def deploy(
        self, source: str | Path | Project, *, progress: Progress = no_progress
    ) -> DeploymentInfo:
        """Deploy a project directory (or a Project): compile every file, install its
        dependencies, boot it, run init.py once, and make it the active version. On any
        error the version is stored as failed with every error, DeployRejected is raised,
        and the previous version stays active. ``progress(message, done, total)`` hears
        about the long steps."""
        project = source if isinstance(source, Project) else read_project(source)
        return self.build(self.begin_deploy(project), project, progress=progress)

    def begin_deploy(self, project: Project) -> int:
        """Store ``project`` as a new version in status ``building``; ``build`` finishes
        it (the HTTP API answers 202 in between)."""
        project.limits()  # a bad manifest is refused before anything is stored
        return self.deployments.create(project)

    def build(
        self, version: int, project: Project, *, progress: Progress = no_progress
    ) -> DeploymentInfo:
        """Compile, install, boot and activate a stored ``building`` version (see deploy)."""
        limits = project.limits()

        def report(message: str, done: int | None, total: int | None) -> None:
            self.deployments.set_progress(version, message)
            progress(message, done, total)

        try:
            validate(Deployment(self.name, version, dict(project.files), limits))
            lock, policy = self.runtime.policy_for(project, self.id, report)
            deployment = Deployment(self.name, version, dict(project.files), limits, policy)
            report("starting", None, None)
            self.runtime.pool.prepare(deployment, init_capabilities=self._capabilities)
        except DeployRejected as exc:
            self.deployments.fail(version, exc.errors)
            raise
        except DependencyError as exc:
            self.deployments.fail(version, [exc.to_error()])
            raise DeployRejected(exc.message, errors=[exc.to_error()]) from None
        except ChatfnError as exc:
            self.deployments.fail(version, [{"file": None, "line": None, "message": exc.message}])
            raise DeployRejected(f"version {version} failed to start: {exc.message}") from None
        self.runtime.remember(deployment, self.id)
        info = self.deployments.activate(version, finishing_build=True, lock=lock)
        self.forget_state()
        self.runtime.went_live(self.name, version, force=True)
        return info

    def activate(self, version: int) -> DeploymentInfo:
        """Make a version that built the active one (a rollback, for an older version)."""
        info = self.deployments.get(version)
        if info.status == "active":
            return info
        if info.status in ("inactive",):
            # Boot it before switching, so a version that no longer starts never goes live.
            self.runtime.pool.prepare(
                self.runtime.deployment(self, version), init_capabilities=self._capabilities
            )
        info = self.deployments.activate(version)
        self.forget_state()
        self.runtime.went_live(self.name, version, force=True)
        return info

    # -- invocations ------------------------------------------------------------------------

    def invoke(self, event_type: str, payload: Any) -> Invocation:
        """Run one handler with ``payload``; a failed Invocation (never an exception) for
        bad input, a missing handler, or anything the handler does."""
        try:
            event = resolve(event_type)
            data = event.validate(payload)
            state = self.state()
        except ChatfnError as exc:
            return self.runtime.not_run(self.name, event_type, exc)
        if not self.has_handler(state, event):
            return self.runtime.not_run(
                self.name, event.name, NotDeployed(f"no {event.name} function is deployed")
            )
        return self.run(event, data, state)

    def has_handler(self, state: AppState, event: EventType) -> bool:
        if state.version is None:
            return False
        return event.filename in self.runtime.deployment(self, state.version).files

    def run(
        self, event: EventType, data: dict[str, Any], state: AppState, *, record: bool = True
    ) -> Invocation:
        """Invoke the active version's handler for ``event``; stored in the invocation log
        unless ``record`` is False (the caller stores it with what it writes)."""
        assert state.version is not None
        invocation_id = uuid.uuid4().hex
        payload = {**data, "type": event.name, "id": uuid.uuid4().hex}
        deployment = self.runtime.deployment(self, state.version)
        self.runtime.went_live(self.name, state.version)
        result = self.runtime.pool.invoke(
            deployment,
            event.stem,
            payload,
            capabilities=self._capabilities,
            invocation_id=invocation_id,
        )
        if result.error is not None and result.error.code == "not_deployed":
            # The version was retired between reading the state and invoking: once more.
            fresh = self.state(fresh=True)
            if fresh.version is not None and fresh.version != state.version:
                return self.run(event, data, fresh, record=record)
        secrets = self.secrets.values() if (result.logs or result.error) else {}
        invocation = from_result(
            self.name, event.name, state.version, result, secrets, deployment.limits.log_bytes
        )
        if record:
            with self.runtime.db.write() as c:
                store(c, self.id, invocation)
        self.runtime.observe(invocation)
        return invocation

    def run_in_background(self, event: EventType, data: dict[str, Any], state: AppState) -> None:
        """Run a non-blocking event's handler later, if ``state``'s version has one."""
        if not self.has_handler(state, event):
            return

        def task() -> None:
            now = self.state()  # the version live when the hook runs (cached, cheap)
            if not self.has_handler(now, event):
                return
            invocation = self.run(event, data, now)
            if invocation.failed and invocation.error is not None:
                log.info(
                    "%s %s failed: %s (invocation %s)",
                    self.name,
                    event.name,
                    invocation.error.code,
                    invocation.id,
                )

        if not self.runtime.background(task):
            # Shed, but never silently: the invocation log and the metrics show it.
            error = Overloaded(
                f"{event.name} not run: {self.runtime.max_background} background "
                "invocations are already waiting"
            )
            invocation = self.runtime.not_run(self.name, event.name, error)
            invocation = dataclasses.replace(invocation, deployment_version=state.version)
            with self.runtime.db.write() as c:
                store(c, self.id, invocation)
            self.runtime.observe(invocation)

    def invocations(
        self,
        *,
        limit: int = 50,
        event: str | None = None,
        status: str | None = None,
        since: datetime.datetime | None = None,
        until: datetime.datetime | None = None,
        before: str | None = None,
    ) -> list[Invocation]:
        """The invocation log, newest first (see ``invocations.list_invocations``)."""
        event_name = resolve(event).name if event is not None else None
        return list_invocations(
            self.runtime.db,
            self.id,
            self.name,
            limit=limit,
            event=event_name,
            status=status,
            since=since,
            until=until,
            before=before,
        )

    def invocation(self, invocation_id: str) -> Invocation:
        found = get_invocation(self.runtime.db, self.id, self.name, invocation_id)
        if found is None:
            raise NotFound(f"no invocation {invocation_id!r}")
        return found

    # -- sessions ---------------------------------------------------------------------------

    def start_session(
        self, username: Any, auth_params: Any = None, *, connection_id: str | None = None
    ) -> sessions.SessionResult:
        return sessions.start_session(self, username, auth_params, connection_id=connection_id)

    def end_session(self, session_id: str, reason: str = "ended") -> dict[str, Any]:
        return sessions.end_session(self, session_id, reason)

    def connect(self) -> sessions.Connection:
        """A connection: at most one active session at a time; closing it ends that session
        with reason ``disconnected``. Its first session registers this process as a node, so
        that if it dies, another node (or its next start) ends its sessions."""
        return sessions.Connection(self, self.runtime.node)

    def sessions(self, *, active: bool = True, limit: int = 100) -> list[dict[str, Any]]:
        return sessions.list_sessions(self, active=active, limit=limit)


class Runtime:
    """Apps on one database, run on one worker pool. ``close()`` when done."""

    def __init__(
        self,
        database_url: str | None = None,
        *,
        pool: WorkerPool | None = None,
        policy: Policy = DEFAULT_POLICY,
        envs_dir: str | Path | None = None,
        background_workers: int = 4,
        sandbox: SandboxSettings | None = None,
        max_background: int = 10_000,
    ) -> None:
        # The operator's sandbox settings (CHATFN_SANDBOX_* by default): which OS layers,
        # which are required, and the uids apps run as.
        self.sandbox = sandbox if sandbox is not None else SandboxSettings.from_env()
        self.db = Database(database_url)
        # Installed dependency environments, one per lock (content-addressed).
        self.envs_dir = Path(envs_dir) if envs_dir is not None else data_dir() / "envs"
        # The sandbox policy every deployment runs under (per-deployment dependencies
        # extend it, and each app gets its own uid).
        self.policy = policy.with_layers(self.sandbox.layers, self.sandbox.require)
        self.db.migrate()
        self._own_pool = pool is None
        self.pool = pool if pool is not None else WorkerPool()
        self._lock = threading.Lock()
        self._apps: dict[str, App] = {}
        self._deployments: dict[tuple[int, int], Deployment] = {}
        self._live: dict[str, int] = {}
        self._background = concurrent.futures.ThreadPoolExecutor(
            max_workers=background_workers, thread_name_prefix="chatfn-background"
        )
        self._pending: set[concurrent.futures.Future[None]] = set()
        # Background invocations waiting or running at most; more are shed as overloaded.
        self.max_background = max_background
        self._closed = False
        # Called with every invocation that ran (metrics); must be quick and never raise.
        self.observers: list[Callable[[Invocation], None]] = []
        self.changes = Changes(self.db, self._changed_elsewhere)
        self.node = Node(self)

    # -- apps -------------------------------------------------------------------------------

    def create_app(self, name: str, *, guest_users: str = "enabled") -> App:
        check_app_name(name)
        check_guest_users(guest_users)
        try:
            with self.db.session() as s:
                row = AppRow(name=name, guest_users=guest_users)
                s.add(row)
                s.flush()
                app_id = row.id
        except IntegrityError:
            raise AlreadyExists(f"an app named {name!r} already exists") from None
        return self._remember_app(app_id, name)

    def app(self, name: str) -> App:
        with self._lock:
            cached = self._apps.get(name)
        if cached is not None:
            return cached
        check_app_name(name)
        with self.db.reading() as s:
            app_id = s.scalar(select(AppRow.id).where(AppRow.name == name))
        if app_id is None:
            raise NotFound(f"no app named {name!r}")
        return self._remember_app(app_id, name)

    def ensure_app(self, name: str = DEFAULT_APP) -> App:
        """The app named ``name``, created (guests enabled) if it does not exist."""
        try:
            return self.app(name)
        except NotFound:
            pass
        try:
            return self.create_app(name)
        except AlreadyExists:  # created concurrently
            return self.app(name)

    def active_session_count(self) -> int:
        """Active sessions of every app (all nodes sharing the database)."""
        query = select(func.count()).select_from(SessionRow).where(SessionRow.ended_at.is_(None))
        with self.db.read() as c:
            return int(c.execute(query).scalar_one())

    def apps(self) -> list[str]:
        with self.db.reading() as s:
            return list(s.scalars(select(AppRow.name).order_by(AppRow.name)))

    def _remember_app(self, app_id: int, name: str) -> App:
        with self._lock:
            app = self._apps.get(name)
            if app is None or app.id != app_id:
                app = self._apps[name] = App(self, app_id, name)
            return app

    # -- deployments on the pool ------------------------------------------------------------

    def deployment(self, app: App, version: int) -> Deployment:
        """The sandbox Deployment of a stored version (versions never change: cached)."""
        key = (app.id, version)
        with self._lock:
            cached = self._deployments.get(key)
        if cached is not None:
            return cached
        project = app.deployments.project(version)
        _lock, policy = self.policy_for(project, app.id)
        deployment = Deployment(app.name, version, dict(project.files), project.limits(), policy)
        return self.remember(deployment, app.id)

    def policy_for(
        self, project: Project, app_id: int, progress: Progress = no_progress
    ) -> tuple[str | None, Policy]:
        """The lock (resolved when the project has none) and the sandbox policy with the
        app's own uid and the project's declared dependencies installed and allowed."""
        try:
            uid = self.sandbox.uids.for_app(app_id)
        except PolicyError as exc:
            raise DeployRejected(str(exc)) from None
        lock, policy = self._dependencies(project, progress)
        return lock, policy.with_uid(uid, uid)

    def _dependencies(self, project: Project, progress: Progress) -> tuple[str | None, Policy]:
        requirements = check_requirements(project.requirements or "")
        if project.lock is not None:
            lock = project.lock
            pins = parse_lock(lock)
            check_lock_covers(requirements, pins)
        elif requirements:
            lock = resolve_lock(project.requirements or "", progress)
            pins = parse_lock(lock)
        else:
            return None, self.policy
        if not pins:
            return lock, self.policy
        environment = ensure_environment(pins, self.envs_dir, progress)
        active = [r for r in requirements if r.marker is None or r.marker.evaluate()]
        declared = [r.name for r in active] if requirements else [p.name for p in pins]
        check_shadowing(environment, declared)
        modules = environment.modules_of(declared)
        return lock, self.policy.with_modules(modules, paths=[str(environment.path)])

    def remember(self, deployment: Deployment, app_id: int | None = None) -> Deployment:
        if app_id is None:
            app_id = self.app(deployment.app).id
        with self._lock:
            return self._deployments.setdefault((app_id, deployment.version), deployment)

    def went_live(self, app: str, version: int, *, force: bool = False) -> None:
        """Note ``version`` as the app's live one; the first time, retire the workers of
        its other versions, letting in-flight invocations finish. Without ``force`` (an
        invocation that merely ran on ``version``), an older version than the one noted
        changes nothing: a hook queued before a deploy must not retire its successor."""
        with self._lock:
            live = self._live.get(app)
            if live == version or (not force and live is not None and version < live):
                return
            self._live[app] = version
            # Other versions' sandbox Deployments are rebuilt from the database if needed.
            app_id = next((a.id for a in self._apps.values() if a.name == app), None)
            for key in [k for k in self._deployments if k[0] == app_id and k[1] != version]:
                del self._deployments[key]
        for (name, v), pool in self.pool.pools().items():
            if name == app and v != version:
                self.pool.retire((name, v), grace_s=pool.limits.timeout_ms / 1000 + 1)

    def observe(self, invocation: Invocation) -> None:
        for observer in self.observers:
            try:
                observer(invocation)
            except Exception:  # an observer never fails an invocation
                log.warning("invocation observer failed", exc_info=False)

    def retire_app(self, app: str) -> None:
        """Stop every worker of ``app`` now (its next invocation boots them again)."""
        with self._lock:
            self._live.pop(app, None)
        for name, version in self.pool.pools():
            if name == app:
                self.pool.retire((name, version))

    def not_run(self, app: str, event: str, error: ChatfnError) -> Invocation:
        """An invocation that failed before reaching a handler (not stored)."""
        return Invocation(
            id=uuid.uuid4().hex,
            app=app,
            event=event,
            deployment_version=None,
            status="failed",
            duration_ms=0.0,
            error=error,
            logs="",
            logs_truncated=False,
            created_at=datetime.datetime.now(datetime.UTC),
        )

    # -- background work --------------------------------------------------------------------

    def background(self, task: Callable[[], None]) -> bool:
        """Run ``task`` on the background pool; False (not queued) when ``max_background``
        tasks are already waiting or running, or the runtime is closed."""

        def guarded() -> None:
            try:
                task()
            except Exception as exc:  # a background hook never takes anything down
                log.warning("background invocation failed: %s", type(exc).__name__)

        with self._lock:
            if self._closed or len(self._pending) >= self.max_background:
                return False
            future = self._background.submit(guarded)
            self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return True

    def drain(self, timeout: float | None = 30.0) -> None:
        """Wait for background invocations (UserStartedSession, UserEndedSession)."""
        with self._lock:
            pending = list(self._pending)
        concurrent.futures.wait(pending, timeout=timeout)

    def _changed_elsewhere(self, app_id: int) -> None:
        """A node (maybe this one) changed ``app_id``: drop its caches now, and warm its
        active version in the background so the first session does not wait for it."""
        with self._lock:
            app = next((a for a in self._apps.values() if a.id == app_id), None)
        if app is None:
            return
        app.forget_state(announce=False)

        def warm() -> None:
            version = app.state().version
            if version is not None:
                self.went_live(app.name, version, force=True)
                self.pool.prepare(self.deployment(app, version))

        self.background(warm)

    def close(self) -> None:
        self.node.stop()
        self.changes.close()
        self.drain()
        with self._lock:
            self._closed = True
        self._background.shutdown(wait=True)
        if self._own_pool:
            self.pool.close()
        self.db.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
