"""What `./dev run` does until `chatfn serve` exists: start a session against the example
project in functions/ through the real sandbox, with a freshly signed ID token.

It makes an RSA key pair, signs a token for "alice" the way an identity provider would,
and runs `chatfn invoke functions UserAttemptedStartSession` with the public key as the
JWT_PUBLIC_KEY secret: init.py parses it, the handler verifies the token, creates alice.
"""

from __future__ import annotations

import json
import sys
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from runtime.cli import main


def run() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    token = jwt.encode(
        {"sub": "alice", "name": "Alice Liddell", "iat": now, "exp": now + 600},
        key,
        algorithm="RS256",
    )
    data = {"username": "alice", "auth_params": {"id_token": token}}
    sys.argv = [
        "chatfn", "invoke", "functions", "UserAttemptedStartSession",
        "--guest-users", "disabled", "--data", json.dumps(data),
        "--secret", f"JWT_PUBLIC_KEY={public.decode()}", *sys.argv[1:],
    ]  # fmt: skip
    main()


if __name__ == "__main__":
    run()
