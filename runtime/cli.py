"""The ``chatfn`` command line: parse, call one typed function, print.

Exit codes: 0 success, 1 the handler or session failed, 2 bad input or any other error
(one line on stderr, never a traceback).
"""

from __future__ import annotations

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

from runtime.core import DEFAULT_APP, App, Runtime
from runtime.dependencies import Progress, no_progress, parse_lock
from runtime.dependencies import resolve as resolve_lock
from runtime.invoke import invoke_project
from runtime.project import LOCK, REQUIREMENTS
from runtime.scaffold import scaffold
from sandbox.errors import ChatfnError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Run chat functions.")
users_cli = typer.Typer(no_args_is_help=True, help="The users of an app, in the local database.")
app.add_typer(users_cli, name="users")

AppOption = Annotated[str, typer.Option("--app", help="The app.")]
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
) -> None:
    """Serve the HTTP API and WebSocket sessions (Ctrl-C stops it gracefully)."""
    from runtime.server.serve import EXAMPLE
    from runtime.server.serve import serve as run_server

    try:
        run_server(host, port, database, example=EXAMPLE if example else None)
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


@app.command()
def settings(
    guest_users: Annotated[
        str | None, typer.Option(help="Set guest_users: enabled or disabled.")
    ] = None,
    app_name: AppOption = DEFAULT_APP,
    database_url: DatabaseOption = None,
) -> None:
    """Show an app's settings, or change them."""
    with local_app(app_name, database_url) as target:
        try:
            echo_json(target.update_settings(guest_users=guest_users))
        except ChatfnError as exc:
            fail(exc.message)


@users_cli.command("list")
def users_list(
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
    after: Annotated[str | None, typer.Option(help="Start after this name.")] = None,
    app_name: AppOption = DEFAULT_APP,
    database_url: DatabaseOption = None,
) -> None:
    """List users by name."""
    with local_app(app_name, database_url) as target:
        try:
            users = target.users.list_users(limit=limit, after=after)
        except ChatfnError as exc:
            fail(exc.message)
    for u in users:
        guest = " (guest)" if u["is_guest"] else ""
        typer.echo(f"{u['name']}\t{u['display_name']}{guest}\t{u['created_at']}")


@users_cli.command("get")
def users_get(
    name: str, app_name: AppOption = DEFAULT_APP, database_url: DatabaseOption = None
) -> None:
    """Show one user as JSON."""
    with local_app(app_name, database_url) as target:
        try:
            user = target.users.get_user(name)
        except ChatfnError as exc:
            fail(exc.message)
    if user is None:
        fail(f"no user named {name!r}")
    echo_json(user)


@users_cli.command("create")
def users_create(
    name: str,
    display_name: Annotated[str | None, typer.Option(help="Default: the name.")] = None,
    guest: Annotated[bool, typer.Option(help="Create a guest user.")] = False,
    properties: Annotated[str | None, typer.Option(help="A JSON object.")] = None,
    app_name: AppOption = DEFAULT_APP,
    database_url: DatabaseOption = None,
) -> None:
    """Create a user."""
    props = parse_json_object(properties, "--properties") if properties is not None else None
    with local_app(app_name, database_url) as target:
        try:
            echo_json(target.users.create_user(name, display_name, guest, props))
        except ChatfnError as exc:
            fail(exc.message)


@users_cli.command("update")
def users_update(
    name: str,
    display_name: Annotated[str | None, typer.Option(help="The new display name.")] = None,
    properties: Annotated[str | None, typer.Option(help="Replace with this JSON object.")] = None,
    app_name: AppOption = DEFAULT_APP,
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
    with local_app(app_name, database_url) as target:
        try:
            echo_json(target.users.update_user(name, **changes))
        except ChatfnError as exc:
            fail(exc.message)


@users_cli.command("delete")
def users_delete(
    name: str, app_name: AppOption = DEFAULT_APP, database_url: DatabaseOption = None
) -> None:
    """Delete a user (and their sessions)."""
    with local_app(app_name, database_url) as target:
        try:
            target.users.delete_user(name)
        except ChatfnError as exc:
            fail(exc.message)
    typer.echo(f"deleted {name}")


def main() -> None:
    app(prog_name="chatfn")


if __name__ == "__main__":
    main()
