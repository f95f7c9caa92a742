"""Every patch changefeed applies to mongomock, in one place, applied once on import.

The embedded engine has no MongoDB server, so mongomock evaluates MongoDB's query and
aggregation languages for it: `GET /<coll>` filters and sorts (services.query, and through
it the permission filters of services.permissions), stream stages (services.pipeline) and
`$pull` conditions (services.updates). mongomock 4.x departs from MongoDB in the ways listed
below; each patch makes it answer as MongoDB does.

mongomock keeps its operators in module globals, so the patches are process-wide. They are
additive: each one answers only where mongomock raised an exception or matched differently
from MongoDB, and leaves the rest of mongomock alone. Every module that evaluates with
mongomock imports this module explicitly (`from . import mongomock_compat`), so what a query
means never depends on which other module the process happened to import first. Importing
it again, or calling `apply()` again, changes nothing.

The patches (`PATCHES`, in the order they are applied):

``bson_order``
    MongoDB orders values of different types by BSON type: ... ObjectId < Boolean < Date <
    Timestamp < Regex ... < MaxKey, with MinKey below everything. mongomock cannot compare
    a bson ``Timestamp`` (NotImplementedError "does not know how to sort"), nor MinKey or
    MaxKey. Change events carry ``clusterTime`` as a Timestamp, so ``{"clusterTime":
    {"$gt": ...}}`` needs it.
``type_aliases``
    ``$type`` with the aliases "timestamp", "null" and "regex" (mongomock: "valid $type but
    not implemented"), with numeric type codes such as 2 for string (mongomock: "not a valid
    $type"), and with an array of types, which matches any of them (mongomock: TypeError).
``mod``
    ``$mod`` in queries (mongomock: "unknown operator: $mod"), with MongoDB's truncated
    modulo (the remainder takes the sign of the dividend) and MongoDB's refusals of a
    malformed argument or a zero divisor.
``missing_in_comparisons``
    Aggregation comparisons (``$eq``, ``$ne``, ``$gt``, ``$gte``, ``$lt``, ``$lte``,
    ``$cmp``, as in ``$expr``) with an operand that is a missing field: MongoDB treats
    "missing" as a value below every other value, null included, and equal only to itself;
    mongomock raises KeyError.
``and_short_circuit``
    Aggregation ``$and`` stops at the first false operand, as MongoDB's does; mongomock
    evaluates every operand first, so a guard such as ``{"$and": [{"$ne": ["$d", 0]},
    {"$gt": [{"$divide": [1, "$d"]}, 0]}]}`` raised ZeroDivisionError when ``d`` is 0.
``linear_regex``
    ``$regex`` (in queries, and regexes inside ``$in``) and ``$regexMatch`` (in expressions)
    are matched by RE2 through services.linear_regex instead of Python's backtracking ``re``:
    ``^(a+)+$`` against 31 characters took 30 s under ``re``, holding the worker's event loop.
    Patterns RE2 cannot run (backreferences, lookaround) are refused with a 400.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import mongomock
from bson.max_key import MaxKey
from bson.min_key import MinKey
from bson.timestamp import Timestamp
from mongomock import aggregate as _mm_aggregate
from mongomock import filtering as _mm_filtering

from . import linear_regex

__all__ = ["PATCHES", "apply", "applied"]

# $type's numeric codes, as MongoDB documents them, mapped to mongomock's aliases.
TYPE_CODES = {
    1: "double",
    2: "string",
    3: "object",
    4: "array",
    5: "binData",
    6: "undefined",
    7: "objectId",
    8: "bool",
    9: "date",
    10: "null",
    11: "regex",
    13: "javascript",
    16: "int",
    17: "timestamp",
    18: "long",
    19: "decimal",
    -1: "minKey",
    127: "maxKey",
}

# Where the names of the applied patches are kept: on mongomock's own module, so that a
# second copy of this module (importlib.reload, a test) sees them and does not patch twice.
_MARK = "_changefeed_compat"


def _bson_order() -> None:
    original = _mm_filtering._get_compare_type

    def _get_compare_type(val: Any) -> int:
        # mongomock's ranks: ... ObjectId 35 < Boolean 40 < Date 45 < Regex 50; Timestamp sits between
        if isinstance(val, Timestamp):
            return 47
        if isinstance(val, MinKey):
            return -1
        if isinstance(val, MaxKey):
            return 127
        return original(val)

    _mm_filtering._get_compare_type = _get_compare_type


def _type_aliases() -> None:
    type_map = _mm_filtering.TYPE_MAP
    re_types = _mm_filtering._RE_TYPES
    type_map["timestamp"] = lambda v: isinstance(v, Timestamp)
    type_map["null"] = lambda v: v is None
    type_map["regex"] = lambda v: isinstance(v, re_types)

    original = _mm_filtering._type_op

    def _type_op(doc_val: Any, search_val: Any) -> bool:
        wanted = search_val if isinstance(search_val, (list, tuple)) else [search_val]
        for alias in wanted:
            if isinstance(alias, (int, float)) and not isinstance(alias, bool) and math.isfinite(alias):
                alias = TYPE_CODES.get(int(alias), alias)
            if original(doc_val, alias):
                return True
        return False

    _mm_filtering._filterer_inst._operator_map["$type"] = _type_op


def _mod() -> None:
    def mod(doc_val: Any, search_val: Any) -> bool:
        if not isinstance(search_val, (list, tuple)) or len(search_val) != 2:
            raise mongomock.OperationFailure("malformed mod, needs to be an array of 2 elements")
        divisor, remainder = search_val
        if not all(isinstance(n, (int, float)) and math.isfinite(n) for n in (divisor, remainder)):
            raise mongomock.OperationFailure("malformed mod, divisor and remainder must be finite numbers")
        if int(divisor) == 0:
            raise mongomock.OperationFailure("divisor cannot be 0")
        if isinstance(doc_val, bool) or not isinstance(doc_val, (int, float)):
            return False
        if isinstance(doc_val, float) and not math.isfinite(doc_val):
            return False
        value, div = int(doc_val), int(divisor)
        rest = abs(value) % abs(div)  # truncated modulo, like MongoDB
        return (-rest if value < 0 else rest) == int(remainder)

    op_map = _mm_filtering._filterer_inst._operator_map
    op_map["$mod"] = _mm_filtering._not_nothing_and(_mm_filtering._list_expand(mod))


def _missing_in_comparisons() -> None:
    nothing = _mm_filtering.NOTHING

    def _handle_comparison_operator(self: Any, op: str, values: Any) -> Any:
        if not isinstance(values, (list, tuple)) or len(values) != 2:
            raise mongomock.OperationFailure(f"Expression {op} takes exactly 2 arguments")
        a, b = self._parse_or_nothing(values[0]), self._parse_or_nothing(values[1])
        if a is nothing or b is nothing:
            # "missing" sorts before every value (including null) and equals only itself
            rank_a = 0 if a is nothing else 1
            rank_b = 0 if b is nothing else 1
            cmp = (rank_a > rank_b) - (rank_a < rank_b)
        elif op in ("$eq", "$ne"):
            cmp = 0 if a == b else 1
        else:
            cmp = 0 if a == b else (1 if _mm_filtering.bson_compare(operator.gt, a, b) else -1)
        return {
            "$eq": cmp == 0,
            "$ne": cmp != 0,
            "$gt": cmp > 0,
            "$gte": cmp >= 0,
            "$lt": cmp < 0,
            "$lte": cmp <= 0,
            "$cmp": cmp,
        }[op]

    setattr(_mm_aggregate._Parser, "_handle_comparison_operator", _handle_comparison_operator)  # noqa: B010


def _and_short_circuit() -> None:
    original = _mm_aggregate._Parser._handle_boolean_operator

    def _handle_boolean_operator(self: Any, op: str, values: Any) -> Any:
        if op == "$and":
            return all(self._parse_to_bool(value) for value in values)  # a generator: stops early
        return original(self, op, values)

    setattr(_mm_aggregate._Parser, "_handle_boolean_operator", _handle_boolean_operator)  # noqa: B010


def _linear_regex() -> None:
    _mm_filtering._regex = linear_regex.regex_matches  # `$in` with regexes calls it directly
    _mm_filtering._filterer_inst._operator_map["$regex"] = _mm_filtering._not_nothing_and(
        linear_regex.regex_matches
    )
    # `$regexMatch` compiles its pattern through the module-level `re`
    setattr(_mm_aggregate, "re", linear_regex.LinearRe)  # noqa: B010


PATCHES: dict[str, Callable[[], None]] = {
    "bson_order": _bson_order,
    "type_aliases": _type_aliases,
    "mod": _mod,
    "missing_in_comparisons": _missing_in_comparisons,
    "and_short_circuit": _and_short_circuit,
    "linear_regex": _linear_regex,
}


def applied() -> frozenset[str]:
    """The names of the patches in effect in this process."""
    return frozenset(getattr(_mm_filtering, _MARK, ()))


def apply() -> None:
    """Apply each patch of `PATCHES` that is not in effect yet (idempotent)."""
    done: set[str] = _mm_filtering.__dict__.setdefault(_MARK, set())
    for name, patch in PATCHES.items():
        if name not in done:
            patch()
            done.add(name)


apply()
