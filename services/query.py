"""Query arguments of `GET /<coll>`: parsing `filter`, `sort`, `keys`, and running them in memory.

Parsing is shared by both engines (the mongo engine sends the parsed values to the
server); `run_query` is the embedded engine's evaluator. Matching uses mongomock's query
engine (`filter_applies`), a maintained implementation of MongoDB's query language, rather
than a hand-written matcher.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable
from typing import Any

from bson import json_util
from mongomock import filtering

from . import hidden, mongomock_compat  # noqa: F401 - mongomock with MongoDB's semantics (and RE2 regexes)
from .errors import BadRequest

FORBIDDEN_OPERATORS = ("$where", "$function", "$accumulator")
MAX_NESTING = 100  # MongoDB refuses documents nested deeper than 100 levels
_INT64 = (-(1 << 63), (1 << 63) - 1)


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_bson_limits(value: Any, what: str) -> None:
    """Refuse what BSON cannot hold: nesting deeper than 100 levels, integers beyond int64,
    and strings (values or field names) that are not Unicode text (a lone surrogate such as
    JSON's "\\ud800" has no UTF-8 form, so it could be parsed but never stored).

    Iterative, so a deeply nested body is refused with a 400 instead of overflowing the
    stack somewhere later (json encoding in the threadpool, the query evaluator).
    """
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, bool):
            continue
        if isinstance(item, int):
            if not _INT64[0] <= item <= _INT64[1]:
                raise BadRequest(f"{what} has an integer that does not fit in 64 bits: {item}")
        elif isinstance(item, str):
            if _SURROGATE.search(item):
                raise BadRequest(f"{what} has a string that is not valid Unicode (a lone surrogate)")
        elif isinstance(item, (dict, list)):
            if depth >= MAX_NESTING:
                raise BadRequest(f"{what} is nested deeper than {MAX_NESTING} levels")
            if isinstance(item, dict):
                for key in item:
                    if isinstance(key, str) and _SURROGATE.search(key):
                        raise BadRequest(
                            f"{what} has a field name that is not valid Unicode (a lone surrogate)"
                        )
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def has_dollar_key(value: Any) -> bool:
    """True if any field name at any depth starts with '$' (an operator)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and key.startswith("$"):
                    return True
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
    return False


def forbidden_operator(value: Any) -> str | None:
    """Return the first of $where/$function/$accumulator used anywhere in `value`, or None.

    Iterative, so a deeply nested value cannot overflow the stack. Filters and stream
    pipelines both use it.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and key.lower() in FORBIDDEN_OPERATORS:
                    return key
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
    return None


def shown(raw: str, limit: int = 200) -> str:
    """A client's raw value, cut to a length that fits in an error message."""
    return raw if len(raw) <= limit else raw[:limit] + f"... ({len(raw)} characters)"


def loads_json(raw: str, what: str) -> Any:
    """Parse Extended JSON from a query parameter, or raise BadRequest naming it."""
    try:
        value = json_util.loads(raw)
    except RecursionError:
        raise BadRequest(f"illegal {what} parameter: nested deeper than {MAX_NESTING} levels") from None
    except Exception as exc:  # noqa: BLE001 - Extended JSON decoders raise many types (InvalidBSON, decimal ...)
        raise BadRequest(
            f"illegal {what} parameter, it is not valid JSON: {shown(raw)} ({shown(str(exc))})"
        ) from None
    check_bson_limits(value, f"the {what} parameter")
    return value


def parse_filter(values: list[str], inspect: Callable[[dict], None] | None = None) -> dict:
    """Combine one or more `filter` parameters (RESTHeart ANDs them) into one filter.

    `inspect` sees the parsed filter before it is validated against the query engine (the
    permission's hidden-field check: a hidden field is a 403 whatever else is wrong).
    """
    filters = []
    for raw in values:
        value = loads_json(raw, "filter")
        if not isinstance(value, dict):
            raise BadRequest(f"illegal filter parameter, it is not a json object: {shown(raw)}")
        filters.append(value)
    if not filters:
        return {}
    combined = filters[0] if len(filters) == 1 else {"$and": filters}
    if inspect is not None:
        inspect(combined)
    return validate_filter(combined, "filter parameter")


def validate_filter(value: dict, what: str) -> dict:
    """Refuse a query MongoDB would refuse, or one using $where/$function/$accumulator."""
    op = forbidden_operator(value)
    if op:
        raise BadRequest(f"illegal {what}: the {op} operator is not allowed")
    try:
        filtering.filter_applies(value, {})
    except Exception as exc:  # mongomock raises several types for bad operators
        raise BadRequest(f"illegal {what}: {_reason(exc)}") from None
    return value


def parse_sort(values: list[str]) -> list[tuple[str, int]]:
    """Parse `sort` given as `{"a": 1, "b": -1}` or as RESTHeart's `a`, `-b` shorthand."""
    sort: list[tuple[str, int]] = []
    for raw in values:
        raw = raw.strip()
        if raw.startswith("{"):
            spec = loads_json(raw, "sort")
            if not isinstance(spec, dict) or not spec:
                raise BadRequest(f"illegal sort parameter, it is not a non-empty json object: {raw}")
            for key, direction in spec.items():
                if direction not in (1, -1) or isinstance(direction, bool):
                    raise BadRequest(f"illegal sort parameter: direction of {key!r} must be 1 or -1")
                sort.append((_field_name(key, "sort"), direction))
        else:
            for part in raw.split(","):
                part = part.strip()
                if not part:
                    raise BadRequest("illegal sort parameter: empty field name")
                direction = -1 if part.startswith("-") else 1
                sort.append((_field_name(part.lstrip("+-"), "sort"), direction))
    return sort


def parse_keys(values: list[str]) -> dict | None:
    """Parse `keys` (a projection, one or more JSON objects) into one projection."""
    if not values:
        return None
    projection: dict = {}
    for raw in values:
        spec = loads_json(raw, "keys")
        if not isinstance(spec, dict):
            raise BadRequest(f"illegal keys parameter, it is not a json object: {shown(raw)}")
        for key, flag in spec.items():
            if flag not in (0, 1, True, False):
                raise BadRequest(f"illegal keys parameter: {key!r} must be 0 or 1")
            name = _field_name(key, "keys")
            if any(part.startswith("$") or part.isdigit() for part in name.split(".")):
                raise BadRequest(
                    f"illegal keys parameter: {key!r}: positional ($) and array index paths "
                    "are not supported in keys"
                )
            projection[name] = int(flag)
    names = sorted(projection)
    for a, b in itertools.pairwise(names):
        if b.startswith(a + "."):
            raise BadRequest(f"illegal keys parameter: path collision at {b!r} ({a!r} is already projected)")
    flags = {v for k, v in projection.items() if k != "_id"}
    if len(flags) > 1:
        raise BadRequest("illegal keys parameter: cannot mix inclusion and exclusion")
    return projection


def _field_name(key: str, what: str) -> str:
    if not key or key.startswith("$") or "\0" in key or any(not p for p in key.split(".")):
        raise BadRequest(f"illegal {what} parameter: invalid field name {key!r}")
    return key


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.replace('"', "'")


def matches(filter: dict, doc: dict) -> bool:
    """True if `doc` matches `filter` in MongoDB's query language."""
    return filtering.filter_applies(filter, doc)


def _sort_key(key: str, doc: dict) -> Any:
    return filtering.resolve_sort_key(key, doc)


def sort_documents(docs: list[dict], sort: list[tuple[str, int]]) -> list[dict]:
    """Sort by BSON order, stable, last key first (MongoDB's multi-key order)."""
    for key, direction in reversed(sort):
        docs.sort(key=functools.partial(_sort_key, key), reverse=direction < 0)
    return docs


def project(doc: dict, projection: dict | None) -> dict:
    """Apply an inclusion or exclusion projection; `_id` is kept unless excluded."""
    if not projection:
        return doc
    return hidden.project(doc, projection)


def run_query(
    docs: list[dict],
    filter: dict,
    sort: list[tuple[str, int]],
    projection: dict | None,
    skip: int,
    limit: int,
) -> list[dict]:
    """Filter, sort, page and project documents in memory."""
    try:
        selected = [d for d in docs if not filter or filtering.filter_applies(filter, d)]
        sort_documents(selected, sort)
    except Exception as exc:
        raise BadRequest(f"cannot run the query: {_reason(exc)}") from None
    page = selected[skip : skip + limit] if limit else selected[skip:]
    try:
        return [project(d, projection) for d in page]
    except Exception as exc:  # noqa: BLE001 - mongomock's projector on shapes it does not expect
        raise BadRequest(f"cannot apply the keys projection: {_reason(exc)}") from None
