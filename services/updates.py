"""MongoDB update operators and the ``updateDescription`` they produce.

changefeed stores documents in SQLite but must emit change events that a client
cannot tell apart from MongoDB's.  For an operator update (``$set``, ``$inc``,
``$push`` ...) MongoDB does *not* diff the pre- and post-image: every update node
logs its own ``$v: 2`` delta entry, and the change stream flattens that delta into
``updateDescription``.  This module applies the operators to a document and
reproduces those per-operator logging rules, as MongoDB 5.0+ has them (the server's
update-node unit tests show the delta each operator writes, and its change-stream diff
parser maps every "updated" or "inserted" delta entry to ``updatedFields`` and every
deleted one to ``removedFields``):

* R1: a changed existing value is logged at its full path with its whole new
  value (sub-documents and arrays set as a whole are not diffed);
* R2: when a path is created, the first missing component is logged with the
  entire created subtree;
* R3/R4: numeric components address array elements (``a.1``); writing past the
  end pads with ``None`` and logs only the target index;
* R5: nodes that change nothing log nothing; an update that changes nothing at
  all produces no event (``apply_update`` returns ``None`` as the description);
* ``$push`` that only appends to a non-empty array logs one ``arr.N`` per new
  element, every other array operator logs the whole array;
* ``truncatedArrays`` is always ``[]`` for operator updates.

Ordering (an approximation): update nodes are applied in MongoDB's processing
order (path components compared as strings, numeric components numerically).
The server emits ``updatedFields`` grouped per document level as
"updated, then inserted, then sub-diffs"; we emit ``updatedFields`` keys and
``removedFields`` entries simply in that sorted path order.  Consumers compare
``updatedFields`` as a mapping (MongoDB's own tests ignore its key order), so
only ``removedFields`` order is observable, and for it sorted order matches the
server whenever the removed paths do not mix levels.

Not supported: positional paths (``$``, ``$[]``, ``$[<id>]``), arrayFilters,
pipeline-style updates and upserts (``$setOnInsert`` is accepted and is a no-op).
``$bit`` is supported in addition to the operators the API promises.
"""

from __future__ import annotations

import copy
import datetime
import decimal
import functools
import json
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import bson
from bson.code import Code
from bson.decimal128 import Decimal128, create_decimal128_context
from bson.int64 import Int64
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.objectid import ObjectId
from bson.regex import Regex
from bson.timestamp import Timestamp
from mongomock.filtering import filter_applies
from pymongo.errors import PyMongoError

from . import mongomock_compat  # noqa: F401 - $pull conditions are matched by mongomock
from .errors import BadRequest

__all__ = ["UpdateError", "normalize_patch", "apply_update"]


class UpdateError(BadRequest):
    """Bad update input; the message names the fault for the client (HTTP 400)."""


OPERATORS = frozenset(
    {
        "$set",
        "$unset",
        "$inc",
        "$mul",
        "$push",
        "$pull",
        "$addToSet",
        "$rename",
        "$min",
        "$max",
        "$currentDate",
        "$pop",
        "$pullAll",
        "$setOnInsert",
        "$bit",
    }
)

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_MAX_PADDING = 1_500_000  # MongoDB refuses to back-fill arrays further than this
_D128_CTX = create_decimal128_context()
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_INDEX_RE = re.compile(r"[0-9]+\Z")
_ID_ERROR = (
    "the _id field cannot be updated: performing an update on the path '{path}' "
    "would modify the immutable field '_id'"
)

# First keys that make a $pull argument a condition on the element itself
# (MatchExpressionParser::parsePathAcceptingKeyword); other objects match
# array elements that are documents.
_PATH_KEYWORDS = frozenset(
    {
        "$eq",
        "$ne",
        "$gt",
        "$gte",
        "$lt",
        "$lte",
        "$in",
        "$nin",
        "$exists",
        "$type",
        "$mod",
        "$regex",
        "$options",
        "$size",
        "$all",
        "$elemMatch",
        "$not",
        "$bitsAllSet",
        "$bitsAllClear",
        "$bitsAnySet",
        "$bitsAnyClear",
        "$geoIntersects",
        "$geoWithin",
        "$within",
        "$near",
        "$nearSphere",
    }
)


class _NoOp:
    """Marker returned by a node that leaves its value unchanged."""


_NOOP = _NoOp()
Path = tuple[str, ...]


# --------------------------------------------------------------------------- #
# BSON type helpers
# --------------------------------------------------------------------------- #


def _num_rank(v: Any) -> int | None:
    """0 int32, 1 int64, 2 double, 3 decimal; None if `v` is not a BSON number."""
    if isinstance(v, bool):
        return None
    if isinstance(v, Int64):
        return 1
    if isinstance(v, int):
        if _INT32_MIN <= v <= _INT32_MAX:
            return 0
        return 1 if _INT64_MIN <= v <= _INT64_MAX else None
    if isinstance(v, float):
        return 2
    if isinstance(v, Decimal128):
        return 3
    return None


def _type_name(v: Any) -> str:
    """MongoDB's name for the BSON type of `v` (as used in server messages)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    rank = _num_rank(v)
    if rank is not None:
        return ("int", "long", "double", "decimal")[rank]
    if isinstance(v, int):
        return "long"
    for types, name in (
        (str, "string"),
        (dict, "object"),
        ((list, tuple), "array"),
        (bytes, "binData"),
        (ObjectId, "objectId"),
        (datetime.datetime, "date"),
        (Timestamp, "timestamp"),
        ((Regex, re.Pattern), "regex"),
        (MinKey, "minKey"),
        (MaxKey, "maxKey"),
        (Code, "javascript"),
    ):
        if isinstance(v, types):
            return name
    return type(v).__name__


def _dt_ms(v: datetime.datetime) -> int:
    if v.tzinfo is None:
        v = v.replace(tzinfo=datetime.UTC)
    return (v - _EPOCH) // datetime.timedelta(milliseconds=1)


def _val_str(v: Any) -> str:
    """Render a value roughly like the server's BSON toString (for messages)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(float(v)) if isinstance(v, float) else str(int(v))
    if isinstance(v, Decimal128):
        return f'NumberDecimal("{v}")'
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, dict):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{k}: {_val_str(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[ " + ", ".join(_val_str(x) for x in v) + " ]" if v else "[]"
    if isinstance(v, ObjectId):
        return f"ObjectId('{v}')"
    if isinstance(v, datetime.datetime):
        return f"new Date({_dt_ms(v)})"
    if isinstance(v, Timestamp):
        return f"Timestamp({v.time}, {v.inc})"
    if isinstance(v, bytes):
        return f"BinData({getattr(v, 'subtype', 0)}, {bytes(v).hex().upper()})"
    if isinstance(v, Regex):
        return f"/{v.pattern}/{v.flags}"
    return repr(v)


def _identical(a: Any, b: Any) -> bool:
    """Same BSON type and value, byte for byte (the $set no-op test)."""
    try:
        return bson.encode({"v": a}) == bson.encode({"v": b})
    except Exception:  # not BSON-encodable: fall back to a strict Python test
        return type(a) is type(b) and a == b


def _canonical_rank(v: Any) -> int:
    """Position of `v`'s type in MongoDB's cross-type sort order."""
    if v is None:
        return 5
    if isinstance(v, bool):
        return 40
    if isinstance(v, (int, float, Decimal128)):
        return 10
    if isinstance(v, str):
        return 15
    if isinstance(v, dict):
        return 20
    if isinstance(v, (list, tuple)):
        return 25
    if isinstance(v, bytes):
        return 30
    if isinstance(v, ObjectId):
        return 35
    if isinstance(v, datetime.datetime):
        return 45
    if isinstance(v, Timestamp):
        return 47
    if isinstance(v, (Regex, re.Pattern)):
        return 50
    if isinstance(v, Code):
        return 60
    if isinstance(v, MinKey):
        return -1
    if isinstance(v, MaxKey):
        return 127
    return 100


def _to_decimal(v: Any) -> decimal.Decimal:
    """Exact decimal value of a BSON number (NaN stays NaN)."""
    if isinstance(v, Decimal128):
        return v.to_decimal()
    if isinstance(v, float):
        return decimal.Decimal(v)
    return decimal.Decimal(int(v))


def _sign(x: Any) -> int:
    return (x > 0) - (x < 0)


def _bson_cmp(a: Any, b: Any) -> int:
    """Compare two values in MongoDB's BSON order (numbers by value across types)."""
    ra, rb = _canonical_rank(a), _canonical_rank(b)
    if ra != rb:
        return _sign(ra - rb)
    if ra == 10:
        da, db = _to_decimal(a), _to_decimal(b)
        if da.is_nan() or db.is_nan():  # NaN equals NaN and sorts below every number
            return int(not da.is_nan()) - int(not db.is_nan())
        return _sign(da - db) if da != db else 0
    if ra in (15, 35):
        x, y = (a.encode(), b.encode()) if ra == 15 else (a.binary, b.binary)
        return (x > y) - (x < y)
    if ra in (20, 25):
        ia = list(a.items()) if ra == 20 else [(str(i), x) for i, x in enumerate(a)]
        ib = list(b.items()) if ra == 20 else [(str(i), x) for i, x in enumerate(b)]
        for (ka, va), (kb, vb) in zip(ia, ib, strict=False):  # a shorter array sorts first
            c = _sign(_canonical_rank(va) - _canonical_rank(vb))
            if not c:
                c = (ka.encode() > kb.encode()) - (ka.encode() < kb.encode())
            if not c:
                c = _bson_cmp(va, vb)
            if c:
                return c
        return _sign(len(ia) - len(ib))
    if ra == 30:
        ka_ = (len(a), getattr(a, "subtype", 0), bytes(a))
        kb_ = (len(b), getattr(b, "subtype", 0), bytes(b))
        return (ka_ > kb_) - (ka_ < kb_)
    if ra == 40:
        return int(a) - int(b)
    if ra == 45:
        return _sign(_dt_ms(a) - _dt_ms(b))
    if ra == 47:
        ta, tb = (a.time, a.inc), (b.time, b.inc)
        return (ta > tb) - (ta < tb)
    if ra == 50:
        ra_, rb_ = (a.pattern, str(a.flags)), (b.pattern, str(b.flags))
        return (ra_ > rb_) - (ra_ < rb_)
    if ra == 60:
        return (str(a) > str(b)) - (str(a) < str(b))
    return 0 if a == b else ((repr(a) > repr(b)) - (repr(a) < repr(b)))


def _bson_equal(a: Any, b: Any) -> bool:
    return _bson_cmp(a, b) == 0


def _double_to_decimal(f: float) -> decimal.Decimal:
    """A double as MongoDB converts it to Decimal128 (rounded to 15 significant digits)."""
    if math.isnan(f) or math.isinf(f) or f == 0:
        return decimal.Decimal(f)
    return decimal.Decimal(format(f, ".14e"))


def _arith(op: str, a: Any, b: Any) -> Any | None:
    """`a + b` (op "$inc") or `a * b` (op "$mul") with MongoDB's type rules; None on int64 overflow."""
    rank = max(_num_rank(a), _num_rank(b))  # type: ignore[type-var]
    if rank == 3:
        x, y = (v if isinstance(v, Decimal128) else None for v in (a, b))
        dx = (
            x.to_decimal()
            if x is not None
            else (_double_to_decimal(a) if isinstance(a, float) else decimal.Decimal(int(a)))
        )
        dy = (
            y.to_decimal()
            if y is not None
            else (_double_to_decimal(b) if isinstance(b, float) else decimal.Decimal(int(b)))
        )
        with decimal.localcontext(_D128_CTX):
            result = dx + dy if op == "$inc" else dx * dy
        return Decimal128(result)
    if rank == 2:
        return float(a) + float(b) if op == "$inc" else float(a) * float(b)
    whole = int(a) + int(b) if op == "$inc" else int(a) * int(b)
    if rank == 0 and _INT32_MIN <= whole <= _INT32_MAX:
        return whole
    if _INT64_MIN <= whole <= _INT64_MAX:
        return Int64(whole)
    return None


def _typed_str(v: Any) -> str:
    """`(NumberLong)5`-style rendering used in arithmetic overflow messages."""
    prefix = {
        "int": "NumberInt",
        "long": "NumberLong",
        "double": "NumberDouble",
        "decimal": "NumberDecimal",
    }.get(_type_name(v), _type_name(v))
    return f"({prefix}){_val_str(v)}"


# --------------------------------------------------------------------------- #
# Paths
# --------------------------------------------------------------------------- #


def _is_index(part: str) -> bool:
    return bool(_INDEX_RE.match(part))


def _split_path(path: Any, what: str = "update") -> Path:
    """Validate a dotted update path and split it into components."""
    if not isinstance(path, str):
        raise UpdateError(f"the {what} path must be a string, not {_type_name(path)}")
    if path == "":
        raise UpdateError(f"An empty {what} path is not valid.")
    parts = tuple(path.split("."))
    for part in parts:
        if part == "":
            raise UpdateError(f"The {what} path '{path}' contains an empty field name, which is not allowed.")
        if part.startswith("$"):
            if part == "$" or part.startswith("$["):
                raise UpdateError(
                    f"The {what} path '{path}' uses a positional operator "
                    "($, $[] or $[<identifier>]), which is not supported"
                )
            raise UpdateError(
                f"The {what} path '{path}' contains the field name '{part}': "
                "field names in update paths must not start with '$'"
            )
    if parts[0] == "_id":
        raise UpdateError(_ID_ERROR.format(path=path))
    return parts


def _cmp_part(a: str, b: str) -> int:
    """MongoDB's update-node order: strings byte-wise, numeric names numerically."""
    if a == b:
        return 0
    if len(a) != len(b) and _is_index(a) and _is_index(b):
        return -1 if len(a) < len(b) else 1
    return -1 if a.encode() < b.encode() else 1


def _cmp_path(a: Path, b: Path) -> int:
    for x, y in zip(a, b, strict=False):  # a prefix sorts first
        c = _cmp_part(x, y)
        if c:
            return c
    return _sign(len(a) - len(b))


_path_key = functools.cmp_to_key(_cmp_path)


class _ConflictTracker:
    """Detect two update paths where one equals or is a prefix of the other."""

    def __init__(self) -> None:
        self._full: set[Path] = set()
        self._prefixes: set[Path] = set()

    def add(self, parts: Path) -> None:
        dotted = ".".join(parts)
        if parts in self._full or parts in self._prefixes:
            raise UpdateError(f"Updating the path '{dotted}' would create a conflict at '{dotted}'")
        for i in range(1, len(parts)):
            if parts[:i] in self._full:
                raise UpdateError(
                    f"Updating the path '{dotted}' would create a conflict at '{'.'.join(parts[:i])}'"
                )
        self._full.add(parts)
        self._prefixes.update(parts[:i] for i in range(1, len(parts)))


# --------------------------------------------------------------------------- #
# Operator arguments
# --------------------------------------------------------------------------- #


class _PushSpec(NamedTuple):
    each: list
    position: int | None
    slice: int | None
    sort: Any  # None, 1/-1, or {field: 1/-1}


def _integral(v: Any) -> int | None:
    rank = _num_rank(v)
    if rank in (0, 1):
        return int(v)
    if rank == 2 and math.isfinite(v) and float(v).is_integer():
        return int(v)
    return None


def _is_plus_minus_one(v: Any) -> bool:
    return _num_rank(v) in (0, 1, 2) and float(v) in (1.0, -1.0)


def _parse_array_arg(op: str, path: str, arg: Any) -> _PushSpec:
    """Parse a $push / $addToSet argument (plain value or {$each: [...], modifiers})."""
    if not isinstance(arg, dict) or "$each" not in arg:
        if isinstance(arg, dict) and any(isinstance(k, str) and k.startswith("$") for k in arg):
            raise UpdateError(
                f"Invalid {op} argument for '{path}': modifiers "
                f"({', '.join(k for k in arg if k.startswith('$'))}) require $each"
            )
        return _PushSpec([arg], None, None, None)
    allowed = {"$each", "$slice", "$sort", "$position"} if op == "$push" else {"$each"}
    for key in arg:
        if key not in allowed:
            if op == "$push":
                raise UpdateError(f"Unrecognized clause in $push: {key}")
            raise UpdateError(f"Found unexpected fields after $each in $addToSet: {_val_str(arg)}")
    each = arg["$each"]
    if not isinstance(each, list):
        raise UpdateError(
            f"The argument to $each in {op} must be an array but it was of type: {_type_name(each)}"
        )
    position = slice_ = sort = None
    if "$position" in arg:
        position = _integral(arg["$position"])
        if position is None:
            raise UpdateError(
                "The value for $position must be an integer value, not of type: "
                f"{_type_name(arg['$position'])}"
            )
    if "$slice" in arg:
        slice_ = _integral(arg["$slice"])
        if slice_ is None:
            raise UpdateError(
                "The value for $slice must be an integer value but was given type: "
                f"{_type_name(arg['$slice'])}"
            )
    if "$sort" in arg:
        sort = arg["$sort"]
        if isinstance(sort, dict):
            if not sort:
                raise UpdateError("The $sort pattern is empty when it should be a set of fields.")
            for field, direction in sort.items():
                if (
                    not isinstance(field, str)
                    or field == ""
                    or "" in field.split(".")
                    or field.startswith("$")
                ):
                    raise UpdateError(f"The $sort field is not a valid field path: {field!r}")
                if not _is_plus_minus_one(direction):
                    raise UpdateError("The $sort element value must be either 1 or -1")
        elif not _is_plus_minus_one(sort):
            raise UpdateError(
                "The $sort is invalid: use 1/-1 to sort the whole element, "
                "or {field:1/-1} to sort embedded fields"
            )
    return _PushSpec(each, position, slice_, sort)


def _pull_matcher(path: str, cond: Any) -> Callable[[Any], bool]:
    """Build the $pull predicate for one array element (pull_node.cpp's three matchers)."""

    def guarded(fn: Callable[[Any], bool]) -> Callable[[Any], bool]:
        def match(elem: Any) -> bool:
            try:
                return bool(fn(elem))
            except (PyMongoError, NotImplementedError, TypeError, ValueError) as exc:
                raise UpdateError(f"invalid $pull condition for '{path}': {exc}") from None

        return match

    if isinstance(cond, dict) and cond and next(iter(cond)) in _PATH_KEYWORDS:
        return guarded(lambda e: filter_applies({"v": cond}, {"v": e}))
    if isinstance(cond, dict):
        return guarded(lambda e: isinstance(e, dict) and filter_applies(cond, e))
    if isinstance(cond, (Regex, re.Pattern)):
        return guarded(lambda e: filter_applies({"v": cond}, {"v": e}))
    return lambda e: _bson_equal(e, cond)


def _check_arg(op: str, path: str, arg: Any) -> Any:
    """Validate one operator argument; return its parsed form for apply_update."""
    if op in ("$inc", "$mul"):
        if _num_rank(arg) is None:
            verb = "increment" if op == "$inc" else "multiply"
            raise UpdateError(f"Cannot {verb} with non-numeric argument: {{{path}: {_val_str(arg)}}}")
    elif op == "$currentDate":
        ok = arg is True or (
            isinstance(arg, dict) and len(arg) == 1 and arg.get("$type") in ("date", "timestamp")
        )
        if not ok:
            raise UpdateError(
                f"{{{path}: {_val_str(arg)}}} is not valid type for $currentDate. "
                "Please use a boolean ('true') or a $type expression "
                "({$type: 'timestamp/date'})."
            )
        return "timestamp" if isinstance(arg, dict) and arg["$type"] == "timestamp" else "date"
    elif op in ("$push", "$addToSet"):
        return _parse_array_arg(op, path, arg)
    elif op == "$pop":
        if not _is_plus_minus_one(arg):
            raise UpdateError(f"$pop expects 1 or -1, found: {_val_str(arg)}")
        return float(arg) < 0
    elif op == "$pullAll":
        if not isinstance(arg, list):
            raise UpdateError(f"$pullAll requires an array argument but was given a {_type_name(arg)}")
    elif op == "$pull":
        matcher = _pull_matcher(path, arg)
        matcher({})  # surface unknown operators / malformed conditions now
        matcher(0)
        return matcher
    elif op == "$bit":
        if not isinstance(arg, dict) or not arg:
            raise UpdateError(
                "You must pass in at least one bitwise operation. "
                "The format is: {$bit: {field: {and/or/xor: #}}"
            )
        for name, value in arg.items():
            if name not in ("and", "or", "xor"):
                raise UpdateError(
                    f"The $bit modifier only supports 'and', 'or', and 'xor', "
                    f"not '{name}' which is an unknown operator: {_val_str(arg)}"
                )
            if _num_rank(value) not in (0, 1):
                raise UpdateError(
                    "The $bit modifier field must be an Integer(32/64 bit); a "
                    f"'{_type_name(value)}' is not supported here: {_val_str(arg)}"
                )
    return arg


def _check_spec(spec: Any) -> list[tuple[str, Path, Any, Path | None]]:
    """Validate an operator spec; return (op, path, parsed arg, rename target) items."""
    if not isinstance(spec, dict):
        raise UpdateError("the update must be a JSON object")
    items = []
    conflicts = _ConflictTracker()
    for op, fields in spec.items():
        if op not in OPERATORS:
            raise UpdateError(f"unknown update operator {op}")
        if not isinstance(fields, dict):
            raise UpdateError(
                f"Modifiers operate on fields but we found type {_type_name(fields)} "
                f"instead. For example: {{$mod: {{<field>: ...}}}} not "
                f"{{{op}: {_val_str(fields)}}}"
            )
        for path, arg in fields.items():
            parts = _split_path(path)
            target = None
            if op == "$rename":
                if not isinstance(arg, str):
                    raise UpdateError(
                        f"The 'to' field for $rename must be a string: {{{path}: {_val_str(arg)}}}"
                    )
                target = _split_path(arg, "$rename target")
                if target == parts:
                    raise UpdateError(f"The source and target field for $rename must differ: {path}")
                shorter = min(len(parts), len(target))
                if parts[:shorter] == target[:shorter]:
                    raise UpdateError(
                        "The source and target field for $rename must not be on "
                        f"the same path: {path}: {_val_str(arg)}"
                    )
                conflicts.add(parts)
                conflicts.add(target)
            else:
                conflicts.add(parts)
            items.append((op, parts, _check_arg(op, path, arg), target))
    return items


def normalize_patch(body: dict) -> dict:
    """Turn a RESTHeart-style PATCH body into a validated operator spec.

    Plain top-level fields are a ``$set`` of that (possibly dotted) path, merged
    with an explicit ``$set``; raises UpdateError for anything MongoDB would
    reject when parsing the update.
    """
    if isinstance(body, list):
        raise UpdateError("pipeline-style updates (an array of stages) are not supported")
    if not isinstance(body, dict):
        raise UpdateError(f"the update body must be a JSON object, not {_type_name(body)}")
    spec: dict[str, Any] = {}
    for key, value in body.items():
        if not isinstance(key, str):
            raise UpdateError(f"update field names must be strings, not {_type_name(key)}")
        if not key.startswith("$"):
            merged = spec.setdefault("$set", {})
            if key in merged:
                raise UpdateError(f"Updating the path '{key}' would create a conflict at '{key}'")
            merged[key] = value
            continue
        if key not in OPERATORS:
            raise UpdateError(f"unknown update operator {key}")
        if not isinstance(value, dict):
            _check_spec({key: value})  # raises the "Modifiers operate on fields" error
        merged = spec.setdefault(key, {})
        for path, arg in value.items():
            if path in merged:
                raise UpdateError(f"Updating the path '{path}' would create a conflict at '{path}'")
            merged[path] = arg
    _check_spec(spec)
    return spec


# --------------------------------------------------------------------------- #
# Applying
# --------------------------------------------------------------------------- #


def _walk(doc: dict, parts: Path) -> list[Any]:
    """Values along `parts`: [doc, doc[p0], doc[p0][p1], ...] as far as the path exists."""
    nodes: list[Any] = [doc]
    node: Any = doc
    for part in parts:
        if isinstance(node, dict):
            if part not in node:
                break
            node = node[part]
        elif isinstance(node, list):
            if not _is_index(part) or int(part) >= len(node):
                break
            node = node[int(part)]
        else:
            break
        nodes.append(node)
    return nodes


def _can_hold(node: Any, part: str) -> bool:
    """Whether `part` can be created inside `node` (object, or array with an index)."""
    return isinstance(node, dict) or (isinstance(node, list) and _is_index(part))


def _put(container: Any, part: str, value: Any) -> None:
    """Set `container[part]`, padding an array with None when writing past its end."""
    if isinstance(container, dict):
        container[part] = value
        return
    index = int(part)
    if index >= len(container):
        if index - len(container) > _MAX_PADDING:
            raise UpdateError(f"can't backfill array to larger than {_MAX_PADDING} elements")
        container.extend([None] * (index + 1 - len(container)))
    container[index] = value


def _read(doc: dict, parts: Path) -> Any:
    node: Any = doc
    for part in parts:
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _sort_value(elem: Any, fields: list[str], ascending: bool) -> Any:
    """Sort key of one element for a $push {$sort: {field: dir}} pattern."""
    node = elem
    for part in fields:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, list):
        if not node:
            return None
        pick = min if ascending else max
        return pick(node, key=functools.cmp_to_key(_bson_cmp))
    return node


def _sort_array(values: list, sort: Any) -> list:
    if not isinstance(sort, dict):
        direction = 1 if float(sort) > 0 else -1
        return sorted(values, key=functools.cmp_to_key(lambda x, y: direction * _bson_cmp(x, y)))
    pattern = [(field.split("."), 1 if float(d) > 0 else -1) for field, d in sort.items()]

    def cmp(x: Any, y: Any) -> int:
        for fields, direction in pattern:
            c = _bson_cmp(_sort_value(x, fields, direction > 0), _sort_value(y, fields, direction > 0))
            if c:
                return direction * c
        return 0

    return sorted(values, key=functools.cmp_to_key(cmp))


class _Apply:
    """One update being applied: the new document plus the paths it logged."""

    def __init__(self, doc: dict, now: datetime.datetime) -> None:
        self.doc = doc
        self.now = now
        self.updated: dict[Path, None] = {}  # insertion-ordered set
        self.removed: list[Path] = []
        self.id_str = f"_id: {_val_str(doc['_id'])}" if "_id" in doc else ""

    # -- traversal ---------------------------------------------------------
    def _not_viable(self, parts: Path, nodes: list[Any]) -> UpdateError:
        k = len(nodes) - 1
        return UpdateError(
            f"Cannot use the part ({parts[k]}) of ({'.'.join(parts)}) to traverse "
            f"the element ({{{parts[k - 1]}: {_val_str(nodes[-1])}}})"
        )

    def modify(self, parts: Path, fn: Callable[[bool, Any], Any]) -> None:
        """Apply a creating node: fn(exists, old) -> _NOOP | (value, logged paths or None)."""
        nodes = _walk(self.doc, parts)
        k = len(nodes) - 1
        if k == len(parts):
            result = fn(True, nodes[-1])
            if result is _NOOP:
                return
            value, logged = result
            _put(nodes[-2], parts[-1], value)
            for path in logged or [parts]:
                self.updated[path] = None
            return
        node = nodes[-1]
        if not _can_hold(node, parts[k]):
            raise UpdateError(
                f"Cannot create field '{parts[k]}' in element {{{parts[k - 1]}: {_val_str(node)}}}"
            )
        result = fn(False, None)
        if result is _NOOP:
            return
        subtree = result[0]
        for part in reversed(parts[k + 1 :]):
            subtree = {part: subtree}
        _put(node, parts[k], subtree)
        self.updated[parts[: k + 1]] = None

    def modify_existing(self, parts: Path, fn: Callable[[Any], Any]) -> None:
        """Apply a non-creating array node ($pull, $pullAll, $pop): fn(old) -> _NOOP | new value."""
        nodes = _walk(self.doc, parts)
        if len(nodes) - 1 < len(parts):
            if not _can_hold(nodes[-1], parts[len(nodes) - 1]):
                raise self._not_viable(parts, nodes)
            return
        value = fn(nodes[-1])
        if value is not _NOOP:
            _put(nodes[-2], parts[-1], value)
            self.updated[parts] = None

    # -- operators ---------------------------------------------------------
    def op_set(self, parts: Path, arg: Any) -> None:
        def fn(exists: bool, old: Any) -> Any:
            if exists and _identical(old, arg):
                return _NOOP
            return copy.deepcopy(arg), None

        self.modify(parts, fn)

    def op_setOnInsert(self, parts: Path, arg: Any) -> None:
        """No upsert insert happens here, so $setOnInsert never changes anything."""

    def op_unset(self, parts: Path, arg: Any) -> None:
        nodes = _walk(self.doc, parts)
        if len(nodes) - 1 < len(parts):
            return  # missing or non-viable path: no-op
        parent = nodes[-2]
        if isinstance(parent, list):
            parent[int(parts[-1])] = None  # $unset of an array element sets it to null
            self.updated[parts] = None
        else:
            del parent[parts[-1]]
            self.removed.append(parts)

    def _arith_op(self, op: str, parts: Path, arg: Any) -> None:
        def fn(exists: bool, old: Any) -> Any:
            if not exists:
                return (copy.deepcopy(arg) if op == "$inc" else _arith(op, 0, arg)), None
            if _num_rank(old) is None:
                raise UpdateError(
                    f"Cannot apply {op} to a value of non-numeric type. "
                    f"{{{self.id_str}}} has the field '{parts[-1]}' of non-numeric "
                    f"type {_type_name(old)}"
                )
            new = _arith(op, old, arg)
            if new is None:
                raise UpdateError(
                    f"Failed to apply {op} operations to current value "
                    f"({_typed_str(old)}) for document {{{self.id_str}}}"
                )
            return _NOOP if _identical(old, new) else (new, None)

        self.modify(parts, fn)

    def op_inc(self, parts: Path, arg: Any) -> None:
        self._arith_op("$inc", parts, arg)

    def op_mul(self, parts: Path, arg: Any) -> None:
        self._arith_op("$mul", parts, arg)

    def _compare_op(self, parts: Path, arg: Any, want: int) -> None:
        def fn(exists: bool, old: Any) -> Any:
            if exists and _bson_cmp(arg, old) != want:
                return _NOOP
            return copy.deepcopy(arg), None

        self.modify(parts, fn)

    def op_min(self, parts: Path, arg: Any) -> None:
        self._compare_op(parts, arg, -1)

    def op_max(self, parts: Path, arg: Any) -> None:
        self._compare_op(parts, arg, 1)

    def op_currentDate(self, parts: Path, kind: str) -> None:
        now = self.now
        if now.tzinfo is None:
            now = now.replace(tzinfo=datetime.UTC)
        if kind == "timestamp":
            value: Any = Timestamp(int(now.timestamp()), 1)
        else:  # BSON dates hold milliseconds; store exactly what will be read back
            value = self.now.replace(microsecond=self.now.microsecond // 1000 * 1000)
        self.modify(parts, lambda exists, old: (value, None))

    def op_bit(self, parts: Path, arg: dict) -> None:
        def fn(exists: bool, old: Any) -> Any:
            if exists and _num_rank(old) not in (0, 1):
                raise UpdateError(
                    f"Cannot apply $bit to a value of non-integral type."
                    f"{{{self.id_str}}} has the field {parts[-1]} of non-integer "
                    f"type {_type_name(old)}"
                )
            value = old if exists else 0
            rank = _num_rank(value)
            for name, operand in arg.items():
                rank = max(rank, _num_rank(operand))  # type: ignore[type-var]
                a, b = int(value), int(operand)
                value = a & b if name == "and" else a | b if name == "or" else a ^ b
            value = Int64(value) if rank == 1 else value
            return _NOOP if exists and _identical(old, value) else (value, None)

        self.modify(parts, fn)

    def op_push(self, parts: Path, spec: _PushSpec) -> None:
        def fn(exists: bool, old: Any) -> Any:
            values = copy.deepcopy(spec.each)
            if exists and not isinstance(old, list):
                raise UpdateError(
                    f"The field '{parts[-1]}' must be an array but is of type "
                    f"{_type_name(old)} in document {{{self.id_str}}}"
                )
            array = list(old) if exists else []
            size = len(array)
            mode = "noop"
            if values:
                pos = size if spec.position is None else spec.position
                pos = min(max(size + pos, 0) if pos < 0 else pos, size)
                array[pos:pos] = values
                mode = "append" if size and pos == size else "whole"
            if spec.sort is not None:
                array, mode = _sort_array(array, spec.sort), "whole"
            if spec.slice is not None:
                n = spec.slice
                array, mode = (array[:n] if n >= 0 else array[n:]), "whole"
            if not exists:
                return array, None
            if mode == "noop":
                return _NOOP
            if mode == "append":
                return array, [parts + (str(i),) for i in range(size, len(array))]
            return array, None

        self.modify(parts, fn)

    def op_addToSet(self, parts: Path, spec: _PushSpec) -> None:
        def fn(exists: bool, old: Any) -> Any:
            if exists and not isinstance(old, list):
                raise UpdateError(
                    f"Cannot apply $addToSet to non-array field. Field named "
                    f"'{parts[-1]}' has non-array type {_type_name(old)}"
                )
            current = list(old) if exists else []
            added = False
            for value in spec.each:
                if not any(_bson_equal(value, e) for e in current):
                    current.append(copy.deepcopy(value))
                    added = True
            if exists and not added:
                return _NOOP
            return current, None

        self.modify(parts, fn)

    def _cull(self, parts: Path, keep: Callable[[Any], bool]) -> None:
        def fn(old: Any) -> Any:
            if not isinstance(old, list):
                raise UpdateError("Cannot apply $pull to a non-array value")
            kept = [e for e in old if keep(e)]
            return _NOOP if len(kept) == len(old) else kept

        self.modify_existing(parts, fn)

    def op_pull(self, parts: Path, matcher: Callable[[Any], bool]) -> None:
        self._cull(parts, lambda e: not matcher(e))

    def op_pullAll(self, parts: Path, values: list) -> None:
        self._cull(parts, lambda e: not any(_bson_equal(e, v) for v in values))

    def op_pop(self, parts: Path, from_front: bool) -> None:
        def fn(old: Any) -> Any:
            if not isinstance(old, list):
                raise UpdateError(
                    f"Path '{'.'.join(parts)}' contains an element of non-array type '{_type_name(old)}'"
                )
            if not old:
                return _NOOP
            return old[1:] if from_front else old[:-1]

        self.modify_existing(parts, fn)

    def op_rename(self, source: Path, target: Path) -> None:
        nodes = _walk(self.doc, source)
        if len(nodes) - 1 < len(source):
            if not _can_hold(nodes[-1], source[len(nodes) - 1]):
                raise self._not_viable(source, nodes)
            return  # source missing: no-op
        where = self.id_str or "no id"
        for i in range(1, len(source)):
            if isinstance(nodes[i], list):
                raise UpdateError(
                    f"The source field cannot be an array element, "
                    f"'{'.'.join(source)}' in doc with {where} has an array field "
                    f"called '{source[i - 1]}'"
                )
        dest = _walk(self.doc, target)
        k = len(dest) - 1
        for i in range(1, min(k + 1, len(target))):
            if isinstance(dest[i], list):
                raise UpdateError(
                    f"The destination field cannot be an array element, "
                    f"'{'.'.join(target)}' in doc with {where} has an array field "
                    f"called '{target[i - 1]}'"
                )
        if k < len(target) and not _can_hold(dest[-1], target[k]):
            raise self._not_viable(target, dest)
        value = nodes[-1]
        del nodes[-2][source[-1]]
        self.removed.append(source)
        self.modify(target, lambda exists, old: _NOOP if exists and _identical(old, value) else (value, None))

    # -- result ------------------------------------------------------------
    def description(self) -> dict | None:
        if not self.updated and not self.removed:
            return None
        logged = set(self.updated)
        # A path inside a subtree that is already logged whole (e.g. two fields
        # created under the same new parent) is covered by the parent's entry.
        paths = [p for p in self.updated if not any(p[:i] in logged for i in range(1, len(p)))]
        paths.sort(key=_path_key)
        return {
            "updatedFields": {".".join(p): copy.deepcopy(_read(self.doc, p)) for p in paths},
            "removedFields": [".".join(p) for p in sorted(self.removed, key=_path_key)],
            "truncatedArrays": [],
        }


def apply_update(doc: dict, spec: dict, now: datetime.datetime) -> tuple[dict, dict | None]:
    """Apply an operator spec (from normalize_patch) to a copy of `doc`.

    Returns ``(new_document, update_description)``; the description is None when
    nothing changed (MongoDB then writes no oplog entry, so there is no event).
    Raises UpdateError for updates MongoDB rejects at apply time.
    """
    items = _check_spec(spec)
    state = _Apply(copy.deepcopy(doc), now)
    # MongoDB applies update nodes in path order; a $rename sits at its target.
    items.sort(key=lambda item: _path_key(item[3] or item[1]))
    for op, parts, arg, target in items:
        if op == "$rename":
            state.op_rename(parts, target)  # type: ignore[arg-type]
        else:
            getattr(state, "op_" + op[1:])(parts, arg)
    return state.doc, state.description()
