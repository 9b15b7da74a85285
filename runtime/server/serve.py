"""``chatfn serve``: the runtime, the HTTP API and the WebSocket endpoint on uvicorn.

On an empty database it creates the app ``default`` and deploys the repository's example
project (``functions/``), prints the URLs and the admin key once, and serves until
SIGINT/SIGTERM; then it closes every WebSocket (ending its session as ``disconnected``),
finishes background hooks and builds, and stops every sandbox worker.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from runtime.admin_keys import AdminKeys
from runtime.core import DEFAULT_APP, Runtime
from runtime.db import safe_url
from runtime.server.app import State, create_app
from runtime.server.ws import MAX_MESSAGE_BYTES
from sandbox.errors import ChatfnError
from sandbox.isolation import REQUIRE_ENV, Isolation, SandboxSettings
from sandbox.policy import LAYERS, PolicyError

EXAMPLE = Path(__file__).resolve().parents[2] / "functions"


def prepare(
    database: str | None, *, example: Path | None, sandbox: SandboxSettings | None = None
) -> tuple[State, str | None]:
    """Open the runtime, check the sandbox layers (refusing to go on without a required
    one), settle the admin key, and deploy the example on a new database."""
    try:
        runtime = Runtime(database, sandbox=sandbox)
    except PolicyError as exc:
        raise ChatfnError(str(exc)) from None
    try:
        isolation = runtime.pool.probe_isolation(runtime.policy)
    except ChatfnError as exc:
        runtime.close()
        raise ChatfnError(f"refusing to start: {exc.message} ({REQUIRE_ENV})") from None
    keys = AdminKeys(runtime.db)
    try:
        shown = keys.setup(os.environ.get("CHATFN_ADMIN_KEY"))
    except ValueError as exc:
        runtime.close()
        raise ChatfnError(str(exc)) from None
    app = runtime.ensure_app(DEFAULT_APP)
    if example is not None and example.is_dir() and not app.deployments.list():
        try:
            info = app.deploy(example)
            print(f"deployed {example} to app '{app.name}' as version {info.version}")
        except ChatfnError as exc:
            print(f"could not deploy the example {example}: {exc.message}", file=sys.stderr)
    state = State(runtime, keys)
    state.isolation = isolation
    return state, shown


def describe_layers(isolation: Isolation) -> str:
    """One line per layer: on (and how, when that is known), or off and why."""
    lines = []
    for layer in LAYERS:
        if isolation.on[layer]:
            detail = isolation.detail.get(layer)
            state = f"on ({detail})" if detail else "on"
        else:
            state = f"off ({isolation.why_off.get(layer, 'not reported')})"
        lines.append(f"{layer:<18} {state}")
    return "\n".join(lines)


def _raise_open_file_limit() -> None:
    """Every WebSocket is a descriptor: allow as many as the hard limit does (workers set
    their own, low, limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def serve(
    host: str = "127.0.0.1",
    port: int = 8080,
    database: str | None = None,
    *,
    example: Path | None = EXAMPLE,
    sandbox: SandboxSettings | None = None,
) -> None:
    _raise_open_file_limit()
    state, shown = prepare(database, example=example, sandbox=sandbox)
    api = create_app(state)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await state.sessions.close_all()
        state.close()
        state.runtime.close()

    api.router.lifespan_context = lifespan
    base = f"http://{host}:{port}"
    print(f"chatfn is serving on {base} (database {safe_url(state.runtime.db.url)})")
    print(f"  API and docs:  {base}/docs")
    print(f"  sessions:      ws://{host}:{port}/v1/apps/{DEFAULT_APP}/session")
    if shown is not None:
        print(f"  admin key:     {shown}")
        print("                 (shown once; set CHATFN_ADMIN_KEY to choose your own)")
    elif os.environ.get("CHATFN_ADMIN_KEY"):
        print("  admin key:     from CHATFN_ADMIN_KEY")
    else:
        print("  admin key:     the one shown when this database was created")
    print("  sandbox:       " + describe_layers(state.isolation).replace("\n", "\n" + " " * 17))
    sys.stdout.flush()
    config = uvicorn.Config(
        api,
        host=host,
        port=port,
        log_level="warning",
        ws_max_size=MAX_MESSAGE_BYTES * 4,
        # Small JSON messages gain nothing from compression, and each compressing socket
        # holds ~40 KB of zlib state (850 vs 425 MiB at 10,000 idle sessions).
        ws_per_message_deflate=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()
