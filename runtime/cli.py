"""The ``chatfn`` command line: parse, call one typed function, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import orjson
import typer

from runtime.invoke import invoke_project, result_dict
from sandbox.errors import ChatfnError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Run chat functions.")


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.callback()
def main_callback() -> None:
    """chatfn: a self-hostable runtime for sandboxed chat functions."""


@app.command()
def invoke(
    directory: Annotated[Path, typer.Argument(help="The function project directory.")],
    event: Annotated[str, typer.Argument(help="Event type or file stem.")],
    data: Annotated[str, typer.Option(help="The event payload as a JSON object.")] = "{}",
    secret: Annotated[list[str] | None, typer.Option(help="NAME=VALUE, repeatable.")] = None,
    user: Annotated[list[str] | None, typer.Option(help="A user that already exists.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Run one handler in the real sandbox against a throwaway store."""
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        fail(f"--data is not valid JSON: {exc}")
    secrets: dict[str, str] = {}
    for item in secret or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            fail(f"--secret expects NAME=VALUE, got {name or item!r}")
        secrets[name] = value
    try:
        result = invoke_project(directory, event, payload, secrets=secrets, users=user)
    except ChatfnError as exc:
        fail(exc.message)
    out = result_dict(result)
    if as_json:
        typer.echo(orjson.dumps(out).decode())
    else:
        if result.logs:
            typer.echo(result.logs.rstrip("\n"))
            typer.echo("---")
        if result.ok:
            typer.echo(
                f"succeeded in {out['duration_ms']} ms: {orjson.dumps(result.value).decode()}"
            )
        else:
            assert result.error is not None
            typer.echo(
                f"failed in {out['duration_ms']} ms: {result.error.code}: {result.error.message}"
            )
    raise typer.Exit(0 if result.ok else 1)


def main() -> None:
    app(prog_name="chatfn")


if __name__ == "__main__":
    main()
