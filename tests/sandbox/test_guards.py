"""The guards in-process, on objects user code cannot normally get: the second line of
defence behind the first (not handing such objects out at all)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import pytest

from sandbox.guards import Guards, Violation
from sandbox.policy import Policy


@pytest.fixture
def guards() -> Guards:
    return Guards(Policy(), lambda text: None)


def consumers(g: Guards) -> dict[str, Callable[[Any], Any]]:
    b = g.builtins
    return {
        "sorted": b["sorted"],
        "tuple": b["tuple"],
        "list": b["list"],
        "set": b["set"],
        "frozenset": b["frozenset"],
        "dict": lambda it: b["dict"]((k, k) for k in it),
        "bytes": b["bytes"],
        "zip": lambda it: b["list"](b["zip"](it, it)),
        "map": lambda it: b["list"](b["map"](repr, it)),
        "filter": lambda it: b["list"](b["filter"](None, it)),
        "enumerate": lambda it: b["list"](b["enumerate"](it)),
        "reversed": lambda it: b["list"](b["reversed"](it)),
        "min": b["min"],
        "max": b["max"],
        "any": b["any"],
        "str.join": lambda it: g.getattr(",", "join")(it),
        "for": lambda it: [x for x in g.checked_iter(it)],
        "iter": lambda it: next(b["iter"](it)),
    }


@pytest.mark.parametrize("name", sorted(consumers(Guards(Policy(), print))))
@pytest.mark.parametrize("forbidden", ["module", "frame"])
def test_c_level_iteration_checks_every_item(guards: Guards, name: str, forbidden: str) -> None:
    item = os if forbidden == "module" else sys._getframe()
    with pytest.raises(Violation):
        consumers(guards)[name]([item])
    assert guards.violations


def test_allowed_modules_pass_through(guards: Guards) -> None:
    assert guards.builtins["list"]([json]) == [json]
    assert guards.getattr(json, "loads") is json.loads


def test_guarded_types_still_behave_like_types(guards: Guards) -> None:
    b = guards.builtins
    assert isinstance([], b["list"]) and isinstance({}, (b["set"], b["dict"]))
    assert issubclass(bool, int) and issubclass(list, b["list"])
    assert b["dict"]({"a": 1}, b=2) == {"a": 1, "b": 2}
    assert b["bytes"]("hé", "utf-8") == "hé".encode() and b["bytes"](3) == b"\0\0\0"
    assert b["dict"].fromkeys("ab") == {"a": None, "b": None}

    class Mine(b["list"]):  # type: ignore[misc,valid-type,type-arg]
        pass

    assert isinstance(Mine(), list)


def test_attribute_rules(guards: Guards) -> None:
    class Sneaky(str):
        def startswith(self, prefix: Any, *args: Any) -> bool:
            return False

    for name in ("__class__", "gi_frame", "f_back", "mro", Sneaky("__class__")):
        with pytest.raises(Violation):
            guards.getattr("x", name)
    with pytest.raises(Violation):
        guards.getattr("{0}", "format")
    with pytest.raises(Violation):
        guards.getattr(str, "format_map")
    assert guards.hasattr("x", "__class__") is False
    assert guards.getattr("x", "upper")() == "X"


def test_import_checks_the_module_and_every_from_name(guards: Guards) -> None:
    imp = guards.builtins["__import__"]
    assert imp("json") is json
    assert imp("urllib.parse").__name__ == "urllib"
    with pytest.raises(ImportError, match="Allowed modules"):
        imp("os")
    with pytest.raises(Violation):
        imp("logging", fromlist=("os",))
    with pytest.raises(Violation):
        imp("string", fromlist=("Formatter",))
    with pytest.raises(ImportError):
        imp("json", level=1)


def test_writes(guards: Guards) -> None:
    with pytest.raises(Violation):
        guards.setattr(json, "loads", None)
    with pytest.raises(Violation):
        guards.write(str).x = 1
    d: dict[str, int] = {}
    guards.write(d)["a"] = 1
    assert d == {"a": 1}
    user_class = guards.metaclass("Box", (), {"__module__": "h", "__qualname__": "Box"})
    box = user_class()
    guards.write(box).value = 3
    assert box.value == 3


def test_builtins_are_fresh_per_guards_instance() -> None:
    a, b = Guards(Policy(), print), Guards(Policy(), print)
    assert a.builtins is not b.builtins
    a.builtins["len"] = None
    assert b.builtins["len"] is len


def test_denied_builtins_raise_a_violation(guards: Guards) -> None:
    for name in ("open", "eval", "exec", "compile", "breakpoint", "globals", "vars", "type"):
        with pytest.raises(Violation, match=name):
            guards.builtins[name]("x")
