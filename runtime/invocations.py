"""The invocation log: every handler run, with its outcome and the user's log lines.

What is stored has been through ``redact``: no secret value reaches the table.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, insert, or_, select

from runtime.db import Database
from runtime.models import InvocationRow
from runtime.secrets import redact
from sandbox import InvocationResult
from sandbox.errors import ChatfnError, InvalidRequest

MAX_LIST = 1000


def truncation_marker(limit_bytes: int) -> str:
    return f"\n[log truncated: the limit is {limit_bytes // 1024} KiB]\n"


@dataclass(frozen=True)
class Invocation:
    """One run of a handler. ``result`` is the handler's return value; it is not stored,
    so it is None for records read back from the log."""

    id: str
    app: str
    event: str
    deployment_version: int | None
    status: str
    duration_ms: float
    error: ChatfnError | None
    logs: str
    logs_truncated: bool
    created_at: datetime.datetime
    result: Any = None

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @property
    def failed(self) -> bool:
        return not self.succeeded

    @property
    def cursor(self) -> str:
        """Where a page that ends with this invocation stops (``before=`` of the next)."""
        return f"{self.created_at.isoformat()}~{self.id}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "app": self.app,
            "event": self.event,
            "deployment_version": self.deployment_version,
            "status": self.status,
            "duration_ms": round(self.duration_ms, 3),
            "error": self.error.to_dict() if self.error else None,
            "logs": self.logs,
            "logs_truncated": self.logs_truncated,
            "created_at": self.created_at.isoformat(),
        }


def from_result(
    app: str,
    event: str,
    version: int | None,
    result: InvocationResult,
    secrets: Mapping[str, str],
    log_limit: int,
) -> Invocation:
    """An Invocation from the sandbox's result, with secrets redacted from logs and error."""
    error = result.error
    if error is not None:
        error = ChatfnError.from_dict(
            {"code": error.code, "message": redact(error.message, secrets)}
        )
    logs = redact(result.logs, secrets)
    if result.logs_truncated:
        logs += truncation_marker(log_limit)
    return Invocation(
        id=result.invocation_id,
        app=app,
        event=event,
        deployment_version=version,
        status="succeeded" if result.ok else "failed",
        duration_ms=result.duration_ms,
        error=error,
        logs=logs,
        logs_truncated=result.logs_truncated,
        created_at=datetime.datetime.now(datetime.UTC),
        result=result.value,
    )


_INSERT = insert(InvocationRow)


def store(connection: Connection, app_id: int, inv: Invocation) -> None:
    """Insert one invocation record (inside the caller's write transaction)."""
    connection.execute(
        _INSERT,
        {
            "id": inv.id,
            "app_id": app_id,
            "event": inv.event,
            "deployment_version": inv.deployment_version,
            "status": inv.status,
            "duration_ms": inv.duration_ms,
            "error_code": inv.error.code if inv.error else None,
            "error_message": inv.error.message if inv.error else None,
            "logs": inv.logs,
            "logs_truncated": inv.logs_truncated,
            "created_at": inv.created_at,
        },
    )


def _from_row(app: str, row: InvocationRow) -> Invocation:
    error = None
    if row.error_code is not None:
        error = ChatfnError.from_dict({"code": row.error_code, "message": row.error_message or ""})
    return Invocation(
        id=row.id,
        app=app,
        event=row.event,
        deployment_version=row.deployment_version,
        status=row.status,
        duration_ms=row.duration_ms,
        error=error,
        logs=row.logs,
        logs_truncated=row.logs_truncated,
        created_at=row.created_at,
    )


def list_invocations(
    db: Database,
    app_id: int,
    app: str,
    *,
    limit: int = 50,
    event: str | None = None,
    status: str | None = None,
    since: datetime.datetime | None = None,
    until: datetime.datetime | None = None,
    before: str | None = None,
) -> list[Invocation]:
    """The newest first, optionally one event type or status, a time window, and only
    those older than the ``before`` cursor (``Invocation.cursor`` of the last one seen)."""
    if not 1 <= limit <= MAX_LIST:
        raise InvalidRequest(f"limit must be 1 to {MAX_LIST}")
    if status not in (None, "succeeded", "failed"):
        raise InvalidRequest("status must be 'succeeded' or 'failed'")
    query = select(InvocationRow).where(InvocationRow.app_id == app_id)
    if event is not None:
        query = query.where(InvocationRow.event == event)
    if status is not None:
        query = query.where(InvocationRow.status == status)
    if since is not None:
        query = query.where(InvocationRow.created_at >= since)
    if until is not None:
        query = query.where(InvocationRow.created_at < until)
    if before is not None:
        at, last_id = parse_cursor(before)
        query = query.where(
            or_(
                InvocationRow.created_at < at,
                and_(InvocationRow.created_at == at, InvocationRow.id > last_id),
            )
        )
    query = query.order_by(InvocationRow.created_at.desc(), InvocationRow.id).limit(limit)
    with db.reading() as s:
        return [_from_row(app, row) for row in s.scalars(query)]


def parse_cursor(cursor: str) -> tuple[datetime.datetime, str]:
    at, sep, last_id = cursor.partition("~")
    try:
        moment = datetime.datetime.fromisoformat(at)
    except ValueError:
        moment = None
    if not sep or moment is None or moment.tzinfo is None or not last_id:
        raise InvalidRequest("before must be a cursor from an earlier page")
    return moment, last_id


def get_invocation(db: Database, app_id: int, app: str, invocation_id: str) -> Invocation | None:
    with db.reading() as s:
        row = s.get(InvocationRow, invocation_id)
        return None if row is None or row.app_id != app_id else _from_row(app, row)
