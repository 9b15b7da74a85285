"""Clients of a chatfn server (DESIGN section 7).

``SessionClient`` speaks the session WebSocket (``/v1/apps/{app}/session``) the way
ChatKitty's JavaScript SDK does: ``start_session`` returns a ``SessionResult`` with
``succeeded``, ``failed``, ``session`` and ``error``; calling it while a start is in progress
or a session is active raises before anything is sent. ``connect_sync`` gives the same
methods, blocking, for scripts.

``AdminClient`` covers the HTTP API (apps, settings, deployments, functions, secrets, users,
invocations, sessions, hooks, health and metrics) with the admin key from
``CHATFN_ADMIN_KEY``. Every failure is a ``ChatfnClientError`` with a stable ``code``, a
``message`` safe to print and the HTTP ``status`` when there was one. The key never appears
in a message or a repr.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
import orjson
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from runtime.archive import pack_project

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_APP = "default"
KEY_ENV = "CHATFN_ADMIN_KEY"
# The close code the server uses for a session socket of an app that does not exist.
CLOSE_UNKNOWN_APP = 4404

T = TypeVar("T")


# -- errors ---------------------------------------------------------------------------------


class ChatfnClientError(Exception):
    """A call to a chatfn server failed. ``code`` is the server's error code (``not_found``,
    ``unauthorized``, ...) or one of the client's own (``connection_failed``,
    ``connection_closed``, ``timeout``, ``bad_response``); ``status`` is the HTTP status
    when there was a response; ``details`` holds any other fields of the server's error
    object (a rejected deploy's ``errors``)."""

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.details: dict[str, Any] = dict(details or {})

    def __repr__(self) -> str:
        status = f", status={self.status}" if self.status is not None else ""
        return f"{type(self).__name__}({self.code!r}, {self.message!r}{status})"


class ChatfnConnectionError(ChatfnClientError):
    """The server could not be reached, refused the connection, or closed it."""


class SessionStartInProgress(ChatfnClientError):
    """``start_session`` (or ``end_session``) while a start is awaiting its answer."""

    def __init__(self, message: str = "a session is already starting on this connection") -> None:
        super().__init__("session_start_in_progress", message)


class SessionAlreadyActive(ChatfnClientError):
    """``start_session`` while this connection has an active session."""

    def __init__(
        self, message: str = "this connection already has an active session; end it first"
    ) -> None:
        super().__init__("session_active", message)


class NoActiveSession(ChatfnClientError):
    """``end_session`` without an active session."""

    def __init__(self, message: str = "this connection has no active session") -> None:
        super().__init__("no_active_session", message)


# -- sessions over the WebSocket ------------------------------------------------------------


@dataclass(frozen=True)
class SessionError:
    """Why a session did not start: the server's ``code`` and ``message``."""

    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class SessionResult:
    """As ChatKitty's SDK: ``succeeded``/``failed``, then ``session`` or ``error``."""

    session: dict[str, Any] | None = None
    error: SessionError | None = None

    @property
    def succeeded(self) -> bool:
        return self.error is None

    @property
    def failed(self) -> bool:
        return self.error is not None


def session_url(url: str, app: str) -> str:
    """``http://host:8080`` -> ``ws://host:8080/v1/apps/{app}/session`` (https -> wss; a ws or
    wss URL is kept; a path prefix is kept, for a server behind a proxy)."""
    parts = urlsplit(url.strip())
    schemes = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
    scheme = schemes.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ChatfnClientError(
            "invalid_request", f"{url!r} is not an http(s) or ws(s) URL of a chatfn server"
        )
    if not app:
        raise ChatfnClientError("invalid_request", "the app name is empty")
    path = f"{parts.path.rstrip('/')}/v1/apps/{quote(app, safe='')}/session"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def _error_from(data: Any) -> SessionError:
    if isinstance(data, dict):
        code, message = data.get("code"), data.get("message")
        if isinstance(code, str) and isinstance(message, str):
            return SessionError(code, message)
    return SessionError("bad_response", "the server sent a malformed error")


class SessionClient:
    """One session connection. ``await SessionClient.connect(url, app)``, then
    ``start_session``/``end_session``; ``close()`` (or ``async with``) when done. At most one
    session at a time, as on the server; closing the connection ends it there
    (``disconnected``)."""

    def __init__(self, ws: ClientConnection, url: str, app: str, timeout: float | None) -> None:
        self._ws = ws
        self.url = url
        self.app = app
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._starting = False
        self._session: dict[str, Any] | None = None
        self._closed_error: ChatfnConnectionError | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(
        cls,
        url: str = DEFAULT_URL,
        app: str = DEFAULT_APP,
        *,
        timeout: float | None = 30.0,
        open_timeout: float = 10.0,
    ) -> SessionClient:
        """Open the session WebSocket of ``app``. ``timeout`` bounds each call: a call that
        gets no answer in time closes the connection (so no session is left behind) and
        raises a ``ChatfnClientError`` with code ``timeout``."""
        target = session_url(url, app)
        try:
            ws = await ws_connect(target, open_timeout=open_timeout, max_size=4 * 1024 * 1024)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 404:
                raise ChatfnConnectionError(
                    "not_found", f"no app named {app!r} on {url}", status
                ) from None
            raise ChatfnConnectionError(
                "connection_failed",
                f"{target} refused the WebSocket (HTTP {status})",
                status,
            ) from None
        except (InvalidURI, InvalidHandshake) as exc:
            raise ChatfnConnectionError(
                "connection_failed", f"cannot open a WebSocket to {target}: {exc}"
            ) from None
        except TimeoutError:
            raise ChatfnConnectionError(
                "timeout", f"{target} did not accept the WebSocket within {open_timeout:g} s"
            ) from None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise ChatfnConnectionError(
                "connection_failed", f"cannot connect to {url}: {reason}"
            ) from None
        return cls(ws, url, app, timeout)

    # -- state ----------------------------------------------------------------------------

    @property
    def session(self) -> dict[str, Any] | None:
        """The active session (``id``, ``user``, ``started_at``), or None."""
        return self._session

    @property
    def closed(self) -> bool:
        return self._closed_error is not None

    # -- calls ----------------------------------------------------------------------------

    async def start_session(
        self, username: str, auth_params: Mapping[str, Any] | None = None
    ) -> SessionResult:
        """Start a session: a ``SessionResult`` that ``succeeded`` with the ``session``, or
        ``failed`` with the server's ``error`` (``access_denied`` and the handler's message,
        ``user_not_found``, ...). Raises ``SessionStartInProgress`` or
        ``SessionAlreadyActive`` before sending anything, and ``ChatfnConnectionError``
        when the connection is or gets closed."""
        if self._starting:
            raise SessionStartInProgress()
        if self._session is not None:
            raise SessionAlreadyActive()
        self._check_open()
        self._starting = True
        try:
            message: dict[str, Any] = {"type": "start_session", "username": username}
            message["auth_params"] = dict(auth_params) if auth_params is not None else {}
            reply = await self._call(message)
            if reply.get("type") == "session_started" and isinstance(reply.get("session"), dict):
                self._session = reply["session"]
                return SessionResult(session=self._session)
            if reply.get("type") == "error":
                return SessionResult(error=_error_from(reply.get("error")))
            raise self._unexpected(reply)
        finally:
            self._starting = False

    async def end_session(self) -> dict[str, Any] | None:
        """End the active session (the server runs UserEndedSession). Returns the ended
        session when the server sends it back. Raises ``NoActiveSession`` without one,
        ``SessionStartInProgress`` while one is starting, and ``ChatfnClientError`` with the
        server's code if the server refuses."""
        if self._starting:
            raise SessionStartInProgress("a session is still starting; wait for start_session")
        if self._session is None:
            raise NoActiveSession()
        self._check_open()
        # Forgotten at once, as on the server: a second end_session is NoActiveSession.
        self._session = None
        reply = await self._call({"type": "end_session"})
        if reply.get("type") == "session_ended":
            ended = reply.get("session")
            return ended if isinstance(ended, dict) else None
        if reply.get("type") == "error":
            error = _error_from(reply.get("error"))
            raise ChatfnClientError(error.code, error.message)
        raise self._unexpected(reply)

    async def close(self) -> None:
        """Close the connection (the server ends an active session as ``disconnected``).
        Pending calls fail with ``connection_closed``. Idempotent."""
        if self._closed_error is None:
            self._closed_error = ChatfnConnectionError(
                "connection_closed", "the connection was closed by the client"
            )
        self._session = None
        with contextlib.suppress(Exception):
            await self._ws.close()
        if not self._reader.done():
            self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader
        self._fail_pending(self._closed_error)

    async def __aenter__(self) -> SessionClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"SessionClient({self.url!r}, app={self.app!r}, {state})"

    # -- the wire ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed_error is not None:
            raise self._closed_error

    async def _call(self, message: dict[str, Any]) -> dict[str, Any]:
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            try:
                await self._ws.send(orjson.dumps({**message, "id": request_id}).decode())
            except ConnectionClosed:
                # The reader sees the close and fails the future with the reason.
                pass
            try:
                return await asyncio.wait_for(future, self.timeout)
            except TimeoutError:
                # The answer may still come; the state is unknown, so give up the connection:
                # the server ends whatever session it started, as for a dropped client.
                await self.close()
                raise ChatfnClientError(
                    "timeout", f"no answer to {message['type']} within {self.timeout:g} s"
                ) from None
        finally:
            self._pending.pop(request_id, None)
            if not future.done():
                future.cancel()

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                self._dispatch(raw)
        except ConnectionClosed:
            pass
        except Exception as exc:  # a broken frame or anything else: the connection is unusable
            self._closed(ChatfnConnectionError("connection_closed", f"connection failed: {exc}"))
            with contextlib.suppress(Exception):
                await self._ws.close()
            return
        self._closed(self._close_error())

    def _dispatch(self, raw: str | bytes) -> None:
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if not isinstance(message, dict):
            return
        request_id = message.get("id")
        future = self._pending.get(request_id) if isinstance(request_id, int) else None
        if future is not None and not future.done():
            future.set_result(message)

    def _close_error(self) -> ChatfnConnectionError:
        code, reason = self._ws.close_code, self._ws.close_reason or ""
        if code == CLOSE_UNKNOWN_APP:
            return ChatfnConnectionError("not_found", f"no app named {self.app!r} on {self.url}")
        shown = f" ({reason})" if reason else ""
        return ChatfnConnectionError(
            "connection_closed", f"the server closed the connection with code {code}{shown}"
        )

    def _closed(self, error: ChatfnConnectionError) -> None:
        if self._closed_error is None:
            self._closed_error = error
        self._session = None
        self._fail_pending(self._closed_error)

    def _fail_pending(self, error: ChatfnClientError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: no "never retrieved" warning if unawaited

    @staticmethod
    def _unexpected(reply: dict[str, Any]) -> ChatfnClientError:
        return ChatfnClientError(
            "bad_response", f"unexpected answer from the server: {str(reply.get('type'))[:80]}"
        )


class SyncSessionClient:
    """``SessionClient`` with blocking methods, for scripts. It runs the async client on a
    private event loop in a daemon thread; ``close()`` stops both."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self._loop = loop
        self._thread = thread
        self._client: SessionClient | None = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise ChatfnConnectionError("connection_closed", "the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def client(self) -> SessionClient:
        assert self._client is not None
        return self._client

    @property
    def session(self) -> dict[str, Any] | None:
        return self.client.session

    @property
    def closed(self) -> bool:
        return self._loop.is_closed() or self.client.closed

    def start_session(
        self, username: str, auth_params: Mapping[str, Any] | None = None
    ) -> SessionResult:
        return self._run(self.client.start_session(username, auth_params))

    def end_session(self) -> dict[str, Any] | None:
        return self._run(self.client.end_session())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            if self._client is not None:
                self._run(self._client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> SyncSessionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Sync{self._client!r}" if self._client is not None else "SyncSessionClient()"


def connect_sync(
    url: str = DEFAULT_URL,
    app: str = DEFAULT_APP,
    *,
    timeout: float | None = 30.0,
    open_timeout: float = 10.0,
) -> SyncSessionClient:
    """``SessionClient.connect`` for blocking code: the same methods, not awaited."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="chatfn-session", daemon=True)
    thread.start()
    sync = SyncSessionClient(loop, thread)
    try:
        sync._client = sync._run(
            SessionClient.connect(url, app, timeout=timeout, open_timeout=open_timeout)
        )
    except BaseException:
        sync.close()
        raise
    return sync


# -- packing a project ----------------------------------------------------------------------


# -- the HTTP API ---------------------------------------------------------------------------

TERMINAL_STATUSES = frozenset({"active", "failed"})
# A version that built is "inactive" for a moment before it is activated.
ACTIVATION_GRACE_S = 10.0


def _segment(value: str | int) -> str:
    return quote(str(value), safe="")


class AdminClient:
    """The HTTP API of a chatfn server, blocking (httpx). ``key`` defaults to
    ``CHATFN_ADMIN_KEY``; without one, admin calls get ``unauthorized``. ``app`` is the app
    the per-app methods act on."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        key: str | None = None,
        app: str = DEFAULT_APP,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ChatfnClientError(
                "invalid_request", f"{url!r} is not an http(s) URL of a chatfn server"
            )
        self.url = url.strip().rstrip("/")
        self.app = app
        self.timeout = timeout
        key = key if key is not None else os.environ.get(KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        # The key lives only in the httpx client's headers (whose repr hides it).
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def __repr__(self) -> str:
        return f"AdminClient({self.url!r}, app={self.app!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _app_path(self, *parts: str | int) -> str:
        tail = "".join(f"/{_segment(p)}" for p in parts)
        return f"/v1/apps/{_segment(self.app)}{tail}"

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> httpx.Response:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(
                method,
                path,
                json=json,
                content=content,
                headers=headers,
                params=query or None,
            )
        except httpx.TimeoutException:
            raise ChatfnConnectionError(
                "timeout", f"{self.url} did not answer {method} {path} within {self.timeout:g} s"
            ) from None
        except httpx.ConnectError as exc:
            reason = _reason(exc)
            raise ChatfnConnectionError(
                "connection_failed",
                f"cannot connect to {self.url}: {reason} (is `chatfn serve` running?)",
            ) from None
        except httpx.HTTPError as exc:
            raise ChatfnConnectionError(
                "connection_failed", f"{method} {self.url}{path} failed: {_reason(exc)}"
            ) from None
        if response.status_code >= 400:
            raise _http_error(response, method, path)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._request(method, path, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ChatfnClientError(
                "bad_response",
                f"{method} {path} answered HTTP {response.status_code} without a JSON object",
                response.status_code,
            )
        return body

    # -- health and metrics -----------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /healthz`` (no key needed)."""
        return self._json("GET", "/healthz")

    def metrics(self) -> str:
        """``GET /metrics``: Prometheus text."""
        return self._request("GET", "/metrics").text

    # -- apps and settings ------------------------------------------------------------------

    def create_app(self, name: str, *, guest_users: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name}
        if guest_users is not None:
            body["guest_users"] = guest_users
        return self._json("POST", "/v1/apps", json=body)

    def list_apps(self) -> list[dict[str, Any]]:
        return list(self._json("GET", "/v1/apps").get("apps", []))

    def get_app(self, name: str | None = None) -> dict[str, Any]:
        """An app (``name``, ``settings``, ``active_version``); this client's by default."""
        return self._json("GET", f"/v1/apps/{_segment(name or self.app)}")

    def settings(self) -> dict[str, Any]:
        return self._json("GET", self._app_path("settings"))

    def update_settings(self, *, guest_users: str | None = None) -> dict[str, Any]:
        changes = {"guest_users": guest_users} if guest_users is not None else {}
        return self._json("PATCH", self._app_path("settings"), json=changes)

    # -- deployments ------------------------------------------------------------------------

    def deploy(
        self, source: str | Path | bytes, *, content_type: str | None = None
    ) -> dict[str, Any]:
        """Upload a project: a directory (packed with ``pack_project``), a ``.tar.gz``/``.tgz``
        or ``.zip`` file, or archive bytes. Answers ``{"version", "status": "building"}``;
        ``wait_for_deployment`` follows it."""
        if isinstance(source, bytes):
            body, kind = source, content_type or "application/gzip"
        else:
            path = Path(source)
            if path.is_dir():
                body, kind = pack_project(path), "application/gzip"
            else:
                try:
                    body = path.read_bytes()
                except OSError as exc:
                    raise ChatfnClientError(
                        "invalid_request", f"cannot read {path}: {exc.strerror or exc}"
                    ) from None
                zipped = path.suffix.lower() == ".zip"
                kind = content_type or ("application/zip" if zipped else "application/gzip")
        return self._json(
            "POST", self._app_path("deployments"), content=body, headers={"Content-Type": kind}
        )

    def deployments(self) -> list[dict[str, Any]]:
        """Every version, newest first."""
        return list(self._json("GET", self._app_path("deployments")).get("deployments", []))

    def deployment(self, version: int) -> dict[str, Any]:
        return self._json("GET", self._app_path("deployments", version))

    def activate(self, version: int) -> dict[str, Any]:
        """Make a version that built the active one (a rollback)."""
        return self._json("POST", self._app_path("deployments", version, "activate"))

    def wait_for_deployment(
        self,
        version: int,
        *,
        timeout: float | None = 900.0,
        interval: float = 0.2,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll a version until it is ``active`` or ``failed`` and return it. A version
        that built but stays ``inactive`` (another version went live first) is returned
        after a short grace. ``on_update`` hears every poll (for a progress bar)."""
        start = time.monotonic()
        inactive_since: float | None = None
        while True:
            info = self.deployment(version)
            if on_update is not None:
                on_update(info)
            status = info.get("status")
            now = time.monotonic()
            if status in TERMINAL_STATUSES:
                return info
            if status == "inactive":
                if info.get("activated_at") is not None:
                    return info  # it was live, and a newer version replaced it
                inactive_since = inactive_since if inactive_since is not None else now
                if now - inactive_since >= ACTIVATION_GRACE_S:
                    return info
            else:
                inactive_since = None
            if timeout is not None and now - start >= timeout:
                raise ChatfnClientError(
                    "timeout", f"version {version} is still {status} after {timeout:g} s"
                )
            time.sleep(interval)

    # -- functions and secrets --------------------------------------------------------------

    def functions(self) -> dict[str, Any]:
        """The active version's code: ``{"version", "functions": [...], "init"}``."""
        return self._json("GET", self._app_path("functions"))

    def set_secret(self, name: str, value: str) -> None:
        self._request("PUT", self._app_path("secrets", name), json={"value": value})

    def list_secrets(self) -> list[dict[str, Any]]:
        """Names and ``updated_at``; values are never returned."""
        return list(self._json("GET", self._app_path("secrets")).get("secrets", []))

    def delete_secret(self, name: str) -> None:
        self._request("DELETE", self._app_path("secrets", name))

    # -- users ------------------------------------------------------------------------------

    def list_users(self, *, limit: int | None = None, after: str | None = None) -> dict[str, Any]:
        """One page by name: ``{"users": [...], "next": name or None}``; pass ``next`` as
        ``after`` for the following page."""
        return self._json("GET", self._app_path("users"), params={"limit": limit, "after": after})

    def create_user(
        self,
        name: str,
        display_name: str | None = None,
        is_guest: bool = False,
        properties: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "is_guest": is_guest}
        if display_name is not None:
            body["display_name"] = display_name
        if properties is not None:
            body["properties"] = dict(properties)
        return self._json("POST", self._app_path("users"), json=body)

    def get_user(self, name: str) -> dict[str, Any]:
        return self._json("GET", self._app_path("users", name))

    def update_user(
        self,
        name: str,
        *,
        display_name: str | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        if display_name is not None:
            changes["display_name"] = display_name
        if properties is not None:
            changes["properties"] = dict(properties)
        return self._json("PATCH", self._app_path("users", name), json=changes)

    def delete_user(self, name: str) -> None:
        self._request("DELETE", self._app_path("users", name))

    # -- invocations, sessions, hooks -------------------------------------------------------

    def invocations(
        self,
        *,
        event: str | None = None,
        status: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int | None = None,
        before: str | None = None,
    ) -> dict[str, Any]:
        """One page, newest first: ``{"invocations": [...], "next": cursor or None}``; pass
        ``next`` as ``before`` for older ones."""
        params = {
            "event": event,
            "status": status,
            "since": since,
            "until": until,
            "limit": limit,
            "before": before,
        }
        return self._json("GET", self._app_path("invocations"), params=params)

    def invocation(self, invocation_id: str) -> dict[str, Any]:
        return self._json("GET", self._app_path("invocations", invocation_id))

    def sessions(self, *, active: bool = True) -> list[dict[str, Any]]:
        params = {"active": "true" if active else "false"}
        return list(
            self._json("GET", self._app_path("sessions"), params=params).get("sessions", [])
        )

    def invoke_hook(self, event: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Run one event's handler, as an external session server does:
        ``{"invocation_id", "status", "error", "result", "duration_ms"}``."""
        return self._json("POST", self._app_path("hooks", event), json=dict(payload))


def _reason(exc: httpx.HTTPError) -> str:
    """The innermost cause's words ("[Errno 111] Connection refused"), never a header."""
    cause: BaseException = exc
    for _ in range(10):
        inner = cause.__cause__ or cause.__context__
        if inner is None:
            break
        cause = inner
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    text = str(cause) or str(exc) or type(exc).__name__
    return text.split("\n", 1)[0][:200]


def _http_error(response: httpx.Response, method: str, path: str) -> ChatfnClientError:
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        if isinstance(code, str) and isinstance(message, str):
            details = {k: v for k, v in error.items() if k not in ("code", "message")}
            return ChatfnClientError(code, message, status, details)
    text = " ".join(response.text.split())[:200]
    shown = f": {text}" if text else ""
    return ChatfnClientError("http_error", f"{method} {path} answered HTTP {status}{shown}", status)


__all__ = [
    "DEFAULT_APP",
    "DEFAULT_URL",
    "KEY_ENV",
    "AdminClient",
    "ChatfnClientError",
    "ChatfnConnectionError",
    "NoActiveSession",
    "SessionAlreadyActive",
    "SessionClient",
    "SessionError",
    "SessionResult",
    "SessionStartInProgress",
    "SyncSessionClient",
    "connect_sync",
    "pack_project",
]
