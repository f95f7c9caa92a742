"""Stream pipelines: validation, variable binding and evaluation of change-stream stages.

What: a collection's metadata defines streams (``{"uri": ..., "stages": [...]}``, RESTHeart
format, keys possibly escaped as ``_$match`` / ``fullDocument::name``). A client opens one
stream, optionally passing ``?avars={...}``. This module

* checks the stored definition (``validate_streams``) so that faults become 400s with a
  message naming the stream, instead of RESTHeart's 500s or silent, never-opening cursors;
* parses ``avars`` (``parse_avars``) and binds ``{"$var": ...}`` placeholders
  (``bind_variables``) so that a client-supplied value can never become an operator or a
  field path (no query/expression injection);
* evaluates the bound pipeline on each change event (``Pipeline.apply``) with mongomock's
  matcher and aggregation stages, because the embedded engine has no MongoDB server to run
  the ``$changeStream`` pipeline for it.

Why mongomock: it is the only small pure-Python evaluator whose ``$match`` semantics were
verified to match MongoDB for the operators streams use (docs/stack-notes.md, section 6). Its gaps are
closed in two places: here, ``$unset``/``$replaceWith`` are rewritten to
``$project``/``$replaceRoot`` and ``$redact`` is implemented; services.mongomock_compat
patches the rest into mongomock itself (bson ``Timestamp`` ordering, more ``$type`` forms,
``$mod``, comparisons with a missing field, a short-circuiting ``$and``, RE2 regexes).

Deliberate departures from RESTHeart / MongoDB:

1. Definitions are validated (``validate_streams``): RESTHeart stores anything and answers
   500 on open; MongoDB rejects a bad stage only asynchronously. Here every fault is a
   ``PipelineError`` (HTTP 400) naming the stream, and stages outside the change-stream
   allow-list, ``$where``/``$function``/``$accumulator``, and stages that statically remove or
   change ``_id`` are refused up front, as are aggregation-expression operators the embedded
   engine cannot evaluate (``$getField``, ``$mergeObjects``, ``$dateAdd`` ...). ``uri`` must
   be URL-safe (``[A-Za-z0-9._~-]``, <= 100 chars) and unique (RESTHeart: first match wins).
2. ``$ifvar`` is a whole stage, RESTHeart's form: ``{"$ifvar": ["n", <stage>]}`` or
   ``{"$ifvar": [["a", "b"], <stage>, <else stage>]}``: the stage applies when every named
   variable is bound, else the else stage, else nothing. Both stages are validated when the
   stream is written, like every stage. ``$changeStreamSplitLargeEvent`` is refused.
3. ``$var`` placement is stricter: a variable may only supply a *value*. It cannot stand for
   a whole stage argument, a whole query document or ``$unset`` field names. A bound value is
   wrapped in ``{"$eq": v}`` (query field-equality position, when it is an object or a
   ``$``-string) or ``{"$literal": v}`` (expression context), so ``"$fullDocument.secret"``
   is only ever that literal string. RESTHeart substitutes the raw value.
4. ``avars`` is strict JSON (standard ``json`` module); RESTHeart's lenient reader also takes
   single quotes and shell syntax. Keys starting with ``$`` are refused at any depth (as
   RESTHeart's default), which also refuses Extended JSON such as ``{"$oid": ...}``. Top-level
   keys starting with ``@`` are refused (reserved for server-side variables; RESTHeart lets a
   client spoof unset ``@user.*`` keys). A non-object (array, number, empty string) is a 400,
   not RESTHeart's 500.
5. The ``_id`` rule (MongoDB error 280) is checked per event and raises ``EventError``; the
   caller decides what to do with the stream (MongoDB kills the cursor).
6. For a pipeline made only of ``$match`` stages, ``apply`` returns a shallow copy of the
   input event (nested values are shared): treat results as read-only.
7. Errors raised while evaluating a ``$match`` that mean "value missing" inside ``$expr``
   (mongomock ``KeyError``) count as "no match" rather than an error.
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import mongomock
from bson import json_util
from mongomock import aggregate as _mm_aggregate
from mongomock import filtering as _mm_filtering
from mongomock import helpers as _mm_helpers

from . import mongomock_compat  # noqa: F401 - MongoDB semantics for the evaluator below
from .errors import BadRequest, ChangefeedError
from .query import check_bson_limits, forbidden_operator, has_dollar_key, shown

__all__ = [
    "ALLOWED_STAGES",
    "PipelineError",
    "VariableError",
    "AvarsError",
    "EventError",
    "unescape",
    "validate_streams",
    "parse_avars",
    "bind_variables",
    "Pipeline",
    "compile_pipeline",
    "shared_stage_count",
    "with_pre_images",
]

ALLOWED_STAGES = (
    "$match",
    "$project",
    "$addFields",
    "$set",
    "$unset",
    "$replaceRoot",
    "$replaceWith",
    "$redact",
)

STREAM_KEYS = ("uri", "stages", "notify_when")
_URI_RE = re.compile(r"[A-Za-z0-9._~-]{1,100}")
_LOGICAL = ("$and", "$or", "$nor")
_MISSING = object()


class PipelineError(BadRequest):
    """Invalid stream definition; the message names the stream uri and the fault (HTTP 400)."""


class VariableError(BadRequest):
    """A ``$var`` is malformed, misplaced or not bound, e.g. ``variable n not bound`` (HTTP 400)."""


class AvarsError(BadRequest):
    """The ``?avars=`` query parameter is not acceptable (HTTP 400)."""


class EventError(ChangefeedError):
    """Evaluating the pipeline on one event failed (message modelled on MongoDB's).

    Raised while a stream runs, after its HTTP response has started: the engine reports it
    in-band as the stream's error event, never as an HTTP status.
    """


# --------------------------------------------------------------------------------------------
# unescape
# --------------------------------------------------------------------------------------------


def _unescape_key(key: Any) -> Any:
    if not isinstance(key, str):
        return key
    if key.startswith("_$"):
        key = key[1:]
    return key.replace("::", ".") if "::" in key else key


def unescape(value: Any) -> Any:
    """Return a copy with RESTHeart escapes resolved.

    Keys starting with ``_$`` lose the ``_``; ``::`` in keys becomes ``.``; string values
    starting with ``_$`` lose the ``_``. Unescaped input passes through unchanged.
    """
    if isinstance(value, dict):
        return {_unescape_key(k): unescape(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [unescape(v) for v in value]
    if isinstance(value, str) and value.startswith("_$"):
        return value[1:]
    return value


# --------------------------------------------------------------------------------------------
# variables
# --------------------------------------------------------------------------------------------


def _is_var(value: Any) -> bool:
    return isinstance(value, dict) and "$var" in value


def _var_spec(value: dict) -> tuple[str, bool, Any]:
    """Return (name, has_default, default) of a ``$var`` placeholder or raise VariableError."""
    if len(value) != 1:
        raise VariableError(f"wrong variable name {_show(value)}: a $var object must have exactly one key")
    spec = value["$var"]
    if isinstance(spec, str) and spec:
        return spec, False, None
    if isinstance(spec, (list, tuple)) and len(spec) == 2 and isinstance(spec[0], str) and spec[0]:
        return spec[0], True, spec[1]
    raise VariableError(
        f"wrong variable name {_show(value)}: use {{'$var': 'name'}} or {{'$var': ['name', default]}}"
    )


def server_variables(user: dict | None, read_filter: dict | None) -> dict:
    """The variables the server binds from the authenticated account (RESTHeart's names):
    ``@user`` (the account without its password; ``@user.<path>`` reads into it, as
    ``@user.roles``) and ``@mongoPermissions.readFilter``. A client can never set them: an
    ``@`` name in ``avars`` or a query parameter is a 400. An anonymous caller has no
    ``@user``."""
    out: dict = {"@mongoPermissions": {"readFilter": read_filter}}
    if user is not None:
        out["@user"] = {k: v for k, v in user.items() if k != "password"}
    return out


def account_variables(stages: Any) -> tuple[bool, bool]:
    """(uses any ``@user`` variable, needs one that has no default) in stored stages."""
    uses = needs = False
    stack = [stages]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, child in value.items():
                if key in ("$var", "_$var"):
                    name = (
                        child
                        if isinstance(child, str)
                        else (child[0] if isinstance(child, list) and child else "")
                    )
                    if isinstance(name, str) and (name == "@user" or name.startswith("@user.")):
                        uses = True
                        needs = needs or isinstance(child, str)
                elif key in ("$ifvar", "_$ifvar") and isinstance(child, list) and child:
                    names = child[0] if isinstance(child[0], list) else [child[0]]
                    uses = uses or any(isinstance(n, str) and n.startswith("@user") for n in names)
                    # the variables of an optional stage are used, but never needed
                    uses = uses or any(account_variables(branch)[0] for branch in child[1:])
                    continue
                stack.append(child)
        elif isinstance(value, list):
            stack.extend(value)
    return uses, needs


def _lookup(avars: dict, name: str) -> Any:
    if name in avars:
        return avars[name]
    current: Any = avars
    for part in name.split("."):
        if isinstance(current, dict) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return _MISSING
    return current


_Resolver = Callable[[str, bool, Any], Any]


def _avars_resolver(avars: dict) -> _Resolver:
    def resolve(name: str, has_default: bool, default: Any) -> Any:
        value = _lookup(avars, name)
        if value is _MISSING:
            if not has_default:
                raise VariableError(f"variable {name} not bound")
            return default
        return value

    return resolve


def _resolve(placeholder: dict, resolver: _Resolver) -> Any:
    name, has_default, default = _var_spec(placeholder)
    return resolver(name, has_default, default)


def _no_var_here(value: Any, where: str) -> None:
    if _is_var(value):
        name = value.get("$var")
        raise VariableError(
            f"variable {_show(name)} cannot be used as {where}: variables can only supply values"
        )


def _bind_literal(value: Any, resolver: _Resolver) -> Any:
    """Literal position: placeholders become the raw value."""
    if isinstance(value, dict):
        if _is_var(value):
            return _resolve(value, resolver)
        return {k: _bind_literal(v, resolver) for k, v in value.items()}
    if isinstance(value, list):
        return [_bind_literal(v, resolver) for v in value]
    return value


def _bind_expr(value: Any, resolver: _Resolver) -> Any:
    """Aggregation-expression context: placeholders become ``{"$literal": value}``."""
    if isinstance(value, dict):
        if _is_var(value):
            return {"$literal": _resolve(value, resolver)}
        return {
            k: (_bind_literal(v, resolver) if k == "$literal" else _bind_expr(v, resolver))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_bind_expr(v, resolver) for v in value]
    return value


def _bind_query(query: Any, resolver: _Resolver) -> Any:
    """Query-document context (``$match``, ``$elemMatch`` on documents, ``$and``/``$or``/``$nor``)."""
    _no_var_here(query, "a query document")
    if not isinstance(query, dict):
        return query
    out = {}
    for key, value in query.items():
        if key in _LOGICAL:
            if isinstance(value, list):
                out[key] = [_bind_query(q, resolver) for q in value]
            else:
                _no_var_here(value, f"the argument of {key}")
                out[key] = value
        elif key == "$expr":
            out[key] = _bind_expr(value, resolver)
        elif isinstance(key, str) and key.startswith("$"):
            out[key] = _bind_literal(value, resolver)
        else:
            out[key] = _bind_field_value(value, resolver)
    return out


def _is_operator_dict(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and k.startswith("$") for k in value)
    )


def _bind_field_value(value: Any, resolver: _Resolver) -> Any:
    """Value of a field in a query: equality value or operator document."""
    if _is_var(value):
        bound = _resolve(value, resolver)
        if isinstance(bound, dict) or (isinstance(bound, str) and bound.startswith("$")):
            return {"$eq": bound}
        return bound
    if _is_operator_dict(value):
        return _bind_operators(value, resolver)
    return _bind_literal(value, resolver)


def _bind_operators(ops: dict, resolver: _Resolver) -> dict:
    out = {}
    for op, arg in ops.items():
        if op == "$elemMatch":
            _no_var_here(arg, "the argument of $elemMatch")
            out[op] = _bind_operators(arg, resolver) if _is_operator_dict(arg) else _bind_query(arg, resolver)
        elif op == "$not":
            out[op] = (
                _bind_operators(arg, resolver) if _is_operator_dict(arg) else _bind_literal(arg, resolver)
            )
        elif op == "$all" and isinstance(arg, list):
            out[op] = [
                {"$elemMatch": _bind_field_value(x["$elemMatch"], resolver)}
                if isinstance(x, dict) and set(x) == {"$elemMatch"}
                else _bind_literal(x, resolver)
                for x in arg
            ]
        else:  # $eq/$gt/$in/$nin/$regex/... : the argument is always a literal in the query language
            out[op] = _bind_literal(arg, resolver)
    return out


def _bind_stage(name: str, arg: Any, resolver: _Resolver) -> Any:
    if name == "$match":
        return _bind_query(arg, resolver)
    if name in ("$replaceWith", "$redact"):
        return _bind_expr(arg, resolver)
    _no_var_here(arg, f"the argument of {name}")
    if name == "$unset":
        if isinstance(arg, list):
            for x in arg:
                _no_var_here(x, "a field name of $unset")
        return arg
    return _bind_expr(arg, resolver)  # $project, $addFields, $set, $replaceRoot {newRoot: ...}


def _ifvar_parts(arg: Any, where: str) -> tuple[list[str], dict, dict | None]:
    """The (variable names, stage, else stage) of a ``$ifvar`` argument, or PipelineError."""
    if not isinstance(arg, list) or len(arg) not in (2, 3):
        raise PipelineError(
            f"{where}: $ifvar needs [variable names, stage] or [variable names, stage, else stage]"
        )
    names = [arg[0]] if isinstance(arg[0], str) else arg[0]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise PipelineError(
            f"{where}: $ifvar's first element must be a variable name or a non-empty array of them"
        )
    if any("$" in n for n in names):
        raise PipelineError(f"{where}: $ifvar's variable names cannot contain '$'")
    for branch in arg[1:]:
        if not isinstance(branch, dict) or len(branch) != 1:
            raise PipelineError(
                f"{where}: $ifvar's stages must each be one stage object, found {_show(branch)}"
            )
    return names, arg[1], arg[2] if len(arg) == 3 else None


def _is_bound(name: str, resolver: _Resolver) -> bool:
    return resolver(name, True, _MISSING) is not _MISSING


def _bind_stages(stages: list, resolver: _Resolver) -> list:
    out = []
    for stage in stages:
        if isinstance(stage, dict) and len(stage) == 1:
            ((name, arg),) = stage.items()
            if name == "$ifvar":
                names, then, otherwise = _ifvar_parts(arg, "$ifvar")
                chosen = then if all(_is_bound(n, resolver) for n in names) else otherwise
                if chosen is not None:
                    out.extend(_bind_stages([chosen], resolver))
                continue
            out.append({name: _bind_stage(name, arg, resolver)})
        else:
            out.append(stage)
    return out


def bind_variables(stages: list, avars: dict) -> list:
    """Return the unescaped stages with every ``$var`` placeholder replaced by its value.

    ``{"$var": "n"}`` or ``{"$var": ["n", default]}``; dotted names read nested avars (a
    literal key containing a dot wins). A missing variable without default raises
    ``VariableError("variable n not bound")``. A bound value is always a value: in a query
    field-equality position an object or ``$``-string becomes ``{"$eq": v}``; in expression
    context (``$expr``, ``$addFields``/``$set``, ``$project``, ``$replaceRoot``/``$replaceWith``,
    ``$redact``) it becomes ``{"$literal": v}``; operator arguments (``$in``, ``$gt`` ...) take it
    as-is.
    """
    return _bind_stages(unescape(stages), _avars_resolver(avars or {}))


# --------------------------------------------------------------------------------------------
# avars
# --------------------------------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Query parameters a stream URL uses itself: never variables.
SERVER_PARAMETERS = frozenset(
    {
        "avars",
        "access_token",
        "lastEventId",
        "noauthchallenge",
        "page",
        "pagesize",
        "fullDocumentBeforeChange",
    }
)


def query_variables(params: Iterable[tuple[str, str]]) -> dict:
    """Variables from a stream URL's own query parameters (RESTHeart 9.9): ``?n=uji`` binds
    ``n``. A value that parses as JSON is that JSON (``?v=5`` is the number 5), anything else
    the string. The server's own parameters (SERVER_PARAMETERS) are skipped; an ``@`` name
    (server-side variables) or a ``$`` key in a value is a 400, as in ``avars``, and so is a
    name given twice, a server parameter's included. ``avars`` wins over a parameter of the
    same name (the caller merges).
    """
    out: dict = {}
    own: set[str] = set()
    for name, value in params:
        if name in SERVER_PARAMETERS:
            if name in own:  # which one counts would be a guess: ?avars=a&avars=b
                raise AvarsError(f"illegal query parameter {name!r}: it may be given once")
            own.add(name)
            continue
        if name.startswith("@"):
            raise AvarsError(
                f"illegal query parameter {name!r}: variable names starting with '@' are reserved "
                "for server-side variables"
            )
        if name in out:
            raise AvarsError(f"illegal query parameter {name!r}: a variable may be given once")
        try:
            out[name] = json.loads(value, parse_constant=_refuse_constant)
        except (ValueError, RecursionError):
            out[name] = value
    if has_dollar_key(out):
        raise AvarsError("illegal query parameter: variables cannot include operators ('$' keys)")
    _check_variable_limits(out, "the query parameters", "illegal query parameters: ", "one of them ")
    return out


def _check_variable_limits(value: dict, what: str, prefix: str, pronoun: str) -> None:
    """check_bson_limits (size, depth) as an AvarsError that names the input."""
    try:
        check_bson_limits(value, what)
    except BadRequest as exc:
        raise AvarsError(prefix + exc.message.replace(what + " ", pronoun)) from None


def _with_braces_curl_dropped(raw: str) -> str:
    """`raw` in braces when that makes a JSON object of a value that is not one (see parse_avars)."""
    if raw.lstrip().startswith("{"):
        return raw
    candidate = "{" + raw + "}"
    try:
        return candidate if isinstance(json.loads(candidate, parse_constant=_refuse_constant), dict) else raw
    except (ValueError, RecursionError):
        return raw


def parse_avars(raw: str | None) -> dict:
    """Parse the ``?avars=`` query value into a dict of variables (``None`` -> ``{}``).

    Raises ``AvarsError`` if it is not JSON, not a JSON object, contains a key starting with
    ``$`` at any depth, or a top-level key starting with ``@`` (reserved names). Messages
    quote the value as sent.

    The form curl sends for the tutorial's ``?avars={"n":"uji"}`` is accepted too: curl's URL
    globbing takes ``{...}`` for a set of alternatives and drops the braces, so the server
    gets ``"n":"uji"``. When a value that does not start with ``{`` parses as a JSON object
    once wrapped in braces, it is read as that object (``curl -g`` is the other fix).
    """
    if raw is None:
        return {}
    if not raw.strip():
        raise AvarsError("illegal avars parameter, it is empty; expected a json object")
    text = _with_braces_curl_dropped(raw)
    try:
        plain = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise AvarsError(f"illegal avars parameter, it is not a json object: {shown(raw)}") from None
    if not isinstance(plain, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(plain), "a number"
        )
        raise AvarsError(f"illegal avars parameter, it is {kind}, not a json object: {shown(raw)}")
    if has_dollar_key(plain):
        raise AvarsError("illegal avars parameter: aggregation variables cannot include operators")
    reserved = sorted(k for k in plain if k.startswith("@"))
    if reserved:
        raise AvarsError(
            "illegal avars parameter: variable names starting with '@' are reserved "
            "for server-side variables: {}".format(", ".join(reserved))
        )
    _check_variable_limits(plain, "the avars parameter", "illegal avars parameter: ", "it ")
    try:
        return json_util.loads(text)
    except Exception:  # noqa: BLE001 - plain JSON without '$' keys; only a decoder fault lands here
        raise AvarsError(f"illegal avars parameter, it is not a json object: {shown(raw)}") from None


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    try:
        text = json_util.dumps(value)
    except Exception:  # noqa: BLE001 - best-effort rendering for messages
        text = repr(value)
    text = text.replace('"', "'")
    return text if len(text) <= 200 else text[:197] + "..."


def _known_expression_operators() -> frozenset[str]:
    names: set[str] = set()
    for attr in (
        "arithmetic_operators",
        "project_operators",
        "projection_operators",
        "date_operators",
        "array_operators",
        "conditional_operators",
        "control_flow_operators",
        "set_operators",
        "string_operators",
        "type_convertion_operators",
        "type_operators",
        "boolean_operators",
        "comparison_operators",
    ):
        names.update(getattr(_mm_aggregate, attr, ()))
    return frozenset(names)


_EXPRESSION_OPERATORS = _known_expression_operators()


def _unknown_expression_operator(expr: Any) -> str | None:
    """First operator in an aggregation expression that the embedded engine cannot evaluate."""
    if isinstance(expr, dict):
        if _is_var(expr):
            return None
        for key, value in expr.items():
            if isinstance(key, str) and key.startswith("$"):
                if key not in _EXPRESSION_OPERATORS:
                    return key
                if key == "$literal":
                    continue
            found = _unknown_expression_operator(value)
            if found:
                return found
    elif isinstance(expr, list):
        for value in expr:
            found = _unknown_expression_operator(value)
            if found:
                return found
    return None


def _check_expression(expr: Any, where: str) -> None:
    unknown = _unknown_expression_operator(expr)
    if unknown:
        raise PipelineError(
            f"{where} uses the expression operator {unknown}, which is unknown or not supported"
        )


def _expressions_in_query(query: Any) -> list:
    if not isinstance(query, dict):
        return []
    found = []
    for key, value in query.items():
        if key == "$expr":
            found.append(value)
        elif key in _LOGICAL and isinstance(value, list):
            for sub in value:
                found.extend(_expressions_in_query(sub))
    return found


def _touches_id(path: Any) -> bool:
    return isinstance(path, str) and (path == "_id" or path.startswith("_id."))


def _check_projection(spec: dict, where: str, top: bool = True) -> list[bool]:
    """Return the include(True)/exclude(False) flags of a projection, rejecting _id changes."""
    flags: list[bool] = []
    for key, value in spec.items():
        if top and _touches_id(key):
            if (
                key != "_id"
                or value is not True
                and not (isinstance(value, numbers.Number) and not isinstance(value, bool) and value == 1)
            ):
                raise PipelineError(
                    f"{where}: $project must not remove or change _id (found {key}: {_show(value)})"
                )
            continue
        if isinstance(value, bool) or (isinstance(value, numbers.Number) and value in (0, 1)):
            flags.append(bool(value))
        elif isinstance(value, dict) and value and not _is_operator_dict(value) and not _is_var(value):
            flags.extend(_check_projection(value, where, top=False))
        else:
            flags.append(True)  # computed value
    return flags


def _check_new_root(new_root: Any, where: str, stage: str) -> None:
    if not (isinstance(new_root, dict) and not _is_operator_dict(new_root) and new_root.get("_id") == "$_id"):
        raise PipelineError(
            f"{where}: {stage} must produce an object literal that keeps the resume token, "
            f"e.g. {{'_id': '$_id', ...}}; found {_show(new_root)}"
        )


def _check_stage(name: str, arg: Any, where: str) -> None:
    if name == "$match":
        if not isinstance(arg, dict):
            raise PipelineError(f"{where}: $match takes a query object, found {_show(arg)}")
        for expr in _expressions_in_query(arg):
            _check_expression(expr, where)
        return
    if name == "$project":
        if not isinstance(arg, dict) or not arg:
            raise PipelineError(f"{where}: $project takes a non-empty object, found {_show(arg)}")
        flags = _check_projection(arg, where)
        if True in flags and False in flags:
            raise PipelineError(
                f"{where}: $project cannot mix inclusion and exclusion of fields other than _id"
            )
    elif name in ("$addFields", "$set"):
        if not isinstance(arg, dict) or not arg:
            raise PipelineError(f"{where}: {name} takes a non-empty object, found {_show(arg)}")
        for key in arg:
            if _touches_id(key):
                raise PipelineError(f"{where}: {name} must not change _id (found field {key})")
    elif name == "$unset":
        fields = [arg] if isinstance(arg, str) else arg
        if not isinstance(fields, list) or not fields or not all(isinstance(f, str) and f for f in fields):
            raise PipelineError(
                f"{where}: $unset takes a field name or an array of field names, found {_show(arg)}"
            )
        for field in fields:
            if _touches_id(field):
                raise PipelineError(f"{where}: $unset must not remove _id (found {field})")
    elif name == "$replaceRoot":
        if not isinstance(arg, dict) or set(arg) != {"newRoot"}:
            raise PipelineError(f"{where}: $replaceRoot takes {{'newRoot': <object>}}, found {_show(arg)}")
        _check_new_root(arg["newRoot"], where, "$replaceRoot")
    elif name == "$replaceWith":
        _check_new_root(arg, where, "$replaceWith")
    _check_expression(arg, where)  # every other allowed stage holds expressions (or field names)


def _check_stages(stages: Any, label: str) -> None:
    """Structural checks shared by validate_streams (escaped input unescaped first) and Pipeline."""
    if not isinstance(stages, list):
        raise PipelineError(f"{label}: 'stages' must be an array of stage objects, found {_show(stages)}")
    for index, stage in enumerate(stages, start=1):
        where = f"{label}: stage {index}"
        if not isinstance(stage, dict) or len(stage) != 1:
            raise PipelineError(
                f"{where} must be an object with exactly one key (the stage name), found {_show(stage)}"
            )
        ((name, arg),) = stage.items()
        if name == "$ifvar":
            _, then, otherwise = _ifvar_parts(arg, where)
            _check_stages([then] if otherwise is None else [then, otherwise], f"{where} ($ifvar)")
            continue
        if name not in ALLOWED_STAGES:
            raise PipelineError(
                "{} uses {}, allowed stages are {}".format(where, name, ", ".join(ALLOWED_STAGES))
            )
        forbidden = forbidden_operator(arg)
        if forbidden:
            raise PipelineError(f"{where} uses the forbidden operator {forbidden}")
        _check_stage(name, arg, where)


def _check_stage_vars(stages: list, label: str) -> None:
    """Dry-run the binder: rejects malformed and misplaced ``$var`` placeholders."""
    for index, stage in enumerate(stages, start=1):
        branches = [stage]
        if isinstance(stage, dict) and "$ifvar" in stage:  # both of its stages, whatever is bound
            _, then, otherwise = _ifvar_parts(stage["$ifvar"], f"{label}: stage {index}")
            branches = [then] if otherwise is None else [then, otherwise]
        try:
            for branch in branches:
                _bind_stages([branch], lambda name, has_default, default: default)
        except VariableError as exc:
            raise PipelineError(f"{label}: stage {index}: {exc}") from None


def validate_streams(streams: Any) -> list[dict]:
    """Validate the ``streams`` value of collection metadata as written (escaped or not).

    Returns ``streams`` unchanged when valid; otherwise raises ``PipelineError`` naming the
    stream and the fault (shape, uri, disallowed stage or operator, ``_id`` change, bad ``$var``).
    """
    if not isinstance(streams, list):
        raise PipelineError(f"'streams' must be an array of stream definitions, found {_show(streams)}")
    seen: set[str] = set()
    for position, entry in enumerate(streams, start=1):
        if not isinstance(entry, dict):
            raise PipelineError(
                f"stream #{position}: a stream definition must be an object, found {_show(entry)}"
            )
        if "uri" not in entry:
            raise PipelineError(f"stream #{position}: missing 'uri'")
        uri = entry["uri"]
        if not isinstance(uri, str):
            raise PipelineError(f"stream #{position}: 'uri' must be a string, found {_show(uri)}")
        if not uri:
            raise PipelineError(f"stream #{position}: 'uri' must not be empty")
        if not _URI_RE.fullmatch(uri):
            raise PipelineError(
                f"stream '{uri[:100]}': 'uri' must be 1 to 100 characters among A-Z a-z 0-9 . _ ~ -"
            )
        if uri in seen:
            raise PipelineError(f"stream '{uri}': 'uri' is defined more than once")
        seen.add(uri)
        label = f"stream '{uri}'"
        unknown = sorted(str(k) for k in entry if k not in STREAM_KEYS)
        if unknown:
            raise PipelineError(
                "{}: unknown key {}; a stream definition has only {} (any other key would be "
                "stored and ignored)".format(
                    label, ", ".join(repr(k) for k in unknown), " and ".join(STREAM_KEYS)
                )
            )
        if "stages" not in entry:
            raise PipelineError(f"{label}: missing 'stages'")
        if "notify_when" in entry:
            _notify_when_parts(entry["notify_when"], label)
        try:
            stages = unescape(entry["stages"])
            _check_stages(stages, label)
            _check_stage_vars(stages, label)
        except RecursionError:
            raise PipelineError(f"{label}: 'stages' is nested too deeply") from None
    return streams


def _notify_when_parts(spec: Any, label: str) -> tuple[str, str, bool, Any]:
    """(field path, variable name, has default, default) of a ``notify_when``, or PipelineError.

    RESTHeart's form: exactly one entry ``"<top>::<dot.path>": {"$var": "<name>"}`` (``_$var``
    too, and ``["name", default]``), split on the first ``::``, both parts non-blank.
    """
    where = f"{label}: notify_when"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise PipelineError(f"{where} must be an object with exactly one entry, found {_show(spec)}")
    ((key, value),) = spec.items()
    top, sep, rest = str(key).partition("::")
    if not sep or not top.strip() or not rest.strip():
        raise PipelineError(
            f"{where}: the key must be '<field>::<path>' (as 'fullDocument::tenantId'), found {key!r}"
        )
    placeholder = unescape(value)
    if not _is_var(placeholder):
        raise PipelineError(
            f"{where}: the value must be a variable ({{'$var': 'name'}}), found {_show(value)}"
        )
    try:
        name, has_default, default = _var_spec(placeholder)
    except VariableError as exc:
        raise PipelineError(f"{where}: {exc}") from None
    if "$" in name:
        raise PipelineError(f"{where}: variable names cannot contain '$'")
    return f"{top.strip()}.{rest.strip()}", name, has_default, default


def notify_filter(definition: dict, variables: dict) -> NotifyFilter | None:
    """The per-subscriber dispatch filter of a stream's ``notify_when``, or None (deliver all).

    A subscriber that does not bind the variable gets every event (RESTHeart), except that a
    server variable (``@user.tenant``) the account lacks is a 400, never everything. Bound, an event
    is delivered when the field equals the value or is an array holding it, by BSON equality
    (numbers and ObjectIds match too, unlike RESTHeart's string-only comparison); an event
    without the field is not delivered. The filter reads the event as the client gets it.
    """
    spec = definition.get("notify_when")
    if spec is None:
        return None
    path, name, has_default, default = _notify_when_parts(spec, "notify_when")
    value = _lookup(variables, name)
    if value is _MISSING:
        if name.startswith("@") and not has_default:
            # a server variable scopes the stream: without it, not everything, but a 400
            raise VariableError(f"variable {name} not bound")
        if not has_default:
            return None
        value = default
    query = {path: {"$eq": value}}

    return NotifyFilter(query)


class NotifyFilter:
    """A bound notify_when: call it on an event. `key` is the same for every subscriber with
    the same binding, so the hub evaluates it once per batch, not once per subscriber."""

    __slots__ = ("query", "key")

    def __init__(self, query: dict):
        self.query = query
        self.key = json_util.dumps(query, json_options=json_util.CANONICAL_JSON_OPTIONS)

    def __call__(self, event: dict) -> bool:
        return bool(_mm_filtering.filter_applies(self.query, event))


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


def _copy(value: Any) -> Any:
    """Deep copy of dicts/lists; leaves (str, numbers, bson scalars, datetime) are immutable."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _contains_datetime(value: Any) -> bool:
    if isinstance(value, datetime):
        return True
    if isinstance(value, dict):
        return any(_contains_datetime(v) for v in value.values())
    if isinstance(value, list):
        return any(_contains_datetime(v) for v in value)
    return False


def _find_var(value: Any) -> Any:
    if isinstance(value, dict):
        if "$var" in value:
            return value["$var"]
        for k, v in value.items():
            if k != "$literal":
                found = _find_var(v)
                if found is not _MISSING:
                    return found
    elif isinstance(value, list):
        for v in value:
            found = _find_var(v)
            if found is not _MISSING:
                return found
    return _MISSING


def _strip_expr(query: dict) -> dict:
    """The query without ``$expr`` (expressions may legitimately fail on an empty document)."""
    out = {}
    for key, value in query.items():
        if key == "$expr":
            continue
        if key in _LOGICAL and isinstance(value, list):
            value = [_strip_expr(q) if isinstance(q, dict) else q for q in value]
        out[key] = value
    return out


_REDACT_KEEP, _REDACT_PRUNE, _REDACT_DESCEND = object(), object(), object()
_REDACT_VARS = {"KEEP": _REDACT_KEEP, "PRUNE": _REDACT_PRUNE, "DESCEND": _REDACT_DESCEND}


def _redact_value(value: Any, expr: Any, root: dict) -> Any:
    if isinstance(value, dict):
        return _redact_doc(value, expr, root)
    if isinstance(value, list):
        out = []
        for item in value:
            kept = _redact_value(item, expr, root)
            if kept is not _REDACT_PRUNE:
                out.append(kept)
        return out
    return value


def _redact_doc(doc: dict, expr: Any, root: dict) -> Any:
    verdict = _mm_aggregate._Parser(doc, dict(_REDACT_VARS, ROOT=root)).parse(expr)
    if verdict is _REDACT_KEEP:
        return doc
    if verdict is _REDACT_PRUNE:
        return _REDACT_PRUNE
    if verdict is _REDACT_DESCEND:
        out = {}
        for key, value in doc.items():
            kept = _redact_value(value, expr, root)
            if kept is not _REDACT_PRUNE:
                out[key] = kept
        return out
    raise mongomock.OperationFailure(
        "$redact's expression should not return anything aside from the variables $$KEEP, "
        f"$$DESCEND, and $$PRUNE, but returned {_show(verdict)}"
    )


def _engine_stage(name: str, arg: Any) -> dict:
    """Rewrite a stage into one mongomock implements."""
    if name == "$unset":
        return {"$project": {field: 0 for field in ([arg] if isinstance(arg, str) else arg)}}
    if name == "$replaceWith":
        return {"$replaceRoot": {"newRoot": arg}}
    if name == "$set":
        return {"$addFields": arg}
    return {name: arg}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, mongomock.OperationFailure):
        return str(exc)
    if isinstance(exc, NotImplementedError):
        return f"not supported by the embedded engine: {exc}"
    return f"{type(exc).__name__}: {exc}"


class Pipeline:
    """A compiled, bound stream pipeline.

    ``$match`` stages are evaluated with ``filter_applies`` (a leading run of them on the event
    as is, without copying); reshaping stages run on one deep copy through mongomock's
    ``process_pipeline`` (``$unset``/``$replaceWith`` rewritten) and the local ``$redact``.
    """

    def __init__(self, stages: list):
        """Compile already unescaped and bound ``stages``; raise ``PipelineError`` if invalid."""
        _check_stages(stages, "pipeline")
        leftover = _find_var(stages)
        if leftover is not _MISSING:
            raise PipelineError("pipeline: unbound variable placeholder {}".format(_show({"$var": leftover})))
        self.stages = stages
        # segments: ("match", (spec, needs_datetime_patch)), ("engine", [mongomock stages]),
        # ("redact", expression)
        self._segments: list[tuple[str, Any]] = []
        for stage in stages:
            ((name, arg),) = stage.items()
            if name == "$match":
                self._dry_run(arg)
                if _contains_datetime(arg):
                    self._segments.append(
                        ("match", (_mm_helpers.patch_datetime_awareness_in_document(arg), True))
                    )
                else:
                    self._segments.append(("match", (arg, False)))
            elif name == "$redact":
                self._segments.append(("redact", arg))
            elif self._segments and self._segments[-1][0] == "engine":
                self._segments[-1][1].append(_engine_stage(name, arg))
            else:
                self._segments.append(("engine", [_engine_stage(name, arg)]))
        self._filters_only = all(kind == "match" for kind, _ in self._segments)

    @staticmethod
    def _dry_run(spec: dict) -> None:
        """Surface unknown operators and malformed arguments at compile time."""
        try:
            _mm_filtering.filter_applies(_strip_expr(spec), {})
        except KeyError:
            pass
        except Exception as exc:  # noqa: BLE001 - any engine complaint is a definition fault
            raise PipelineError(f"pipeline: invalid $match {_show(spec)}: {_describe(exc)}") from None

    @property
    def filters_only(self) -> bool:
        """True when the pipeline only filters (no copy is made per event)."""
        return self._filters_only

    @staticmethod
    def _matches(doc: dict, spec: dict, needs_dt: bool) -> bool:
        if needs_dt:
            doc = _mm_helpers.patch_datetime_awareness_in_document(doc)
        try:
            return bool(_mm_filtering.filter_applies(spec, doc))
        except KeyError:  # mongomock's "value is missing" inside $expr
            return False

    def apply(self, event: dict) -> dict | None:
        """Evaluate on one change event; return the transformed event, or None if filtered out.

        ``event`` is never mutated (one deep copy is made before the first reshaping stage; a
        filter-only pipeline returns a shallow copy). Raises ``EventError`` when evaluation fails
        or the output's ``_id`` (the resume token) differs from the input's (MongoDB error 280).
        """
        doc: Any = event
        copied = False
        try:
            for kind, segment in self._segments:
                if kind == "match":
                    if not self._matches(doc, *segment):
                        return None
                    continue
                if not copied:
                    doc, copied = _copy(event), True
                if kind == "redact":
                    doc = _redact_doc(doc, segment, doc)
                    if doc is _REDACT_PRUNE:
                        return None
                else:
                    docs = list(_mm_aggregate.process_pipeline([doc], None, segment, None))
                    if not docs:
                        return None
                    doc = docs[0]
        except Exception as exc:  # noqa: BLE001 - mongomock raises many types
            raise EventError(
                f"PlanExecutor error during aggregation :: caused by :: {_describe(exc)}"
            ) from None
        if not copied:
            return dict(event)
        expected = event.get("_id", _MISSING)
        found = doc.get("_id", _MISSING) if isinstance(doc, dict) else _MISSING
        if found is _MISSING or expected is _MISSING or found != expected:
            raise EventError(
                "Encountered an event whose _id field, which contains the resume token, was modified by "
                "the pipeline. Modifying the _id field of an event makes it impossible to resume the stream "
                "from that point. Only transformations that retain the unmodified _id field are allowed. "
                "Expected: {{_id: {}}} but found: {}".format(
                    _show(None if expected is _MISSING else expected),
                    "{_id: missing}" if found is _MISSING else f"{{_id: {_show(found)}}}",
                )
            )
        return doc


def _has_key(value: Any, key: str) -> bool:
    if isinstance(value, dict):
        return key in value or any(_has_key(v, key) for v in value.values())
    if isinstance(value, list):
        return any(_has_key(v, key) for v in value)
    return False


def shared_stage_count(stages_as_stored: list) -> int:
    """How many leading stages of a stream every subscriber runs alike (hub: one watcher).

    The leading ``$match`` stages that name no variable and hold no ``$expr``. Only filters:
    they commute with the caller's readFilter, which must see the events as the collection
    made them (a reshaping stage could not run before it); and without ``$expr`` they cannot
    fail on an event, whose error would describe a document outside the caller's readFilter.
    Everything after them is bound and run per subscriber, in the process.
    """
    count = 0
    for stage in unescape(stages_as_stored):
        if not isinstance(stage, dict) or list(stage) != ["$match"]:
            break
        if _find_var(stage) is not _MISSING or _has_key(stage, "$expr"):
            break
        count += 1
    return count


def _on_pre_image(query: dict) -> dict | None:
    """`query` with its `fullDocument` paths read from `fullDocumentBeforeChange` instead,
    or None when it names no `fullDocument` path (or holds an `$expr`, left as it is)."""
    found = False

    def rewrite(q: dict) -> dict:
        nonlocal found
        out: dict = {}
        for key, value in q.items():
            if key in _LOGICAL and isinstance(value, list):
                out[key] = [rewrite(v) if isinstance(v, dict) else v for v in value]
            elif key == "fullDocument" or key.startswith("fullDocument."):
                found = True
                out["fullDocumentBeforeChange" + key[len("fullDocument") :]] = value
            else:
                out[key] = value
        return out

    if _has_key(query, "$expr"):
        return None
    before = rewrite(query)
    return before if found else None


def with_pre_images(stages: list) -> list:
    """Bound stages whose leading `$match`es also pass an event whose document matched
    before the change (its pre-image): a delete, or an update that moved it out of the
    filter, reaches the subscribers who had the document.

    `{"fullDocument.owner": "uji"}` becomes `{"$or": [<it>, {"fullDocumentBeforeChange":
    {"$type": "object"}, "fullDocumentBeforeChange.owner": "uji"}]}`: the second branch only
    where a pre-image exists, so an insert, or an event without one (MongoDB without
    changeStreamPreAndPostImages), is filtered exactly as written.
    """
    out = []
    leading = True
    for stage in stages:
        ((name, arg),) = stage.items()
        if name != "$match":
            leading = False
        before = _on_pre_image(arg) if leading and name == "$match" else None
        if before is None:
            out.append(stage)
            continue
        guard = {"fullDocumentBeforeChange": {"$type": "object"}}
        out.append({"$match": {"$or": [arg, {"$and": [guard, before]}]}})
    return out


def compile_pipeline(stages_as_stored: list, avars: dict) -> Pipeline:
    """Unescape the stored stages, bind ``avars`` and compile them into a ``Pipeline``."""
    return Pipeline(with_pre_images(_bind_stages(unescape(stages_as_stored), _avars_resolver(avars or {}))))
