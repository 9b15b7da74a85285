"""``chatfn init DIR``: a new function project that works and is tested from the start."""

from __future__ import annotations

from pathlib import Path

from sandbox.errors import InvalidRequest

FILES: dict[str, str] = {
    "chatfn.toml": """\
# Runtime limits for this app's functions (all optional; these are the defaults).
[runtime]
timeout_ms = 5000
memory_mb = 256
network = "none"
""",
    "requirements.in": """\
# Declared dependencies, one per line in pip-tools format (for example: pyjwt[crypto]>=2.8).
# `chatfn lock` writes requirements.txt, the lock with hashes.
""",
    "user_attempted_start_session.py": '''\
"""Runs when a user tries to start a chat session. Raise SessionRejected to refuse it.

This one accepts a user whose auth_params carry the password kept in the APP_PASSWORD
secret, and creates the user on first sign-in.
"""

import hmac


def handle_event(event, context):
    expected = context.secrets.get("APP_PASSWORD")
    given = event.auth_params.get("password")
    if expected is None or not isinstance(given, str):
        raise SessionRejected("A password is required")
    if not hmac.compare_digest(given, expected):
        raise SessionRejected("Wrong password")
    if not context.users.check_user_exists(event.username):
        context.users.create_user(event.username)
''',
    "tests/test_user_attempted_start_session.py": '''\
"""Run with `pytest`: the chatfn_app fixture comes from chatfn's pytest plugin and runs
these functions in the real sandbox."""

from pathlib import Path

FUNCTIONS = Path(__file__).resolve().parents[1]


def test_the_right_password_starts_a_session(chatfn_app):
    app = chatfn_app(FUNCTIONS, guest_users="disabled")
    app.set_secret("APP_PASSWORD", "s3cret")
    result = app.start_session("ada", {"password": "s3cret"})
    assert result.succeeded
    assert result.session["user"]["name"] == "ada"


def test_a_wrong_password_is_rejected(chatfn_app):
    app = chatfn_app(FUNCTIONS, guest_users="disabled")
    app.set_secret("APP_PASSWORD", "s3cret")
    result = app.start_session("ada", {"password": "guess"})
    assert result.failed
    assert (result.error.code, result.error.message) == ("access_denied", "Wrong password")
''',
}


def scaffold(directory: str | Path) -> list[Path]:
    """Write a new project into ``directory``; refuses to overwrite any file."""
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise InvalidRequest(f"{root} exists and is not a directory")
    existing = [name for name in FILES if (root / name).exists()]
    if existing:
        raise InvalidRequest(f"{root} already has {', '.join(existing)}; not overwriting")
    written = []
    for name, text in FILES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
