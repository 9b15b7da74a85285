"""Checks on everything a caller or a handler hands the runtime. Each failure is an
``InvalidRequest`` whose message names the field and the rule; it never echoes the value.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import orjson

from sandbox.errors import InvalidRequest

MAX_NAME = 256
MAX_PROPERTIES_BYTES = 64 * 1024
MAX_AUTH_PARAMS_BYTES = 64 * 1024
MAX_SECRET_BYTES = 64 * 1024
GUEST_USERS = ("enabled", "disabled")

_APP_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def check_name(name: Any, what: str = "username") -> str:
    """A user name or display name: 1-256 characters, no control characters."""
    if not isinstance(name, str):
        raise InvalidRequest(f"{what} must be a string")
    if not 1 <= len(name) <= MAX_NAME:
        raise InvalidRequest(f"{what} must be 1 to {MAX_NAME} characters (got {len(name)})")
    if any(unicodedata.category(ch) == "Cc" for ch in name):
        raise InvalidRequest(f"{what} must not contain control characters")
    return name


def _json_object(value: Any, what: str, cap: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    try:
        size = len(orjson.dumps(value))
    except TypeError:
        raise InvalidRequest(f"{what} must hold only JSON values") from None
    if size > cap:
        raise InvalidRequest(f"{what} must be at most {cap // 1024} KiB (got {size} bytes)")
    return value


def check_properties(properties: Any) -> dict[str, Any]:
    return (
        {} if properties is None else _json_object(properties, "properties", MAX_PROPERTIES_BYTES)
    )


def check_auth_params(auth_params: Any) -> dict[str, Any]:
    if auth_params is None:
        return {}
    return _json_object(auth_params, "auth_params", MAX_AUTH_PARAMS_BYTES)


def check_is_guest(value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest("is_guest must be true or false")
    return value


def check_app_name(name: Any) -> str:
    if not isinstance(name, str) or not _APP_NAME.fullmatch(name):
        raise InvalidRequest(
            "app name must be 1 to 64 characters of a-z, 0-9, '-' and '_', "
            "starting with a letter or digit"
        )
    return name


def check_guest_users(value: Any) -> str:
    if value not in GUEST_USERS:
        raise InvalidRequest("guest_users must be 'enabled' or 'disabled'")
    return str(value)


def check_secret_name(name: Any) -> str:
    if not isinstance(name, str) or not _SECRET_NAME.fullmatch(name):
        raise InvalidRequest(
            "secret name must be 1 to 128 characters of A-Z, a-z, 0-9 and '_', "
            "not starting with a digit"
        )
    return name


def check_secret_value(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidRequest("secret value must be a string")
    if len(value.encode()) > MAX_SECRET_BYTES:
        raise InvalidRequest(f"secret value must be at most {MAX_SECRET_BYTES // 1024} KiB")
    return value
