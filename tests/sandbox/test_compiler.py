"""Compile errors are values with file and line; handle_event's signature is checked."""

from __future__ import annotations

import pytest

from sandbox.compiler import CompiledProject, SourceError, compile_project


def errors_of(files: dict[str, str]) -> list[SourceError]:
    result = compile_project(files)
    assert isinstance(result, list)
    return result


def test_a_good_project_compiles() -> None:
    result = compile_project(
        {"init.py": "KEY = 1\n", "h.py": "def handle_event(event, context):\n    return KEY\n",
         "README.md": "not code"}
    )  # fmt: skip
    assert isinstance(result, CompiledProject)
    assert result.init is not None and set(result.handlers) == {"h"}


def test_syntax_error_has_file_and_line() -> None:
    [error] = errors_of({"h.py": "def handle_event(event, context):\n    return (\n"})
    assert error.file == "h.py" and error.line is not None and error.line >= 2
    assert "SyntaxError" in error.message


def test_every_error_of_every_file_is_reported() -> None:
    errors = errors_of(
        {
            "a.py": "def handle_event(e, c):\n    return e._x\n",
            "b.py": "def handle_event(e, c):\n    exec('1')\n",
            "init.py": "import os as _os\n",
        }
    )
    assert {(e.file, e.line) for e in errors} >= {("a.py", 2), ("b.py", 2), ("init.py", 1)}


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("x = 1\n", "no top-level function `handle_event`"),
        ("def handle_event(event):\n    pass\n", "exactly two positional parameters"),
        ("def handle_event(e, c, d):\n    pass\n", "exactly two positional parameters"),
        ("def handle_event(*args):\n    pass\n", "exactly two positional parameters"),
        ("def handle_event(e, c, *, k):\n    pass\n", "exactly two positional parameters"),
        ("def handle_event(e, c=None):\n    pass\n", "default values"),
        ("async def handle_event(e, c):\n    pass\n", "AsyncFunctionDef"),
    ],
)
def test_handler_signature(source: str, message: str) -> None:
    errors = errors_of({"h.py": source})
    assert any(message in e.message for e in errors), errors


def test_init_needs_no_handler() -> None:
    assert isinstance(compile_project({"init.py": "X = 1\n"}), CompiledProject)


def test_str_of_error() -> None:
    assert str(SourceError("h.py", 3, "bad")) == "h.py:3: bad"
    assert str(SourceError("h.py", None, "bad")) == "h.py: bad"
