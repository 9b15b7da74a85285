"""What a chat function may do, as frozen data.

``Limits`` are the per-app runtime limits of ``chatfn.toml`` ``[runtime]``; ``Policy`` is what
restricted code may touch (builtins, modules, attributes). Both are immutable; ``with_*``
builders return changed copies. Both cross into the template process as plain dicts, so
nothing here holds code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Network = Literal["none", "outbound"]

# The standard-library modules restricted code may import. Chosen for handlers that parse,
# hash, encode and compute; anything that touches files, processes, the interpreter or code
# objects (os, sys, io, pickle, marshal, importlib, inspect, gc, ctypes, operator, functools,
# typing: get_type_hints evaluates strings) stays out. Reaching a module through an attribute
# of an allowed one is refused by the attribute guard unless that module is listed here too.
# dataclasses stays out as well: asdict/astuple/replace/fields and the generated methods read
# fields with the real getattr, and make_dataclass takes "_"-names as fields, so it reads any
# private attribute (and asdict's deepcopy runs __reduce_ex__ from a stdlib frame). Without
# annotations (RestrictedPython refuses them) make_dataclass was its only use anyway.
STDLIB_ALLOWLIST: frozenset[str] = frozenset(
    {
        "base64",
        "binascii",
        "bisect",
        "calendar",
        "cmath",
        "collections",
        "datetime",
        "decimal",
        "difflib",
        "fractions",
        "hashlib",
        "heapq",
        "hmac",
        "html",
        "ipaddress",
        "itertools",
        "json",
        "logging",
        "math",
        "numbers",
        "random",
        "re",
        "secrets",
        "statistics",
        "string",
        "struct",
        "textwrap",
        "time",
        "unicodedata",
        "urllib.parse",
        "uuid",
        "zlib",
    }
)

# Submodules of allowed packages that stay out: logging.config can listen on a socket and
# evaluate what it receives; logging.handlers writes files and opens sockets; json.tool opens
# the files named in sys.argv and hands out pathlib.Path.
DENIED_SUBMODULES: frozenset[str] = frozenset({"logging.config", "logging.handlers", "json.tool"})

# Attributes of allowed modules that are ways out (formatting engines that read attributes,
# frame access, file writers). Refused by the attribute guard and by ``from m import name``.
DENIED_MODULE_ATTRIBUTES: frozenset[tuple[str, str]] = frozenset(
    {
        ("string", "Formatter"),
        ("logging", "currentframe"),
        ("logging", "Formatter"),
        ("logging", "BufferingFormatter"),
        ("logging", "PercentStyle"),
        ("logging", "StrFormatStyle"),
        ("logging", "StringTemplateStyle"),
        ("logging", "FileHandler"),
        ("logging", "basicConfig"),
        ("logging", "makeLogRecord"),
        ("logging", "setLogRecordFactory"),
        ("logging", "setLoggerClass"),
        ("logging", "config"),
        ("logging", "handlers"),
        # UserDict.copy() runs copy.copy(), whose __reduce_ex__ protocol calls what a user
        # class returns and then sets any attribute, private ones too, on any object.
        ("collections", "UserDict"),
        # Enum's functional API compares the members a user passes (any dunder) with
        # object.__reduce_ex__, __format__, __new__... handing those to a user __eq__.
        ("uuid", "Enum"),
    }
)

# Builtins restricted code gets, by name. The guards module maps each to a real or guarded
# implementation; names outside this set do not exist for user code.
ALLOWED_BUILTINS: frozenset[str] = frozenset(
    {
        "None", "False", "True", "Ellipsis", "NotImplemented",
        "abs", "all", "any", "ascii", "bin", "bool", "bytearray", "bytes", "callable",
        "chr", "classmethod", "complex", "delattr", "dict", "divmod", "enumerate",
        "filter", "float", "frozenset", "getattr", "hasattr", "hash", "hex", "id", "int",
        "isinstance", "issubclass", "iter", "len", "list", "map", "max", "min", "next",
        "object", "oct", "ord", "pow", "property", "range", "repr", "reversed", "round",
        "set", "setattr", "slice", "sorted", "staticmethod", "str", "sum", "super",
        "tuple", "zip",
        "ArithmeticError", "AssertionError", "AttributeError", "BaseException",
        "EOFError", "Exception", "IndexError", "KeyError", "LookupError", "MemoryError",
        "NameError", "NotImplementedError", "OSError", "OverflowError", "RecursionError",
        "RuntimeError", "StopIteration", "TypeError", "UnicodeDecodeError",
        "UnicodeEncodeError", "UnicodeError", "ValueError", "ZeroDivisionError",
        "ImportError",
    }
)  # fmt: skip

# Builtins that exist only to fail loudly: calling one is a sandbox violation with a message
# saying so, rather than a puzzling NameError.
DENIED_BUILTINS: frozenset[str] = frozenset(
    {
        "open", "eval", "exec", "compile", "breakpoint", "input", "globals", "locals",
        "vars", "dir", "help", "exit", "quit", "memoryview", "type", "__loader__",
    }
)  # fmt: skip

KIB = 1024
MIB = 1024 * 1024


# The operating-system layers around a worker (sandbox.isolation), in the order a worker
# meets them.
LAYERS: tuple[str, ...] = (
    "uid",  # a private uid/gid per app, no supplementary groups (root only)
    "pid_namespace",  # workers see only their own deployment's processes
    "ipc_namespace",  # no System V / POSIX IPC shared with anything else
    "mount_namespace",  # read-only view of the filesystem, a private tmpfs, a fresh /proc
    "network_namespace",  # network "none": no interface but a downed loopback
    "landlock",  # the filesystem (and TCP for network "none") by path, unprivileged
    "seccomp",  # system calls: exec, ptrace, namespaces, kernel attack surface, sockets
    "cgroup",  # memory and process count for the whole deployment
    "rlimits",  # per-worker process count (none) and address space
)
ALL_LAYERS = frozenset(LAYERS)


class PolicyError(ValueError):
    """A limit or policy value is out of range; the message names the field."""


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyError(f"[runtime] {name} must be a number, got {type(value).__name__}")
    if not low <= value <= high:
        raise PolicyError(f"[runtime] {name} must be between {low} and {high}, got {value}")


@dataclass(frozen=True)
class Limits:
    """Per-app runtime limits (``chatfn.toml`` ``[runtime]``), with DESIGN's defaults."""

    timeout_ms: int = 5000
    # Memory a worker may allocate on top of the preloaded runtime (address-space limit).
    memory_mb: int = 256
    # CPU seconds per invocation; None derives it from the timeout.
    cpu_seconds: int | None = None
    max_workers: int = 4
    max_queue: int = 64
    network: Network = "none"
    max_invocations: int = 1000
    idle_timeout_s: float = 300.0
    file_size_mb: int = 16
    open_files: int = 64
    log_bytes: int = 64 * KIB
    max_frame_bytes: int = 1 * MIB

    def __post_init__(self) -> None:
        _check_range("timeout_ms", self.timeout_ms, 10, 15 * 60 * 1000)
        _check_range("memory_mb", self.memory_mb, 16, 16 * 1024)
        if self.cpu_seconds is not None:
            _check_range("cpu_seconds", self.cpu_seconds, 1, 3600)
        _check_range("max_workers", self.max_workers, 1, 256)
        _check_range("max_queue", self.max_queue, 0, 100_000)
        if self.network not in ("none", "outbound"):
            raise PolicyError(
                f'[runtime] network must be "none" or "outbound", got {self.network!r}'
            )
        _check_range("max_invocations", self.max_invocations, 1, 10_000_000)
        _check_range("idle_timeout_s", self.idle_timeout_s, 0.1, 86_400)
        _check_range("file_size_mb", self.file_size_mb, 0, 4096)
        _check_range("open_files", self.open_files, 8, 4096)
        _check_range("log_bytes", self.log_bytes, 1 * KIB, 16 * MIB)
        _check_range("max_frame_bytes", self.max_frame_bytes, 4 * KIB, 64 * MIB)

    @property
    def effective_cpu_seconds(self) -> int:
        if self.cpu_seconds is not None:
            return self.cpu_seconds
        return max(1, math.ceil(self.timeout_ms / 1000)) + 1

    def with_(self, **changes: Any) -> Limits:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Limits:
        """Build from ``chatfn.toml`` ``[runtime]``; unknown keys are an error, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PolicyError(
                f"[runtime] unknown setting(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**dict(data))


@dataclass(frozen=True)
class Policy:
    """What restricted code may reach. The default is the curated stdlib allowlist."""

    allowed_modules: frozenset[str] = STDLIB_ALLOWLIST
    denied_modules: frozenset[str] = DENIED_SUBMODULES
    denied_attributes: frozenset[tuple[str, str]] = DENIED_MODULE_ATTRIBUTES
    allowed_builtins: frozenset[str] = ALLOWED_BUILTINS
    denied_builtins: frozenset[str] = DENIED_BUILTINS
    # Extra import roots (a deployment's installed dependencies), read-only for workers.
    module_paths: tuple[str, ...] = ()
    # Modules the template process imports before forking, so workers start warm.
    preload: tuple[str, ...] = field(default=())
    # The uid/gid workers drop to when chatfn runs as root.
    sandbox_uid: int = 65534
    sandbox_gid: int = 65534
    # The operating-system layers to set up where the machine supports them
    # (sandbox.isolation.LAYERS), and those without which a deployment must not boot.
    layers: frozenset[str] = ALL_LAYERS
    require: frozenset[str] = frozenset()

    def with_modules(self, names: Iterable[str], *, paths: Iterable[str] = ()) -> Policy:
        """Allow more top-level modules (declared dependencies), found under ``paths``."""
        names = tuple(names)
        return dataclasses.replace(
            self,
            allowed_modules=self.allowed_modules | frozenset(names),
            module_paths=self.module_paths + tuple(paths),
            preload=self.preload + names,
        )

    def with_uid(self, uid: int, gid: int) -> Policy:
        return dataclasses.replace(self, sandbox_uid=uid, sandbox_gid=gid)

    def with_layers(self, layers: Iterable[str], require: Iterable[str] = ()) -> Policy:
        return dataclasses.replace(self, layers=frozenset(layers), require=frozenset(require))

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed_modules": sorted(self.allowed_modules),
            "denied_modules": sorted(self.denied_modules),
            "denied_attributes": sorted([m, a] for m, a in self.denied_attributes),
            "allowed_builtins": sorted(self.allowed_builtins),
            "denied_builtins": sorted(self.denied_builtins),
            "module_paths": list(self.module_paths),
            "preload": list(self.preload),
            "sandbox_uid": self.sandbox_uid,
            "sandbox_gid": self.sandbox_gid,
            "layers": sorted(self.layers),
            "require": sorted(self.require),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        return cls(
            allowed_modules=frozenset(data["allowed_modules"]),
            denied_modules=frozenset(data["denied_modules"]),
            denied_attributes=frozenset((m, a) for m, a in data["denied_attributes"]),
            allowed_builtins=frozenset(data["allowed_builtins"]),
            denied_builtins=frozenset(data["denied_builtins"]),
            module_paths=tuple(data["module_paths"]),
            preload=tuple(data["preload"]),
            sandbox_uid=int(data["sandbox_uid"]),
            sandbox_gid=int(data["sandbox_gid"]),
            layers=frozenset(data["layers"]),
            require=frozenset(data["require"]),
        )

    def allows_module(self, name: str) -> bool:
        """May restricted code hold this module?

        Yes for an allowlisted module, any submodule of one (a dependency's own packages)
        unless denied, and a bare package namespace above one (``urllib`` for
        ``urllib.parse``), whose other submodules stay refused.
        """
        if name in self.denied_modules:
            return False
        if name in self.allowed_modules:
            return True
        parts = name.split(".")
        if any(".".join(parts[:i]) in self.allowed_modules for i in range(1, len(parts))):
            return True
        prefix = name + "."
        return any(m.startswith(prefix) for m in self.allowed_modules)


DEFAULT_POLICY = Policy()
DEFAULT_LIMITS = Limits()
