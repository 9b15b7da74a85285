"""Declared dependencies (DESIGN section 4): ``requirements.in`` checked, resolved with
pip-tools into a lock with hashes, installed once per lock into a content-addressed
environment, verified with importlib-metadata, and turned into the import allowlist.

    requirements.in --check_requirements--> [Requirement]
                    --resolve (pip-compile --generate-hashes)--> requirements.txt (lock)
    lock --parse_lock--> [Pin] --ensure_environment--> envs/<sha256>/ (read-only)
    Environment.modules_of(declared names) -> the top-level modules user code may import

pip runs in a subprocess with the machine's pip configuration (index, find-links), so an
offline wheelhouse works. It installs wheels only (``--only-binary :all:``): building an
sdist would run the package's build code on the host.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from sandbox.errors import ChatfnError

PIP_TIMEOUT_S = 900
ENV_MARKER = ".chatfn-environment"
# Lock lines that only say where packages come from or in what form: the server's pip
# configuration decides where, and it installs wheels only; so they are ignored.
_INDEX_OPTIONS = (
    "--index-url", "-i", "--extra-index-url", "--find-links", "-f", "--trusted-host",
    "--only-binary", "--prefer-binary",
)  # fmt: skip

Progress = Callable[[str, int | None, int | None], None]


def no_progress(_message: str, _done: int | None, _total: int | None) -> None:
    pass


class DependencyError(ChatfnError):
    """A requirement that cannot be used, resolved, installed or verified. ``file`` and
    ``line`` point at the offending line when there is one."""

    code = "dependency_error"

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None):
        super().__init__(message)
        self.file = file
        self.line = line

    def to_error(self) -> dict[str, object]:
        return {"file": self.file, "line": self.line, "message": self.message}


@dataclass(frozen=True)
class Pin:
    """One locked distribution: ``name==version`` with its allowed hashes."""

    name: str
    version: str
    hashes: tuple[str, ...]

    def line(self) -> str:
        hashes = "".join(f" --hash={h}" for h in sorted(self.hashes))
        return f"{self.name}=={self.version}{hashes}"


@dataclass(frozen=True)
class Environment:
    """An installed lock: its directory and, per distribution, version and modules."""

    path: Path
    key: str
    versions: dict[str, str]
    modules: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def modules_of(self, names: Iterable[str]) -> list[str]:
        """The top-level modules user code may import: those of the declared
        distributions only (their own dependencies stay internal)."""
        out: list[str] = []
        for name in names:
            out.extend(self.modules.get(canonicalize_name(name), ()))
        return sorted(set(out))


# -- requirements.in ---------------------------------------------------------------------------


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) with comments dropped and continuations joined."""
    out: list[tuple[int, str]] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if not buffer:
            start = number
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        if buffer.strip():
            out.append((start, buffer.strip()))
        buffer = ""
    if buffer.strip():
        out.append((start, buffer.strip()))
    return out


def check_requirements(text: str, file: str = "requirements.in") -> list[Requirement]:
    """The declared requirements; DependencyError naming the line for anything that is
    not a plain ``name[extras] specifier ; marker`` from the package index."""
    requirements: list[Requirement] = []
    for number, line in _logical_lines(text):
        if line.startswith("-"):
            raise DependencyError(
                f"{file}:{number}: options ({line.split()[0]}) are not allowed; "
                "declare packages by name",
                file=file,
                line=number,
            )
        if "://" in line or line.startswith((".", "/", "~")) or os.sep in line.split(";")[0]:
            raise DependencyError(
                f"{file}:{number}: {line!r} is a URL or a local path; only packages from "
                "the package index can be declared",
                file=file,
                line=number,
            )
        if re.search(r"\.(whl|zip|tar|tgz|tar\.gz|tar\.bz2|tar\.xz)\s*(;|$)", line):
            raise DependencyError(
                f"{file}:{number}: {line!r} is a local path to an archive; only packages "
                "from the package index can be declared",
                file=file,
                line=number,
            )
        try:
            requirement = Requirement(line)
        except InvalidRequirement as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "syntax error"
            raise DependencyError(
                f"{file}:{number}: {line!r} is not a valid requirement ({reason})",
                file=file,
                line=number,
            ) from None
        if requirement.url:
            raise DependencyError(
                f"{file}:{number}: {line!r} is a direct reference; only packages from the "
                "package index can be declared",
                file=file,
                line=number,
            )
        requirements.append(requirement)
    return requirements


# -- the lock ----------------------------------------------------------------------------------


def parse_lock(text: str, file: str = "requirements.txt") -> list[Pin]:
    """Every pin of a pip-compile lock; each must be ``name==version`` with hashes."""
    pins: dict[str, Pin] = {}
    for number, line in _logical_lines(text):
        if line.startswith(_INDEX_OPTIONS):
            continue
        if line.startswith("-"):
            raise DependencyError(
                f"{file}:{number}: option {line.split()[0]} is not allowed in a lock",
                file=file,
                line=number,
            )
        spec, *options = line.split(" --")
        hashes = tuple(o.removeprefix("hash=").strip() for o in options if o.startswith("hash="))
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)", spec.strip())
        if match is None:
            raise DependencyError(
                f"{file}:{number}: {spec.strip()!r} is not pinned as name==version; "
                "run `chatfn lock` to write the lock",
                file=file,
                line=number,
            )
        if not hashes:
            raise DependencyError(
                f"{file}:{number}: {match[1]} has no --hash; run `chatfn lock`",
                file=file,
                line=number,
            )
        name = canonicalize_name(match[1])
        pins[name] = Pin(name, match[3], hashes)
    return sorted(pins.values(), key=lambda p: p.name)


def check_lock_covers(requirements: list[Requirement], pins: list[Pin]) -> None:
    """Every declared requirement is locked at a version it accepts (else the lock is
    stale: requirements.in changed after ``chatfn lock``)."""
    locked = {p.name: p.version for p in pins}
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = locked.get(canonicalize_name(requirement.name))
        if version is None:
            raise DependencyError(
                f"requirements.txt does not lock {requirement.name}; run `chatfn lock`",
                file="requirements.txt",
            )
        try:
            accepted = requirement.specifier.contains(Version(version), prereleases=True)
        except InvalidVersion:
            accepted = False
        if not accepted:
            raise DependencyError(
                f"requirements.txt locks {requirement.name}=={version}, which does not "
                f"satisfy {requirement}; run `chatfn lock`",
                file="requirements.txt",
            )


def lock_key(pins: list[Pin]) -> str:
    """The content address of an environment: the pins, their hashes, and the
    interpreter and machine the wheels are for."""
    tag = f"{sys.implementation.cache_tag}-{os.uname().machine}"
    text = tag + "\n" + "\n".join(p.line() for p in pins)
    return hashlib.sha256(text.encode()).hexdigest()


# -- pip ---------------------------------------------------------------------------------------


def _pip_env() -> dict[str, str]:
    """The host environment minus chatfn's own variables (keys stay out of subprocesses)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CHATFN_")}


def _pip_failure(output: str, what: str) -> DependencyError:
    """One clear line from pip's output: the requirement pip could not satisfy."""
    patterns = [
        r"Could not find a version that satisfies the requirement ([^\s]+)"
        r"(?: \(from versions: ([^)]*)\))?",
        r"No matching distribution found for ([^\s]+)",
        r"Cannot install (.+?) because these package versions have conflicting dependencies",
        r"THESE PACKAGES DO NOT MATCH THE HASHES.*?\n\s+([^\s]+)",
    ]
    for pattern in patterns:
        match = re.search(pattern, output, re.DOTALL)
        if match:
            requirement = match[1]
            if "satisfies" in pattern:
                versions = [v for v in (match[2] or "").split(", ") if v and v != "none"]
                shown = ", ".join(versions[-8:])
                if len(versions) > 8:
                    shown = "..., " + shown
                return DependencyError(
                    f"{what}: no version of {requirement} matches"
                    + (f" (available: {shown})" if shown else "")
                )
            if "conflicting" in pattern:
                return DependencyError(f"{what}: conflicting requirements: {requirement}")
            if "HASHES" in pattern:
                return DependencyError(f"{what}: {requirement} does not match its locked hash")
            return DependencyError(f"{what}: no distribution found for {requirement}")
    errors = [line.strip() for line in output.splitlines() if line.strip().startswith("ERROR")]
    last = errors[-1] if errors else (output.strip().splitlines() or ["pip failed"])[-1]
    return DependencyError(f"{what}: {last.removeprefix('ERROR: ')[:500]}")


def resolve(requirements_text: str, progress: Progress = no_progress) -> str:
    """Resolve requirements.in into a lock with hashes (``pip-compile``)."""
    check_requirements(requirements_text)
    progress("resolving requirements.in", None, None)
    with tempfile.TemporaryDirectory(prefix="chatfn-lock-") as tmp:
        source, output = Path(tmp, "requirements.in"), Path(tmp, "requirements.txt")
        source.write_text(requirements_text, encoding="utf-8")
        command = [
            sys.executable, "-m", "piptools", "compile", "--quiet", "--generate-hashes",
            "--strip-extras", "--no-header", "--no-emit-index-url", "--no-emit-find-links",
            "--no-emit-trusted-host", "--no-emit-options", "--allow-unsafe",
            "--pip-args", "--only-binary=:all: --disable-pip-version-check",
            "--output-file", output.name, source.name,
        ]  # fmt: skip
        try:
            done = subprocess.run(
                command,
                cwd=tmp,
                env=_pip_env(),
                capture_output=True,
                text=True,
                timeout=PIP_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise DependencyError(
                f"resolving requirements.in took longer than {PIP_TIMEOUT_S} s"
            ) from None
        if done.returncode != 0:
            error = _pip_failure(done.stderr + done.stdout, "cannot resolve requirements.in")
            error.file, error.line = "requirements.in", _line_of(requirements_text, error.message)
            raise error
        return output.read_text(encoding="utf-8")


def _line_of(requirements_text: str, message: str) -> int | None:
    """The line of requirements.in whose package the pip message is about, if one is."""
    mentioned = {canonicalize_name(m) for m in re.findall(r"[A-Za-z0-9][A-Za-z0-9._-]*", message)}
    for number, line in _logical_lines(requirements_text):
        try:
            if canonicalize_name(Requirement(line).name) in mentioned:
                return number
        except InvalidRequirement:
            continue
    return None


def ensure_environment(
    pins: list[Pin], envs_dir: Path, progress: Progress = no_progress
) -> Environment:
    """The environment for ``pins``, installed if this lock never was. Two deploys of one
    lock at once install it once: a file lock per key, a temporary directory, and an
    atomic rename."""
    key = lock_key(pins)
    target = envs_dir / key
    if (target / ENV_MARKER).is_file():
        return load_environment(target, pins)
    envs_dir.mkdir(parents=True, exist_ok=True)
    with open(envs_dir / f".lock-{key}", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if (target / ENV_MARKER).is_file():
            return load_environment(target, pins)
        staging = envs_dir / f".staging-{key[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            _install(pins, staging, progress)
            progress("verifying", len(pins), len(pins))
            environment = load_environment(staging, pins)
            (staging / ENV_MARKER).write_text(key + "\n")
            _make_read_only(staging)
            if target.exists():  # a leftover without its marker (an interrupted install)
                shutil.rmtree(target)
            os.rename(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return Environment(target, key, environment.versions, environment.modules)


def _install(pins: list[Pin], staging: Path, progress: Progress) -> None:
    requirements = staging.with_name(staging.name + ".txt")
    requirements.write_text("".join(p.line() + "\n" for p in pins), encoding="utf-8")
    command = [
        sys.executable, "-m", "pip", "install", "--require-hashes", "--no-deps",
        "--only-binary=:all:", "--disable-pip-version-check", "--no-input", "--progress-bar=off",
        "--target", str(staging), "-r", str(requirements),
    ]  # fmt: skip
    total = len(pins)
    progress(f"installing {total} distributions", 0, total)
    seen = 0
    output: list[str] = []
    try:
        with subprocess.Popen(
            command,
            env=_pip_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                output.append(line)
                # "Collecting name==v" from an index; "Processing /path.whl" from find-links.
                if line.startswith(("Collecting ", "Processing ")):
                    seen += 1
                    progress(f"installing {Path(line.split()[1]).name}", min(seen, total), total)
            code = proc.wait(timeout=PIP_TIMEOUT_S)
    finally:
        requirements.unlink(missing_ok=True)
    if code != 0:
        raise _pip_failure("".join(output), "cannot install requirements.txt")


def _make_read_only(root: Path) -> None:
    """Everyone may read and import; no one, the sandbox's uid included, may write."""
    for directory, _dirs, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(directory, name), 0o444)
        os.chmod(directory, 0o555)


_verified: dict[tuple[Path, str], Environment] = {}
_verified_lock = threading.Lock()


def load_environment(path: Path, pins: list[Pin]) -> Environment:
    """Verify an installed environment against its pins and map its modules (once per
    process: environments are content-addressed and read-only)."""
    key = (path, lock_key(pins))
    with _verified_lock:
        cached = _verified.get(key)
    if cached is not None:
        return cached
    environment = _verify(path, pins)
    if (path / ENV_MARKER).is_file():
        with _verified_lock:
            _verified[key] = environment
    return environment


def _verify(path: Path, pins: list[Pin]) -> Environment:
    found: dict[str, importlib.metadata.Distribution] = {}
    for dist in importlib.metadata.distributions(path=[str(path)]):
        name = dist.metadata["Name"]
        if name:
            found[canonicalize_name(name)] = dist
    versions: dict[str, str] = {}
    modules: dict[str, tuple[str, ...]] = {}
    for pin in pins:
        installed = found.get(pin.name)
        if installed is None:
            raise DependencyError(f"{pin.name} {pin.version} is missing after installation")
        if Version(installed.version) != Version(pin.version):
            raise DependencyError(
                f"{pin.name} is installed at {installed.version}, but the lock says {pin.version}"
            )
        versions[pin.name] = installed.version
        modules[pin.name] = tuple(sorted(top_level_modules(installed)))
    return Environment(path, path.name, versions, modules)


def top_level_modules(dist: importlib.metadata.Distribution) -> set[str]:
    """The importable top-level names a distribution installs, read from its RECORD."""
    names: set[str] = set()
    for file in dist.files or []:
        parts = file.parts
        top = parts[0]
        if top.endswith((".dist-info", ".data", ".egg-info")) or top in ("..", "bin"):
            continue
        if len(parts) == 1:
            if top.endswith(".py"):
                names.add(top[:-3])
            elif top.endswith((".so", ".pyd")):
                names.add(top.split(".")[0])
        elif top != "__pycache__" and parts[-1].endswith((".py", ".so", ".pyd")):
            names.add(top)
    return {n for n in names if n.isidentifier() and not n.startswith("_")}


def check_shadowing(environment: Environment, declared: Iterable[str]) -> None:
    """A declared distribution may not provide a module named like a stdlib module."""
    for name in declared:
        for module in environment.modules.get(canonicalize_name(name), ()):
            if module in sys.stdlib_module_names:
                raise DependencyError(
                    f"{name} provides a module named {module!r}, which would shadow the "
                    "standard library",
                    file="requirements.in",
                )
