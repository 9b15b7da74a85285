"""Hand-built wheels and an offline pip for the tests that deploy declared dependencies.

``build_wheel`` writes a tiny pure-Python wheel into a wheelhouse directory; ``point_pip_at``
(or ``only_wheelhouse`` where no monkeypatch fixture is at hand, as in module-scoped fixtures)
makes pip and pip-compile, which run as subprocesses and inherit the environment, see that
wheelhouse and nothing else: no index, no pip configuration file.
"""

from __future__ import annotations

import base64
import hashlib
import os
import textwrap
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest


def _record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(
    directory: Path,
    name: str,
    version: str,
    files: Mapping[str, str],
    requires: Sequence[str] = (),
) -> Path:
    """A pure-Python wheel: ``files`` (path -> source) plus METADATA, WHEEL and RECORD.
    Entries carry a fixed timestamp, so the same inputs give the same bytes (and hash)."""
    stem = name.replace("-", "_")
    dist_info = f"{stem}-{version}.dist-info"
    entries = {path: textwrap.dedent(text) for path, text in files.items()}
    entries[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        + "".join(f"Requires-Dist: {r}\n" for r in requires)
    )
    entries[f"{dist_info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: chatfn-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = [
        f"{path},sha256={_record_hash(text.encode())},{len(text.encode())}"
        for path, text in entries.items()
    ]
    entries[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    wheel = directory / f"{stem}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in entries.items():
            info = zipfile.ZipInfo(path, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, text)
    return wheel


def sha256_of(path: Path) -> str:
    """A file's hash as a lock's ``--hash=`` gives it."""
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def point_pip_at(mp: pytest.MonkeyPatch, wheelhouse: Path) -> None:
    """pip (and pip-compile) see ``wheelhouse`` and nothing else."""
    mp.setenv("PIP_NO_INDEX", "1")
    mp.setenv("PIP_FIND_LINKS", str(wheelhouse))
    mp.setenv("PIP_CONFIG_FILE", os.devnull)


@contextmanager
def only_wheelhouse(wheelhouse: Path) -> Iterator[None]:
    """``point_pip_at`` for the duration of a ``with`` block."""
    with pytest.MonkeyPatch.context() as mp:
        point_pip_at(mp, wheelhouse)
        yield
