"""The ``chatfn`` command line: parse, call one typed function, print.

Local commands: ``init``, ``lock``, ``invoke``. Commands that talk to a server (``deploy``,
``rollback``, ``logs``, ``secrets``, ``users``, ``settings``; ``dev`` starts one) take
``--url`` and ``--app`` and read the admin key from ``CHATFN_ADMIN_KEY``; ``users`` and
``settings`` act on the local database instead with ``--local``.

Exit codes: 0 success, 1 the handler, the session or the deploy failed, 2 bad input or any
other error (one line on stderr, never a traceback).
"""

from __future__ import annotations

import datetime
import os
import secrets as token_source
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichProgress

from runtime.client import (
    DEFAULT_URL,
    KEY_ENV,
    AdminClient,
    ChatfnClientError,
    ChatfnConnectionError,
    pack_project,
)
from runtime.core import DEFAULT_APP, App, Runtime
from runtime.dependencies import Progress, no_progress, parse_lock
from runtime.dependencies import resolve as resolve_lock
from runtime.events import resolve as resolve_event
from runtime.invoke import invoke_project
from runtime.project import LOCK, MANIFEST, REQUIREMENTS
from runtime.scaffold import scaffold
from runtime.users import Users
from sandbox.errors import ChatfnError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Run chat functions.")
users_cli = typer.Typer(
    no_args_is_help=True,
    help="The users of an app: on the server, or in the local database with --local.",
)
app.add_typer(users_cli, name="users")
secrets_cli = typer.Typer(
    no_args_is_help=True, help="An app's secrets on the server (values are never shown)."
)
app.add_typer(secrets_cli, name="secrets")

AppOption = Annotated[str, typer.Option("--app", help="The app.")]
UrlOption = Annotated[
    str,
    typer.Option(
        "--url", envvar="CHATFN_URL", show_envvar=True, help="The chatfn server's base URL."
    ),
]
LocalOption = Annotated[
    bool,
    typer.Option("--local", help="Act on the local database (--database-url), not a server."),
]
DatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="CHATFN_DATABASE_URL",
        show_envvar=True,
        help="Default: the SQLite file in CHATFN_DATA_DIR.",
    ),
]


def fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def echo_json(value: Any) -> None:
    typer.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


def parse_json_object(text: str, option: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        fail(f"{option} is not valid JSON: {exc}")
    if not isinstance(value, dict):
        fail(f"{option} must be a JSON object")
    return value


@contextmanager
def local_app(name: str, database_url: str | None) -> Iterator[App]:
    """An app in the local database; the default app is created when missing."""
    try:
        with Runtime(database_url) as runtime:
            yield runtime.ensure_app(name) if name == DEFAULT_APP else runtime.app(name)
    except ChatfnError as exc:
        fail(exc.message)


@app.callback()
def main_callback() -> None:
    """chatfn: a self-hostable runtime for sandboxed chat functions."""


@app.command()
def init(directory: Annotated[Path, typer.Argument(help="Where to create the project.")]) -> None:
    """Create a function project: a session handler, a manifest and its tests."""
    try:
        written = scaffold(directory)
    except ChatfnError as exc:
        fail(exc.message)
    for path in written:
        typer.echo(f"created {path}")
    typer.echo(f"next: chatfn invoke {directory} UserAttemptedStartSession --data '{{...}}'")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="The address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The port to listen on.")] = 8080,
    database: Annotated[
        str | None,
        typer.Option(help="A SQLAlchemy URL. Default: CHATFN_DATABASE_URL, else SQLite."),
    ] = None,
    example: Annotated[
        bool, typer.Option(help="Deploy functions/ to the app 'default' on a new database.")
    ] = True,
    require_sandbox: Annotated[
        str | None,
        typer.Option(
            envvar="CHATFN_SANDBOX_REQUIRE",
            show_envvar=True,
            help="Sandbox layers without which to refuse to start: 'all' or a list such as "
            "'uid,seccomp,landlock' (the layers are listed at start).",
        ),
    ] = None,
) -> None:
    """Serve the HTTP API and WebSocket sessions (Ctrl-C stops it gracefully)."""
    from runtime.server.serve import EXAMPLE
    from runtime.server.serve import serve as run_server
    from sandbox.isolation import REQUIRE_ENV, SandboxSettings
    from sandbox.policy import PolicyError

    try:
        env = dict(os.environ)
        if require_sandbox is not None:
            env[REQUIRE_ENV] = require_sandbox
        sandbox = SandboxSettings.from_env(env)
    except PolicyError as exc:
        fail(str(exc))
    try:
        run_server(host, port, database, example=EXAMPLE if example else None, sandbox=sandbox)
    except ChatfnError as exc:
        fail(exc.message)


@contextmanager
def progress_display() -> Iterator[Progress]:
    """A Rich progress bar on stderr for long steps (resolving, installing), when stderr
    is a terminal; nothing otherwise, so scripts and logs get only the result lines."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield no_progress
        return
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with RichProgress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("working", total=None)

        def report(message: str, done: int | None, total: int | None) -> None:
            bar.update(task, description=message, completed=done or 0, total=total)

        yield report


@app.command()
def lock(
    directory: Annotated[Path, typer.Argument(help="The function project directory.")],
) -> None:
    """Resolve requirements.in into requirements.txt: every version pinned, with hashes."""
    source = directory / REQUIREMENTS
    if not source.is_file():
        fail(f"{directory} has no {REQUIREMENTS}")
    try:
        with progress_display() as report:
            text = resolve_lock(source.read_text(encoding="utf-8"), report)
        pins = parse_lock(text)
    except ChatfnError as exc:
        fail(exc.message)
    target = directory / LOCK
    target.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {target}: {len(pins)} distributions pinned with hashes")


@app.command()
def invoke(
    directory: Annotated[Path, typer.Argument(help="The function project directory.")],
    event: Annotated[str, typer.Argument(help="Event type or file stem.")],
    data: Annotated[str, typer.Option(help="The event payload as a JSON object.")] = "{}",
    guest_users: Annotated[
        str, typer.Option(help="The app's guest_users setting: enabled or disabled.")
    ] = "enabled",
    user: Annotated[list[str] | None, typer.Option(help="A user that already exists.")] = None,
    secret: Annotated[list[str] | None, typer.Option(help="NAME=VALUE, repeatable.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Run one event in the real sandbox against a throwaway store."""
    payload = parse_json_object(data, "--data")
    secrets: dict[str, str] = {}
    for item in secret or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            fail("--secret expects NAME=VALUE")
        secrets[name] = value
    try:
        with progress_display() as report:
            outcome = invoke_project(
                directory,
                event,
                payload,
                secrets=secrets,
                users=user,
                guest_users=guest_users,
                progress=report,
            )
    except ChatfnError as exc:
        fail(exc.message)
    out = outcome.to_dict()
    if as_json:
        typer.echo(orjson.dumps(out).decode())
    else:
        if outcome.logs:
            typer.echo(outcome.logs.rstrip("\n"))
            typer.echo("---")
        if outcome.error is None:
            shown = outcome.session if outcome.session is not None else outcome.result
            typer.echo(f"succeeded in {out['duration_ms']} ms: {orjson.dumps(shown).decode()}")
        else:
            typer.echo(
                f"failed in {out['duration_ms']} ms: {outcome.error.code}: {outcome.error.message}"
            )
    raise typer.Exit(0 if outcome.succeeded else 1)


# -- talking to a server --------------------------------------------------------------------


def make_admin_client(url: str, key: str, app_name: str) -> AdminClient:
    """The client every server command uses (tests replace it)."""
    return AdminClient(url, key, app_name)


def admin_key() -> str:
    key = os.environ.get(KEY_ENV, "")
    if not key:
        fail(f"{KEY_ENV} is not set: export the server's admin key")
    return key


@contextmanager
def remote(url: str, app_name: str) -> Iterator[AdminClient]:
    """A client of the server at ``url`` for ``app_name``; any client error is one line."""
    key = admin_key()
    try:
        with make_admin_client(url, key, app_name) as client:
            yield client
    except ChatfnClientError as exc:
        fail(exc.message)


def use_local(ctx: typer.Context, local: bool) -> bool:
    """``--local``: the local database. ``--database-url`` without it, or ``--url`` with it,
    is a mistake worth one line rather than a silent choice."""

    def given(name: str) -> bool:
        source = ctx.get_parameter_source(name)
        return source is not None and source.name == "COMMANDLINE"

    if local and given("url"):
        fail("--url cannot be used with --local")
    if not local and given("database_url"):
        fail("--database-url needs --local")
    return local


def deploy_error_line(error: Any) -> str:
    """``file:line: message`` (the parts the server knows)."""
    if not isinstance(error, dict):
        return str(error)
    file, line, message = error.get("file"), error.get("line"), error.get("message")
    where = f"{file}:{line}: " if file and line else f"{file}: " if file else ""
    return f"{where}{message}"


def deploy_and_report(client: AdminClient, archive: bytes, timeout: float) -> bool:
    """Upload ``archive``, follow the version until it is live or failed, and print the
    outcome. True when the version went live."""
    try:
        started = client.deploy(archive)
    except ChatfnClientError as exc:
        if exc.code not in ("deploy_rejected", "dependency_error"):
            raise
        errors = exc.details.get("errors")
        for error in errors if isinstance(errors, list) and errors else [exc.message]:
            typer.echo(deploy_error_line(error))
        typer.echo("deploy rejected")
        return False
    version = started.get("version")
    if not isinstance(version, int):
        raise ChatfnClientError("bad_response", "the server did not say which version it built")
    with progress_display() as report:

        def update(info: dict[str, Any]) -> None:
            shown = info.get("progress") or info.get("status")
            report(f"version {version}: {shown}", None, None)

        final = client.wait_for_deployment(version, timeout=timeout, on_update=update)
    status = final.get("status")
    if status == "active":
        typer.echo(f"version {version} is live")
        return True
    if status == "failed":
        for error in final.get("errors") or []:
            typer.echo(deploy_error_line(error))
    try:
        live = client.get_app().get("active_version")
    except ChatfnClientError:
        live = None
    still = f"version {live} is live" if live is not None else "no version is live"
    outcome = "failed" if status == "failed" else f"is {status}"
    typer.echo(f"version {version} {outcome}; {still}")
    return False


@app.command()
def deploy(
    directory: Annotated[Path, typer.Argument(help="The function project directory.")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the build.")] = 900.0,
    url: UrlOption = DEFAULT_URL,
    app_name: AppOption = DEFAULT_APP,
) -> None:
    """Upload a function project and wait until it is live (exit 1 if it failed)."""
    try:
        archive = pack_project(directory)
    except ChatfnError as exc:
        fail(exc.message)
    with remote(url, app_name) as client:
        try:
            live = deploy_and_report(client, archive, timeout)
        except KeyboardInterrupt:
            typer.echo("stopped waiting; the version keeps building on the server", err=True)
            raise typer.Exit(130) from None
    raise typer.Exit(0 if live else 1)


@app.command()
def rollback(
    version: Annotated[int, typer.Argument(help="A version that built.")],
    url: UrlOption = DEFAULT_URL,
    app_name: AppOption = DEFAULT_APP,
) -> None:
    """Make an earlier (or any built) version the live one."""
    with remote(url, app_name) as client:
        before = client.get_app().get("active_version")
        info = client.activate(version)
    was = f" (was {before})" if before is not None and before != info.get("version") else ""
    typer.echo(f"version {info.get('version')} is live{was}")


# -- chatfn logs ----------------------------------------------------------------------------


def _parse_time(text: Any) -> datetime.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.datetime.fromisoformat(text)
    except ValueError:
        return None


def format_invocation(inv: dict[str, Any]) -> str:
    """``time  id  event  status  duration[  code: message]`` then the log, indented."""
    when = _parse_time(inv.get("created_at"))
    if when is not None and when.tzinfo is not None:
        when = when.astimezone(datetime.UTC)
    shown = when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if when else str(inv.get("created_at"))
    duration = inv.get("duration_ms")
    took = f"{duration:.1f} ms" if isinstance(duration, int | float) else "- ms"
    head = f"{shown}  {inv.get('id')}  {inv.get('event')}  {inv.get('status')}  {took}"
    error = inv.get("error")
    if isinstance(error, dict):
        head += f"  {error.get('code')}: {error.get('message')}"
    logs = inv.get("logs") or ""
    lines = [f"    {line}" for line in str(logs).rstrip("\n").split("\n")] if logs else []
    return "\n".join([head, *lines])


# Invocations are stored when they finish, a moment after their timestamp: --follow asks
# again for this much before the newest one it has shown, and skips those it has seen.
FOLLOW_OVERLAP = datetime.timedelta(seconds=5)
FOLLOW_MAX_PAGES = 20


def follow_invocations(
    client: AdminClient,
    shown: list[dict[str, Any]],
    event: str | None,
    status: str | None,
    interval: float,
) -> None:
    """Print invocations newer than ``shown`` as they arrive, oldest first, until Ctrl-C."""
    seen: dict[str, datetime.datetime | None] = {
        str(i.get("id")): _parse_time(i.get("created_at")) for i in shown
    }
    newest = max((t for t in seen.values() if t is not None), default=None)
    while True:
        time.sleep(interval)
        since = (newest - FOLLOW_OVERLAP).isoformat() if newest is not None else None
        fresh: list[dict[str, Any]] = []
        before = None
        for _ in range(FOLLOW_MAX_PAGES):
            page = client.invocations(
                event=event, status=status, since=since, limit=100, before=before
            )
            batch = page.get("invocations") or []
            fresh += [i for i in batch if str(i.get("id")) not in seen]
            before = page.get("next")
            if not before or not batch or since is None:
                break
        fresh.sort(key=lambda i: str(i.get("created_at")))
        for inv in fresh:
            typer.echo(format_invocation(inv))
            when = _parse_time(inv.get("created_at"))
            seen[str(inv.get("id"))] = when
            if when is not None and (newest is None or when > newest):
                newest = when
        if newest is not None:
            horizon = newest - 2 * FOLLOW_OVERLAP
            seen = {k: t for k, t in seen.items() if t is None or t >= horizon}


@app.command()
def logs(
    event: Annotated[str | None, typer.Option(help="Only this event (type or file stem).")] = None,
    status: Annotated[str | None, typer.Option(help="Only succeeded or failed.")] = None,
    limit: Annotated[int, typer.Option(help="Show the last this many.")] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new ones.")] = False,
    interval: Annotated[float, typer.Option(hidden=True)] = 1.0,
    url: UrlOption = DEFAULT_URL,
    app_name: AppOption = DEFAULT_APP,
) -> None:
    """Recent invocations, oldest first: time, id, event, status, duration, error, log."""
    try:
        event_name = resolve_event(event).name if event is not None else None
    except ChatfnError as exc:
        fail(exc.message)
    if status not in (None, "succeeded", "failed"):
        fail("--status must be 'succeeded' or 'failed'")
    if not 1 <= limit <= 1000:
        fail("--limit must be 1 to 1000")
    with remote(url, app_name) as client:
        page = client.invocations(event=event_name, status=status, limit=limit)
        shown = list(page.get("invocations") or [])
        for inv in reversed(shown):
            typer.echo(format_invocation(inv))
        if follow:
            try:
                follow_invocations(client, shown, event_name, status, interval)
            except KeyboardInterrupt:
                pass


# -- chatfn secrets -------------------------------------------------------------------------


def read_secret_value(name: str) -> str:
    """The value from stdin: a hidden prompt on a terminal, else everything piped in (one
    trailing newline dropped)."""
    if sys.stdin.isatty():
        value: str = typer.prompt(f"value of {name}", hide_input=True, err=True)
    else:
        value = sys.stdin.read()
        value = value.removesuffix("\n").removesuffix("\r")
    if not value:
        fail("no value: give VALUE or pipe it on stdin")
    return value


@secrets_cli.command("set")
def secrets_set(
    name: str,
    value: Annotated[
        str | None,
        typer.Argument(help="Default: read from stdin, so it stays out of shell history."),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    app_name: AppOption = DEFAULT_APP,
) -> None:
    """Set a secret (handlers read it as context.secrets[NAME])."""
    with remote(url, app_name) as client:
        client.set_secret(name, value if value is not None else read_secret_value(name))
    typer.echo(f"set secret {name}")


@secrets_cli.command("list")
def secrets_list(url: UrlOption = DEFAULT_URL, app_name: AppOption = DEFAULT_APP) -> None:
    """Secret names and when each was last set."""
    with remote(url, app_name) as client:
        listed = client.list_secrets()
    for item in listed:
        typer.echo(f"{item.get('name')}\t{item.get('updated_at')}")


@secrets_cli.command("delete")
def secrets_delete(
    name: str, url: UrlOption = DEFAULT_URL, app_name: AppOption = DEFAULT_APP
) -> None:
    """Delete a secret."""
    with remote(url, app_name) as client:
        client.delete_secret(name)
    typer.echo(f"deleted secret {name}")


# -- chatfn settings and chatfn users: a server, or the local database with --local ---------


@app.command()
def settings(
    ctx: typer.Context,
    guest_users: Annotated[
        str | None, typer.Option(help="Set guest_users: enabled or disabled.")
    ] = None,
    app_name: AppOption = DEFAULT_APP,
    url: UrlOption = DEFAULT_URL,
    local: LocalOption = False,
    database_url: DatabaseOption = None,
) -> None:
    """Show an app's settings, or change them."""
    if not use_local(ctx, local):
        with remote(url, app_name) as client:
            if guest_users is None:
                echo_json(client.settings())
            else:
                echo_json(client.update_settings(guest_users=guest_users))
        return
    with local_app(app_name, database_url) as target:
        echo_json(target.update_settings(guest_users=guest_users))


def echo_users(users: list[dict[str, Any]]) -> None:
    for u in users:
        guest = " (guest)" if u["is_guest"] else ""
        typer.echo(f"{u['name']}\t{u['display_name']}{guest}\t{u['created_at']}")


@contextmanager
def user_store(
    ctx: typer.Context, local: bool, url: str, app_name: str, database_url: str | None
) -> Iterator[Users | AdminClient]:
    """The app's users: on the server, or with ``--local`` in the database. Both have the
    same methods; any error becomes one line (``remote``, ``local_app``)."""
    if use_local(ctx, local):
        with local_app(app_name, database_url) as target:
            yield target.users
    else:
        with remote(url, app_name) as client:
            yield client


@users_cli.command("list")
def users_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
    after: Annotated[str | None, typer.Option(help="Start after this name.")] = None,
    app_name: AppOption = DEFAULT_APP,
    url: UrlOption = DEFAULT_URL,
    local: LocalOption = False,
    database_url: DatabaseOption = None,
) -> None:
    """List users by name."""
    with user_store(ctx, local, url, app_name, database_url) as users:
        found = users.list_users(limit=limit, after=after)
    if isinstance(found, dict):  # the server answers a page: {"users", "next"}
        echo_users(found.get("users") or [])
        if found.get("next"):
            typer.echo(f"more: --after {found['next']}", err=True)
    else:
        echo_users(found)


@users_cli.command("get")
def users_get(
    ctx: typer.Context,
    name: str,
    app_name: AppOption = DEFAULT_APP,
    url: UrlOption = DEFAULT_URL,
    local: LocalOption = False,
    database_url: DatabaseOption = None,
) -> None:
    """Show one user as JSON."""
    with user_store(ctx, local, url, app_name, database_url) as users:
        user = users.get_user(name)
    if user is None:
        fail(f"no user named {name!r}")
    echo_json(user)


@users_cli.command("create")
def users_create(
    ctx: typer.Context,
    name: str,
    display_name: Annotated[str | None, typer.Option(help="Default: the name.")] = None,
    guest: Annotated[bool, typer.Option(help="Create a guest user.")] = False,
    properties: Annotated[str | None, typer.Option(help="A JSON object.")] = None,
    app_name: AppOption = DEFAULT_APP,
    url: UrlOption = DEFAULT_URL,
    local: LocalOption = False,
    database_url: DatabaseOption = None,
) -> None:
    """Create a user."""
    props = parse_json_object(properties, "--properties") if properties is not None else None
    with user_store(ctx, local, url, app_name, database_url) as users:
        echo_json(users.create_user(name, display_name, guest, props))


@users_cli.command("update")
def users_update(
    ctx: typer.Context,
    name: str,
    display_name: Annotated[str | None, typer.Option(help="The new display name.")] = None,
    properties: Annotated[str | None, typer.Option(help="Replace with this JSON object.")] = None,
    app_name: AppOption = DEFAULT_APP,
    url: UrlOption = DEFAULT_URL,
    local: LocalOption = False,
    database_url: DatabaseOption = None,
) -> None:
    """Change a user's display name or properties."""
    changes: dict[str, Any] = {}
    if display_name is not None:
        changes["display_name"] = display_name
    if properties is not None:
        changes["properties"] = parse_json_object(properties, "--properties")
    if not changes:
        fail("nothing to change: give --display-name or --properties")
    with user_store(ctx, local, url, app_name, database_url) as users:
        echo_json(users.update_user(name, **changes))


@users_cli.command("delete")
def users_delete(
    ctx: typer.Context,
    name: str,
    app_name: AppOption = DEFAULT_APP,
    url: UrlOption = DEFAULT_URL,
    local: LocalOption = False,
    database_url: DatabaseOption = None,
) -> None:
    """Delete a user (and their sessions)."""
    with user_store(ctx, local, url, app_name, database_url) as users:
        users.delete_user(name)
    typer.echo(f"deleted {name}")


# -- chatfn dev -----------------------------------------------------------------------------

WATCH_INTERVAL_S = 0.5
SERVER_START_TIMEOUT_S = 60.0


def serve_command(port: int) -> list[str]:
    """How ``chatfn dev`` starts its server."""
    return [sys.executable, "-m", "runtime.cli", "serve", "--port", str(port), "--no-example"]


def project_snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """What a deploy packs, by name: (mtime in ns, size). Missing files are absent."""
    names = {MANIFEST, REQUIREMENTS, LOCK}
    out: dict[str, tuple[int, int]] = {}
    try:
        entries = list(directory.iterdir())
    except OSError:
        return out
    for path in entries:
        if path.suffix == ".py" or path.name in names:
            try:
                st = path.stat()
            except OSError:
                continue
            if path.is_file():
                out[path.name] = (st.st_mtime_ns, st.st_size)
    return out


def changed_files(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> list[str]:
    return sorted(
        name for name in before.keys() | after.keys() if before.get(name) != after.get(name)
    )


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until_up(client: AdminClient, child: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if child.poll() is not None:
            fail(f"chatfn serve exited with code {child.returncode}")
        try:
            client.health()
            return
        except ChatfnConnectionError:
            if time.monotonic() > deadline:
                fail(f"chatfn serve did not answer on {client.url} within {timeout:g} s")
            time.sleep(0.1)


def stop_server(child: subprocess.Popen[bytes], interrupted: bool) -> None:
    """Stop the child server: after Ctrl-C it got the SIGINT too, so give it a moment
    first; then SIGTERM, then SIGKILL."""
    if interrupted:
        try:
            child.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            pass
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def deploy_directory(client: AdminClient, directory: Path, timeout: float) -> bool:
    """One deploy for ``chatfn dev``: problems are printed, never fatal."""
    try:
        archive = pack_project(directory)
    except ChatfnError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        return False
    try:
        return deploy_and_report(client, archive, timeout)
    except ChatfnClientError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        return False


@app.command()
def dev(
    directory: Annotated[Path, typer.Argument(help="The function project directory.")],
    port: Annotated[int, typer.Option(help="The port chatfn serve listens on.")] = 8080,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each build.")] = 900.0,
    app_name: AppOption = DEFAULT_APP,
    database_url: DatabaseOption = None,
) -> None:
    """Serve on 127.0.0.1, deploy DIR, and redeploy it on every save; Ctrl-C stops."""
    if not directory.is_dir():
        fail(f"{directory} is not a directory")
    if not port_is_free(port):
        fail(f"port {port} is in use; choose another with --port")
    key = os.environ.get(KEY_ENV, "")
    env = dict(os.environ)
    if not key:
        key = env[KEY_ENV] = token_source.token_urlsafe(32)
        typer.echo(f"admin key for this server: export {KEY_ENV}={key}")
    if database_url is not None:
        env["CHATFN_DATABASE_URL"] = database_url
    url = f"http://127.0.0.1:{port}"
    child = subprocess.Popen(serve_command(port), env=env)
    interrupted = False
    try:
        with make_admin_client(url, key, app_name) as client:
            wait_until_up(client, child, SERVER_START_TIMEOUT_S)
            try:
                client.get_app()
            except ChatfnClientError as exc:
                if exc.code != "not_found":
                    raise
                client.create_app(app_name)
            typer.echo(f"serving {url} (app {app_name!r}); watching {directory}; Ctrl-C stops")
            last = project_snapshot(directory)
            deploy_directory(client, directory, timeout)
            while True:
                time.sleep(WATCH_INTERVAL_S)
                if child.poll() is not None:
                    fail(f"chatfn serve exited with code {child.returncode}")
                current = project_snapshot(directory)
                if current == last:
                    continue
                time.sleep(0.1)  # an editor's save may be several writes
                current = project_snapshot(directory)
                typer.echo(f"changed: {', '.join(changed_files(last, current))}; deploying")
                last = current
                deploy_directory(client, directory, timeout)
    except KeyboardInterrupt:
        interrupted = True
        typer.echo("stopping")
    except ChatfnClientError as exc:
        fail(exc.message)
    finally:
        stop_server(child, interrupted)


def main() -> None:
    app(prog_name="chatfn")


if __name__ == "__main__":
    main()
