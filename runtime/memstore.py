"""A throwaway in-memory store for ``chatfn invoke``: the users and secrets capabilities a
handler reaches through host calls, with the same validation and errors as the real one."""

from __future__ import annotations

import datetime
import unicodedata
from collections.abc import Callable
from typing import Any

import orjson

from sandbox.errors import InvalidRequest, UserExists, UserNotFound

MAX_NAME = 256
MAX_PROPERTIES_BYTES = 64 * 1024
_UNSET: Any = object()


def check_name(name: Any, what: str = "username") -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME:
        raise InvalidRequest(f"{what} must be a string of 1 to {MAX_NAME} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise InvalidRequest(f"{what} must not contain control characters")
    return name


def check_properties(properties: Any) -> dict[str, Any]:
    if properties is None:
        return {}
    if not isinstance(properties, dict):
        raise InvalidRequest("properties must be a JSON object")
    if len(orjson.dumps(properties)) > MAX_PROPERTIES_BYTES:
        raise InvalidRequest(f"properties exceed {MAX_PROPERTIES_BYTES} bytes")
    return properties


class MemoryStore:
    def __init__(self, secrets: dict[str, str] | None = None) -> None:
        self.users: dict[str, dict[str, Any]] = {}
        self.secrets = dict(secrets or {})

    def check_user_exists(self, name: str) -> bool:
        return check_name(name) in self.users

    def get_user(self, name: str) -> dict[str, Any] | None:
        return self.users.get(check_name(name))

    def create_user(
        self,
        name: str,
        display_name: str | None = None,
        is_guest: bool = False,
        properties: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        check_name(name)
        if name in self.users:
            raise UserExists(f"user {name!r} already exists")
        if display_name is not None:
            check_name(display_name, "display_name")
        if not isinstance(is_guest, bool):
            raise InvalidRequest("is_guest must be true or false")
        user = {
            "name": name,
            "display_name": display_name or name,
            "is_guest": is_guest,
            "properties": check_properties(properties),
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
        }
        self.users[name] = user
        return user

    def update_user(
        self, name: str, display_name: Any = _UNSET, properties: Any = _UNSET
    ) -> dict[str, Any]:
        user = self.users.get(check_name(name))
        if user is None:
            raise UserNotFound(f"user {name!r} does not exist")
        if display_name is not _UNSET:
            user["display_name"] = check_name(display_name, "display_name")
        if properties is not _UNSET:
            user["properties"] = check_properties(properties)
        return user

    def capabilities(self) -> dict[str, Callable[..., Any]]:
        return {
            "users.check_user_exists": self.check_user_exists,
            "users.get_user": self.get_user,
            "users.create_user": self.create_user,
            "users.update_user": self.update_user,
            "secrets.all": lambda: dict(self.secrets),
        }
