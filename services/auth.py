"""Users and credentials: bcrypt passwords in the `users` collection, the default admin.

Passwords are bcrypt hashes (at most 72 bytes of password: bcrypt ignores the rest, so a
longer one is refused rather than silently cut). A successful check is remembered per
(user, stored hash), so a Basic-auth client does not pay bcrypt's ~0.3 s on every request,
and a password change (new hash) or a deleted user takes effect on the very next request.

Every check that does not succeed from that memory costs one bcrypt check, whether the
user exists or not and whether the user logged in recently or not: answering an unknown
user (or a wrong guess for a remembered user) faster than a wrong password for a real
one would tell an attacker which user names exist. bcrypt runs in its own one-thread
pool (services.blocking.run_cpu), once for requests that bring the same credentials at
the same time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import bcrypt
import gevent.event

from . import blocking
from .errors import BadRequest, DuplicateKey, NotFound
from .storage import Engine

log = logging.getLogger(__name__)

BCRYPT_ROUNDS = 12
MAX_PASSWORD_BYTES = 72  # bcrypt's limit
USERS = "users"
# A bcrypt hash of a value no user has, at the cost of stored hashes: checked against when
# there is no hash to check, so that the answer takes as long as for a real user.
_NO_SUCH_USER = b"$2b$12$GCrK9odLpfeY2YqJCjkMw.CxjRoyusJywXYIAq5sDPhE9gMfWyjuq"


def check_password_length(password: str) -> None:
    if len(password.encode("utf-8", errors="surrogatepass")) > MAX_PASSWORD_BYTES:
        raise BadRequest(f"a password can be at most {MAX_PASSWORD_BYTES} bytes long (bcrypt's limit)")


def hash_password(password: str, gate: Callable[[], AbstractContextManager[Any]] = nullcontext) -> str:
    """bcrypt hash of `password`; `gate()` is entered around the work (the login throttle's
    bound on bcrypt work per client address: password changes cost what logins cost)."""
    check_password_length(password)
    with gate():
        return blocking.run_cpu(bcrypt.hashpw, password.encode(), bcrypt.gensalt(BCRYPT_ROUNDS)).decode()


def _checkpw(password: bytes, hashed: bytes) -> bool:
    try:
        return bcrypt.checkpw(password, hashed)
    except ValueError:  # malformed stored hash, or a password over 72 bytes
        bcrypt.checkpw(b"", _NO_SUCH_USER)  # the same work as a real check
        return False


def prepare_user(
    doc: dict,
    doc_id: Any = None,
    keep_hashes: bool = False,
    gate: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> dict:
    """Validate a user document written through /users and hash its password.

    With `keep_hashes` (an admin importing users) a value that is already a bcrypt hash is
    stored as it is; for anyone else every password is hashed, whatever it looks like, so
    nobody can plant a hash of their choosing or pass the 72-byte limit that way.
    """
    user_id = doc.get("_id", doc_id)
    if not isinstance(user_id, str) or not user_id or ":" in user_id:
        raise BadRequest("a user's _id must be a non-empty string without ':'")
    password = doc.get("password")
    if password is not None:
        if not isinstance(password, str) or not password:
            raise BadRequest("a user's password must be a non-empty string")
        if not (keep_hashes and password.startswith(("$2a$", "$2b$", "$2y$"))):
            doc = {**doc, "password": hash_password(password, gate)}
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
        self._checking: dict[tuple[str, str, bytes], gevent.event.AsyncResult] = {}  # in flight

    def _check_once(
        self,
        key: tuple[str, str, bytes],
        given: bytes,
        stored: str,
        gate: Callable[[], AbstractContextManager[Any]],
    ) -> bool:
        """One bcrypt check for the same credentials however many requests bring them at
        once: after a restart nothing is remembered, and clients reconnecting together (a
        worker's streams, or many behind one address) each needed a check, so most got the
        login throttle's 429 and came back a second later. A request that joins a check in
        flight waits for its answer (or its error) and does no work of its own."""
        pending = self._checking.get(key)
        if pending is not None:
            return bool(pending.get())
        pending = self._checking[key] = gevent.event.AsyncResult()
        try:
            with gate():
                ok = blocking.run_cpu(_checkpw, given, stored.encode())
        except BaseException as exc:
            pending.set_exception(exc)
            raise
        finally:
            self._checking.pop(key, None)
        pending.set(ok)
        return ok

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

    def verify(
        self, username: str, password: str, gate: Callable[[], AbstractContextManager[Any]] = nullcontext
    ) -> dict | None:
        """Return the user (without password) if the credentials are right, else None.

        `gate()` is entered around every bcrypt check (the login throttle: it may refuse
        with a 429 before any work is done); a remembered right password needs none.
        """
        if not username or password is None:
            return None
        try:
            user: dict | None = self.engine.get_document(USERS, username)
        except NotFound:
            user = None
        stored = user.get("password") if user is not None else None
        given = password.encode("utf-8", errors="surrogatepass")
        if user is None or not isinstance(stored, str):
            with gate():
                blocking.run_cpu(_checkpw, given, _NO_SUCH_USER)
            return None
        digest = hashlib.sha256(given).digest()
        key = (username, stored)
        known = self._verified.get(key)
        if known is not None and hmac.compare_digest(known, digest):
            return public_user(user)
        ok = self._check_once((username, stored, digest), given, stored, gate)
        if not ok:
            return None
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[key] = digest
        return public_user(user)
