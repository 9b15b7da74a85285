"""A worker's invocation log: a capped byte buffer in shared memory.

User ``print`` output and ``context.log`` lines go here, never into the protocol stream, so
nothing a handler prints can corrupt a frame, and the host still has the lines written
before a timeout or a crash. The host creates the memory (memfd), the worker appends, the
host reads. The layout is a 4-byte length, a truncation flag, then the bytes; the host
clamps the length it reads, so a worker that scribbles on the header gets garbage text at
worst, never more than the capacity.
"""

from __future__ import annotations

import mmap
import os
import struct

_LEN = struct.Struct("<I")
_HEADER = 8  # length (4), truncated flag (1), padding


class LogBuffer:
    __slots__ = ("_capacity", "_mm", "_used")

    def __init__(self, mm: mmap.mmap, capacity: int) -> None:
        self._mm = mm
        self._capacity = capacity
        self._used = 0

    @classmethod
    def create(cls, capacity: int) -> tuple[LogBuffer, int]:
        """Host side: a new buffer and the memfd to hand to the worker."""
        fd = os.memfd_create("chatfn-log", os.MFD_CLOEXEC)
        os.ftruncate(fd, _HEADER + capacity)
        return cls(mmap.mmap(fd, _HEADER + capacity), capacity), fd

    @classmethod
    def attach(cls, fd: int, capacity: int) -> LogBuffer:
        """Worker side: map the memfd received from the host."""
        mm = mmap.mmap(fd, _HEADER + capacity)
        os.close(fd)
        return cls(mm, capacity)

    def reset(self) -> None:
        self._used = 0
        self._mm[:_HEADER] = b"\0" * _HEADER

    def write(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        room = self._capacity - self._used
        if len(data) > room:
            data = data[:room]
            self._mm[4] = 1
        if data:
            start = _HEADER + self._used
            self._mm[start : start + len(data)] = data
            self._used += len(data)
            _LEN.pack_into(self._mm, 0, self._used)

    def read(self) -> tuple[str, bool]:
        """Host side: the text written since the last reset, and whether it was cut."""
        (used,) = _LEN.unpack_from(self._mm, 0)
        used = min(used, self._capacity)
        text = self._mm[_HEADER : _HEADER + used].decode("utf-8", "replace")
        return text, self._mm[4] != 0

    def close(self) -> None:
        self._mm.close()
