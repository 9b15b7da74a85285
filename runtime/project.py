"""Reading a function project directory (DESIGN section 2) into a sandbox Deployment."""

from __future__ import annotations

import tomllib
from pathlib import Path

from runtime.events import EVENTS
from sandbox import Deployment, Limits, PolicyError
from sandbox.compiler import INIT_FILE
from sandbox.errors import InvalidRequest

MANIFEST = "chatfn.toml"
_CODE_FILES = {INIT_FILE} | {e.filename for e in EVENTS}


def read_project(directory: str | Path) -> tuple[dict[str, str], Limits]:
    """The project's code files and runtime limits; InvalidRequest naming any problem."""
    root = Path(directory)
    if not root.is_dir():
        raise InvalidRequest(f"{root} is not a directory")
    files: dict[str, str] = {}
    for path in sorted(root.glob("*.py")):
        if path.name not in _CODE_FILES:
            known = ", ".join(sorted(_CODE_FILES))
            raise InvalidRequest(f"{path.name} is not an event handler or init.py (known: {known})")
        try:
            files[path.name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(f"{path.name} is not valid UTF-8") from None
    if not any(name != INIT_FILE for name in files):
        raise InvalidRequest(f"{root} has no event handler files")
    return files, read_limits(root)


def read_limits(root: Path) -> Limits:
    manifest = root / MANIFEST
    if not manifest.exists():
        return Limits()
    try:
        data = tomllib.loads(manifest.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest(f"{MANIFEST}: {exc}") from None
    runtime = data.get("runtime", {})
    if not isinstance(runtime, dict):
        raise InvalidRequest(f"{MANIFEST}: [runtime] must be a table")
    try:
        return Limits.from_mapping(runtime)
    except (PolicyError, TypeError) as exc:
        raise InvalidRequest(f"{MANIFEST}: {exc}") from None


def load_deployment(directory: str | Path, app: str = "local", version: int = 1) -> Deployment:
    files, limits = read_project(directory)
    return Deployment(app=app, version=version, files=files, limits=limits)
