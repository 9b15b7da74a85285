"""What a handler sees (inside the worker): ``event``, ``context`` and the error classes.

``context.users`` and ``context.secrets`` hold no data of their own: each method is a host
call, a request frame the host answers while the invocation is in flight, against the
invoking app's store only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from sandbox.guards import ReadOnly

HostCallFn = Callable[..., Any]


class SessionRejected(Exception):
    """Raise to reject the session; the message is shown to the client."""

    def __init__(self, message: str = "Session rejected") -> None:
        super().__init__(message)


class UserExistsError(Exception):
    """``context.users.create_user`` for a name that already exists."""


# Host-call error codes and the exception a handler sees for each.
HOST_CALL_ERRORS: dict[str, type[Exception]] = {
    "user_exists": UserExistsError,
    "invalid_request": ValueError,
    "user_not_found": LookupError,
}


class Event(ReadOnly):
    """The event payload with attribute access; writing it is an AttributeError."""

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, Any]) -> None:
        object.__setattr__(self, "_data", data)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"event has no attribute {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("event is read-only")

    def __repr__(self) -> str:
        return f"Event({self._data!r})"


class Users(ReadOnly):
    """``context.users``: the app's users, through host calls."""

    __slots__ = ("_call",)

    def __init__(self, call: HostCallFn) -> None:
        self._call = call

    def check_user_exists(self, name: str) -> bool:
        return bool(self._call("users.check_user_exists", name))

    def get_user(self, name: str) -> dict[str, Any] | None:
        user: dict[str, Any] | None = self._call("users.get_user", name)
        return user

    def create_user(
        self,
        name: str,
        display_name: str | None = None,
        is_guest: bool = False,
        properties: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        user: dict[str, Any] = self._call(
            "users.create_user",
            name,
            display_name=display_name,
            is_guest=is_guest,
            properties=properties,
        )
        return user

    def update_user(self, name: str, **changes: Any) -> dict[str, Any]:
        """``update_user(name, display_name=..., properties=...)``: only what is given."""
        user: dict[str, Any] = self._call("users.update_user", name, **changes)
        return user


class Secrets(ReadOnly, Mapping[str, str]):
    """``context.secrets``: a read-only mapping, fetched from the host on first use."""

    __slots__ = ("_cache", "_call")

    def __init__(self, call: HostCallFn) -> None:
        self._call = call
        self._cache: dict[str, str] | None = None

    def _all(self) -> dict[str, str]:
        if self._cache is None:
            values = self._call("secrets.all")
            self._cache = dict(values) if isinstance(values, dict) else {}
        return self._cache

    def __getitem__(self, name: str) -> str:
        try:
            return self._all()[name]
        except KeyError:
            raise KeyError(f"no secret named {name!r}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._all()))

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:  # never the values
        return f"<secrets: {', '.join(sorted(self._all()))}>"


class InitContext(ReadOnly):
    """``context`` in init.py: the app, its secrets (to parse a key once) and the log."""

    __slots__ = ("_log", "app", "secrets")

    def __init__(self, *, app: str, call: HostCallFn, log: Callable[[str], None]) -> None:
        self.app = app
        self.secrets = Secrets(call)
        self._log = log

    def log(self, *values: Any) -> None:
        self._log(" ".join(str(v) for v in values) + "\n")


class Context(ReadOnly):
    """``context``: the app, the invocation id, users, secrets, logging and the clock."""

    __slots__ = ("_deadline", "_log", "app", "invocation_id", "secrets", "users")

    def __init__(
        self,
        *,
        app: str,
        invocation_id: str,
        timeout_ms: int,
        call: HostCallFn,
        log: Callable[[str], None],
    ) -> None:
        self.app = app
        self.invocation_id = invocation_id
        self.users = Users(call)
        self.secrets = Secrets(call)
        self._deadline = time.monotonic() + timeout_ms / 1000.0
        self._log = log

    def remaining_time_ms(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))

    def log(self, *values: Any) -> None:
        self._log(" ".join(str(v) for v in values) + "\n")
