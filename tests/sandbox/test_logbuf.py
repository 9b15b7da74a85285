"""The shared log buffer: capped, marked when cut, clamped against a lying writer."""

from __future__ import annotations

import struct

from sandbox.logbuf import LogBuffer


def test_write_read_reset() -> None:
    log, fd = LogBuffer.create(16)
    worker_side = LogBuffer.attach(fd, 16)
    worker_side.write("héllo ")
    worker_side.write("world")
    assert log.read() == ("héllo world", False)
    worker_side.write("and much more than fits")
    text, truncated = log.read()
    assert truncated and len(text.encode()) <= 16
    log.reset()
    worker_side.reset()
    assert log.read() == ("", False)


def test_reader_clamps_a_forged_length() -> None:
    log, fd = LogBuffer.create(8)
    worker_side = LogBuffer.attach(fd, 8)
    worker_side.write("abc")
    struct.pack_into("<I", worker_side._mm, 0, 2**31)
    text, _ = log.read()
    assert len(text) <= 8
