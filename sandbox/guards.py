"""The RestrictedPython hooks and builtins that user code runs with (inside the worker).

RestrictedPython rewrites ``a.b`` into ``_getattr_(a, "b")``, ``a[b]`` into ``_getitem_``,
``for x in y`` into ``_getiter_(y)``, ``a.b = c`` into ``_write_(a).b = c``, ``import`` into
``__import__`` and so on; this module supplies every one of those hooks, deny by default.
It is a filter in front of the real boundary, the worker process and its OS limits.

Every refusal is recorded on ``Guards.violations`` as well as raised, so a handler that
swallows the exception still fails its invocation with ``sandbox_violation``.
"""

from __future__ import annotations

import builtins
import importlib
import operator
import string
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import (
    BuiltinMethodType,
    CodeType,
    FrameType,
    GenericAlias,
    MethodType,
    ModuleType,
    TracebackType,
)
from typing import Any

from RestrictedPython.Guards import guarded_iter_unpack_sequence, guarded_unpack_sequence
from RestrictedPython.transformer import INSPECT_ATTRIBUTES

from sandbox.policy import Policy


class Violation(BaseException):
    """A guard refused an operation. A BaseException so that ``except Exception`` in user
    code does not swallow it; recorded on the Guards either way."""


class ForbiddenImport(ImportError):
    """Importing a module that is not on the allowlist."""


# Objects that expose interpreter internals; never handed to user code.
FORBIDDEN_TYPES: frozenset[type] = frozenset({FrameType, TracebackType, CodeType})
# Types whose values need a closer look when they flow to user code.
_SUSPECT_TYPES: frozenset[type] = FORBIDDEN_TYPES | {ModuleType}
# Membership is tested by id: ``type(x) in FORBIDDEN_TYPES`` would hash and compare a
# user-defined type, running its metaclass's __hash__/__eq__ with these types in hand.
_FORBIDDEN_TYPE_IDS = frozenset(map(id, FORBIDDEN_TYPES))
_SUSPECT_TYPE_IDS = frozenset(map(id, _SUSPECT_TYPES))

# Attribute names refused on every object, on top of names starting with "_".
FORBIDDEN_ATTRIBUTES: frozenset[str] = INSPECT_ATTRIBUTES | frozenset(
    {
        "gi_frame", "gi_code", "gi_yieldfrom", "gi_running", "gi_suspended",
        "cr_frame", "cr_code", "cr_await", "cr_origin", "cr_running",
        "ag_frame", "ag_code", "ag_await", "ag_running",
        "f_back", "f_builtins", "f_code", "f_globals", "f_locals", "f_trace",
        "tb_frame", "tb_next", "co_code", "mro",
    }
)  # fmt: skip

_FORMAT_METHODS = frozenset({"format", "format_map"})
# The unbound str formatting methods: reachable without a str in hand through ``super()``.
_STR_FORMATTERS = (str.format, str.format_map)
_FORMATTER_METHODS = frozenset({"format", "vformat", "get_field", "get_value", "parse"})
# Their functions, refused however they are reached (a ``super()`` proxy of a subclass).
_FORMATTER_FUNCTIONS = tuple(vars(string.Formatter)[name] for name in sorted(_FORMATTER_METHODS))

_INPLACE: dict[str, Callable[[Any, Any], Any]] = {
    "+=": operator.iadd, "-=": operator.isub, "*=": operator.imul, "/=": operator.itruediv,
    "//=": operator.ifloordiv, "%=": operator.imod, "**=": operator.ipow,
    "<<=": operator.ilshift, ">>=": operator.irshift, "&=": operator.iand,
    "|=": operator.ior, "^=": operator.ixor, "@=": operator.imatmul,
}  # fmt: skip

_MISSING = object()


def _is_str_formatter(value: Any) -> bool:
    """``str.format``/``str.format_map``, unbound or bound to any str (subclass) instance."""
    if type(value) is BuiltinMethodType:
        return isinstance(value.__self__, str)
    return any(value is f for f in _STR_FORMATTERS)


def _is_formatter_method(value: Any) -> bool:
    """A ``string.Formatter`` method that reads attributes, bound or not."""
    func = value.__func__ if type(value) is MethodType else value
    return any(func is f for f in _FORMATTER_FUNCTIONS)


class ReadOnly:
    """Marker base for objects chatfn hands to handlers that must not be written
    (``event``, ``context``): writing one is an ordinary AttributeError, not a violation."""

    __slots__ = ()


class _ItemWriter:
    """What ``_write_`` returns for outside objects: item writes pass, attribute writes fail."""

    __slots__ = ("_guards", "_ob")
    _guards: Guards
    _ob: Any

    def __init__(self, ob: Any, guards: Guards) -> None:
        object.__setattr__(self, "_ob", ob)
        object.__setattr__(self, "_guards", guards)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._ob[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._ob[key]

    def __setattr__(self, name: str, value: Any) -> None:
        raise self._guards.refuse(f"cannot set attributes of {type(self._ob).__name__} objects")

    def __delattr__(self, name: str) -> None:
        raise self._guards.refuse(f"cannot delete attributes of {type(self._ob).__name__} objects")


class _GuardedType:
    """Stands in for a builtin container type (``list``, ``dict``...): construction consumes
    its argument through the checked iterator, while ``isinstance``, subclassing and class
    attributes behave as the real type's."""

    __slots__ = ("_guards", "_kind")

    def __init__(self, kind: type, guards: Guards) -> None:
        self._kind = kind
        self._guards = guards

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kind = self._kind
        if args:
            first = args[0]
            if kind is dict:
                source = first if hasattr(first, "keys") else self._guards.checked_iter(first)
                made = dict(source, **kwargs)
                self._guards.check_all(made.keys())
                self._guards.check_all(made.values())
                return made
            if not isinstance(first, str | bytes | bytearray | int):
                args = (self._guards.checked_iter(first), *args[1:])
        return kind(*args, **kwargs)

    def __instancecheck__(self, obj: Any) -> bool:
        return isinstance(obj, self._kind)

    def __subclasscheck__(self, cls: type) -> bool:
        return issubclass(cls, self._kind)

    def __mro_entries__(self, bases: tuple[Any, ...]) -> tuple[type, ...]:
        return (self._kind,)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kind, name)

    def __repr__(self) -> str:
        return repr(self._kind)


class _Printer:
    """RestrictedPython's print collector, writing to the invocation log."""

    def __init__(self, write: Callable[[str], None], guards: Guards) -> None:
        self._write = write
        self._guards = guards
        self._parts: list[str] = []
        self._size = 0

    def write(self, text: str) -> None:
        self._write(text)
        if self._size < 65536:  # what `printed` can return is capped too
            self._parts.append(text)
            self._size += len(text)

    def __call__(self) -> str:
        return "".join(self._parts)

    def _call_print(self, *objects: Any, **kwargs: Any) -> None:
        target = kwargs.get("file")
        if target is None:
            kwargs["file"] = self
        else:
            self._guards.getattr(target, "write")
        print(*objects, **kwargs)


class Guards:
    """One worker's guards, builtins and namespaces. Built after fork, so each worker has
    fresh copies that no other worker's code ever touched."""

    def __init__(self, policy: Policy, log_write: Callable[[str], None]) -> None:
        self.policy = policy
        self.violations: list[str] = []
        self._log_write = log_write
        # Classes user code defined, by id: identity, never ==/hash, which a user metaclass
        # can override to make a stdlib class or ModuleType look like one of its own.
        self._user_classes: weakref.WeakValueDictionary[int, type] = weakref.WeakValueDictionary()
        self._module_ok: dict[str, bool] = {}
        self._denied_attrs = policy.denied_attributes
        self.builtins = self._make_builtins()

    # -- refusals ---------------------------------------------------------------------------

    def refuse(self, message: str) -> Violation:
        self.violations.append(message)
        return Violation(message)

    def module_allowed(self, name: str) -> bool:
        ok = self._module_ok.get(name)
        if ok is None:
            ok = self._module_ok[name] = self.policy.allows_module(name)
        return ok

    def check_value(self, value: Any) -> Any:
        """Refuse interpreter internals and modules that are not on the allowlist."""
        kind = type(value)
        if id(kind) in _SUSPECT_TYPE_IDS:
            if kind is ModuleType:
                if not self.module_allowed(value.__name__):
                    raise self.refuse(f"module {value.__name__!r} is not available")
            else:
                raise self.refuse(f"{kind.__name__} objects are not available")
        return value

    def check_all(self, values: Iterable[Any]) -> None:
        for value in values:
            if id(type(value)) in _SUSPECT_TYPE_IDS:
                self.check_value(value)

    def checked_iter(self, iterable: Any) -> Iterator[Any]:
        """``_getiter_``: iterate, checking every item that comes out."""
        suspect = _SUSPECT_TYPE_IDS
        check = self.check_value
        for item in iter(iterable):
            if id(type(item)) in suspect:
                check(item)
            yield item

    # -- the hooks --------------------------------------------------------------------------

    def getattr(self, obj: Any, name: Any, default: Any = _MISSING) -> Any:
        if type(name) is not str:
            raise self.refuse("attribute names must be plain strings")
        if name[:1] == "_":
            raise self.refuse(f'attribute "{name}" is private: names starting with "_"')
        if name in FORBIDDEN_ATTRIBUTES:
            raise self.refuse(f'attribute "{name}" exposes interpreter internals')
        kind = type(obj)
        if kind is ModuleType:
            if (obj.__name__, name) in self._denied_attrs:
                raise self.refuse(f"{obj.__name__}.{name} is not available in chat functions")
        elif id(kind) in _FORBIDDEN_TYPE_IDS:
            raise self.refuse(f"{kind.__name__} objects are not available")
        elif name in _FORMAT_METHODS and (
            isinstance(obj, str) or (isinstance(obj, type) and issubclass(obj, str))
        ):
            raise self.refuse(f"str.{name} is not available; use f-strings or %")
        elif name in _FORMATTER_METHODS and (
            isinstance(obj, string.Formatter)
            or (isinstance(obj, type) and issubclass(obj, string.Formatter))
        ):
            raise self.refuse("string.Formatter is not available")
        value = getattr(obj, name) if default is _MISSING else getattr(obj, name, default)
        if id(type(value)) in _SUSPECT_TYPE_IDS:
            self.check_value(value)
        if value is GenericAlias:
            # Re-exported by logging, difflib, dataclasses...: GenericAlias(anything, ())
            # forwards every attribute read to what it wraps, past the checks on obj above.
            raise self.refuse("types.GenericAlias is not available in chat functions")
        if name in _FORMAT_METHODS and _is_str_formatter(value):
            # ``super(S, s).format`` with ``class S(str)``: the object is a super proxy.
            raise self.refuse(f"str.{name} is not available; use f-strings or %")
        if name in _FORMATTER_METHODS and _is_formatter_method(value):
            raise self.refuse("string.Formatter is not available")
        if name == "join" and isinstance(obj, str | bytes | bytearray):
            join = value
            return lambda iterable: join(self.checked_iter(iterable))
        return value

    def hasattr(self, obj: Any, name: Any) -> bool:
        if type(name) is not str:
            raise self.refuse("attribute names must be plain strings")
        if name[:1] == "_" or name in FORBIDDEN_ATTRIBUTES:
            return False
        try:
            self.getattr(obj, name)
        except AttributeError:
            return False
        return True

    def getitem(self, obj: Any, key: Any) -> Any:
        value = obj[key]
        if id(type(value)) in _SUSPECT_TYPE_IDS:
            self.check_value(value)
        return value

    def write(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is dict or kind is list or kind is set or kind is bytearray:  # not ==
            return obj
        if self.is_user_class(kind) or self.is_user_class(obj):
            return obj
        if isinstance(obj, ReadOnly):
            raise AttributeError(f"{kind.__name__} is read-only")
        if kind is ModuleType or isinstance(obj, type):
            raise self.refuse(f"cannot modify {getattr(obj, '__name__', kind.__name__)!r}")
        return _ItemWriter(obj, self)

    def setattr(self, obj: Any, name: Any, value: Any) -> None:
        if type(name) is not str or name[:1] == "_":
            raise self.refuse("cannot set private attributes")
        setattr(self.write(obj), name, value)

    def delattr(self, obj: Any, name: Any) -> None:
        if type(name) is not str or name[:1] == "_":
            raise self.refuse("cannot delete private attributes")
        delattr(self.write(obj), name)

    def inplacevar(self, op: str, target: Any, value: Any) -> Any:
        func = _INPLACE.get(op)
        if func is None:
            raise self.refuse(f"operator {op!r} is not available")
        if (
            op == "+="
            and type(target) is list
            and type(value) is not list
            and type(value) is not tuple
        ):
            value = list(self.checked_iter(value))
        return func(target, value)

    def apply(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        self.check_all(args)
        self.check_all(kwargs.values())
        return func(*args, **kwargs)

    def unpack_sequence(self, it: Any, spec: Any, _getiter_: Any) -> Any:
        return guarded_unpack_sequence(it, spec, self.checked_iter)  # type: ignore[no-untyped-call]

    def iter_unpack_sequence(self, it: Any, spec: Any, _getiter_: Any) -> Any:
        return guarded_iter_unpack_sequence(it, spec, self.checked_iter)  # type: ignore[no-untyped-call]

    def import_(
        self,
        name: Any,
        globals: Any = None,
        locals: Any = None,
        fromlist: Any = (),
        level: int = 0,
    ) -> ModuleType:
        if type(name) is not str:
            raise self.refuse("module names must be plain strings")
        if level != 0:
            raise ForbiddenImport("relative imports are not available in chat functions")
        if not self.module_allowed(name):
            raise ForbiddenImport(self.forbidden_import_message(name), name=name)
        module = importlib.import_module(name)
        if not fromlist:
            return sys.modules[name.partition(".")[0]]
        for item in fromlist:
            if type(item) is not str or item == "*":
                raise self.refuse("from-imports must name plain attributes")
            submodule = f"{name}.{item}"
            if not hasattr(module, item) and self.module_allowed(submodule):
                importlib.import_module(submodule)
            self.getattr(module, item)
        return module

    def forbidden_import_message(self, name: str) -> str:
        allowed = ", ".join(sorted(self.policy.allowed_modules))
        return (
            f"import of {name!r} is not allowed in chat functions. Allowed modules: {allowed}. "
            "Declare other packages in requirements.in."
        )

    def print_(self, _getattr_: Any = None) -> _Printer:
        return _Printer(self._log_write, self)

    def metaclass(self, name: str, bases: tuple[type, ...], namespace: dict[str, Any]) -> type:
        meta: type = type
        for base in bases:
            base_meta = type(base)
            if issubclass(base_meta, meta):
                meta = base_meta
        cls: type = meta(name, bases, namespace)
        self._user_classes[id(cls)] = cls
        return cls

    def is_user_class(self, obj: Any) -> bool:
        """Was ``obj`` made by a class statement of user code? By identity only."""
        return self._user_classes.get(id(obj)) is obj

    # -- assembly ---------------------------------------------------------------------------

    def _denied(self, name: str) -> Callable[..., Any]:
        def denied(*args: Any, **kwargs: Any) -> Any:
            raise self.refuse(f"{name}() is not available in chat functions")

        denied.__name__ = name
        return denied

    def _consuming(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """A builtin that consumes iterables in C, fed through the checked iterator."""
        checked = self.checked_iter

        def guarded(*args: Any, **kwargs: Any) -> Any:
            return func(*[checked(a) for a in args], **kwargs)

        guarded.__name__ = func.__name__
        return guarded

    def _one_or_many(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """``min``/``max``: one iterable argument, or several plain values."""
        checked = self.checked_iter

        def guarded(*args: Any, **kwargs: Any) -> Any:
            if len(args) == 1:
                return self.check_value(func(checked(args[0]), **kwargs))
            self.check_all(args)
            return func(*args, **kwargs)

        guarded.__name__ = func.__name__
        return guarded

    def _make_builtins(self) -> dict[str, Any]:
        table: dict[str, Any] = {}
        for name in self.policy.allowed_builtins:
            table[name] = getattr(builtins, name)
        for kind in (list, tuple, dict, set, frozenset, bytes, bytearray):
            if kind.__name__ in table:
                table[kind.__name__] = _GuardedType(kind, self)
        wrappers: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
            "sorted": self._consuming_first,
            "enumerate": self._consuming_first,
            "sum": self._consuming_first,
            "any": self._consuming_first,
            "all": self._consuming_first,
            "zip": self._consuming,
            "map": self._function_then_iterables,
            "filter": self._function_then_iterables,
        }
        for name, wrap in wrappers.items():
            if name in table:
                table[name] = wrap(getattr(builtins, name))
        for name in ("min", "max"):
            if name in table:
                table[name] = self._one_or_many(getattr(builtins, name))
        if "reversed" in table:
            table["reversed"] = lambda seq: self.checked_iter(reversed(seq))
        if "iter" in table:
            table["iter"] = self._iter
        table["getattr"] = self.getattr
        table["hasattr"] = self.hasattr
        table["setattr"] = self.setattr
        table["delattr"] = self.delattr
        for name in self.policy.denied_builtins:
            table[name] = self._denied(name)
        table["__import__"] = self.import_
        table["__build_class__"] = builtins.__build_class__
        return table

    def _iter(self, obj: Any, *sentinel: Any) -> Iterator[Any]:
        if sentinel:
            return self.checked_iter(iter(obj, *sentinel))
        return self.checked_iter(obj)

    def _consuming_first(self, func: Callable[..., Any]) -> Callable[..., Any]:
        checked = self.checked_iter

        def guarded(iterable: Any, *args: Any, **kwargs: Any) -> Any:
            return func(checked(iterable), *args, **kwargs)

        guarded.__name__ = func.__name__
        return guarded

    def _function_then_iterables(self, func: Callable[..., Any]) -> Callable[..., Any]:
        checked = self.checked_iter

        def guarded(function: Any, *iterables: Any) -> Any:
            return checked(func(function, *[checked(i) for i in iterables]))

        guarded.__name__ = func.__name__
        return guarded

    def namespace(self, module_name: str, extra: dict[str, Any]) -> dict[str, Any]:
        """Globals for one user module: the hooks, fresh builtins, and ``extra``."""
        ns: dict[str, Any] = {
            "__builtins__": self.builtins,
            "__name__": module_name,
            "__metaclass__": self.metaclass,
            "_getattr_": self.getattr,
            "_getitem_": self.getitem,
            "_getiter_": self.checked_iter,
            "_write_": self.write,
            "_inplacevar_": self.inplacevar,
            "_unpack_sequence_": self.unpack_sequence,
            "_iter_unpack_sequence_": self.iter_unpack_sequence,
            "_apply_": self.apply,
            "_print_": self.print_,
        }
        ns.update(extra)
        return ns
