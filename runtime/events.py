"""The event registry: one table, so a new event is one entry (DESIGN section 3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, JsonValue, ValidationError

from sandbox.errors import InvalidRequest


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class UserAttemptedStartSession(_Payload):
    username: str
    auth_params: dict[str, JsonValue] = {}


class UserStartedSession(_Payload):
    user: dict[str, JsonValue]
    session_id: str


class UserEndedSession(_Payload):
    user: dict[str, JsonValue]
    session_id: str
    reason: Literal["ended", "disconnected"]


@dataclass(frozen=True)
class EventType:
    name: str
    stem: str
    blocking: bool
    payload: type[_Payload]

    @property
    def filename(self) -> str:
        return f"{self.stem}.py"

    def validate(self, payload: Any) -> dict[str, Any]:
        """The payload as plain data, or InvalidRequest naming the bad field."""
        try:
            return self.payload.model_validate(payload).model_dump(mode="json")
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'payload'}: {err['msg']}"
                for err in exc.errors()
            )
            raise InvalidRequest(f"invalid {self.name} payload: {problems}") from None


EVENTS: tuple[EventType, ...] = (
    EventType("UserAttemptedStartSession", "user_attempted_start_session", True,
              UserAttemptedStartSession),
    EventType("UserStartedSession", "user_started_session", False, UserStartedSession),
    EventType("UserEndedSession", "user_ended_session", False, UserEndedSession),
)  # fmt: skip

_BY_NAME = {e.name: e for e in EVENTS} | {e.stem: e for e in EVENTS}


def resolve(name: str) -> EventType:
    """An event by its type (``UserAttemptedStartSession``) or file stem."""
    event = _BY_NAME.get(name)
    if event is None:
        known = ", ".join(e.name for e in EVENTS)
        raise InvalidRequest(f"unknown event type {name!r}; known: {known}")
    return event
