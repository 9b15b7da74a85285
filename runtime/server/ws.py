"""The WebSocket session endpoint ``/v1/apps/{app}/session`` (DESIGN section 7).

    -> {"type": "start_session", "id": 1, "username": "...", "auth_params": {...}}
    <- {"type": "session_started", "id": 1, "session": {...}}
     | {"type": "error", "id": 1, "error": {"code": "...", "message": "..."}}
    -> {"type": "end_session", "id": 2}
    <- {"type": "session_ended", "id": 2}

One ``runtime.sessions.Connection`` per socket (at most one active session, a state
machine); messages are handled in order. A bad message gets an ``error`` and the socket
stays usable; dropping the socket ends its session (UserEndedSession, ``disconnected``).
An unknown app closes the socket with code 4404.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from runtime.core import Runtime
from runtime.sessions import Connection
from sandbox.errors import ChatfnError, InvalidRequest

log = logging.getLogger("chatfn.server")
T = TypeVar("T")
Call = Callable[..., Awaitable[Any]]

MAX_MESSAGE_BYTES = 128 * 1024
CLOSE_UNKNOWN_APP = 4404
CLOSE_GOING_AWAY = 1001
_ID_TYPES = (int, str)


def _reply(kind: str, request_id: Any, **fields: Any) -> str:
    return orjson.dumps({"type": kind, "id": request_id, **fields}).decode()


def _error(request_id: Any, error: ChatfnError) -> str:
    return _reply("error", request_id, error=error.to_dict())


class SessionEndpoint:
    def __init__(self, runtime: Runtime, call: Call) -> None:
        self.runtime = runtime
        self.call = call
        self.connections: set[Connection] = set()
        self.sockets: set[WebSocket] = set()

    async def serve(self, websocket: WebSocket, app_name: str) -> None:
        await websocket.accept()
        try:
            app = await self.call(self.runtime.app, app_name)
        except ChatfnError:
            await websocket.close(CLOSE_UNKNOWN_APP, f"no app named {app_name[:64]!r}")
            return
        connection: Connection = app.connect()
        self.connections.add(connection)
        self.sockets.add(websocket)
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text")
                if raw is None:
                    data = message.get("bytes") or b""
                    raw = data.decode("utf-8", errors="replace")
                await websocket.send_text(await self.handle(connection, raw))
        except WebSocketDisconnect:
            pass
        except RuntimeError:  # the socket was closed under us (server shutdown)
            pass
        finally:
            self.sockets.discard(websocket)
            # Shielded: a cancelled endpoint (client gone, shutdown timeout) still ends the
            # session and fires UserEndedSession.
            await asyncio.shield(self._close(connection))

    async def _close(self, connection: Connection) -> None:
        try:
            await self.call(connection.close)
        finally:
            self.connections.discard(connection)

    async def handle(self, connection: Connection, raw: str) -> str:
        """One client message to one reply."""
        if len(raw) > MAX_MESSAGE_BYTES:
            return _error(
                None, InvalidRequest(f"messages are limited to {MAX_MESSAGE_BYTES // 1024} KiB")
            )
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _error(None, InvalidRequest("the message is not valid JSON"))
        if not isinstance(message, dict):
            return _error(None, InvalidRequest("the message must be a JSON object"))
        request_id = message.get("id")
        if request_id is not None and (
            type(request_id) not in _ID_TYPES or (type(request_id) is str and len(request_id) > 64)
        ):
            return _error(None, InvalidRequest("id must be an integer or a short string"))
        kind = message.get("type")
        try:
            if kind == "start_session":
                extra = set(message) - {"type", "id", "username", "auth_params"}
                if extra:
                    raise InvalidRequest(f"unknown fields: {', '.join(sorted(map(str, extra)))}")
                result = await self.call(
                    connection.start_session, message.get("username"), message.get("auth_params")
                )
                if result.error is not None:
                    return _error(request_id, result.error)
                return _reply("session_started", request_id, session=result.session)
            if kind == "end_session":
                await self.call(connection.end_session)
                return _reply("session_ended", request_id)
            known = "start_session, end_session"
            raise InvalidRequest(f"unknown message type {str(kind)[:40]!r}; known: {known}")
        except ChatfnError as exc:
            return _error(request_id, exc)

    async def close_all(self) -> None:
        """Server shutdown: end every session (as disconnected) and close every socket."""
        for websocket in list(self.sockets):
            try:
                await websocket.close(CLOSE_GOING_AWAY, "the server is shutting down")
            except RuntimeError:
                pass
        for connection in list(self.connections):
            await self.call(connection.close)
