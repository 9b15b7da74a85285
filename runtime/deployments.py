"""One app's deployments: numbered versions of a function project, each building, active,
inactive or failed, with at most one active (a unique index guarantees it)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from runtime.db import Database
from runtime.events import resolve
from runtime.models import AppRow, DeploymentRow, utcnow
from runtime.project import Project
from sandbox.errors import InvalidRequest, NotFound

_ALLOCATE_ATTEMPTS = 5


@dataclass(frozen=True)
class DeploymentInfo:
    version: int
    status: str
    errors: list[dict[str, Any]]
    handlers: list[str]
    created_at: datetime.datetime
    activated_at: datetime.datetime | None
    progress: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "status": self.status,
            "errors": self.errors,
            "functions": self.handlers,
            "created_at": self.created_at.isoformat(),
            "activated_at": self.activated_at.isoformat() if self.activated_at else None,
            "progress": self.progress,
        }


def _info(row: DeploymentRow) -> DeploymentInfo:
    handlers = sorted(
        resolve(name.removesuffix(".py")).name for name in row.files if name != "init.py"
    )
    return DeploymentInfo(
        version=row.version,
        status=row.status,
        errors=list(row.errors or []),
        handlers=handlers,
        created_at=row.created_at,
        activated_at=row.activated_at,
        progress=row.progress,
    )


class Deployments:
    def __init__(self, db: Database, app_id: int) -> None:
        self._db = db
        self._app_id = app_id

    def create(self, project: Project) -> int:
        """Store a new version in status ``building``; returns its number."""
        for _ in range(_ALLOCATE_ATTEMPTS):
            try:
                with self._db.session() as s:
                    latest = s.scalar(
                        select(func.max(DeploymentRow.version)).where(
                            DeploymentRow.app_id == self._app_id
                        )
                    )
                    version = (latest or 0) + 1
                    s.add(
                        DeploymentRow(
                            app_id=self._app_id,
                            version=version,
                            status="building",
                            files=dict(project.files),
                            manifest=project.manifest,
                            requirements=project.requirements,
                            lock=project.lock,
                        )
                    )
                return version
            except IntegrityError:  # another deploy took the number; take the next
                continue
        raise InvalidRequest("too many concurrent deploys of this app; try again")

    def fail(self, version: int, errors: list[dict[str, Any]]) -> None:
        self._set(version, status="failed", errors=errors, progress=None)

    def set_progress(self, version: int, message: str) -> None:
        self._set(version, progress=message[:200])

    def _set(self, version: int, **values: Any) -> None:
        with self._db.session() as s:
            s.execute(
                update(DeploymentRow)
                .where(DeploymentRow.app_id == self._app_id, DeploymentRow.version == version)
                .values(**values)
            )

    def activate(
        self, version: int, *, finishing_build: bool = False, lock: str | None = None
    ) -> DeploymentInfo:
        """Make ``version`` the active one, in one transaction with retiring the old one.
        ``finishing_build``: the version is ``building`` and just built from ``lock``; it
        goes straight to ``active`` (pollers never see it in between)."""
        with self._db.session() as s:
            # One activation per app at a time, on every node: lock the app's row (a
            # no-op on SQLite, whose writers are serialised anyway).
            s.execute(select(AppRow.id).where(AppRow.id == self._app_id).with_for_update())
            row = self._row(s, version)
            if finishing_build and row.status == "building":
                row.lock, row.progress = lock, None
            elif row.status in ("building", "failed"):
                raise InvalidRequest(
                    f"version {version} is {row.status}; only a version that built can be activated"
                )
            if row.status != "active":
                s.execute(
                    update(DeploymentRow)
                    .where(DeploymentRow.app_id == self._app_id, DeploymentRow.status == "active")
                    .values(status="inactive")
                )
                s.flush()
                row.status, row.activated_at = "active", utcnow()
                s.flush()
            return _info(row)

    def get(self, version: int) -> DeploymentInfo:
        with self._db.reading() as s:
            return _info(self._row(s, version))

    def project(self, version: int) -> Project:
        with self._db.reading() as s:
            row = self._row(s, version)
            return Project(
                files=dict(row.files),
                manifest=row.manifest,
                requirements=row.requirements,
                lock=row.lock,
            )

    def list(self) -> list[DeploymentInfo]:
        """Every version, newest first."""
        with self._db.reading() as s:
            rows = s.scalars(
                select(DeploymentRow)
                .where(DeploymentRow.app_id == self._app_id)
                .order_by(DeploymentRow.version.desc())
            )
            return [_info(r) for r in rows]

    def _row(self, s: Any, version: int) -> DeploymentRow:
        row: DeploymentRow | None = s.scalar(
            select(DeploymentRow).where(
                DeploymentRow.app_id == self._app_id, DeploymentRow.version == version
            )
        )
        if row is None:
            raise NotFound(f"no deployment version {version}")
        return row
