"""Starting and ending chat sessions (DESIGN section 6).

``start_session``:
    1. validate username and auth_params                      -> invalid_request
    2. a UserAttemptedStartSession handler deployed? run it    -> its error, if it fails
       none deployed and guest users disabled                  -> access_denied
    3. the user must exist; if not: guests enabled -> create a guest user,
       disabled                                                 -> user_not_found
    4. store the session; run UserStartedSession in the background

What reaches the client: ``SessionRejected``'s message (secrets redacted); for any other
failure of the handler a generic message with the invocation id. Details stay in the
invocation log.
"""

from __future__ import annotations

import enum
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from runtime.events import resolve
from runtime.invocations import Invocation, store
from runtime.models import SessionRow, UserRow, utcnow
from runtime.users import USER_BY_ID, USER_BY_NAME, user_dict
from runtime.validation import check_auth_params, check_name
from sandbox.errors import (
    AccessDenied,
    ChatfnError,
    FunctionError,
    InvalidRequest,
    NotFound,
    SessionActive,
    UserNotFound,
)

if TYPE_CHECKING:
    from runtime.core import App, AppState
    from runtime.nodes import Node

ATTEMPTED = resolve("UserAttemptedStartSession")
STARTED = resolve("UserStartedSession")
ENDED = resolve("UserEndedSession")
END_REASONS = ("ended", "disconnected")

# Failures of the handler whose sandbox message is written by the host, safe to pass on.
_HOST_WORDED = frozenset({"timeout", "resource_limit", "worker_crashed", "overloaded"})


@dataclass(frozen=True)
class SessionResult:
    """As ChatKitty's SDK: ``succeeded``/``failed``, ``session`` or ``error``. ``invocation``
    is the UserAttemptedStartSession run, when there was one."""

    session: dict[str, Any] | None = None
    error: ChatfnError | None = None
    invocation: Invocation | None = None

    @property
    def succeeded(self) -> bool:
        return self.error is None

    @property
    def failed(self) -> bool:
        return self.error is not None


def client_error(invocation: Invocation) -> ChatfnError:
    """The error a client sees when the handler failed: never a traceback or secret."""
    error = invocation.error
    assert error is not None
    if error.code == "access_denied":
        return AccessDenied(error.message or "Session rejected")  # redacted already
    ref = f"(invocation {invocation.id})"
    if error.code in _HOST_WORDED:
        return ChatfnError.from_dict({"code": error.code, "message": f"{error.message} {ref}"})
    if error.code == "function_error":
        return FunctionError(f"the session function failed {ref}")
    return ChatfnError.from_dict(
        {"code": error.code, "message": f"the session function was stopped: {error.code} {ref}"}
    )


def start_session(
    app: App,
    username: Any,
    auth_params: Any = None,
    *,
    connection_id: str | None = None,
    node_id: str | None = None,
) -> SessionResult:
    try:
        check_name(username)
        params = check_auth_params(auth_params)
        state = app.state()
    except ChatfnError as exc:
        return SessionResult(error=exc)

    invocation = None
    if app.has_handler(state, ATTEMPTED):
        data = {"username": username, "auth_params": params}
        invocation = app.run(ATTEMPTED, data, state, record=False)
        if invocation.failed:
            with app.runtime.db.write() as c:
                store(c, app.id, invocation)
            return SessionResult(error=client_error(invocation), invocation=invocation)
    elif state.guest_users == "disabled":
        return SessionResult(
            error=AccessDenied(
                "guest users are disabled and no UserAttemptedStartSession function is deployed"
            )
        )

    session_id = uuid.uuid4().hex
    try:
        session = _store_session(
            app,
            username,
            state,
            session_id,
            invocation,
            connection_id=connection_id,
            node_id=node_id,
        )
    except ChatfnError as exc:
        return SessionResult(error=exc, invocation=invocation)
    app.run_in_background(STARTED, {"user": session["user"], "session_id": session_id}, state)
    return SessionResult(session=session, invocation=invocation)


# Built once: a Core insert executed with a parameter dict skips statement construction.
_INSERT_USER = insert(UserRow)
_INSERT_SESSION = insert(SessionRow)


def _store_session(
    app: App,
    username: str,
    state: AppState,
    session_id: str,
    invocation: Invocation | None,
    *,
    connection_id: str | None,
    node_id: str | None,
) -> dict[str, Any]:
    """In one write transaction: the handler's invocation record, the guest user if one is
    due, and the session. UserNotFound (with the invocation still recorded) otherwise."""
    for _attempt in range(2):
        missing = False
        try:
            with app.runtime.db.write() as c:
                if invocation is not None:
                    store(c, app.id, invocation)
                user = c.execute(USER_BY_NAME, {"app_id": app.id, "name": username}).first()
                if user is None and state.guest_users != "enabled":
                    missing = True
                else:
                    if user is None:
                        c.execute(
                            _INSERT_USER,
                            {
                                "app_id": app.id,
                                "name": username,
                                "display_name": username,
                                "is_guest": True,
                                "properties": {},
                                "created_at": utcnow(),
                            },
                        )
                        user = c.execute(USER_BY_NAME, {"app_id": app.id, "name": username}).one()
                    started = utcnow()
                    c.execute(
                        _INSERT_SESSION,
                        {
                            "id": session_id,
                            "app_id": app.id,
                            "user_id": user.id,
                            "connection_id": connection_id,
                            "node_id": node_id,
                            "started_at": started,
                            "ended_at": None,
                            "end_reason": None,
                        },
                    )
                    return {
                        "id": session_id,
                        "user": user_dict(user),
                        "started_at": started.isoformat(),
                    }
        except IntegrityError:  # the guest user was created concurrently: use it
            continue
        if missing:
            raise UserNotFound("the user does not exist and guest users are disabled")
    raise InvalidRequest("the user changed while the session was starting; try again")


_END = (
    update(SessionRow)
    .where(
        (SessionRow.id == bindparam("sid"))
        & (SessionRow.app_id == bindparam("aid"))
        & SessionRow.ended_at.is_(None)
    )
    .values(ended_at=bindparam("when"), end_reason=bindparam("why"))
    .returning(SessionRow.user_id, SessionRow.started_at)
)


def end_session(app: App, session_id: str, reason: str = "ended") -> dict[str, Any]:
    """End an active session and run UserEndedSession in the background. One UPDATE
    decides it (a session ends once, whoever asks at the same time)."""
    if reason not in END_REASONS:
        raise InvalidRequest("reason must be 'ended' or 'disconnected'")
    if not isinstance(session_id, str) or not 1 <= len(session_id) <= 64:
        raise InvalidRequest("session_id must be a session id string")
    ended_at = utcnow()
    with app.runtime.db.write() as c:
        found = c.execute(
            _END,
            {"sid": session_id, "aid": app.id, "when": ended_at, "why": reason},
        ).first()
        if found is None:
            raise NotFound("no active session with that id")
        user = c.execute(USER_BY_ID, {"user_id": found.user_id}).one()
    session = {
        "id": session_id,
        "user": user_dict(user),
        "started_at": found.started_at.isoformat(),
        "ended_at": ended_at.isoformat(),
        "end_reason": reason,
    }
    app.run_in_background(
        ENDED,
        {"user": session["user"], "session_id": session_id, "reason": reason},
        app.state(),
    )
    return session


def list_sessions(app: App, *, active: bool = True, limit: int = 100) -> list[dict[str, Any]]:
    if not 1 <= limit <= 1000:
        raise InvalidRequest("limit must be 1 to 1000")
    query = (
        select(SessionRow, UserRow)
        .join(UserRow, UserRow.id == SessionRow.user_id)
        .where(SessionRow.app_id == app.id)
    )
    if active:
        query = query.where(SessionRow.ended_at.is_(None))
    query = query.order_by(SessionRow.started_at.desc()).limit(limit)
    with app.runtime.db.reading() as s:
        return [_session_dict(row, user) for row, user in s.execute(query)]


def _session_dict(row: SessionRow, user: UserRow) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row.id,
        "user": user_dict(user),
        "started_at": row.started_at.isoformat(),
    }
    if row.ended_at is not None:
        out["ended_at"] = row.ended_at.isoformat()
        out["end_reason"] = row.end_reason
    return out


class SessionState(enum.Enum):
    """Where a connection's session is. ``Connection`` moves only along ``_TRANSITIONS``."""

    IDLE = "idle"
    STARTING = "starting"
    ACTIVE = "active"
    ENDING = "ending"
    CLOSED = "closed"


_TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.IDLE: frozenset({SessionState.STARTING, SessionState.CLOSED}),
    SessionState.STARTING: frozenset({SessionState.ACTIVE, SessionState.IDLE}),
    SessionState.ACTIVE: frozenset({SessionState.ENDING}),
    SessionState.ENDING: frozenset({SessionState.IDLE, SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
}


class IllegalTransition(InvalidRequest):
    """A move the session state machine does not allow (a bug in the caller)."""


class Connection:
    """One client connection: at most one active session; closing it ends the session as
    ``disconnected``. The WebSocket endpoint holds one per socket."""

    def __init__(self, app: App, node: Node | None = None) -> None:
        self.app = app
        self.id = uuid.uuid4().hex
        # The node whose death would leave the session behind (runtime.nodes reaps it).
        self.node = node
        self.session_id: str | None = None
        self.state = SessionState.IDLE
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self.state is SessionState.CLOSED

    def _move(self, to: SessionState) -> None:
        if to not in _TRANSITIONS[self.state]:
            raise IllegalTransition(f"a session cannot go from {self.state.value} to {to.value}")
        self.state = to

    def start_session(self, username: Any, auth_params: Any = None) -> SessionResult:
        with self._lock:
            if self.state is SessionState.CLOSED:
                return SessionResult(error=InvalidRequest("the connection is closed"))
            if self.state is not SessionState.IDLE:
                return SessionResult(
                    error=SessionActive("this connection already has an active session")
                )
            self._move(SessionState.STARTING)
            try:
                node_id = None
                if self.node is not None:
                    self.node.start()  # registered before its first session is stored
                    node_id = self.node.id
                result = start_session(
                    self.app, username, auth_params, connection_id=self.id, node_id=node_id
                )
            except BaseException:
                self._move(SessionState.IDLE)
                raise
            if result.session is not None:
                self.session_id = result.session["id"]
                self._move(SessionState.ACTIVE)
            else:
                self._move(SessionState.IDLE)
            return result

    def end_session(self) -> dict[str, Any]:
        with self._lock:
            if self.state is not SessionState.ACTIVE or self.session_id is None:
                raise InvalidRequest("this connection has no active session")
            self._move(SessionState.ENDING)
            session_id, self.session_id = self.session_id, None
            try:
                return end_session(self.app, session_id, "ended")
            except NotFound:  # ended elsewhere meanwhile (an admin, another node)
                raise InvalidRequest("this connection has no active session") from None
            finally:
                self._move(SessionState.IDLE)

    def close(self) -> None:
        """The connection dropped: end its session as ``disconnected``."""
        with self._lock:
            if self.state is SessionState.CLOSED:
                return
            session_id, self.session_id = self.session_id, None
            if self.state is SessionState.ACTIVE:
                self._move(SessionState.ENDING)
            self._move(SessionState.CLOSED)
        if session_id is not None:
            try:
                end_session(self.app, session_id, "disconnected")
            except NotFound:  # already ended elsewhere
                pass


__all__ = ["Connection", "SessionResult", "SessionState", "end_session", "start_session"]
