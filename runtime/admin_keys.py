"""The admin key of a server: random, shown once, stored only as a SHA-256 hash, and
checked in constant time. ``CHATFN_ADMIN_KEY`` sets it explicitly."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import delete, select

from runtime.db import Database
from runtime.models import AdminKeyRow

MIN_KEY_CHARS = 16


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class AdminKeys:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._hashes: list[str] = []

    def setup(self, explicit: str | None) -> str | None:
        """Make ``explicit`` (CHATFN_ADMIN_KEY) the key, or keep the stored one, or create
        one. Returns a key to show the operator once (None when it was set or stored)."""
        shown = None
        if explicit is not None:
            if len(explicit) < MIN_KEY_CHARS:
                raise ValueError(f"CHATFN_ADMIN_KEY must be at least {MIN_KEY_CHARS} characters")
            wanted = key_hash(explicit)
            with self._db.session() as s:
                s.execute(delete(AdminKeyRow).where(AdminKeyRow.key_hash != wanted))
                if s.scalar(select(AdminKeyRow.id).where(AdminKeyRow.key_hash == wanted)) is None:
                    s.add(AdminKeyRow(key_hash=wanted))
        else:
            with self._db.session() as s:
                if s.scalar(select(AdminKeyRow.id)) is None:
                    shown = secrets.token_urlsafe(32)
                    s.add(AdminKeyRow(key_hash=key_hash(shown)))
        self.reload()
        return shown

    def reload(self) -> None:
        with self._db.reading() as s:
            self._hashes = list(s.scalars(select(AdminKeyRow.key_hash)))

    def check(self, presented: str) -> bool:
        """Constant-time comparison of the presented key's hash with every stored hash."""
        candidate = key_hash(presented)
        ok = False
        for stored in self._hashes:
            ok |= hmac.compare_digest(candidate, stored)
        return ok
