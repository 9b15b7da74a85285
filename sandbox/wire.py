"""The wire between host and worker: length-prefixed JSON frames, schema-checked.

A frame is a 4-byte big-endian length followed by that many bytes of JSON (orjson). Both
sides cap the length. Worker-to-host messages are untrusted: ``parse_worker_message`` turns
them into typed values or raises ``ProtocolError``; nothing a worker sends is ever
unpickled, unmarshalled, imported or evaluated.

Host to worker:   invoke {handler, event, ctx} | reply {ok, value | error} | exit
Worker to host:   ready {pid} | call {name, args, kwargs} | result {ok, value | error}
"""

from __future__ import annotations

import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

import orjson

from sandbox.errors import MAX_MESSAGE_CHARS, ChatfnError

HEADER = struct.Struct(">I")
MAX_CALL_NAME = 64
_INITIAL_BUFFER = 64 * 1024
MAX_DETAIL_CHARS = 16 * 1024
# The only outcomes a worker may claim; the rest (timeout, overloaded, ...) are the host's.
WORKER_ERROR_CODES = frozenset(
    {"access_denied", "function_error", "resource_limit", "sandbox_violation"}
)


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame or message."""


class FrameTooLarge(ProtocolError):
    pass


def encode(message: Any, max_bytes: int) -> bytes:
    """One frame; raises FrameTooLarge past ``max_bytes`` and TypeError for non-JSON data."""
    body = orjson.dumps(message)
    if len(body) > max_bytes:
        raise FrameTooLarge(f"frame of {len(body)} bytes exceeds the {max_bytes}-byte cap")
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Reads whole frames from a stream socket, with an optional monotonic deadline.

    Reads land in one reusable buffer (``recv_into``): a fresh large ``bytes`` per read
    would cost an mmap/munmap pair per frame, more than the rest of the round trip.
    """

    __slots__ = ("_buf", "_end", "_max", "_poll", "_sock", "_start")

    def __init__(self, sock: socket.socket, max_bytes: int) -> None:
        self._sock = sock
        self._max = max_bytes
        self._buf = bytearray(_INITIAL_BUFFER)
        self._start = 0
        self._end = 0
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)

    def read(self, deadline: float | None = None) -> Any:
        """The next decoded frame. EOFError when the peer closed, TimeoutError past deadline."""
        while True:
            available = self._end - self._start
            needed = 4
            if available >= 4:
                (size,) = HEADER.unpack_from(self._buf, self._start)
                if size > self._max:
                    raise FrameTooLarge(f"peer announced a {size}-byte frame (cap {self._max})")
                needed = 4 + size
                if available >= needed:
                    return self._take(size)
            self._make_room(needed)
            if deadline is not None:
                remaining_ms = (deadline - time.monotonic()) * 1000.0
                if remaining_ms <= 0 or not self._poll.poll(max(1, int(remaining_ms + 1))):
                    if time.monotonic() >= deadline:
                        raise TimeoutError
                    continue
            with memoryview(self._buf) as view:
                received = self._sock.recv_into(view[self._end :])
            if not received:
                raise EOFError
            self._end += received

    def _take(self, size: int) -> Any:
        begin = self._start + 4
        try:
            with memoryview(self._buf) as view:
                value = orjson.loads(view[begin : begin + size])
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"frame is not valid JSON: {exc}") from None
        self._start = begin + size
        if self._start == self._end:
            self._start = self._end = 0
        return value

    def _make_room(self, needed: int) -> None:
        """Make sure a frame of ``needed`` bytes fits after ``_start``."""
        if len(self._buf) - self._start >= needed and self._end < len(self._buf):
            return
        available = self._end - self._start
        self._buf[:available] = self._buf[self._start : self._end]
        self._start, self._end = 0, available
        if len(self._buf) < max(needed, available + 1):
            self._buf.extend(bytes(max(needed, available + 1) - len(self._buf)))


# ---- worker -> host messages, checked field by field -------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    pid: int


@dataclass(frozen=True, slots=True)
class HostCall:
    name: str
    args: list[Any]
    kwargs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Result:
    ok: bool
    value: Any
    error: ChatfnError | None


WorkerMessage = Ready | HostCall | Result


def parse_worker_message(obj: Any) -> WorkerMessage:
    if type(obj) is not dict:
        raise ProtocolError("message is not an object")
    kind = obj.get("t")
    if kind == "call":
        name, args, kwargs = obj.get("name"), obj.get("args"), obj.get("kwargs")
        if type(name) is not str or not 0 < len(name) <= MAX_CALL_NAME:
            raise ProtocolError("call.name must be a short string")
        if type(args) is not list or type(kwargs) is not dict:
            raise ProtocolError("call.args must be a list and call.kwargs an object")
        return HostCall(name, args, kwargs)
    if kind == "result":
        ok = obj.get("ok")
        if ok is True:
            return Result(True, obj.get("value"), None)
        if ok is False:
            return Result(False, None, _parse_error(obj.get("error")))
        raise ProtocolError("result.ok must be a boolean")
    if kind == "ready":
        pid = obj.get("pid")
        if type(pid) is not int:
            raise ProtocolError("ready.pid must be an integer")
        return Ready(pid)
    raise ProtocolError(f"unknown message type {str(kind)[:32]!r}")


def _parse_error(obj: Any) -> ChatfnError:
    if type(obj) is not dict:
        raise ProtocolError("result.error must be an object")
    code, message, detail = obj.get("code"), obj.get("message"), obj.get("detail")
    if type(code) is not str or type(message) is not str:
        raise ProtocolError("result.error needs string code and message")
    if code not in WORKER_ERROR_CODES:
        raise ProtocolError(f"a worker may not report error code {code[:32]!r}")
    if detail is not None and type(detail) is not str:
        raise ProtocolError("result.error.detail must be a string")
    return ChatfnError.from_dict(
        {
            "code": code,
            "message": message[:MAX_MESSAGE_CHARS],
            "detail": detail[:MAX_DETAIL_CHARS] if detail else None,
        }
    )
