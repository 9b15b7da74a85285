"""Compiling user code with RestrictedPython; errors come back as values with file and line.

Used twice with the same rules: by the host when a project is uploaded (to reject it with
every error at once) and by the template process that compiles the deployment it serves.
Nothing here runs user code.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import CodeType

from RestrictedPython.compile import compile_restricted_exec

INIT_FILE = "init.py"
HANDLER_NAME = "handle_event"
MAX_SOURCE_BYTES = 512 * 1024

_LINE_PREFIX = re.compile(r"^Line (\d+): (.*)$", re.S)


@dataclass(frozen=True, slots=True)
class SourceError:
    """One problem in one file: what ``chatfn deploy`` prints as ``file:line: message``."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"

    def to_dict(self) -> dict[str, object]:
        return {"file": self.file, "line": self.line, "message": self.message}


@dataclass(frozen=True, slots=True)
class CompiledProject:
    """Code objects of a project: ``init`` (optional) and one per handler module stem."""

    init: CodeType | None
    handlers: Mapping[str, CodeType]


def _restricted_errors(filename: str, messages: Sequence[str]) -> list[SourceError]:
    errors = []
    for raw in messages:
        match = _LINE_PREFIX.match(raw)
        if match:
            errors.append(SourceError(filename, int(match.group(1)), match.group(2).strip()))
        else:
            errors.append(SourceError(filename, None, raw.strip()))
    return errors


def _check_handler_signature(filename: str, source: str) -> list[SourceError]:
    tree = ast.parse(source, filename)
    defs = [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == HANDLER_NAME
    ]
    if not defs:
        return [SourceError(filename, None, f"no top-level function `{HANDLER_NAME}` defined")]
    node = defs[-1]
    problems = []
    a = node.args
    positional = len(a.posonlyargs) + len(a.args)
    if positional != 2 or a.vararg or a.kwarg or a.kwonlyargs:
        problems.append(
            f"`{HANDLER_NAME}` must take exactly two positional parameters "
            f"(event, context), found {ast.unparse(a) or 'none'}"
        )
    elif a.defaults:
        problems.append(f"`{HANDLER_NAME}` parameters may not have default values")
    if node.decorator_list:
        problems.append(f"`{HANDLER_NAME}` may not be decorated")
    return [SourceError(filename, node.lineno, p) for p in problems]


def compile_source(
    filename: str, source: str, *, is_handler: bool
) -> tuple[CodeType | None, list[SourceError]]:
    """Restricted-compile one file; a handler file must also define ``handle_event`` right."""
    if len(source.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
        return None, [SourceError(filename, None, f"file exceeds {MAX_SOURCE_BYTES} bytes")]
    result = compile_restricted_exec(source, filename=filename)
    errors = _restricted_errors(filename, result.errors)
    if not errors and is_handler:
        errors = _check_handler_signature(filename, source)
    if errors or result.code is None:
        return None, errors
    code: CodeType = result.code
    return code, []


def compile_project(files: Mapping[str, str]) -> CompiledProject | list[SourceError]:
    """Compile every ``.py`` file of a project; all errors of all files, or the code."""
    errors: list[SourceError] = []
    init: CodeType | None = None
    handlers: dict[str, CodeType] = {}
    for filename in sorted(files):
        if not filename.endswith(".py"):
            continue
        is_init = filename == INIT_FILE
        code, file_errors = compile_source(filename, files[filename], is_handler=not is_init)
        errors.extend(file_errors)
        if code is None:
            continue
        if is_init:
            init = code
        else:
            handlers[filename.removesuffix(".py")] = code
    if errors:
        return errors
    return CompiledProject(init=init, handlers=handlers)
