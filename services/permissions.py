"""What an ACL permission's ``mongo`` object lets one request do, with RESTHeart's meaning.

A matching ACL permission (``services.acl``) may carry a ``mongo`` object. Every key is
enforced here or refused when the ACL document is written (``validate_mongo``):

* ``readFilter``: documents outside it do not exist for the caller (GET, GET by id,
  ``_size``, streams);
* ``writeFilter``: a write may only touch a document that matches it, before *and* after
  the write, so neither an update nor an upsert or insert can produce a document outside
  it. It is checked inside the write (``write_guard``, run by the engine atomically with
  the write), never on a copy read earlier;
* ``mergeRequest``: merged into the body of every write (POST, PUT, PATCH, bulk), so a
  server-chosen value such as ``{"owner": "@user._id"}`` cannot be forged or removed;
* ``projectResponse``: fields hidden from every response and stream event, and which no
  filter, sort, ``keys`` or stream stage may reach (``services.hidden``);
* ``allowManagementRequests``: writes to the collection itself (its properties, stream
  definitions, the collection) need it;
* ``allowBulkPatch`` / ``allowBulkDelete``: ``PATCH``/``DELETE /<coll>/*?filter=...``;
* ``allowWriteMode``: the ``?wm=``/``?writeMode=`` parameter.

The ``admin`` role has a ``Grant`` with everything allowed and nothing filtered. Whoever
the caller, ``password`` is hidden in ``users``, and in ``users`` only an admin may set or
change anyone's ``roles`` (any operator, ``$rename`` and upserts included): roles decide
what the ACL grants, so letting a rule that allows self-service edits also write roles
would let a user promote himself.

Values in filters and ``mergeRequest`` may be ``"@user"``, ``"@user.<path>"`` (from the
authenticated account, never its password) or ``"@now"``; a filter or merge that needs a
value the caller does not have refuses the request (403) rather than lose a condition.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import pipeline as pipelines
from . import query, updates
from .errors import BadRequest, DocumentNotFound, Forbidden
from .hidden import Visibility, validate_projection

USERS = "users"
_ELEMENT = re.compile(r"\{.*\}", re.S)
_NUMBER_VALUE = re.compile(r"\(Number\w+\)\S+")
ALWAYS_HIDDEN = {USERS: ("password",)}
BOOLEAN_KEYS = ("allowManagementRequests", "allowBulkPatch", "allowBulkDelete", "allowWriteMode")
FILTER_KEYS = ("readFilter", "writeFilter")
MONGO_KEYS = (*BOOLEAN_KEYS, *FILTER_KEYS, "mergeRequest", "projectResponse")
_UNSET = object()


def validate_mongo(mongo: Any) -> None:
    """Refuse (ValueError naming the key) a ``mongo`` object we could not enforce exactly."""
    if mongo is None:
        return
    if not isinstance(mongo, dict):
        raise ValueError("mongo: must be an object")
    for key, value in mongo.items():
        if key not in MONGO_KEYS:
            raise ValueError(f"mongo: unknown key {key!r}; the supported keys are {', '.join(MONGO_KEYS)}")
        if key in BOOLEAN_KEYS:
            if not isinstance(value, bool):
                raise ValueError(f"mongo.{key}: must be true or false")
            continue
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ValueError(f"mongo.{key}: must be an object or null")
        if key in FILTER_KEYS:
            _validate_filter(key, value)
        elif key == "mergeRequest":
            _validate_merge(value)
        else:
            try:
                validate_projection(value)
            except ValueError as exc:
                raise ValueError(f"mongo.projectResponse: {exc}") from None


def _validate_filter(key: str, value: dict) -> None:
    try:
        query.check_bson_limits(value, f"mongo.{key}")
        op = query.forbidden_operator(value)
        if op:
            raise ValueError(f"the {op} operator is not allowed")
        query.validate_filter(value, f"mongo.{key}")  # "@user..." placeholders are strings here
    except BadRequest as exc:
        raise ValueError(
            exc.message if exc.message.startswith("illegal mongo.") else f"mongo.{key}: {exc.message}"
        ) from None
    except ValueError as exc:
        raise ValueError(f"mongo.{key}: {exc}") from None


def _validate_merge(value: dict) -> None:
    if not value:
        raise ValueError("mongo.mergeRequest: must not be empty (use null for none)")
    for path in value:
        if (
            not isinstance(path, str)
            or not path
            or path.startswith("$")
            or "\0" in path
            or any(not p for p in path.split("."))
        ):
            raise ValueError(f"mongo.mergeRequest: invalid field name {path!r}")
        if path.split(".")[0] in ("_id", "_etag"):
            raise ValueError(f"mongo.mergeRequest: {path!r} is managed by the server and cannot be merged")
    if query.has_dollar_key(value):
        raise ValueError("mongo.mergeRequest: values cannot hold field names starting with '$'")


# ---------------------------------------------------------------------- interpolation


def interpolate(value: Any, user: dict | None, now: dt.datetime, what: str) -> Any:
    """A copy of ``value`` with ``"@user"``, ``"@user.<path>"`` and ``"@now"`` filled in.

    :raise Forbidden: a variable the caller cannot fill (anonymous, missing property, the
        password): a filter that silently lost a condition would widen what the caller sees.
    """
    if isinstance(value, dict):
        return {k: interpolate(v, user, now, what) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, user, now, what) for v in value]
    if value == "@now":
        return now
    if isinstance(value, str) and (value == "@user" or value.startswith("@user.")):
        if user is None:
            raise Forbidden(f"this permission's {what} needs an authenticated user")
        parts = value.split(".")[1:]
        if parts and parts[0] == "password":
            raise Forbidden(f"this permission's {what} refers to {value}, which is never available")
        current: Any = {k: v for k, v in user.items() if k != "password"}
        for part in parts:
            if isinstance(current, dict) and part in current:
                current = current[part]
            elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
                current = current[int(part)]
            else:
                raise Forbidden(f"this permission's {what} needs {value}, which the user does not have")
        return current
    return value


# ---------------------------------------------------------------------- the grant


def _roles(doc: dict | None) -> Any:
    if doc is None:
        return []
    return doc.get("roles", [])


def _uses_expr(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "$expr" in item:
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def check_user_document(doc: dict) -> None:
    """What every stored user must look like, whoever writes it and however."""
    roles = doc.get("roles", [])
    if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
        raise BadRequest("a user's roles must be an array of non-empty strings")
    password = doc.get("password", _UNSET)
    if password is not _UNSET and not (
        isinstance(password, str) and password.startswith(("$2a$", "$2b$", "$2y$"))
    ):
        raise BadRequest("a user's password can only be set to a new string")


@dataclass(frozen=True)
class Grant:
    """The permission of one request, interpolated for its caller and collection."""

    admin: bool
    read_filter: dict | None = None
    write_filter: dict | None = None
    merge: dict | None = None
    visibility: Visibility | None = None
    projection: dict | None = None  # projectResponse as written (visibility adds ALWAYS_HIDDEN)
    allow_management: bool = False
    allow_bulk_patch: bool = False
    allow_bulk_delete: bool = False
    allow_write_mode: bool = False

    @classmethod
    def of(
        cls,
        mongo: dict | None,
        user: dict | None,
        coll: str | None,
        admin: bool,
        now: dt.datetime | None = None,
    ) -> Grant:
        """``mongo`` of the matching permission (None: no options, all defaults)."""
        now = now or dt.datetime.now(dt.UTC).replace(tzinfo=None)
        always = ALWAYS_HIDDEN.get(coll or "", ())
        if admin:
            return cls(
                True,
                visibility=Visibility.of(None, always),
                allow_management=True,
                allow_bulk_patch=True,
                allow_bulk_delete=True,
                allow_write_mode=True,
            )
        mongo = mongo or {}

        def opt(key: str, what: str) -> dict | None:
            value = mongo.get(key)
            return interpolate(value, user, now, what) if value else None

        return cls(
            False,
            read_filter=opt("readFilter", "readFilter"),
            write_filter=opt("writeFilter", "writeFilter"),
            merge=opt("mergeRequest", "mergeRequest"),
            visibility=Visibility.of(mongo.get("projectResponse") or None, always),
            projection=mongo.get("projectResponse") or None,
            allow_management=bool(mongo.get("allowManagementRequests")),
            allow_bulk_patch=bool(mongo.get("allowBulkPatch")),
            allow_bulk_delete=bool(mongo.get("allowBulkDelete")),
            allow_write_mode=bool(mongo.get("allowWriteMode")),
        )

    # -- refusals before anything is read or written --

    def require(self, allowed: bool, key: str, what: str) -> None:
        if not allowed:
            raise Forbidden(f"{what} needs a permission with mongo.{key}: true")

    # -- reads --

    def restrict(self, flt: dict | None) -> dict:
        """A client filter ANDed with the readFilter (both optional), the readFilter first."""
        if not self.read_filter:
            return flt or {}
        return {"$and": [self.read_filter, flt]} if flt else self.read_filter

    def redact(self, message: str) -> str:
        """An update error's message without the stored values it quotes (`in element {...}`,
        `(NumberLong)5`) when the caller's permission hides fields: they may hold them."""
        if self.visibility is None:
            return message
        return _NUMBER_VALUE.sub("(...)", _ELEMENT.sub("{...}", message))

    def check_update(self, spec: dict) -> None:
        """403 for an operator update that would read a hidden field (services.hidden)."""
        if self.visibility is not None:
            self.visibility.check_update(spec)

    @property
    def stage_visibility(self) -> Visibility | None:
        """What a stream's own stages may not read: projectResponse's fields. (The users
        password never reaches any stage: the engines remove it before the stages run.)"""
        return Visibility.of(self.projection) if self.projection else None

    def check_stream_stages(self, stages: list, avars: dict) -> None:
        """403 when a stream's stage reads a field projectResponse hides (its events would be
        an oracle for it); 400 for a readFilter that cannot apply to change events. (The
        readFilter itself is applied before the stream's stages, per subscriber, by
        services.views.scoped: the stages only ever see events of documents the caller may
        read, as GETs.)"""
        hidden = self.stage_visibility
        if hidden is not None:
            hidden.check_stages(pipelines.bind_variables(stages, avars))
        if self.read_filter:
            read_filter_on_events(self.read_filter)

    def shown(self, doc: dict) -> dict:
        return self.visibility.project_document(doc) if self.visibility is not None else doc

    def check_filter(self, flt: dict) -> None:
        """403 for a read's filter that could reveal what the permission hides.

        Hidden fields (projectResponse) may not be named. And where a filter narrows what
        the caller may see (the readFilter), `$expr` is refused: an expression can fail on a
        document (`$toInt` of a string, a division by zero), and the error, or that there
        was one, would describe a document outside the caller's filter, whatever order the
        engine evaluates in.
        """
        self._check_client_filter(flt, self.read_filter)

    def check_bulk_filter(self, flt: dict) -> None:
        """`check_filter` for a bulk write, whose candidates the writeFilter narrows."""
        self._check_client_filter(flt, self.write_filter or self.read_filter)

    def _check_client_filter(self, flt: dict, scope: dict | None) -> None:
        if self.visibility is not None:
            self.visibility.check_filter(flt)
        if scope and _uses_expr(flt):
            raise Forbidden(
                "filter: $expr is not allowed under a permission with a readFilter or writeFilter "
                "(an expression that fails on another document would reveal it)"
            )

    def check_query(
        self, flt: dict | None = None, sort: list | None = None, keys: dict | None = None
    ) -> None:
        """403 for a filter, sort or keys that could reveal a hidden field."""
        if self.visibility is None:
            return
        if flt:
            self.visibility.check_filter(flt)
        if sort:
            self.visibility.check_sort(sort)
        if keys:
            self.visibility.check_keys(keys)

    # -- writes --

    def merged_document(self, doc: dict) -> dict:
        """``doc`` with mergeRequest's values set, as a ``$set`` of them would (dotted paths
        reach into sub-documents; a body whose shape conflicts with them is a 400)."""
        if not self.merge:
            return doc
        try:
            merged, _ = updates.apply_update(doc, {"$set": self.merge}, dt.datetime.now(dt.UTC))
        except updates.UpdateError as exc:
            raise updates.UpdateError(
                f"the body conflicts with the fields the server sets (mongo.mergeRequest): {exc}"
            ) from None
        return merged

    def merged_update(self, spec: dict) -> dict:
        """An operator update with mergeRequest added as ``$set``; a client operator that
        would also touch a merged field is refused (it could undo the merge)."""
        if not self.merge:
            return spec
        for op, fields in spec.items():
            if not isinstance(fields, dict):
                continue
            touched = list(fields)
            if op == "$rename":
                touched += [t for t in fields.values() if isinstance(t, str)]
            for path in touched:
                for merged in self.merge:
                    if path == merged or path.startswith(merged + ".") or merged.startswith(path + "."):
                        if op == "$set" and path == merged:
                            continue  # overwritten by the merge below
                        raise Forbidden(
                            f"the field '{merged}' is set by the server (mongo.mergeRequest); "
                            f"{op} cannot change '{path}'"
                        )
        out = dict(spec)
        out["$set"] = {**spec.get("$set", {}), **self.merge}
        return out

    def write_guard(self, coll: str) -> Callable[[dict | None, dict | None], None] | None:
        """The checks the engine runs inside the write, on the stored and the new document."""
        checks: list[Callable[[dict | None, dict | None], None]] = []
        if self.write_filter:
            flt, readable = self.write_filter, self.read_filter

            def inside_write_filter(old: dict | None, new: dict | None) -> None:
                if old is not None and not query.matches(flt, old):
                    if readable and not query.matches(readable, old):
                        # outside the readFilter too: as absent as in GET
                        raise DocumentNotFound(coll, str(old.get("_id")))
                    raise Forbidden(
                        f"document '{old.get('_id')}' is outside what your permission lets you "
                        "write (mongo.writeFilter)"
                    )
                if new is not None and not query.matches(flt, new):
                    raise Forbidden(
                        "the write would produce a document outside what your permission lets you "
                        "write (mongo.writeFilter)"
                    )

            checks.append(inside_write_filter)
        if coll == USERS:

            def valid_user(old: dict | None, new: dict | None) -> None:
                if new is not None:
                    check_user_document(new)

            checks.append(valid_user)
            if not self.admin:

                def roles_unchanged(old: dict | None, new: dict | None) -> None:
                    if new is not None and _roles(new) != _roles(old):
                        raise Forbidden("only an admin may set or change a user's roles")

                checks.append(roles_unchanged)
        if not checks:
            return None
        if len(checks) == 1:
            return checks[0]

        def guard(old: dict | None, new: dict | None) -> None:
            for check in checks:
                check(old, new)

        return guard


def read_filter_on_events(read_filter: dict) -> dict:
    """Rewrite a document filter to match change events' `fullDocument` (deletes never match)."""
    out: dict = {}
    for key, value in read_filter.items():
        if key in ("$and", "$or", "$nor"):
            if not isinstance(value, list):
                raise BadRequest(f"readFilter: {key} needs an array")
            out[key] = [read_filter_on_events(v) for v in value]
        elif key.startswith("$"):
            raise BadRequest(f"readFilter: {key} cannot be applied to a stream")
        else:
            out[f"fullDocument.{key}"] = value
    return out
