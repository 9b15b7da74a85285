"""Runs when a user tries to start a chat session: the Python version of ChatKitty's
Firebase authentication guide.

The client sends an ID token (a JWT signed with RS256) in auth_params["id_token"]. The
session starts only if the token is valid, unexpired, and issued for this username; the
user is created on first sign-in, with the token's "name" claim as display name.
"""

import jwt


def handle_event(event, context):
    if PUBLIC_KEY is None:
        raise SessionRejected("This app is not configured: set its JWT_PUBLIC_KEY secret")
    token = event.auth_params.get("id_token")
    if not isinstance(token, str) or not token:
        raise SessionRejected("An id_token is required")
    try:
        claims = jwt.decode(
            token,
            PUBLIC_KEY,
            algorithms=["RS256"],
            audience=AUDIENCE,
            issuer=ISSUER,
            options={"require": ["exp", "sub"], "verify_aud": AUDIENCE is not None},
        )
    except jwt.ExpiredSignatureError:
        raise SessionRejected("The token has expired") from None
    except jwt.InvalidTokenError:
        raise SessionRejected("The token is not valid") from None
    if claims["sub"] != event.username:
        raise SessionRejected("This token was not issued for this user")
    if not context.users.check_user_exists(event.username):
        context.users.create_user(event.username, display_name=claims.get("name") or event.username)
        print("created user", event.username)
    return {"uid": claims["sub"]}
