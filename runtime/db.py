"""The database: where it is, how to connect, and bringing its schema up to date.

SQLite (a file in the data directory) is the default; ``CHATFN_DATABASE_URL`` points
elsewhere. Everything above this module speaks SQLAlchemy and works on either.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.orm import Session, sessionmaker

from sandbox.errors import InvalidRequest, StorageError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def data_dir() -> Path:
    """``CHATFN_DATA_DIR``, else ``$XDG_DATA_HOME/chatfn`` (``~/.local/share/chatfn``)."""
    explicit = os.environ.get("CHATFN_DATA_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "chatfn"


def database_url(url: str | None = None) -> str:
    """The URL to use: the argument, ``CHATFN_DATABASE_URL``, or the SQLite default."""
    if url:
        return url
    env = os.environ.get("CHATFN_DATABASE_URL")
    if env:
        return env
    return f"sqlite:///{data_dir() / 'chatfn.db'}"


def safe_url(url: str) -> str:
    """The URL with any password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


class Database:
    """An engine, transactions, and the migration step.

    ``session()`` is an ORM write transaction and ``write()`` the same on a Core connection;
    ``reading()`` and ``read()`` are their read-only twins. On SQLite a write transaction
    takes the write lock at BEGIN (IMMEDIATE) and writers of this process queue on a lock
    of ours rather than in SQLite's sleeping busy handler; reads never take the write lock.
    """

    def __init__(self, url: str | None = None) -> None:
        self.url = database_url(url)
        try:
            parsed = make_url(self.url)
        except ArgumentError:
            raise InvalidRequest("the database URL is not a valid SQLAlchemy URL") from None
        if parsed.drivername in ("postgresql", "postgres"):
            # psycopg 3 is chatfn's PostgreSQL driver; a plain postgresql:// URL means it.
            parsed = parsed.set(drivername="postgresql+psycopg")
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {}
        if self.dialect == "postgresql":
            # pre_ping: a connection the server dropped (a restart) is replaced, not used.
            kwargs.update(pool_pre_ping=True, pool_size=20, max_overflow=20, pool_timeout=10)
        if self.dialect == "sqlite":
            path = parsed.database
            if not path or path == ":memory:":
                raise InvalidRequest("chatfn needs a SQLite file, not an in-memory database")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            # Connections are cheap: enough for every call and background thread.
            kwargs["pool_size"], kwargs["max_overflow"] = 40, 40
        try:
            self.engine: Engine = create_engine(parsed, **kwargs)
        except (ImportError, NoSuchModuleError) as exc:
            raise StorageError(
                f"the database driver for {safe_url(self.url)} is not installed "
                f"({getattr(exc, 'name', None) or parsed.drivername})"
            ) from None
        self._writer: AbstractContextManager[Any] = nullcontext()
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine)
            self._writer = threading.Lock()
        self._write_engine = self.engine.execution_options(chatfn_write=True)
        self._sessions = sessionmaker(self._write_engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One write transaction: committed on success, rolled back on any exception."""
        with (
            self._unavailable_as_storage_error(),
            self._writer,
            self._sessions.begin() as session,
        ):
            yield session

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction on a Core connection."""
        with (
            self._unavailable_as_storage_error(),
            self._writer,
            self._write_engine.begin() as connection,
        ):
            yield connection

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only ORM transaction (rolled back at the end)."""
        with self._unavailable_as_storage_error(), self._read_sessions() as session:
            yield session

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction on a Core connection (rolled back at the end)."""
        with self._unavailable_as_storage_error(), self.engine.connect() as connection:
            yield connection

    @contextmanager
    def _unavailable_as_storage_error(self) -> Iterator[None]:
        """A database that is down or dropped the connection: StorageError, naming the
        database (never its password); the pool reconnects once it is back."""
        try:
            yield
        except (OperationalError, InterfaceError) as exc:
            raise StorageError(
                f"the database {safe_url(self.url)} is unavailable: {_reason(exc)}"
            ) from None
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            raise StorageError(
                f"the database {safe_url(self.url)} dropped the connection"
            ) from None

    def migrate(self) -> None:
        """Bring the schema to the newest migration (a no-op when it already is).
        StorageError, naming the database but never its password, if it cannot."""
        try:
            self._migrate()
        except (SQLAlchemyError, OSError) as exc:
            raise StorageError(
                f"cannot open the database {safe_url(self.url)}: {_reason(exc)}"
            ) from None

    def _migrate(self) -> None:
        config = alembic_config()
        with self._writer, self._write_engine.begin() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
            head = ScriptDirectory.from_config(config).get_current_head()
            if current == head:
                return
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        self.engine.dispose()


def _reason(exc: BaseException) -> str:
    """The driver's own one-line reason, without SQLAlchemy's SQL and help links."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def _configure_sqlite(engine: Engine) -> None:
    """WAL, enforced foreign keys, and write transactions that wait for the lock.

    pysqlite's own transaction handling starts transactions lazily and deferred, and a
    deferred transaction that reads and then writes fails at once with "database is locked"
    when another writer got there first. Write transactions take the write lock at BEGIN
    (IMMEDIATE), so writers from other processes queue on ``busy_timeout`` instead; reads
    begin deferred and, in WAL mode, never wait for a writer.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        write = connection.get_execution_options().get("chatfn_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
