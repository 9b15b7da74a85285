"""The tables (DESIGN section 8). Alembic migrations in ``runtime/migrations`` create them;
a test checks that the migrations and these models agree.

Timestamps are stored as UTC and always come back timezone-aware, on SQLite too.
"""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

JsonType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class UTCDateTime(TypeDecorator[datetime.datetime]):
    """A timezone-aware UTC datetime on every database (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(
        self, value: datetime.datetime | None, dialect: Dialect
    ) -> datetime.datetime | None:
        if value is not None:
            if value.tzinfo is None:
                raise ValueError("naive datetime given to a UTC column")
            value = value.astimezone(datetime.UTC)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(
        self, value: datetime.datetime | None, dialect: Dialect
    ) -> datetime.datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value


class Base(DeclarativeBase):
    pass


class AppRow(Base):
    __tablename__ = "apps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    guest_users: Mapped[str] = mapped_column(String(8), default="enabled")
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, default=utcnow)


class UserRow(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("app_id", "name", name="uq_users_app_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(256))
    display_name: Mapped[str] = mapped_column(String(256))
    is_guest: Mapped[bool] = mapped_column(Boolean, default=False)
    properties: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, default=utcnow)


class DeploymentRow(Base):
    __tablename__ = "deployments"
    __table_args__ = (
        UniqueConstraint("app_id", "version", name="uq_deployments_app_version"),
        # At most one active deployment per app, enforced by the database.
        Index(
            "uq_deployments_one_active",
            "app_id",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    # building | active | inactive | failed
    status: Mapped[str] = mapped_column(String(16))
    files: Mapped[dict[str, str]] = mapped_column(JsonType)
    manifest: Mapped[str | None] = mapped_column(Text, nullable=True)
    requirements: Mapped[str | None] = mapped_column(Text, nullable=True)
    lock: Mapped[str | None] = mapped_column(Text, nullable=True)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonType, nullable=True)
    # While building: the step it is on ("installing 3 distributions").
    progress: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, default=utcnow)
    activated_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class SecretRow(Base):
    __tablename__ = "secrets"

    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, default=utcnow)


class NodeRow(Base):
    """A process that holds connections (``chatfn serve``), while it runs: its heartbeat."""

    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    started_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, default=utcnow)
    seen_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, default=utcnow)


class SessionRow(Base):
    __tablename__ = "sessions"
    __table_args__ = (
        Index("ix_sessions_app_active", "app_id", "ended_at"),
        Index("ix_sessions_node_active", "node_id", "ended_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    connection_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # The node whose connection holds it (None: started without a connection).
    node_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    started_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[datetime.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # ended | disconnected
    end_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)


class InvocationRow(Base):
    __tablename__ = "invocations"
    __table_args__ = (Index("ix_invocations_app_created", "app_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    app_id: Mapped[int] = mapped_column(ForeignKey("apps.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(64))
    deployment_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # succeeded | failed
    status: Mapped[str] = mapped_column(String(16))
    duration_ms: Mapped[float] = mapped_column(Float)
    error_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    logs: Mapped[str] = mapped_column(Text, default="")
    logs_truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, default=utcnow)


class AdminKeyRow(Base):
    """The server's admin key: only its SHA-256 is stored (keys are random, 256 bits)."""

    __tablename__ = "admin_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime.datetime] = mapped_column(UTCDateTime, default=utcnow)
