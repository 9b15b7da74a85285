"""Fixtures for the runtime tests: a Runtime on a throwaway SQLite file, whose sandbox
policy also allows the test dependencies (``crashy``, ``probe``), and project folders."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runtime.core import Runtime
from sandbox import Policy
from tests.sandbox.conftest import dependency_dir

__all__ = ["dependency_dir"]

ProjectFactory = Callable[..., Path]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory, dependency_dir: Path) -> Iterator[Runtime]:
    policy = Policy().with_modules(["crashy"], paths=[str(dependency_dir)])
    db = tmp_path_factory.mktemp("db") / "chatfn.db"
    with Runtime(f"sqlite:///{db}", policy=policy) as rt:
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
