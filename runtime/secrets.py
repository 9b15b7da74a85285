"""One app's secrets, and the redaction that keeps their values out of every log and error.

Values are write-only from outside: they go to handlers (``context.secrets``) and to
``redact``; no API returns them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy import bindparam, delete, select

from runtime.db import Database
from runtime.models import SecretRow, utcnow
from runtime.validation import check_secret_name, check_secret_value
from sandbox.errors import NotFound

# How long secret values are reused before being read again (changes made through this
# runtime show at once).
VALUES_TTL_S = 0.5

_VALUES_QUERY = select(SecretRow.name, SecretRow.value).where(
    SecretRow.app_id == bindparam("app_id")
)


class Secrets:
    def __init__(
        self, db: Database, app_id: int, on_change: Callable[[], None] | None = None
    ) -> None:
        self._db = db
        self._app_id = app_id
        self._cache: tuple[float, dict[str, str]] | None = None
        self._on_change = on_change or (lambda: None)

    def forget(self) -> None:
        self._cache = None

    def set(self, name: str, value: str) -> None:
        check_secret_name(name)
        check_secret_value(value)
        with self._db.session() as s:
            row = s.get(SecretRow, (self._app_id, name))
            if row is None:
                s.add(SecretRow(app_id=self._app_id, name=name, value=value))
            else:
                row.value, row.updated_at = value, utcnow()
        self._cache = None
        self._on_change()

    def delete(self, name: str) -> None:
        check_secret_name(name)
        with self._db.session() as s:
            gone = s.execute(
                delete(SecretRow).where(SecretRow.app_id == self._app_id, SecretRow.name == name)
            )
            self._cache = None
            if not gone.rowcount:  # type: ignore[attr-defined]
                raise NotFound(f"no secret named {name!r}")
        self._on_change()

    def names(self) -> list[dict[str, Any]]:
        """Each secret's name and when it was last set; never the value."""
        with self._db.reading() as s:
            rows = s.execute(
                select(SecretRow.name, SecretRow.updated_at)
                .where(SecretRow.app_id == self._app_id)
                .order_by(SecretRow.name)
            )
            return [{"name": n, "updated_at": t.isoformat()} for n, t in rows]

    def values(self) -> dict[str, str]:
        """Name -> value: for ``context.secrets`` and for ``redact`` only."""
        cached, now = self._cache, time.monotonic()
        if cached is not None and now - cached[0] < VALUES_TTL_S:
            return dict(cached[1])
        with self._db.read() as c:
            values = {n: v for n, v in c.execute(_VALUES_QUERY, {"app_id": self._app_id})}
        self._cache = (now, values)
        return dict(values)


def redact(text: str, secrets: Mapping[str, str] | Iterable[tuple[str, str]]) -> str:
    """``text`` with every secret value replaced by ``[secret NAME]``, longest value first
    so that a value containing another is replaced whole."""
    pairs = secrets.items() if isinstance(secrets, Mapping) else secrets
    for name, value in sorted(pairs, key=lambda p: -len(p[1])):
        if value and value in text:
            text = text.replace(value, f"[secret {name}]")
    return text
