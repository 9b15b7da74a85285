"""A function project (DESIGN section 2): its code files, manifest and dependency files,
read from a directory into plain data that can be stored and deployed."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from runtime.events import EVENTS
from sandbox import Limits, PolicyError
from sandbox.compiler import INIT_FILE
from sandbox.errors import InvalidRequest

MANIFEST = "chatfn.toml"
REQUIREMENTS = "requirements.in"
LOCK = "requirements.txt"
CODE_FILES = frozenset({INIT_FILE} | {e.filename for e in EVENTS})
MAX_FILE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Project:
    """What a deployment is made of; ``files`` maps code file names to source."""

    files: dict[str, str]
    manifest: str | None = None
    requirements: str | None = None
    lock: str | None = None
    handlers: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        for name in self.files:
            if name not in CODE_FILES:
                known = ", ".join(sorted(CODE_FILES))
                raise InvalidRequest(f"{name} is not an event handler or init.py (known: {known})")
        stems = frozenset(n.removesuffix(".py") for n in self.files if n != INIT_FILE)
        if not stems:
            raise InvalidRequest("the project has no event handler files")
        object.__setattr__(self, "handlers", stems)

    def limits(self) -> Limits:
        """The ``[runtime]`` limits of chatfn.toml; InvalidRequest naming the bad key."""
        if self.manifest is None:
            return Limits()
        try:
            data = tomllib.loads(self.manifest)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidRequest(f"{MANIFEST}: {exc}") from None
        runtime = data.get("runtime", {})
        if not isinstance(runtime, dict):
            raise InvalidRequest(f"{MANIFEST}: [runtime] must be a table")
        try:
            return Limits.from_mapping(runtime)
        except (PolicyError, TypeError) as exc:
            raise InvalidRequest(f"{MANIFEST}: {exc}") from None


def read_project(directory: str | Path) -> Project:
    """Read a project directory; InvalidRequest naming the first problem."""
    root = Path(directory)
    if not root.is_dir():
        raise InvalidRequest(f"{root} is not a directory")
    files = {path.name: _read(path) for path in sorted(root.glob("*.py"))}
    project = Project(
        files=files,
        manifest=_read_optional(root / MANIFEST),
        requirements=_read_optional(root / REQUIREMENTS),
        lock=_read_optional(root / LOCK),
    )
    project.limits()  # a bad manifest is reported before anything is stored
    return project


def _read(path: Path) -> str:
    if path.stat().st_size > MAX_FILE_BYTES:
        raise InvalidRequest(f"{path.name} is larger than {MAX_FILE_BYTES // 1024} KiB")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{path.name} is not valid UTF-8") from None


def _read_optional(path: Path) -> str | None:
    return _read(path) if path.is_file() else None
