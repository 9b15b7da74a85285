"""The operating-system layers around a worker, which of them to set up, and what a
template process reports it could set up on this machine.

Every layer is tried when the policy names it (all of them by default) and the machine
supports it; what a machine cannot do is reported with the reason, never silently
skipped. ``require`` turns a missing layer into a boot failure, so an operator can refuse
to run untrusted code on a machine weaker than they expect.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sandbox.policy import ALL_LAYERS, LAYERS, PolicyError

UIDS_ENV = "CHATFN_SANDBOX_UIDS"
LAYERS_ENV = "CHATFN_SANDBOX_LAYERS"
REQUIRE_ENV = "CHATFN_SANDBOX_REQUIRE"
DEFAULT_UIDS = "3000000-3999999"


def parse_layers(text: str, *, setting: str = LAYERS_ENV) -> frozenset[str]:
    """``all``, ``none`` or a comma-separated list of layer names."""
    text = text.strip()
    if text == "all":
        return ALL_LAYERS
    if text in ("", "none"):
        return frozenset()
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_LAYERS]
    if unknown:
        raise PolicyError(
            f"{setting}: unknown sandbox layer(s) {', '.join(unknown)}; "
            f"known: all, none, {', '.join(LAYERS)}"
        )
    return frozenset(names)


@dataclass(frozen=True)
class UidRange:
    """The uids (and equal gids) handed to apps, one each: ``first + app id``."""

    first: int
    last: int

    def __post_init__(self) -> None:
        if not 1000 <= self.first <= self.last < 2**32 - 1:
            raise PolicyError(
                f"{UIDS_ENV}: the uid range must be FIRST-LAST with 1000 <= FIRST <= LAST "
                f"< 4294967295, got {self.first}-{self.last}"
            )

    @classmethod
    def parse(cls, text: str) -> UidRange:
        first, sep, last = text.strip().partition("-")
        if not sep or not first.strip().isdigit() or not last.strip().isdigit():
            raise PolicyError(
                f"{UIDS_ENV}: expected FIRST-LAST (e.g. {DEFAULT_UIDS}), got {text!r}"
            )
        return cls(int(first), int(last))

    def for_app(self, app_id: int) -> int:
        uid = self.first + app_id
        if app_id < 0 or uid > self.last:
            raise PolicyError(
                f"{UIDS_ENV}: app id {app_id} does not fit the uid range "
                f"{self.first}-{self.last}; widen it"
            )
        return uid


@dataclass(frozen=True)
class SandboxSettings:
    """The operator's sandbox settings (environment variables of ``chatfn serve``)."""

    layers: frozenset[str] = ALL_LAYERS
    require: frozenset[str] = frozenset()
    uids: UidRange = field(default_factory=lambda: UidRange.parse(DEFAULT_UIDS))

    def __post_init__(self) -> None:
        if not self.require <= self.layers:
            raise PolicyError(
                f"{REQUIRE_ENV}: layer(s) {', '.join(sorted(self.require - self.layers))} are "
                f"required but turned off by {LAYERS_ENV}"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SandboxSettings:
        env = os.environ if env is None else env
        return cls(
            layers=parse_layers(env.get(LAYERS_ENV, "all")),
            require=parse_layers(env.get(REQUIRE_ENV, "none"), setting=REQUIRE_ENV),
            uids=UidRange.parse(env.get(UIDS_ENV, DEFAULT_UIDS)),
        )


@dataclass
class Isolation:
    """What one template process set up: each layer on or off, why it is off, and for some
    layers that are on, how (the Landlock ABI, the cgroup version)."""

    on: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(LAYERS, False))
    why_off: dict[str, str] = field(default_factory=dict)
    detail: dict[str, str] = field(default_factory=dict)

    def set(self, layer: str, active: bool, note: str = "") -> None:
        """``note``: why it is off, or (optional) how it is on."""
        assert layer in ALL_LAYERS, layer
        self.on[layer] = active
        if active:
            self.why_off.pop(layer, None)
            if note:
                self.detail[layer] = note
        else:
            self.detail.pop(layer, None)
            self.why_off[layer] = note or "not supported"

    def to_dict(self) -> dict[str, Any]:
        return {"on": dict(self.on), "why_off": dict(self.why_off), "detail": dict(self.detail)}

    @classmethod
    def from_dict(cls, data: Any) -> Isolation:
        """From a template's boot reply (untrusted: only known names and plain types)."""
        iso = cls()
        if not isinstance(data, dict):
            return iso
        on, why, detail = data.get("on"), data.get("why_off"), data.get("detail")
        for layer in LAYERS:
            if isinstance(on, dict) and on.get(layer) is True:
                iso.on[layer] = True
                if isinstance(detail, dict) and isinstance(detail.get(layer), str):
                    iso.detail[layer] = str(detail[layer])[:300]
            elif isinstance(why, dict) and isinstance(why.get(layer), str):
                iso.why_off[layer] = str(why[layer])[:300]
            else:
                iso.why_off[layer] = "not reported"
        return iso

    def missing(self, required: Iterable[str]) -> list[str]:
        return [layer for layer in LAYERS if layer in set(required) and not self.on[layer]]

    def describe(self, layers: Iterable[str]) -> str:
        return "; ".join(f"{layer}: {self.why_off.get(layer, 'off')}" for layer in layers)
