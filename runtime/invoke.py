"""``chatfn invoke``: run one handler of a project directory in the real sandbox, against a
throwaway store. The command-line layer only parses and prints; this is the function."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.events import resolve
from runtime.memstore import MemoryStore
from runtime.project import load_deployment
from sandbox import InvocationResult, WorkerPool


def invoke_project(
    directory: str | Path,
    event_name: str,
    payload: Any,
    *,
    secrets: dict[str, str] | None = None,
    users: list[str] | None = None,
) -> InvocationResult:
    """Validate the payload, deploy ``directory`` in a fresh pool, invoke once, tear down."""
    event = resolve(event_name)
    data = event.validate(payload)
    deployment = load_deployment(directory)
    store = MemoryStore(secrets)
    for name in users or []:
        store.create_user(name)
    with WorkerPool() as pool:
        return pool.invoke(deployment, event.stem, data, capabilities=store.capabilities())


def result_dict(result: InvocationResult) -> dict[str, Any]:
    return {
        "status": "succeeded" if result.ok else "failed",
        "error": result.error.to_dict() if result.error else None,
        "result": result.value,
        "logs": result.logs,
        "duration_ms": round(result.duration_ms, 3),
    }
