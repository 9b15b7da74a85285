"""chatfn's pytest plugin (entry point ``pytest11``), for testing a function project with
plain pytest. It is active wherever chatfn is installed.

    def test_wrong_password(chatfn_app):
        app = chatfn_app("functions", guest_users="disabled")
        result = app.start_session("alice", {"password": "guess"})
        assert result.failed and result.error.code == "access_denied"

``chatfn_app(directory, guest_users="enabled", secrets=None)`` deploys the project on a
fresh app in a throwaway database and runs it in the real sandbox; see
``runtime.testing.FunctionApp`` for what the returned object does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runtime.core import Runtime
from runtime.testing import FunctionApp


@pytest.fixture(scope="session")
def chatfn_runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """One runtime, database and worker pool for the test session."""
    directory = tmp_path_factory.mktemp("chatfn")
    with Runtime(f"sqlite:///{directory}/chatfn.db") as runtime:
        yield runtime


@pytest.fixture
def chatfn_app(chatfn_runtime: Runtime) -> Iterator[Callable[..., FunctionApp]]:
    """A factory: ``chatfn_app(directory, guest_users=..., secrets=...)`` -> FunctionApp."""
    made: list[FunctionApp] = []

    def factory(
        directory: str | Path,
        *,
        guest_users: str = "enabled",
        secrets: dict[str, str] | None = None,
    ) -> FunctionApp:
        app = FunctionApp.deploy(
            chatfn_runtime, directory, guest_users=guest_users, secrets=secrets
        )
        made.append(app)
        return app

    yield factory
    for app in made:
        app.close()
