"""Runs when a user tries to start a chat session. Raise SessionRejected to refuse it.

This example accepts a shared password kept in the DEMO_PASSWORD secret (any password
when the secret is not set), and creates the user on first sign-in.
"""

import hmac


def handle_event(event, context):
    expected = context.secrets.get("DEMO_PASSWORD")
    if expected is not None:
        given = event.auth_params.get("password", "")
        if not isinstance(given, str) or not hmac.compare_digest(given, expected):
            raise SessionRejected("Wrong password")
    if not context.users.check_user_exists(event.username):
        context.users.create_user(
            event.username, display_name=event.username.title(), properties={"source": "demo"}
        )
        print("created user", event.username)
    return {"welcome": event.username}
