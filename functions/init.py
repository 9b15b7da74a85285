"""Runs once in each sandbox worker, before its first invocation (and once at deploy time):
parse the RSA public key that session tokens are signed with, so each session start only
verifies a signature.

Secrets (set with `chatfn secrets set` or the HTTP API, then redeploy):
  JWT_PUBLIC_KEY   the PEM public key of your identity provider's signing key; until it is
                   set, every session is rejected with a message saying so
  JWT_AUDIENCE     if set, tokens must carry this "aud" (a Firebase project id, say)
  JWT_ISSUER       if set, tokens must carry this "iss"
"""

from jwt.algorithms import RSAAlgorithm

PEM = context.secrets.get("JWT_PUBLIC_KEY")
PUBLIC_KEY = RSAAlgorithm(RSAAlgorithm.SHA256).prepare_key(PEM) if PEM else None
AUDIENCE = context.secrets.get("JWT_AUDIENCE")
ISSUER = context.secrets.get("JWT_ISSUER")
