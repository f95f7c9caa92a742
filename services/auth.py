"""Users and credentials: bcrypt passwords in the `users` collection, the default admin.

Passwords are bcrypt hashes; a successful check is remembered per (user, stored hash), so
a Basic-auth client does not pay bcrypt's ~0.2 s on every request, and a password change
(new hash) or a deleted user takes effect on the very next request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Any

import bcrypt

from . import blocking
from .errors import BadRequest, DuplicateKey, NotFound
from .storage import Engine

log = logging.getLogger(__name__)

BCRYPT_ROUNDS = 12
USERS = "users"


def hash_password(password: str) -> str:
    return blocking.run(bcrypt.hashpw, password.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()


def prepare_user(doc: dict, doc_id: Any = None) -> dict:
    """Validate a user document written through /users and hash its password.

    A value that is already a bcrypt hash is kept, so a GET-then-PUT round trip of a user
    (whose password is never returned) does not lock the user out.
    """
    user_id = doc.get("_id", doc_id)
    if not isinstance(user_id, str) or not user_id or ":" in user_id:
        raise BadRequest("a user's _id must be a non-empty string without ':'")
    password = doc.get("password")
    if password is not None:
        if not isinstance(password, str) or not password:
            raise BadRequest("a user's password must be a non-empty string")
        if not password.startswith(("$2a$", "$2b$", "$2y$")):
            doc = {**doc, "password": hash_password(password)}
    roles = doc.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
        raise BadRequest("a user's roles must be an array of non-empty strings")
    return doc


def public_user(doc: dict) -> dict:
    """The user as the API shows it: never the password hash."""
    return {k: v for k, v in doc.items() if k != "password"}


class Users:
    """Checks credentials against the `users` collection."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._verified: dict[tuple[str, str], bytes] = {}

    def ensure_default_admin(self, password: str) -> bool:
        """Create `admin` (role admin) when the users collection is empty; True if created."""
        if self.engine.count(USERS, {}):
            return False
        try:
            self.engine.insert_documents(
                USERS, [{"_id": "admin", "password": hash_password(password), "roles": ["admin"]}]
            )
        except DuplicateKey:
            return False  # another worker created it first
        if password == "secret":
            log.warning("created user 'admin' with the default password 'secret'; set ADMIN_PASSWORD")
        else:
            log.info("created user 'admin' with the password from ADMIN_PASSWORD")
        return True

    def verify(self, username: str, password: str) -> dict | None:
        """Return the user (without password) if the credentials are right, else None."""
        if not username or password is None:
            return None
        try:
            user = self.engine.get_document(USERS, username)
        except NotFound:
            return None
        stored = user.get("password")
        if not isinstance(stored, str):
            return None
        digest = hashlib.sha256(password.encode()).digest()
        key = (username, stored)
        known = self._verified.get(key)
        if known is not None:
            return public_user(user) if hmac.compare_digest(known, digest) else None
        try:
            ok = blocking.run(bcrypt.checkpw, password.encode(), stored.encode())
        except ValueError:
            return None
        if not ok:
            return None
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[key] = digest
        return public_user(user)

    def get(self, username: str) -> dict | None:
        try:
            return public_user(self.engine.get_document(USERS, username))
        except NotFound:
            return None
