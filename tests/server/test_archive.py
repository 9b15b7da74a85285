"""``runtime.archive``: uploaded projects (tar.gz or zip) read defensively, each bad input
refused with an InvalidRequest that says what is wrong; ``pack_project`` round trip."""

from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from runtime import archive
from runtime.archive import pack_project, read_archive
from runtime.project import Project, read_project
from sandbox.errors import InvalidRequest
from tests.server.conftest import ACCEPT_ALL, sources, tar_gz, zip_bytes

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "password_functions"
Pack = Callable[..., bytes]
HANDLER = sources(user_attempted_start_session=ACCEPT_ALL)
SOURCE = HANDLER["user_attempted_start_session.py"]


def refused(data: bytes, *fragments: str) -> str:
    with pytest.raises(InvalidRequest) as caught:
        read_archive(data)
    message = caught.value.message
    for fragment in fragments:
        assert fragment in message, message
    return message


def tar_with(*members: tarfile.TarInfo, data: dict[str, bytes] | None = None) -> bytes:
    """A tar.gz of the handler plus the given raw members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        handler = SOURCE.encode()
        info = tarfile.TarInfo("user_attempted_start_session.py")
        info.size = len(handler)
        tar.addfile(info, io.BytesIO(handler))
        for member in members:
            payload = (data or {}).get(member.name)
            tar.addfile(member, io.BytesIO(payload) if payload is not None else None)
    return buffer.getvalue()


def regular(name: str, payload: bytes) -> tuple[tarfile.TarInfo, dict[str, bytes]]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info, {name: payload}


# -- what is accepted ----------------------------------------------------------------------


@pytest.mark.parametrize("pack", [tar_gz, zip_bytes], ids=["tar.gz", "zip"])
def test_a_project_at_the_top_is_read(pack: Pack) -> None:
    files = {
        **HANDLER,
        "init.py": "X = 1\n",
        "chatfn.toml": "[runtime]\ntimeout_ms = 1000\n",
        "requirements.in": "",
        "README.md": "ignored",
    }
    project = read_archive(pack(files))
    assert project.files == {"user_attempted_start_session.py": SOURCE, "init.py": "X = 1\n"}
    assert project.manifest == "[runtime]\ntimeout_ms = 1000\n"
    assert project.requirements == ""
    assert project.lock is None
    assert project.limits().timeout_ms == 1000


@pytest.mark.parametrize("pack", [tar_gz, zip_bytes], ids=["tar.gz", "zip"])
def test_a_project_in_one_folder_is_stripped(pack: Pack) -> None:
    files = {**HANDLER, "tests/test_it.py": "def test(): pass\n"}
    project = read_archive(pack(files, "functions"))
    assert project.files == {"user_attempted_start_session.py": SOURCE}


def test_directory_entries_are_skipped() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("functions/", "")
        z.writestr("functions/user_attempted_start_session.py", SOURCE)
    assert read_archive(buffer.getvalue()).files == {"user_attempted_start_session.py": SOURCE}
    folder = tarfile.TarInfo("functions")
    folder.type = tarfile.DIRTYPE
    data = tar_gz({"functions/user_attempted_start_session.py": SOURCE})
    assert read_archive(data).files == {"user_attempted_start_session.py": SOURCE}
    assert read_archive(tar_with(folder)).files == {"user_attempted_start_session.py": SOURCE}


@pytest.mark.parametrize("pack", [tar_gz, zip_bytes], ids=["tar.gz", "zip"])
def test_a_project_in_two_folders_is_refused(pack: Pack) -> None:
    data = pack(
        {
            "a/user_attempted_start_session.py": SOURCE,
            "b/user_started_session.py": SOURCE,
        }
    )
    refused(data, "top", "one folder")


def test_pack_project_round_trips_the_fixture_project() -> None:
    data = pack_project(FIXTURE)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = sorted(tar.getnames())
    # Only the project's own files: not its tests/ folder.
    assert names == ["chatfn.toml", "user_attempted_start_session.py", "user_started_session.py"]
    project = read_archive(data)
    assert project == read_project(FIXTURE)
    assert isinstance(project, Project)
    assert project.handlers == {"user_attempted_start_session", "user_started_session"}


def test_pack_project_refuses_a_bad_project(tmp_path: Path) -> None:
    (tmp_path / "helper.py").write_text("x = 1\n")
    with pytest.raises(InvalidRequest, match=r"helper\.py is not an event handler"):
        pack_project(tmp_path)


# -- what is refused -----------------------------------------------------------------------


@pytest.mark.parametrize("pack", [tar_gz, zip_bytes], ids=["tar.gz", "zip"])
@pytest.mark.parametrize(
    "name",
    ["/etc/user_attempted_start_session.py", "/user_started_session.py", "C:/x/init.py", "\\x.py"],
)
def test_an_absolute_path_is_refused(pack: Pack, name: str) -> None:
    refused(pack({**HANDLER, name: "x = 1\n"}), "absolute path", repr(name))


@pytest.mark.parametrize("pack", [tar_gz, zip_bytes], ids=["tar.gz", "zip"])
@pytest.mark.parametrize(
    "name", ["../user_started_session.py", "functions/../../init.py", "a/../../../etc/passwd", ".."]
)
def test_a_parent_path_is_refused(pack: Pack, name: str) -> None:
    refused(pack({**HANDLER, name: "x = 1\n"}), "'..'")


def test_a_backslash_path_is_refused() -> None:
    refused(zip_bytes({**HANDLER, "functions\\init.py": "X = 1\n"}), "backslash")


@pytest.mark.parametrize(
    ("kind", "target"),
    [
        (tarfile.SYMTYPE, "/etc/passwd"),
        (tarfile.SYMTYPE, "user_attempted_start_session.py"),
        (tarfile.LNKTYPE, "user_attempted_start_session.py"),
        (tarfile.LNKTYPE, "/etc/shadow"),
    ],
    ids=["symlink-out", "symlink-in", "hardlink-in", "hardlink-out"],
)
def test_tar_links_are_refused(kind: bytes, target: str) -> None:
    link = tarfile.TarInfo("init.py")
    link.type = kind
    link.linkname = target
    refused(tar_with(link), "'init.py'", "link or special file")


@pytest.mark.parametrize(
    "kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE], ids=["chr", "blk", "fifo"]
)
def test_tar_special_files_are_refused(kind: bytes) -> None:
    special = tarfile.TarInfo("chatfn.toml")
    special.type = kind
    refused(tar_with(special), "link or special file")


def test_a_tar_link_outside_the_project_files_is_refused_too() -> None:
    link = tarfile.TarInfo("docs/readme")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    refused(tar_with(link), "link or special file")


@pytest.mark.parametrize("name", ["init.py", "docs/anything"])
def test_a_zip_symlink_entry_is_refused(name: str) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("user_attempted_start_session.py", SOURCE)
        link = zipfile.ZipInfo(name)
        link.create_system = 3  # unix
        link.external_attr = (0o120777 << 16) | 0x20
        z.writestr(link, "/etc/passwd")
    refused(buffer.getvalue(), repr(name), "link or special file")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello world",
        b"PK",
        SOURCE.encode(),
        gzip.compress(b"just gzip, not a tar"),
        b"\x1f\x8b\x08\x00truncated",
        tar_gz(HANDLER)[: len(tar_gz(HANDLER)) // 2],
        b"PK\x03\x04" + b"\x00" * 40,
        zip_bytes(HANDLER)[:-30],
    ],
    ids=[
        "empty",
        "text",
        "pk-short",
        "python-source",
        "gzip-not-tar",
        "truncated-gzip",
        "truncated-tar-gz",
        "zip-header-only",
        "truncated-zip",
    ],
)
def test_not_an_archive_is_refused(data: bytes) -> None:
    message = refused(data)
    assert any(word in message for word in ("tar.gz", "zip")), message


def test_a_plain_tar_is_refused() -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("user_attempted_start_session.py")
        info.size = len(SOURCE)
        tar.addfile(info, io.BytesIO(SOURCE.encode()))
    refused(buffer.getvalue(), "tar.gz or zip")


def test_an_archive_over_the_size_cap_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    data = tar_gz(HANDLER)
    monkeypatch.setattr(archive, "MAX_ARCHIVE_BYTES", len(data) - 1)
    refused(data, "larger than")
    monkeypatch.setattr(archive, "MAX_ARCHIVE_BYTES", len(data))
    assert read_archive(data).files == {"user_attempted_start_session.py": SOURCE}


@pytest.mark.parametrize("pack", [tar_gz, zip_bytes], ids=["tar.gz", "zip"])
def test_too_many_project_files_are_refused(pack: Pack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive, "MAX_MEMBERS", 5)
    files = {**HANDLER, **{f"dir{i}/user_started_session.py": "" for i in range(5)}}
    refused(pack(files), "more than 5 members")


@pytest.mark.parametrize("pack", [tar_gz, zip_bytes], ids=["tar.gz", "zip"])
def test_too_many_members_of_any_kind_are_refused(
    pack: Pack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The member cap bounds the work of reading an archive: files that are not part of a
    project (docs, data, deeper folders) count too."""
    monkeypatch.setattr(archive, "MAX_MEMBERS", 5)
    files = {**HANDLER, **{f"docs/page{i}.md": "" for i in range(10)}}
    refused(pack(files), "more than 5 members")


@pytest.mark.parametrize("pack", [tar_gz, zip_bytes], ids=["tar.gz", "zip"])
def test_an_unpacked_size_bomb_is_refused(pack: Pack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive, "MAX_UNPACKED_BYTES", 64 * 1024)
    # Compresses to a few hundred bytes; unpacks past the cap. Not a project file: it
    # counts all the same.
    data = pack({**HANDLER, "data/zeros.bin": b"\x00" * (256 * 1024)})
    assert len(data) < 4096
    refused(data, "unpacks to more than")


def test_a_project_file_over_the_file_cap_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive, "MAX_FILE_BYTES", 1024)
    big = "# padding\n" * 200 + SOURCE
    refused(tar_gz(sources(user_attempted_start_session=big)), "larger than")


def test_a_zip_that_lies_about_its_sizes_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The declared size is what is checked; a member whose data is bigger than declared
    must not get through (zipfile checks the CRC and the length)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("user_attempted_start_session.py", SOURCE + "#" * 10_000)
    data = bytearray(buffer.getvalue())
    # Patch the declared uncompressed size (local header and central directory) to 10.
    real = len(SOURCE) + 10_000
    needle = real.to_bytes(4, "little")
    assert data.count(needle) == 2
    data = bytearray(bytes(data).replace(needle, (10).to_bytes(4, "little")))
    refused(bytes(data), "not a valid zip")


@pytest.mark.parametrize("pack", [tar_gz, zip_bytes], ids=["tar.gz", "zip"])
@pytest.mark.parametrize(
    "name", ["user_attempted_start_session.py", "init.py", "chatfn.toml", "requirements.txt"]
)
def test_a_non_utf8_file_is_refused(pack: Pack, name: str) -> None:
    files: dict[str, str | bytes] = {**HANDLER, name: b"# caf\xe9\n\xff\xfe"}
    refused(pack(files), name, "not valid UTF-8")


@pytest.mark.parametrize("pack", [tar_gz, zip_bytes], ids=["tar.gz", "zip"])
@pytest.mark.parametrize("folder", [None, "functions"])
def test_an_unknown_python_file_is_refused(pack: Pack, folder: str | None) -> None:
    data = pack({**HANDLER, "helpers.py": "def helper(): pass\n"}, folder)
    refused(data, "helpers.py", "is not an event handler")


def test_an_archive_without_handlers_is_refused() -> None:
    refused(tar_gz({"init.py": "X = 1\n"}), "no event handler")
    refused(tar_gz({"README.md": "hello"}), "no project files")
    refused(zip_bytes({"a/b/c/user_attempted_start_session.py": SOURCE}), "no project files")


def test_a_bad_manifest_is_refused() -> None:
    data = tar_gz({**HANDLER, "chatfn.toml": "[runtime\n"})
    refused(data, "chatfn.toml")
    data = tar_gz({**HANDLER, "chatfn.toml": "[runtime]\nmemory_mb = 'lots'\n"})
    refused(data, "chatfn.toml")
