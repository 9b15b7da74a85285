"""Frames and the schema of worker messages: caps, garbage, partial reads, deadlines."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox.errors import AccessDenied, FunctionError
from sandbox.wire import (
    HEADER,
    FrameReader,
    FrameTooLarge,
    HostCall,
    ProtocolError,
    Ready,
    Result,
    encode,
    parse_worker_message,
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_round_trip_and_split_delivery(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    frame = encode({"t": "ready", "pid": 7}, 1024)
    a.sendall(frame[:3])
    a.sendall(frame[3:] + encode([1, 2], 1024))
    reader = FrameReader(b, 1024)
    assert reader.read() == {"t": "ready", "pid": 7}
    assert reader.read() == [1, 2]


def test_encode_refuses_oversized_and_non_json() -> None:
    with pytest.raises(FrameTooLarge):
        encode("x" * 100, 50)
    with pytest.raises(TypeError):
        encode({"a": object()}, 1024)


def test_reader_refuses_announced_oversize(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(HEADER.pack(10_000_000))
    with pytest.raises(FrameTooLarge):
        FrameReader(b, 1024).read()


def test_reader_refuses_garbage(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(HEADER.pack(4) + b"\x80\x04K.")  # a pickle, never unpickled
    with pytest.raises(ProtocolError):
        FrameReader(b, 1024).read()


def test_reader_deadline_and_eof(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    reader = FrameReader(b, 1024)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        reader.read(time.monotonic() + 0.05)
    assert time.monotonic() - started < 0.5
    a.close()
    with pytest.raises(EOFError):
        reader.read(time.monotonic() + 1)


def test_parse_worker_messages() -> None:
    assert parse_worker_message({"t": "ready", "pid": 3}) == Ready(3)
    call = parse_worker_message(
        {"t": "call", "name": "users.get_user", "args": ["a"], "kwargs": {}}
    )
    assert call == HostCall("users.get_user", ["a"], {})
    ok = parse_worker_message({"t": "result", "ok": True, "value": [1]})
    assert ok == Result(True, [1], None)
    failed = parse_worker_message(
        {"t": "result", "ok": False, "error": {"code": "access_denied", "message": "no"}}
    )
    assert isinstance(failed, Result) and isinstance(failed.error, AccessDenied)


@pytest.mark.parametrize(
    "message",
    [
        [],
        {"t": "nope"},
        {"t": "ready", "pid": "1"},
        {"t": "call", "name": "", "args": [], "kwargs": {}},
        {"t": "call", "name": "x" * 65, "args": [], "kwargs": {}},
        {"t": "call", "name": "a", "args": {}, "kwargs": {}},
        {"t": "result", "ok": "yes"},
        {"t": "result", "ok": False, "error": "boom"},
        {"t": "result", "ok": False, "error": {"code": 1, "message": "m"}},
        # a worker may not claim outcomes that only the host decides
        {"t": "result", "ok": False, "error": {"code": "overloaded", "message": "m"}},
        {"t": "result", "ok": False, "error": {"code": "timeout", "message": "m"}},
    ],
)
def test_parse_rejects_malformed_messages(message: object) -> None:
    with pytest.raises(ProtocolError):
        parse_worker_message(message)


def test_worker_error_messages_are_capped() -> None:
    parsed = parse_worker_message(
        {"t": "result", "ok": False, "error": {"code": "function_error", "message": "m" * 5000}}
    )
    assert isinstance(parsed, Result) and isinstance(parsed.error, FunctionError)
    assert len(parsed.error.message) == 1000


@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner)))  # fmt: skip
def test_any_worker_message_parses_or_raises_protocol_error(value: object) -> None:
    for message in (
        value,
        {"t": "result", "ok": False, "error": value},
        {"t": "call", "name": value},
    ):
        try:
            parse_worker_message(message)
        except ProtocolError:
            pass


def test_frames_larger_than_the_buffer_and_back_to_back(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    big = {"blob": "y" * 300_000}
    frames = encode(big, 1 << 20) + encode([1], 1 << 20) + encode(big, 1 << 20)
    reader = FrameReader(b, 1 << 20)
    done = threading.Event()

    def send() -> None:
        for i in range(0, len(frames), 50_000):
            a.sendall(frames[i : i + 50_000])
        done.set()

    threading.Thread(target=send).start()
    assert reader.read(time.monotonic() + 5) == big
    assert reader.read(time.monotonic() + 5) == [1]
    assert reader.read(time.monotonic() + 5) == big
    assert done.wait(5)
