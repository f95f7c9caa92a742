"""Hidden fields: which fields a permission hides, and enforcing that everywhere.

What: an ACL permission may carry RESTHeart's ``mongo.projectResponse``, a MongoDB projection
(exclusion ``{"secret": 0, "a.b": 0}`` or inclusion ``{"name": 1, "owner": 1}``); some fields
are hidden whatever the permission (the ``password`` hash of documents in ``users``). A
``Visibility`` combines both and does two jobs:

A. it projects what a client receives: documents of GET responses (``project_document``) and
   change events of streams (``project_event``: full documents, ``updatedFields``,
   ``removedFields``, ``truncatedArrays``, ``disambiguatedPaths``);
B. it refuses (``Forbidden``, HTTP 403, naming the field or construct) any client-supplied
   query that could *reveal* a hidden value without returning it: filters (``check_filter``),
   sorts (``check_sort``), key projections (``check_keys``) and stream stages
   (``check_stages``).

Why B: projecting responses is not enough, because a query is an oracle. Each request
answers a yes/no question about the hidden value ("is there a document matching this?", "which
comes first?"), and enough questions reveal it. With ``password`` hidden in ``users``, the
filter ::

    {"$expr": {"$gte": [{"$let": {"vars": {"e": {"$arrayElemAt": [{"$objectToArray": "$$ROOT"}, 1]}},
                                  "in": "$$e.v"}},
                        {"$literal": "<prefix>"}]}}

binary-searched a bcrypt hash in 361 requests without ever naming ``password``, and
``sort=password`` orders users by their hash. So every field path a query reads is checked
(``Visibility.reveals``), and every construct that reads fields without naming them
(``$$ROOT``, ``$$CURRENT``, ``$objectToArray``, ``$getField``, ``$jsonSchema``, ``$where`` ...)
is refused whenever anything is hidden.

Rules where MongoDB gives no answer (or a dangerous one), chosen to hide more, never less:

* a path component that is a number, after the first, is an array index and is skipped when
  matching (``arr.0.secret`` is ``arr.secret``): an element has its array's projection. A
  field literally named ``"0"`` is then treated as an index, which can only hide more.
  projectResponse paths themselves may not hold such components, nor ``$``, nor empty parts;
* ``_id`` (and every path under it) is never hidden: it names the document in URLs and events;
* reading a path that is an ancestor of hidden data reveals it (``a`` when ``a.secret`` is
  hidden; ``profile`` when only ``profile.name`` is shown), except through ``$elemMatch``
  with a query document, whose sub-paths are checked instead (``{"arr": {"$elemMatch":
  {"x": 1}}}`` reads ``arr.x``, not ``arr``);
* an invalid path (empty, or with an empty component) counts as hidden.

Pure Python and stdlib only: no query engine is needed to decide what a query *reads*.
Walks over client input are iterative (no recursion limit, whatever the nesting).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

from .errors import Forbidden

__all__ = ["validate_projection", "Visibility"]

_DROP = object()  # "this value disappears" (inclusion projections drop non-object elements)
_Tree = dict  # segment -> True (hidden/included leaf) | _Tree (an ancestor of leaves)


# --------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------


def _is_index(segment: str) -> bool:
    return segment.isascii() and segment.isdigit()


def _segments(path: Any) -> tuple[str, ...] | None:
    """The path as matched against projections (array indexes skipped), or None if invalid."""
    if not isinstance(path, str) or not path:
        return None
    parts = path.split(".")
    if any(not p for p in parts):
        return None
    return (parts[0],) + tuple(p for p in parts[1:] if not _is_index(p))


def _is_id(segments: tuple[str, ...]) -> bool:
    return segments[0] == "_id"


def _path_fault(path: Any) -> str | None:
    """Why ``path`` cannot be a projectResponse (or always-hidden) path, or None."""
    if not isinstance(path, str):
        return f"field names must be strings, found {path!r}"
    if not path:
        return "a field name is empty"
    if "\0" in path:
        return f"the field name {path!r} contains a NUL character"
    parts = path.split(".")
    if any(not p for p in parts):
        return f"the field name {path!r} has an empty part"
    if any(p.startswith("$") for p in parts):
        return f"the field name {path!r} uses '$' (operators and positional projections are not allowed)"
    if any(_is_index(p) for p in parts[1:]):
        return (
            f"the field name {path!r} holds an array index; name the field without it, a path applies "
            "to every element of an array"
        )
    return None


def _tree(paths: Iterable[tuple[str, ...]]) -> _Tree:
    """A prefix tree of paths; a path under another one adds nothing."""
    root: _Tree = {}
    for segments in paths:
        node = root
        for segment in segments[:-1]:
            child = node.get(segment)
            if child is True:
                break
            if child is None:
                child = node[segment] = {}
            node = child
        else:
            node[segments[-1]] = True
    return root


def _descend(tree: _Tree, segments: Iterable[str]) -> Any:
    """Walk ``tree`` along ``segments``: True if the path is (under) a leaf, the subtree if it
    is an ancestor of leaves, None if it is unrelated to every path of the tree."""
    node: Any = tree
    for segment in segments:
        if node is True:
            return True
        node = node.get(segment)
        if node is None:
            return None
    return node


def _leaves(tree: _Tree, base: str = "") -> list[str]:
    out: list[str] = []
    stack: list[tuple[str, Any]] = [(base, tree)]
    while stack:
        prefix, node = stack.pop()
        if node is True:
            out.append(prefix)
            continue
        for key in reversed(list(node)):
            stack.append((prefix + "." + key if prefix else key, node[key]))
    return out


def _listed(paths: list[str], limit: int = 8) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (", ..." if len(paths) > limit else "")


# --------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------


def _copy(value: Any) -> Any:
    """Deep copy of dicts and lists (iterative); other values are shared (immutable leaves)."""
    if not isinstance(value, (dict, list)):
        return value
    root: Any = {} if isinstance(value, dict) else []
    stack = [(value, root)]
    while stack:
        src, dst = stack.pop()
        items = src.items() if isinstance(src, dict) else enumerate(src)
        for key, child in items:
            if isinstance(child, dict):
                new: Any = {}
                stack.append((child, new))
            elif isinstance(child, list):
                new = []
                stack.append((child, new))
            else:
                new = child
            if isinstance(dst, dict):
                dst[key] = new
            else:
                dst.append(new)
    return root


def _exclude(value: Any, tree: _Tree) -> Any:
    """A copy of ``value`` without the paths of ``tree``, through arrays (MongoDB exclusion)."""
    if isinstance(value, dict):
        out = {}
        for key, child in value.items():
            sub = tree.get(key) if isinstance(key, str) else None
            if sub is None:
                out[key] = _copy(child)
            elif sub is not True:
                out[key] = _exclude(child, sub)
        return out
    if isinstance(value, list):
        return [_exclude(item, tree) for item in value]
    return value


def _include(value: Any, tree: _Tree) -> Any:
    """A copy of ``value`` keeping only the paths of ``tree`` (MongoDB inclusion): an object
    keeps the listed fields (possibly none), an array keeps its projected object and array
    elements, anything else is dropped (``_DROP``)."""
    if isinstance(value, dict):
        out = {}
        for key, child in value.items():
            sub = tree.get(key) if isinstance(key, str) else None
            if sub is True:
                out[key] = _copy(child)
            elif sub is not None:
                kept = _include(child, sub)
                if kept is not _DROP:
                    out[key] = kept
        return out
    if isinstance(value, list):
        return [kept for kept in (_include(item, tree) for item in value) if kept is not _DROP]
    return _DROP


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _include_document(doc: dict, tree: _Tree, keep_id: bool = True) -> dict:
    """An inclusion projection of a whole document: `_id` (unless `keep_id` is false) and
    the paths of `tree`."""
    out: dict = {}
    for key, value in doc.items():
        if key == "_id":
            if keep_id:
                out[key] = _copy(value)
            continue
        sub = tree.get(key) if isinstance(key, str) else None
        if sub is True:
            out[key] = _copy(value)
        elif sub is not None:
            kept = _include(value, sub)
            if kept is not _DROP:
                out[key] = kept
    return out


def _flag(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if (
        isinstance(value, (int, float))
        and not (isinstance(value, float) and math.isnan(value))
        and value in (0, 1)
    ):
        return int(value)
    return None


def validate_projection(spec: Any) -> dict:
    """Check a ``projectResponse`` value; return it normalized to ``{path: 0 | 1}``.

    Raises ValueError naming the fault: not an object, empty, a value other than 0/1/true/false,
    inclusion mixed with exclusion (other than ``_id``), an invalid path (empty, ``$``, empty
    part, NUL, array index), two paths where one is inside the other (MongoDB's "path
    collision"), or any attempt to hide or reshape ``_id``.
    """
    if not isinstance(spec, dict):
        raise ValueError(
            f"must be an object (a MongoDB projection such as {{'secret': 0}}), found {type(spec).__name__}"
        )
    if not spec:
        raise ValueError("must not be empty (use null to hide nothing)")
    out: dict[str, int] = {}
    for key, value in spec.items():
        fault = _path_fault(key)
        if fault:
            raise ValueError(fault)
        flag = _flag(value)
        if flag is None:
            raise ValueError(f"the value of {key!r} must be 0, 1, true or false, found {value!r}")
        if key == "_id" and flag == 0:
            raise ValueError(
                "cannot hide _id: _id names the document in URLs and change events, so it is always shown"
            )
        if key.startswith("_id."):
            raise ValueError(
                f"cannot project {key!r}: _id names the document in URLs and change events, "
                "so it is always shown whole"
            )
        out[key] = flag
    flags = {flag for key, flag in out.items() if key != "_id"}
    if len(flags) > 1:
        raise ValueError(
            "cannot mix inclusion (1) and exclusion (0) of fields other than _id: {}".format(
                _listed([f"{name}: {flag}" for name, flag in out.items()])
            )
        )
    ordered = sorted(out, key=lambda k: k.split("."))
    for shorter, longer in itertools.pairwise(ordered):
        if longer.startswith(shorter + "."):
            raise ValueError(f"path collision: {longer!r} is inside {shorter!r}; keep only one of them")
    return out


# --------------------------------------------------------------------------------------------
# query walking (oracle checks)
# --------------------------------------------------------------------------------------------

_LOGICAL = frozenset({"$and", "$or", "$nor"})
_HARMLESS_QUERY_OPERATORS = frozenset({"$comment", "$alwaystrue", "$alwaysfalse"})
_REFUSED_QUERY_OPERATORS = {
    "$jsonschema": "a JSON schema can test any field",
    "$where": "it runs code over the whole document",
    "$function": "it runs code over the whole document",
    "$accumulator": "it runs code over the whole document",
    "$text": "it searches every text-indexed field",
}
_QUERY_LEVEL = _LOGICAL | _HARMLESS_QUERY_OPERATORS | set(_REFUSED_QUERY_OPERATORS) | {"$expr"}
_REFUSED_EXPRESSION_OPERATORS = {
    "$objecttoarray": "it reaches fields by computed names",
    "$getfield": "it reaches fields by computed names",
    "$setfield": "it reaches fields by computed names",
    "$unsetfield": "it reaches fields by computed names",
    "$function": "it runs code over its arguments",
    "$accumulator": "it runs code over its arguments",
    "$where": "it runs code over the whole document",
}
_WHOLE_VARIABLES = ("ROOT", "CURRENT")
_STAGES = frozenset(
    {"$match", "$project", "$addFields", "$set", "$unset", "$replaceRoot", "$replaceWith", "$redact"}
)


def _is_query_document(arg: Any) -> bool:
    """True if ``arg`` of ``$elemMatch`` is a query on the elements' fields (not operators
    comparing whole elements). Empty counts as operators: ``{}`` matches any element."""
    if not isinstance(arg, dict) or not arg:
        return False
    return any(not isinstance(k, str) or not k.startswith("$") or k.lower() in _QUERY_LEVEL for k in arg)


def _descends_only(ops: dict) -> bool:
    """True if every operator only looks inside the elements (``$elemMatch`` with a query
    document, ``$all`` of those), so the field itself is not read as a whole."""
    for op, arg in ops.items():
        if op == "$elemMatch" and _is_query_document(arg):
            continue
        if (
            op == "$all"
            and isinstance(arg, list)
            and arg
            and all(
                isinstance(x, dict) and list(x) == ["$elemMatch"] and _is_query_document(x["$elemMatch"])
                for x in arg
            )
        ):
            continue
        return False
    return bool(ops)


def _refuse(where: str, construct: str, reason: str) -> Forbidden:
    return Forbidden(f"{where}: {construct} is not allowed when your permission hides fields ({reason})")


def _walk(
    where: str,
    check_path: Callable[[str], None],
    query: Any = None,
    expression: Any = None,
    check_container: Callable[[str], None] | None = None,
) -> None:
    """Check every path a query (and/or an aggregation expression) reads with ``check_path``;
    raise Forbidden for constructs that read fields without naming them.

    A field only looked into (``$elemMatch`` with a query document) is not read whole, but
    ``check_container`` still refuses it when nothing in it is visible: even an empty
    condition on its elements (``{"$elemMatch": {"$and": [{}]}}``) tells whether it is a
    non-empty array.

    Iterative: the stack holds (kind, node, prefix) with kind "q" (query document), "o"
    (operator document of the field ``prefix``) or "e" (aggregation expression).
    """
    stack: list[tuple[str, Any, str]] = []
    if query is not None:
        stack.append(("q", query, ""))
    if expression is not None:
        stack.append(("e", expression, ""))
    while stack:
        kind, node, prefix = stack.pop()
        if kind == "q":
            if not isinstance(node, dict):
                continue
            for key, value in node.items():
                key = key if isinstance(key, str) else str(key)
                if key.startswith("$"):
                    low = key.lower()
                    if low in _LOGICAL:
                        subs = value if isinstance(value, list) else [value]
                        stack.extend(("q", sub, prefix) for sub in subs)
                    elif low == "$expr":
                        if prefix:
                            raise _refuse(where, "$expr inside $elemMatch", "its paths are ambiguous")
                        stack.append(("e", value, ""))
                    elif low in _REFUSED_QUERY_OPERATORS:
                        raise _refuse(where, key, _REFUSED_QUERY_OPERATORS[low])
                    elif low not in _HARMLESS_QUERY_OPERATORS:
                        raise _refuse(where, "the query operator " + key, "it cannot be checked")
                    continue
                path = prefix + "." + key if prefix else key
                if isinstance(value, dict) and any(isinstance(k, str) and k.startswith("$") for k in value):
                    if not _descends_only(value):
                        check_path(path)
                    elif check_container is not None:
                        check_container(path)
                    stack.append(("o", value, path))
                else:  # equality with a literal reads the field as a whole
                    check_path(path)
        elif kind == "o":
            for op, arg in node.items():
                if op == "$elemMatch":
                    if _is_query_document(arg):
                        stack.append(("q", arg, prefix))
                    elif isinstance(arg, dict):
                        stack.append(("o", arg, prefix))
                elif op == "$not" and isinstance(arg, dict):
                    stack.append(("o", arg, prefix))
                elif op == "$all" and isinstance(arg, list):
                    stack.extend(("o", x, prefix) for x in arg if isinstance(x, dict) and "$elemMatch" in x)
                # every other operator compares the field (already checked) with a literal
        else:  # aggregation expression
            if isinstance(node, str):
                if node.startswith("$$"):
                    name, dot, rest = node[2:].partition(".")
                    if name in _WHOLE_VARIABLES:
                        if not dot:
                            raise _refuse(where, node, "it reads the whole document")
                        check_path(rest)
                    # any other $$variable is a user or system variable: what it is bound to
                    # was checked where it was bound ($let vars, $map/$filter input ...)
                elif node.startswith("$"):
                    check_path(node[1:])
            elif isinstance(node, list):
                stack.extend(("e", item, "") for item in node)
            elif isinstance(node, dict):
                for key, value in node.items():
                    if isinstance(key, str) and key.startswith("$"):
                        low = key.lower()
                        if low == "$literal":
                            continue
                        if low in _REFUSED_EXPRESSION_OPERATORS:
                            raise _refuse(where, key, _REFUSED_EXPRESSION_OPERATORS[low])
                    stack.append(("e", value, ""))


def _event_field(path: str) -> tuple[str, str]:
    """Classify a change-event path: ("doc", document path), ("whole", why) or ("event", "")."""
    parts = path.split(".") if isinstance(path, str) else [""]
    if any(not p for p in parts):
        return "whole", "it is not a valid field path"
    head = parts[0]
    if head in ("fullDocument", "fullDocumentBeforeChange"):
        if len(parts) == 1:
            return "whole", "it reads whole documents"
        return "doc", ".".join(parts[1:])
    if head == "updateDescription":
        if len(parts) >= 3 and parts[1] == "updatedFields":
            return "doc", ".".join(parts[2:])
        if len(parts) == 2 and parts[1] == "updatedFields":
            return "whole", "it reads every updated field"
        return "whole", "it reads changed fields or their names"
    return "event", ""


# --------------------------------------------------------------------------------------------
# Visibility
# --------------------------------------------------------------------------------------------

_OVERWRITING = frozenset({"$set", "$setOnInsert", "$unset", "$currentDate"})


def project(doc: dict, projection: dict) -> dict:
    """A client's ``keys`` projection (validated by services.query.parse_keys), with the same
    MongoDB semantics as projectResponse: through arrays, scalars dropped by an inclusion;
    ``_id`` kept unless ``{"_id": 0}``."""
    fields = {k: v for k, v in projection.items() if k != "_id"}
    keep_id = bool(projection.get("_id", 1))
    if not fields:
        out = {"_id": _copy(doc["_id"])} if keep_id and "_id" in doc else {}
        if not keep_id and projection:
            out = {k: _copy(v) for k, v in doc.items() if k != "_id"}
        return out
    tree = _tree(tuple(k.split(".")) for k in fields)
    if next(iter(fields.values())):
        return _include_document(doc, tree, keep_id)
    out = _exclude(doc, tree)
    if not keep_id:
        out.pop("_id", None)
    return out


class Visibility:
    """The fields one permission hides in one collection; build with ``Visibility.of``.

    ``projection`` is the normalized projectResponse (or None), ``always_hidden`` the paths
    hidden whatever it says. Immutable; safe to share between requests.
    """

    __slots__ = ("projection", "always_hidden", "_include", "_exclude")

    def __init__(self, projection: dict | None, always_hidden: tuple[str, ...]):
        """Use ``Visibility.of`` (it validates and returns None when nothing is hidden)."""
        self.projection = projection
        self.always_hidden = always_hidden
        self._include: _Tree | None = None  # inclusion projection: the shown paths (_id implied)
        hidden = [tuple(p.split(".")) for p in always_hidden]
        if projection:
            fields = {k: v for k, v in projection.items() if k != "_id"}
            if not fields or next(iter(fields.values())):  # {"_id": 1} alone shows only _id
                self._include = _tree(tuple(k.split(".")) for k in fields)
            else:
                hidden = [tuple(k.split(".")) for k in fields] + hidden
        self._exclude: _Tree = _tree(hidden)  # always hidden, and exclusion paths

    @classmethod
    def of(cls, projection: dict | None, always_hidden: tuple[str, ...] = ()) -> Visibility | None:
        """The visibility of a projectResponse plus always-hidden paths; None if nothing is hidden.

        Raises ValueError (from ``validate_projection``) for an unusable projection or
        always-hidden path.
        """
        spec = validate_projection(projection) if projection is not None else None
        always = tuple(always_hidden)
        for path in always:
            fault = _path_fault(path)
            if fault:
                raise ValueError("always hidden: " + fault)
            if path.split(".")[0] == "_id":
                raise ValueError("always hidden: _id names the document and cannot be hidden")
        if spec is None and not always:
            return None
        return cls(spec, always)

    def __repr__(self) -> str:
        return f"Visibility({self.projection!r}, always_hidden={self.always_hidden!r})"

    @property
    def hides_anything(self) -> bool:
        """Always True for a built Visibility (``of`` returns None otherwise)."""
        return self._include is not None or bool(self._exclude)

    def describe(self) -> str:
        """For messages, e.g. ``hides password, secret`` or ``shows only _id, name``."""
        parts = []
        if self._include is not None:
            parts.append("shows only " + _listed(["_id"] + _leaves(self._include)))
        if self._exclude:
            parts.append(
                ("always hides " if self._include is not None else "hides ") + _listed(_leaves(self._exclude))
            )
        return "; ".join(parts)

    # -- which paths are hidden --

    def _why_hidden(self, path: str) -> str | None:
        """None if reading ``path`` reveals nothing hidden, else the reason ("" if plainly hidden)."""
        segments = _segments(path)
        if segments is None:
            return "it is not a valid field path"
        if _is_id(segments):
            return None
        if self._include is not None:
            node = _descend(self._include, segments)
            if node is None:
                return "your permission shows only " + _listed(["_id"] + _leaves(self._include))
            if node is not True:
                return "only part of it is visible: " + _listed(_leaves(node, ".".join(segments)))
        if self._exclude:
            node = _descend(self._exclude, segments)
            if node is True:
                return ""
            if node is not None:
                return "it contains the hidden field '{}'".format(_leaves(node, ".".join(segments))[0])
        return None

    def reveals(self, path: str) -> bool:
        """True if reading the field ``path`` would reveal hidden data.

        Hidden paths, paths under them and their ancestors reveal (reading ``a`` reveals
        ``a.secret``); with an inclusion projection, so does every path not equal to or under
        a shown path (ancestors of shown paths included). ``_id`` never does. Numeric
        components after the first are array indexes and are skipped; an invalid path reveals.
        """
        return self._why_hidden(path) is not None

    def _entirely_hidden(self, path: Any) -> bool:
        """True if nothing at ``path`` is visible (it is hidden or under a hidden path)."""
        segments = _segments(path)
        if segments is None:
            return True
        if _is_id(segments):
            return False
        if self._include is not None and _descend(self._include, segments) is None:
            return True
        return bool(self._exclude) and _descend(self._exclude, segments) is True

    def _check(self, path: str, where: str, shown: str | None = None) -> None:
        reason = self._why_hidden(path)
        if reason is not None:
            raise Forbidden(
                "{}: the field '{}' is hidden by your permission{}".format(
                    where, path if shown is None else shown, f" ({reason})" if reason else ""
                )
            )

    # -- A: projecting what the client receives --

    def project_document(self, doc: dict) -> dict:
        """A new document with the hidden paths removed (MongoDB projection semantics).

        Exclusion removes the paths, through arrays (every object element of ``a`` loses
        ``b`` for ``a.b``). Inclusion keeps ``_id`` and the shown paths; through an array it
        keeps the object elements projected (possibly to ``{}``) and drops the others, as
        MongoDB does. Always-hidden paths are removed afterwards. The input is not mutated and
        the result shares no dict or list with it.
        """
        if not isinstance(doc, dict):
            return _copy(doc)
        if self._include is not None:
            out = _include_document(doc, self._include)
            return _exclude(out, self._exclude) if self._exclude else out
        return _exclude(doc, self._exclude)

    def _project_at(self, path: Any, value: Any) -> Any:
        """The value of ``updatedFields[path]`` as the client may see it, or ``_DROP``."""
        segments = _segments(path)
        if segments is None:
            return _DROP
        if _is_id(segments):
            return _copy(value)
        copied = False
        if self._include is not None:
            node = _descend(self._include, segments)
            if node is None:
                return _DROP
            if node is not True:  # an ancestor of shown paths: keep only those
                value = _include(value, node)
                if value is _DROP:
                    return _DROP
                copied = True
        if self._exclude:
            node = _descend(self._exclude, segments)
            if node is True:
                return _DROP
            if node is not None:  # an ancestor of hidden paths: remove them
                return _exclude(value, node)
        return value if copied else _copy(value)

    def _project_update(self, desc: dict) -> dict:
        dropped: set = set()
        fields = desc.get("updatedFields")
        if isinstance(fields, dict):
            projected = {}
            for path, value in fields.items():
                kept = self._project_at(path, value)
                if kept is _DROP:
                    dropped.add(path)
                else:
                    projected[path] = kept
            fields = projected
        out = {}
        for key, value in desc.items():
            if key == "updatedFields" and isinstance(value, dict):
                out[key] = fields
            elif key == "removedFields" and isinstance(value, list):
                out[key] = [_copy(p) for p in value if not (isinstance(p, str) and self._entirely_hidden(p))]
            elif key == "truncatedArrays" and isinstance(value, list):
                out[key] = [
                    _copy(t)
                    for t in value
                    if not (isinstance(t, dict) and self._entirely_hidden(t.get("field")))
                ]
            elif key == "disambiguatedPaths" and isinstance(value, dict):
                out[key] = {
                    p: _copy(v) for p, v in value.items() if p not in dropped and not self._entirely_hidden(p)
                }
            else:
                out[key] = _copy(value)
        return out

    def project_event(self, event: dict) -> dict:
        """A new change event with hidden data removed.

        ``fullDocument`` and ``fullDocumentBeforeChange`` are projected like documents. In
        ``updateDescription``: an ``updatedFields`` key that is hidden (or under a hidden
        path) is dropped, a key that is an ancestor of hidden data (``"a"`` holding an object
        when ``a.secret`` is hidden, ``"arr.1"`` holding an element) keeps its value projected
        relative to that path; ``removedFields`` and ``truncatedArrays`` entries naming hidden
        fields are dropped, and so are ``disambiguatedPaths`` keys that are hidden or whose
        ``updatedFields`` entry was dropped. Everything else (``documentKey``, ``_id``,
        ``operationType``, ``wallTime`` ...) is copied unchanged. The input is not mutated.
        """
        if not isinstance(event, dict):
            return _copy(event)
        out = {}
        for key, value in event.items():
            if key in ("fullDocument", "fullDocumentBeforeChange") and isinstance(value, dict):
                out[key] = self.project_document(value)
            elif key == "updateDescription" and isinstance(value, dict):
                out[key] = self._project_update(value)
            else:
                out[key] = _copy(value)
        return out

    # -- B: refusing oracles --

    def check_filter(self, flt: dict | None, where: str = "filter") -> None:
        """Raise Forbidden if the MongoDB query ``flt`` reads hidden data.

        Field keys are paths (relative to the enclosing ``$elemMatch``); ``$and``/``$or``/
        ``$nor``, ``$not``, ``$elemMatch`` and ``$all`` of ``$elemMatch`` are walked; ``$expr``
        is checked as an aggregation expression; ``$jsonSchema``, ``$where``, ``$function``,
        ``$accumulator``, ``$text`` and unknown top-level operators are refused. Operator
        arguments are literals.
        """
        if flt:
            _walk(
                where,
                lambda path: self._check(path, where),
                query=flt,
                check_container=lambda path: self._check_container(path, where),
            )

    def check_expression(self, expression: Any, where: str = "expression") -> None:
        """Raise Forbidden if the aggregation expression reads hidden data.

        ``"$a.b"`` reads the path ``a.b``; ``"$$ROOT"``/``"$$CURRENT"`` alone read everything,
        ``"$$ROOT.x"`` reads ``x``; other ``$$variables`` are fine; ``$literal`` is not walked;
        ``$objectToArray``, ``$getField``, ``$setField``, ``$unsetField`` (computed field
        names) and code operators are refused.
        """
        _walk(where, lambda path: self._check(path, where), expression=expression)

    def check_update(self, spec: dict, where: str = "update") -> None:
        """Refuse an operator update that would read a hidden field.

        Operators that compute from the current value (``$inc``, ``$push``, ``$pull`` ...)
        and a ``$rename`` source read it (a rename to a visible name would simply show it);
        their error messages would show it too. Overwriting a hidden field, or a whole
        sub-document that holds one (``$set``, ``$setOnInsert``, ``$unset``,
        ``$currentDate``, a ``$rename`` target), reads nothing, so a hidden field can stay
        writable; reaching *into* a hidden value (``$set`` of ``secret.x``) is refused.
        """
        for op, fields in spec.items():
            if not isinstance(fields, dict):
                continue
            for path in fields:
                if op in _OVERWRITING:
                    self._check_overwrite(path, f"{where} ({op})")
                else:
                    self._check(path, f"{where} ({op})")
            if op == "$rename":
                for target in fields.values():
                    if isinstance(target, str):
                        self._check_overwrite(target, f"{where} ($rename target)")

    def _check_overwrite(self, path: str, where: str) -> None:
        if _segments(path) is None:
            raise Forbidden(f"{where}: invalid field path '{path}'")
        # every proper prefix as written: 'secret.0' writes into 'secret' (an array index is
        # still inside it), so the index must not be skipped here
        parts = path.split(".")
        for i in range(1, len(parts)):
            inside = ".".join(parts[:i])
            if self._entirely_hidden(inside):
                raise Forbidden(
                    f"{where}: the field '{inside}' is hidden by your permission; it can be replaced "
                    "as a whole but not written into"
                )

    def _check_container(self, path: str, where: str) -> None:
        if self._entirely_hidden(path):
            raise Forbidden(f"{where}: the field '{path}' is hidden by your permission")

    def check_sort(self, sort: Iterable[Any] | dict | None, where: str = "sort") -> None:
        """Raise Forbidden if a sort key is hidden or holds hidden data (``(path, direction)``
        pairs, a ``{path: direction}`` object, or bare paths)."""
        if not sort:
            return
        for item in sort.keys() if isinstance(sort, dict) else sort:
            self._check(item if isinstance(item, str) else item[0], where)

    def check_keys(self, keys: dict | None, where: str = "keys") -> None:
        """Raise Forbidden if a ``keys`` projection names a hidden field, even to exclude it
        (``{"secret": 0}`` would still tell which documents have one)."""
        for path in keys or ():
            self._check(path, where)

    def check_stages(self, stages: list | None, where: str = "stream") -> None:
        """Raise Forbidden if an (unescaped) change-stream pipeline reads hidden data.

        Paths are paths of the change *event*: ``fullDocument.x``,
        ``fullDocumentBeforeChange.x`` and ``updateDescription.updatedFields.x`` are the
        document path ``x``; ``fullDocument``, ``fullDocumentBeforeChange``,
        ``updateDescription`` and everything else under it (``updatedFields`` whole,
        ``removedFields``, ``truncatedArrays``, ``disambiguatedPaths``) are refused; any other
        event path (``operationType``, ``documentKey``, ``ns``, ``_id`` ...) is fine.
        ``$match`` is a query, ``$project``/``$addFields``/``$set`` values and
        ``$replaceRoot``/``$replaceWith`` are expressions, ``$unset`` names are fine, and
        ``$redact`` (it reads everything) and unknown stages are refused.
        """
        for index, stage in enumerate(stages or (), start=1):
            if not isinstance(stage, dict):
                continue
            for name, arg in stage.items():
                here = f"{where} stage {index} ({name})"

                def check(path: str, here: str = here) -> None:
                    kind, detail = _event_field(path)
                    if kind == "whole":
                        raise Forbidden(f"{here}: the field '{path}' is hidden by your permission ({detail})")
                    if kind == "doc":
                        self._check(detail, here, shown=path)

                def container(path: str, here: str = here) -> None:
                    kind, detail = _event_field(path)
                    if kind == "whole" or (kind == "doc" and self._entirely_hidden(detail)):
                        raise Forbidden(f"{here}: the field '{path}' is hidden by your permission")

                if name == "$match":
                    _walk(here, check, query=arg, check_container=container)
                elif name in ("$project", "$addFields", "$set"):
                    values = list(arg.values()) if isinstance(arg, dict) else arg
                    _walk(here, check, expression=values)
                elif name in ("$replaceRoot", "$replaceWith"):
                    _walk(here, check, expression=arg)
                elif name == "$unset":
                    continue
                elif name == "$redact":
                    raise _refuse(here, "$redact", "it reads every field")
                else:
                    raise _refuse(here, "the stage " + str(name), "it cannot be checked")
