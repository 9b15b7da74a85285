"""One app's users: ``context.users`` on the host side, the CLI's ``chatfn users``, and the
test harness's ``app.users``. Every method is scoped to the app it was made for."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import bindparam, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from runtime.db import Database
from runtime.models import UserRow
from runtime.validation import check_is_guest, check_name, check_properties
from sandbox.errors import InvalidRequest, UserExists, UserNotFound

_UNSET: Any = object()
MAX_LIST = 1000


_USERS = UserRow.__table__
_BY_NAME = (_USERS.c.app_id == bindparam("app_id")) & (_USERS.c.name == bindparam("name"))
_EXISTS = select(_USERS.c.id).where(_BY_NAME)
# Core statements built once; parameters ``app_id`` and ``name`` (``user_id``).
USER_BY_NAME = select(_USERS).where(_BY_NAME)
USER_BY_ID = select(_USERS).where(_USERS.c.id == bindparam("user_id"))


def user_dict(row: Any) -> dict[str, Any]:
    """A user as handlers and clients see it (DESIGN section 4), from a UserRow or a Core
    row of the users table."""
    return {
        "name": row.name,
        "display_name": row.display_name,
        "is_guest": row.is_guest,
        "properties": row.properties,
        "created_at": row.created_at.isoformat(),
    }


def find_user(session: Session, app_id: int, name: str) -> UserRow | None:
    return session.scalar(select(UserRow).where(UserRow.app_id == app_id, UserRow.name == name))


class Users:
    def __init__(self, db: Database, app_id: int) -> None:
        self._db = db
        self._app_id = app_id

    def check_user_exists(self, name: str) -> bool:
        check_name(name)
        with self._db.read() as c:
            found = c.execute(_EXISTS, {"app_id": self._app_id, "name": name}).first()
        return found is not None

    def get_user(self, name: str) -> dict[str, Any] | None:
        check_name(name)
        with self._db.read() as c:
            row = c.execute(USER_BY_NAME, {"app_id": self._app_id, "name": name}).first()
        return None if row is None else user_dict(row)

    def create_user(
        self,
        name: str,
        display_name: str | None = None,
        is_guest: bool = False,
        properties: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        row = UserRow(
            app_id=self._app_id,
            name=check_name(name),
            display_name=name if display_name is None else check_name(display_name, "display_name"),
            is_guest=check_is_guest(is_guest),
            properties=check_properties(properties),
        )
        try:
            with self._db.session() as s:
                if find_user(s, self._app_id, name) is not None:
                    raise UserExists(f"user {name!r} already exists")
                s.add(row)
                s.flush()
                return user_dict(row)
        except IntegrityError:  # created concurrently by another caller
            raise UserExists(f"user {name!r} already exists") from None

    def update_user(
        self, name: str, display_name: Any = _UNSET, properties: Any = _UNSET
    ) -> dict[str, Any]:
        """Change only what is given: ``display_name=...``, ``properties=...``."""
        check_name(name)
        if display_name is not _UNSET:
            check_name(display_name, "display_name")
        if properties is not _UNSET:
            properties = check_properties(properties)
        with self._db.session() as s:
            row = find_user(s, self._app_id, name)
            if row is None:
                raise UserNotFound(f"user {name!r} does not exist")
            if display_name is not _UNSET:
                row.display_name = display_name
            if properties is not _UNSET:
                row.properties = properties
            s.flush()
            return user_dict(row)

    def delete_user(self, name: str) -> None:
        check_name(name)
        with self._db.session() as s:
            gone = s.execute(
                delete(UserRow).where(UserRow.app_id == self._app_id, UserRow.name == name)
            )
            if not gone.rowcount:  # type: ignore[attr-defined]
                raise UserNotFound(f"user {name!r} does not exist")

    def list_users(self, *, limit: int = 100, after: str | None = None) -> list[dict[str, Any]]:
        """Users by name, ``limit`` at a time; pass the last name as ``after`` for more."""
        if not 1 <= limit <= MAX_LIST:
            raise InvalidRequest(f"limit must be 1 to {MAX_LIST}")
        query = select(UserRow).where(UserRow.app_id == self._app_id)
        if after is not None:
            query = query.where(UserRow.name > after)
        with self._db.reading() as s:
            rows = s.scalars(query.order_by(UserRow.name).limit(limit))
            return [user_dict(r) for r in rows]

    def capabilities(self) -> dict[str, Callable[..., Any]]:
        """The host calls behind ``context.users``."""
        return {
            "users.check_user_exists": self.check_user_exists,
            "users.get_user": self.get_user,
            "users.create_user": self.create_user,
            "users.update_user": self.update_user,
        }
