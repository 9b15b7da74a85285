"""Error codes survive the trip through plain data."""

from __future__ import annotations

import pytest

from sandbox.errors import ERRORS_BY_CODE, ChatfnError, FunctionError, WorkerCrashed

DESIGN_CODES = {
    "access_denied", "function_error", "timeout", "resource_limit", "worker_crashed",
    "sandbox_violation", "overloaded", "invalid_request", "user_not_found", "not_deployed",
}  # fmt: skip


def test_every_design_code_has_a_class() -> None:
    assert set(ERRORS_BY_CODE) >= DESIGN_CODES


@pytest.mark.parametrize("code", sorted(ERRORS_BY_CODE))
def test_round_trip(code: str) -> None:
    error = ERRORS_BY_CODE[code]("message", detail="traceback")
    again = ChatfnError.from_dict(error.to_dict())
    assert type(again) is type(error) and again.message == "message"
    assert "detail" not in error.to_dict()  # tracebacks never travel to clients


def test_malformed_records() -> None:
    assert isinstance(ChatfnError.from_dict("x"), WorkerCrashed)
    assert isinstance(ChatfnError.from_dict({"code": 1}), WorkerCrashed)
    assert isinstance(ChatfnError.from_dict({"code": "???", "message": "m"}), FunctionError)
