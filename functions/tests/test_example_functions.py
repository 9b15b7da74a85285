"""Tests of the example function project, written the way its developer would: plain pytest
with the ``chatfn_app`` fixture from chatfn's pytest plugin, which deploys this directory
(dependencies included) on a fresh app and runs it in the real sandbox.

Tokens are signed here with a key pair made for the test run; the app gets the public key
as the JWT_PUBLIC_KEY secret, which init.py parses once per worker.
"""

import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

FUNCTIONS = Path(__file__).resolve().parents[1]


def make_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key):
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def key():
    return make_key()


def token(key, sub, *, name=None, expires_in=3600, **claims):
    payload = {"sub": sub, "iat": int(time.time()), "exp": int(time.time()) + expires_in}
    if name is not None:
        payload["name"] = name
    payload.update(claims)
    return jwt.encode(payload, key, algorithm="RS256")


@pytest.fixture
def app(chatfn_app, key):
    return chatfn_app(
        FUNCTIONS, guest_users="disabled", secrets={"JWT_PUBLIC_KEY": public_pem(key)}
    )


def test_a_valid_token_starts_a_session_and_creates_the_user(app, key):
    result = app.start_session("alice", {"id_token": token(key, "alice", name="Alice Liddell")})

    assert result.succeeded, result.error
    user = result.session["user"]
    assert (user["name"], user["display_name"], user["is_guest"]) == (
        "alice",
        "Alice Liddell",
        False,
    )
    assert "created user alice" in app.invocations()[0].logs


def test_a_returning_user_is_not_created_again(app, key):
    assert app.start_session("bob", {"id_token": token(key, "bob")}).succeeded
    again = app.start_session("bob", {"id_token": token(key, "bob", name="Robert")})

    assert again.succeeded
    assert again.session["user"]["display_name"] == "bob"  # no "name" claim the first time
    assert "created user" not in again.invocation.logs


def test_an_expired_token_is_rejected(app, key):
    result = app.start_session("alice", {"id_token": token(key, "alice", expires_in=-60)})

    assert result.failed
    assert (result.error.code, result.error.message) == ("access_denied", "The token has expired")
    assert not app.users.check_user_exists("alice")


def test_a_token_for_another_user_is_rejected(app, key):
    result = app.start_session("mallory", {"id_token": token(key, "alice")})

    assert result.failed
    assert result.error.code == "access_denied"
    assert result.error.message == "This token was not issued for this user"


def test_a_token_signed_with_another_key_is_rejected(app):
    forged = token(make_key(), "alice")

    result = app.start_session("alice", {"id_token": forged})

    assert (result.error.code, result.error.message) == ("access_denied", "The token is not valid")


def test_a_missing_or_malformed_token_is_rejected(app):
    for params in ({}, {"id_token": ""}, {"id_token": 42}, {"password": "x"}):
        result = app.start_session("alice", params)
        assert (result.error.code, result.error.message) == (
            "access_denied",
            "An id_token is required",
        )
    garbage = app.start_session("alice", {"id_token": "not.a.jwt"})
    assert garbage.error.message == "The token is not valid"


def test_audience_and_issuer_are_checked_when_configured(chatfn_app, key):
    app = chatfn_app(
        FUNCTIONS,
        secrets={
            "JWT_PUBLIC_KEY": public_pem(key),
            "JWT_AUDIENCE": "my-project",
            "JWT_ISSUER": "https://securetoken.google.com/my-project",
        },
    )
    good = token(key, "ann", aud="my-project", iss="https://securetoken.google.com/my-project")
    assert app.start_session("ann", {"id_token": good}).succeeded
    wrong_audience = token(key, "ann", aud="other", iss="https://securetoken.google.com/my-project")
    assert app.start_session("ann", {"id_token": wrong_audience}).error.code == "access_denied"


def test_the_session_hook_logs_the_new_session(app, key):
    result = app.start_session("carol", {"id_token": token(key, "carol")})

    started = [i for i in app.invocations() if i.event == "UserStartedSession"]
    assert [i.logs for i in started] == [f"session {result.session['id']} started for carol\n"]


def test_without_the_public_key_every_session_is_rejected_saying_why(chatfn_app, key):
    app = chatfn_app(FUNCTIONS)

    result = app.start_session("alice", {"id_token": token(key, "alice")})

    assert (result.error.code, result.error.message) == (
        "access_denied",
        "This app is not configured: set its JWT_PUBLIC_KEY secret",
    )


def test_a_public_key_that_is_not_a_key_fails_the_deploy(chatfn_app):
    from sandbox.errors import DeployRejected

    with pytest.raises(DeployRejected) as rejected:
        chatfn_app(FUNCTIONS, secrets={"JWT_PUBLIC_KEY": "not a pem"})
    assert rejected.value.errors[0]["file"] == "init.py"
