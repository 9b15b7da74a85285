"""Generated input against the server, bounded so it stays fast and deterministic.

- Schemathesis reads the app's OpenAPI schema and sends generated requests (valid and
  invalid) to every operation, with the admin key; no answer may be a 5xx.
- Hypothesis sends arbitrary JSON values, strings and message-shaped objects over one
  WebSocket; every reply must be a JSON object of a known type, and the connection must
  keep answering.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.schemas import OpenApiSchema

from tests.server.conftest import (
    ACCEPT_ALL,
    ADMIN_KEY,
    Server,
    create_app_named,
    deploy,
    sources,
)

FUZZ_APP = "fuzz"
ERROR_CODES = {
    "access_denied",
    "function_error",
    "timeout",
    "resource_limit",
    "worker_crashed",
    "sandbox_violation",
    "overloaded",
    "invalid_request",
    "user_not_found",
    "not_deployed",
    "session_active",
}

# -- the HTTP API from its OpenAPI schema --------------------------------------------------

CONFIG = {
    "seed": 20240601,
    "headers": {"Authorization": f"Bearer {ADMIN_KEY}"},
    # Most generated requests should reach an app that exists (with a deployment, a user
    # and a secret), not stop at "no such app".
    "dictionaries": {
        "apps": {"values": [FUZZ_APP]},
        "events": {"values": ["UserAttemptedStartSession", "user_started_session"]},
        "versions": {"values": [1, 2]},
        "names": {"values": ["alice", "TOKEN"]},
    },
    "parameters": {
        "path.app": {"dictionary": "apps", "probability": 0.8},
        "path.event": {"dictionary": "events", "probability": 0.5},
        "path.version": {"dictionary": "versions", "probability": 0.5},
        "path.name": {"dictionary": "names", "probability": 0.5},
    },
}


# The upload operation takes the archive as raw bytes: send generated bodies as they are.
schemathesis.serializer.alias(
    ["application/gzip", "application/x-gzip", "application/zip"], "application/octet-stream"
)


@pytest.fixture(scope="module")
def fuzzed_app(server: Server) -> str:
    create_app_named(server.client, FUZZ_APP)
    deploy(server.client, FUZZ_APP, sources(user_attempted_start_session=ACCEPT_ALL))
    client = server.client
    assert client.post(f"/v1/apps/{FUZZ_APP}/users", json={"name": "alice"}).status_code == 201
    assert client.put(f"/v1/apps/{FUZZ_APP}/secrets/TOKEN", json={"value": "v"}).status_code == 204
    return FUZZ_APP


@pytest.fixture(scope="module")
def api_schema(server: Server, fuzzed_app: str) -> OpenApiSchema:
    return schemathesis.openapi.from_asgi(
        "/openapi.json", server.api, config=schemathesis.Config.from_dict(CONFIG)
    )


MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
EXAMPLES_PER_MODE = 40


def test_no_generated_request_gets_a_server_error(api_schema: OpenApiSchema) -> None:
    """Every operation, valid and invalid input: a 4xx is fine, a 5xx (or an exception out
    of the app) is a failure. Failures are collected, not raised, so one run shows all."""
    failures: list[str] = []
    statuses: Counter[tuple[str, int]] = Counter()  # what the run saw (shown with -s)
    operations = [r.ok() for r in api_schema.get_all_operations() if isinstance(r, Ok)]
    assert len(operations) == 24  # the 23 admin routes and /healthz

    for operation in operations:
        for mode in MODES:

            @settings(
                max_examples=EXAMPLES_PER_MODE,
                deadline=None,
                derandomize=True,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def send(case: schemathesis.Case[Any]) -> None:
                try:
                    response = case.call()
                except Exception as exc:  # the app raised: the real server would answer 500
                    failures.append(f"{case.as_curl_command()}\n  raised {exc!r}")
                    return
                statuses[case.operation.label, response.status_code] += 1
                try:
                    case.validate_response(response, checks=[not_a_server_error])
                except (AssertionError, FailureGroup) as exc:
                    failures.append(f"{case.as_curl_command()}\n  {exc}")

            try:
                send()
            except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
                assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label

    print(sorted(statuses.items()))
    assert not failures, "\n".join(failures[:20])
    # The run reached past the "no such app" answer for most operations.
    reached = {label for label, status in statuses if status < 300}
    assert len(reached) >= 15, sorted(statuses.items())


# -- the WebSocket protocol ----------------------------------------------------------------

REPLY_TYPES = {"session_started", "session_ended", "error"}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
ids = st.none() | st.integers() | st.text(max_size=70) | st.booleans() | st.floats() | json_values
usernames = (
    st.text(min_size=1, max_size=12, alphabet=st.characters(codec="utf-8"))
    | st.sampled_from(["alice", "bob", "", "a\nb", "x" * 257])
    | json_values
)
message_shaped = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["start_session", "end_session", "ping", "", "START_SESSION"])
        | json_values,
        "id": ids,
        "username": usernames,
        "auth_params": json_values | st.dictionaries(st.text(max_size=8), json_values),
        "extra": json_values,
    },
)
# Well-formed starts (and ends), so that sessions really start and end along the way.
well_formed = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["start_session", "end_session"]),
        "id": st.integers(min_value=0, max_value=2**31) | st.text(max_size=64),
        "username": st.text(min_size=1, max_size=20).filter(str.isprintable),
    },
    optional={"auth_params": st.dictionaries(st.text(max_size=8), json_values, max_size=3)},
)
messages = (
    well_formed.map(json.dumps)
    | message_shaped.map(json.dumps)
    | json_values.map(json.dumps)
    | st.text(max_size=60)
    | st.dictionaries(st.text(max_size=10), json_values, max_size=5).map(json.dumps)
)


@pytest.fixture(scope="module")
def session_app(server: Server) -> str:
    create_app_named(server.client, "ws-fuzz")
    deploy(server.client, "ws-fuzz", sources(user_attempted_start_session=ACCEPT_ALL))
    return "ws-fuzz"


def check_reply(raw: str) -> dict[str, Any]:
    reply = json.loads(raw)
    assert isinstance(reply, dict), raw
    assert reply.get("type") in REPLY_TYPES, raw
    if reply["type"] == "error":
        assert set(reply) == {"type", "id", "error"}, raw
        assert set(reply["error"]) == {"code", "message"}, raw
        assert reply["error"]["code"] in ERROR_CODES, raw
        assert isinstance(reply["error"]["message"], str) and reply["error"]["message"], raw
    elif reply["type"] == "session_started":
        assert set(reply) == {"type", "id", "session"}, raw
        assert set(reply["session"]) == {"id", "user", "started_at"}, raw
    else:
        assert set(reply) == {"type", "id"}, raw
    return reply


def expected_id(message: str) -> Any:
    """The id a reply must carry: the message's, when it is a JSON object (as the server
    parses it) with an integer or short string id; None otherwise."""
    try:
        parsed = orjson.loads(message)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    value = parsed.get("id")
    if type(value) is int or (type(value) is str and len(value) <= 64):
        return value
    return None


@pytest.fixture
def socket(server: Server, session_app: str) -> Iterator[Any]:
    with server.client.websocket_connect(f"/v1/apps/{session_app}/session") as ws:
        yield ws


def test_arbitrary_messages_always_get_a_well_formed_reply(socket: Any) -> None:
    counter = iter(range(10**9))
    seen: Counter[str] = Counter()

    @settings(
        max_examples=300,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(message=messages, binary=st.booleans())
    def exchange(message: str, binary: bool) -> None:
        if binary:
            socket.send_bytes(message.encode("utf-8", errors="surrogatepass"))
        else:
            socket.send_text(message)
        reply = check_reply(socket.receive_text())
        assert reply["id"] == expected_id(message), (message, reply)
        seen[reply["type"]] += 1
        # The connection still answers, in order (and any session it started ends here).
        probe = f"probe-{next(counter)}"
        socket.send_text(json.dumps({"type": "end_session", "id": probe}))
        reply = check_reply(socket.receive_text())
        assert reply["id"] == probe
        seen[reply["type"]] += 1

    exchange()
    # Every kind of reply came up.
    assert set(seen) == REPLY_TYPES, seen


def test_a_fresh_connection_still_works_after_the_fuzzing(server: Server, session_app: str) -> None:
    with server.client.websocket_connect(f"/v1/apps/{session_app}/session") as ws:
        ws.send_text(json.dumps({"type": "start_session", "id": 1, "username": "after"}))
        assert check_reply(ws.receive_text())["type"] == "session_started"
        ws.send_text(json.dumps({"type": "end_session", "id": 2}))
        assert check_reply(ws.receive_text()) == {"type": "session_ended", "id": 2}
