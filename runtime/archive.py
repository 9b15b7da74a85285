"""Function projects as uploaded archives (tar.gz or zip) and back.

Reading is defensive: size-capped (compressed and uncompressed), regular files only (no
links, devices or directories-as-files), no absolute paths and no ``..``. Only the files a
project is made of are kept; a single top-level folder (``functions/...``) is stripped.
"""

from __future__ import annotations

import gzip
import io
import re
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from runtime.project import CODE_FILES, LOCK, MANIFEST, REQUIREMENTS, Project, read_project
from sandbox.errors import InvalidRequest

MAX_ARCHIVE_BYTES = 16 * 1024 * 1024
MAX_UNPACKED_BYTES = 32 * 1024 * 1024
MAX_MEMBERS = 2000
MAX_FILE_BYTES = 1024 * 1024
PROJECT_FILES = frozenset({*CODE_FILES, MANIFEST, REQUIREMENTS, LOCK})


def _checked_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise InvalidRequest(f"archive member {name!r} has an absolute path")
    if any(part == ".." for part in path.parts):
        raise InvalidRequest(f"archive member {name!r} leaves the project folder ('..')")
    if "\\" in name:
        raise InvalidRequest(f"archive member {name!r} has a backslash in its path")
    return path


def _members(data: bytes) -> dict[PurePosixPath, bytes]:
    """Every regular file of a tar.gz or zip, checked; InvalidRequest otherwise."""
    if len(data) > MAX_ARCHIVE_BYTES:
        raise InvalidRequest(f"the archive is larger than {MAX_ARCHIVE_BYTES // 1024 // 1024} MiB")
    files: dict[PurePosixPath, bytes] = {}
    total = 0
    count = 0

    def counted() -> None:
        """Every member counts toward the cap, kept or not, directories included."""
        nonlocal count
        count += 1
        if count > MAX_MEMBERS:
            raise InvalidRequest(f"the archive has more than {MAX_MEMBERS} members")

    def add(name: str, size: int, read: object) -> None:
        nonlocal total
        path = _checked_path(name)
        total += size
        if total > MAX_UNPACKED_BYTES:
            raise InvalidRequest(
                f"the archive unpacks to more than {MAX_UNPACKED_BYTES // 1024 // 1024} MiB"
            )
        if (path.name in PROJECT_FILES or path.suffix == ".py") and len(path.parts) <= 2:
            if size > MAX_FILE_BYTES:
                raise InvalidRequest(f"{name} is larger than {MAX_FILE_BYTES // 1024} KiB")
            assert callable(read)
            files[path] = read()

    if data[:2] == b"\x1f\x8b":
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
                for member in tar:
                    counted()
                    _checked_path(member.name)
                    if member.isdir():
                        continue
                    if not member.isfile():
                        raise InvalidRequest(
                            f"archive member {member.name!r} is a link or special file"
                        )
                    handle = tar.extractfile(member)
                    assert handle is not None
                    add(member.name, member.size, handle.read)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise InvalidRequest(f"the archive is not a valid tar.gz ({exc})") from None
    elif data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                infos = archive.infolist()
                if len(infos) > MAX_MEMBERS:
                    raise InvalidRequest(f"the archive has more than {MAX_MEMBERS} members")
                for info in infos:
                    counted()
                    _checked_path(info.filename)
                    if info.is_dir():
                        continue
                    mode = info.external_attr >> 16
                    if mode and (mode & 0o170000) not in (0, 0o100000):
                        raise InvalidRequest(
                            f"archive member {info.filename!r} is a link or special file"
                        )
                    add(info.filename, info.file_size, lambda i=info: archive.read(i))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as exc:
            raise InvalidRequest(f"the archive is not a valid zip ({exc})") from None
    else:
        raise InvalidRequest("the body must be a tar.gz or zip archive of the project")
    return files


def read_archive(data: bytes) -> Project:
    """The project in an uploaded archive. Files may sit at the top or in one folder."""
    members = _members(data)
    folders = {p.parts[0] for p in members if len(p.parts) == 2}
    top = {p for p in members if len(p.parts) == 1}
    if top:
        chosen = {p.name: raw for p, raw in members.items() if len(p.parts) == 1}
    elif len(folders) == 1:
        chosen = {p.name: raw for p, raw in members.items() if len(p.parts) == 2}
    else:
        raise InvalidRequest("the archive has no project files at its top or in one folder")
    texts: dict[str, str] = {}
    for name, raw in chosen.items():
        try:
            texts[name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(f"{name} is not valid UTF-8") from None
    project = Project(
        files={n: t for n, t in texts.items() if n.endswith(".py")},
        manifest=texts.get(MANIFEST),
        requirements=texts.get(REQUIREMENTS),
        lock=texts.get(LOCK),
    )
    project.limits()
    return project


def pack_project(directory: str | Path) -> bytes:
    """The project in ``directory`` as a tar.gz for ``POST .../deployments``: its code
    files, chatfn.toml, requirements.in and requirements.txt, at the archive's top level,
    nothing else. The project is read and checked first (``runtime.project.read_project``:
    an ``InvalidRequest`` names the problem). The archive is deterministic: the same files
    give the same bytes."""
    project = read_project(directory)
    members = dict(project.files)
    for name, text in ((MANIFEST, project.manifest), (REQUIREMENTS, project.requirements)):
        if text is not None:
            members[name] = text
    if project.lock is not None:
        members[LOCK] = project.lock
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in sorted(members):
            data = members[name].encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
