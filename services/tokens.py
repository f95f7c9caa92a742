"""Bearer tokens (JWT, HS256 via PyJWT) for browsers, which cannot send Basic auth on EventSource.

A token names its user (`sub`) and a fingerprint of the user's password hash (`pwf`), and
nothing else: roles are read from the users collection on every request, so a role change,
a password change or a deleted user takes effect at once, token or not.

The signing key comes from JWT_SECRET, or is generated once and kept in DATA_DIR (created
with O_EXCL, so every worker of one data directory signs with the same key).
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import time
import uuid

import jwt

from .errors import Unauthorized

ALGORITHM = "HS256"
COOKIE_NAME = "changefeed_token"


class TokenError(Unauthorized):
    """A token that cannot be used: forged, expired, malformed or revoked (HTTP 401)."""


def password_fingerprint(user: dict) -> str:
    stored = user.get("password") or ""
    return hashlib.sha256(stored.encode()).hexdigest()[:16]


def load_key(secret: str, data_dir: str) -> bytes:
    """JWT_SECRET if set, else a random key generated once per data directory."""
    if secret:
        return secret.encode()
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, "jwt.key")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):  # another worker may be writing it right now
            with open(path, "rb") as f:
                key = f.read().strip()
            if key:
                return key
            time.sleep(0.02)
        raise RuntimeError(f"{path} is empty; delete it to generate a new signing key") from None
    with os.fdopen(fd, "wb") as f:
        key = secrets.token_hex(32).encode()
        f.write(key)
    return key


class Tokens:
    """Issues and checks tokens with one key and one lifetime."""

    def __init__(self, key: bytes, ttl_seconds: int):
        self.key = key
        self.ttl = ttl_seconds

    def issue(self, user: dict, not_after: int | None = None) -> dict:
        """A token for `user`; with `not_after` (the expiry of the token presented to ask
        for this one) it expires no later than that, so tokens cannot be renewed forever."""
        now = time.time()
        # exp is whole seconds: round up, so the token lives at least `expires_in` seconds
        # (int(now) + ttl cut up to a second off, a 2 s token could die after 1.0 s)
        exp = math.ceil(now + self.ttl)
        if not_after is not None:
            exp = min(exp, int(not_after))
        claims = {
            "sub": user["_id"],
            "iat": int(now),
            "exp": exp,
            "jti": uuid.uuid4().hex,
            "pwf": password_fingerprint(user),
        }
        token = jwt.encode(claims, self.key, algorithm=ALGORITHM)
        return {"access_token": token, "token_type": "Bearer", "expires_in": max(0, int(exp - now))}

    def verify(self, token: str) -> dict:
        """Return the claims of a valid token; :raise TokenError: naming the fault."""
        try:
            claims = jwt.decode(
                token, self.key, algorithms=[ALGORITHM], options={"require": ["sub", "exp", "iat", "pwf"]}
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("the token has expired") from None
        except jwt.InvalidSignatureError:
            raise TokenError("the token's signature is not valid") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"the token is not valid: {exc}") from None
        if not isinstance(claims.get("sub"), str):
            raise TokenError("the token is not valid: bad subject")
        return claims
