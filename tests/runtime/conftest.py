"""Fixtures for the runtime tests: a Runtime on a throwaway SQLite file and, for every
module again, on a real PostgreSQL database, whose sandbox policy also allows the test
dependencies (``crashy``, ``probe``); and project folders."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.core import App, Runtime
from runtime.invocations import Invocation
from sandbox import Policy
from tests.sandbox.conftest import dependency_dir

__all__ = ["dependency_dir"]

ProjectFactory = Callable[..., Path]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Each module's storage and runtime tests run on SQLite and on a real PostgreSQL."""
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres").new_database()
        return url
    return f"sqlite:///{tmp_path_factory.mktemp('db') / 'chatfn.db'}"


@pytest.fixture(scope="module")
def runtime(database_url: str, dependency_dir: Path) -> Iterator[Runtime]:
    policy = Policy().with_modules(["crashy"], paths=[str(dependency_dir)])
    with Runtime(database_url, policy=policy) as rt:
        yield rt


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> ProjectFactory:
    """``project(user_attempted_start_session="...", manifest="...")`` -> a project dir.
    Keyword names are file stems; sources are dedented."""

    def make(*, manifest: str | None = None, **sources: str) -> Path:
        root = tmp_path_factory.mktemp("project")
        for stem, source in sources.items():
            (root / f"{stem}.py").write_text(textwrap.dedent(source))
        if manifest is not None:
            (root / "chatfn.toml").write_text(textwrap.dedent(manifest))
        return root

    return make


def invoke(app: App, what: str = "s") -> Invocation:
    """Run the app's UserStartedSession handler; ``what`` arrives as ``event.session_id``."""
    return app.invoke("UserStartedSession", {"user": {}, "session_id": what})


def served(app: App, what: str = "s") -> Any:
    """What that handler returned (the invocation must succeed)."""
    inv = invoke(app, what)
    assert inv.succeeded, (inv.error, inv.logs)
    return inv.result


def version_project(project: ProjectFactory, n: int) -> Path:
    """A project whose UserStartedSession handler returns ``n``."""
    return project(user_started_session=f"def handle_event(event, context):\n    return {n}\n")
