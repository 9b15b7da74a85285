"""Fixtures for the server tests: the FastAPI app built in-process on a throwaway SQLite
database (as ``serve.prepare`` builds it), one per test module so the runtime and its
sandbox pools are shared, and helpers to pack projects and deploy them over HTTP."""

from __future__ import annotations

import io
import tarfile
import textwrap
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from fastapi import FastAPI
from starlette.exceptions import StarletteDeprecationWarning

from runtime.admin_keys import AdminKeys
from runtime.core import Runtime
from runtime.server.app import State, create_app

# Starlette warns at import that its test client prefers ``httpx2`` (not installed here;
# the project depends on httpx). The warning is about the test client's transport only.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

__all__ = [
    "ACCEPT_ALL",
    "ADMIN_KEY",
    "AUTH",
    "GZIP",
    "ZIP",
    "Server",
    "TestClient",
    "create_app_named",
    "deploy",
    "poll",
    "sources",
    "tar_gz",
    "upload",
    "wait_built",
    "zip_bytes",
]

T = TypeVar("T")

ADMIN_KEY = "server-tests-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
GZIP = {"Content-Type": "application/gzip"}
ZIP = {"Content-Type": "application/zip"}

ACCEPT_ALL = """
    def handle_event(event, context):
        return {"ok": event.username}
"""


@dataclass
class Server:
    state: State
    runtime: Runtime
    api: FastAPI
    client: TestClient  # sends the admin key on every request unless told otherwise


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("server")
    runtime = Runtime(f"sqlite:///{tmp}/db.sqlite", envs_dir=tmp / "envs")
    keys = AdminKeys(runtime.db)
    keys.setup(ADMIN_KEY)
    state = State(runtime, keys)
    api = create_app(state)
    try:
        with TestClient(api, headers=AUTH) as client:
            yield Server(state, runtime, api, client)
    finally:
        state.close()
        runtime.close()


def sources(**files: str) -> dict[str, str]:
    """``sources(user_attempted_start_session="...")`` -> {"user_attempted_start_session.py":
    dedented source}; keys with a dot are kept as they are (``**{"chatfn.toml": ...}``)."""
    return {
        (name if "." in name else f"{name}.py"): textwrap.dedent(text)
        for name, text in files.items()
    }


def tar_gz(files: Mapping[str, str | bytes], folder: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(f"{folder}/{name}" if folder else name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(files: Mapping[str, str | bytes], folder: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(f"{folder}/{name}" if folder else name, content)
    return buffer.getvalue()


def create_app_named(client: TestClient, name: str, **settings: str) -> dict[str, Any]:
    response = client.post("/v1/apps", json={"name": name, **settings})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def upload(client: TestClient, app: str, archive: bytes, *, kind: str = "gzip") -> int:
    """POST the archive; asserts the 202 answer and returns the new version."""
    response = client.post(
        f"/v1/apps/{app}/deployments",
        content=archive,
        headers=GZIP if kind == "gzip" else ZIP,
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body == {"version": body["version"], "status": "building"}
    assert isinstance(body["version"], int)
    version: int = body["version"]
    return version


def wait_built(client: TestClient, app: str, version: int, timeout: float = 60) -> dict[str, Any]:
    """Poll the version until it is active or failed; returns its deployment record.
    (A version that built shows ``inactive`` for a moment before it is activated.)"""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/apps/{app}/deployments/{version}")
        assert response.status_code == 200, response.text
        info: dict[str, Any] = response.json()
        if info["status"] in ("active", "failed"):
            return info
        assert info["status"] in ("building", "inactive"), info
        assert time.monotonic() < deadline, f"version {version} never went live: {info}"
        time.sleep(0.02)


def deploy(client: TestClient, app: str, files: Mapping[str, str | bytes]) -> dict[str, Any]:
    """Upload a project as tar.gz and wait for it; asserts it went active."""
    info = wait_built(client, app, upload(client, app, tar_gz(files)))
    assert info["status"] == "active", info
    return info


def poll(fetch: Callable[[], T], until: Callable[[T], bool], timeout: float = 20) -> T:
    """``fetch()`` again until ``until(value)``; the last value (asserted) otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if until(value):
            return value
        assert time.monotonic() < deadline, f"gave up waiting; last value: {value!r}"
        time.sleep(0.02)
