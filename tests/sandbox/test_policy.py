"""Policy and limits as frozen data: defaults, validation, builders, round trips."""

from __future__ import annotations

import dataclasses

import pytest

from sandbox.policy import DEFAULT_LIMITS, Limits, Policy, PolicyError


def test_defaults_match_the_design() -> None:
    assert (DEFAULT_LIMITS.timeout_ms, DEFAULT_LIMITS.memory_mb, DEFAULT_LIMITS.network) == (
        5000,
        256,
        "none",
    )
    assert DEFAULT_LIMITS.effective_cpu_seconds == 6


def test_limits_are_frozen_and_builders_copy() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_LIMITS.timeout_ms = 1  # type: ignore[misc]
    changed = DEFAULT_LIMITS.with_(timeout_ms=100)
    assert changed.timeout_ms == 100 and DEFAULT_LIMITS.timeout_ms == 5000


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"timeout_ms": 0}, "timeout_ms"),
        ({"memory_mb": "lots"}, "memory_mb"),
        ({"network": "everything"}, "network"),
        ({"max_workers": True}, "max_workers"),
        ({"timeuot_ms": 10}, "timeuot_ms"),
    ],
)
def test_bad_limits_name_the_field(data: dict[str, object], named: str) -> None:
    with pytest.raises(PolicyError, match=named):
        Limits.from_mapping(data)


def test_policy_round_trips_as_plain_data() -> None:
    policy = Policy().with_modules(["jwt"], paths=["/env/site"]).with_uid(1000, 1000)
    assert Policy.from_dict(policy.to_dict()) == policy
    assert "jwt" in policy.allowed_modules and "jwt" not in Policy().allowed_modules


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("json", True),
        ("json.decoder", True),
        ("urllib.parse", True),
        ("urllib", True),
        ("urllib.request", False),
        ("logging", True),
        ("logging.config", False),
        ("logging.handlers", False),
        ("os", False),
        ("jsonx", False),
        ("operator", False),
        ("typing", False),
    ],
)
def test_allows_module(name: str, allowed: bool) -> None:
    assert Policy().allows_module(name) is allowed
