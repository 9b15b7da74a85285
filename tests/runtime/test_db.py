"""The database layer: migrations match the models, URLs resolve as documented, and bad
URLs fail clearly without showing a password."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from runtime.db import Database, data_dir, database_url, safe_url
from runtime.models import Base
from sandbox.errors import InvalidRequest


def test_migrations_build_exactly_the_models_schema(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/m.db")
    db.migrate()
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() == "0004"
    tables = set(inspect(db.engine).get_table_names())
    assert {"apps", "users", "deployments", "secrets", "sessions", "invocations"} <= tables
    db.migrate()  # a second run is a no-op
    db.close()


def test_sqlite_is_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/w.db")
    with db.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    db.close()


def test_url_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CHATFN_DATABASE_URL", raising=False)
    monkeypatch.setenv("CHATFN_DATA_DIR", str(tmp_path / "data"))
    assert data_dir() == tmp_path / "data"
    assert database_url() == f"sqlite:///{tmp_path / 'data' / 'chatfn.db'}"
    monkeypatch.setenv("CHATFN_DATABASE_URL", "sqlite:////elsewhere/x.db")
    assert database_url() == "sqlite:////elsewhere/x.db"
    assert database_url("sqlite:////given.db") == "sqlite:////given.db"
    monkeypatch.delenv("CHATFN_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_dir() == tmp_path / "xdg" / "chatfn"


def test_the_default_database_is_created_in_the_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CHATFN_DATABASE_URL", raising=False)
    monkeypatch.setenv("CHATFN_DATA_DIR", str(tmp_path / "fresh" / "dir"))
    db = Database()
    db.migrate()
    assert (tmp_path / "fresh" / "dir" / "chatfn.db").is_file()
    db.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "not a valid SQLAlchemy URL"),
        ("sqlite://", "not an in-memory database"),
        ("sqlite:///:memory:", "not an in-memory database"),
    ],
)
def test_bad_urls_are_invalid_requests(url: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        Database(url)


def test_safe_url_hides_the_password() -> None:
    shown = safe_url("postgresql+psycopg://chat:hunter2@db.example/chatfn")
    assert "hunter2" not in shown and "db.example" in shown
    assert "hunter2" not in safe_url("::hunter2::")


def test_an_unusable_database_is_a_storage_error(tmp_path: Path) -> None:
    from sandbox.errors import StorageError

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match=r"cannot open the database .*file is not a database"):
        Database(f"sqlite:///{junk}").migrate()
    with pytest.raises(StorageError, match=r"driver .* is not installed"):
        Database("postgresql+nodriver://u:hunter2@h/db")
