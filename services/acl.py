"""Access control: ACL documents, the RESTHeart/Undertow predicate language, the decision.

Standard library only, besides services.paths, RE2 for ``regex()`` (matching in linear
time: the matched text is the client's) and, for the ``mongo`` object of ACL documents,
services.permissions. The pieces:

* ``normalize_path`` (services.paths) turns the raw, percent-encoded request path into the
  one path every rule is matched against and the router routes on: decoded once, ``//``
  collapsed, ``.``/``..`` resolved, and anything ambiguous refused with ``None`` (the caller
  answers 400). Only a document id segment keeps ``/``, ``%`` or control characters, and
  keeps them percent-encoded, so that it stays one segment.
* ``parse_predicate`` is a real parser: a context-sensitive tokenizer (argument values are
  lexed differently from the expression around them, because bare words such as
  ``/messages/_streams/all`` are legal arguments) driving a recursive-descent parser into an
  AST. Grammar (EBNF)::

      predicate := or_expr EOF
      or_expr   := and_expr { "or" and_expr }
      and_expr  := not_expr { "and" not_expr }
      not_expr  := "not" not_expr | primary
      primary   := "(" or_expr ")" | call
      call      := NAME [ "(" [ args ] ")" | "[" [ args ] "]" ]
      args      := arg { "," arg }
      arg       := [ NAME "=" ] value            (NAME must be a parameter of the function)
      value     := STRING | array | BARE
      array     := "{" [ value { "," value } ] "}"
      STRING    := "'" ... "'" | '"' ... '"'     (\\', \\", \\\\ are escapes; other \\x kept as is)
      BARE      := characters up to "," or the closing bracket at nesting level 0, trimmed

  Keywords and function names are case-insensitive. Inside any value, ``@user.<a.b>``,
  ``@user.roles``, ``${var}`` (captured by a ``path-template`` evaluated earlier in the same
  ``and`` chain), ``@qparams['k']``, ``@request.path``, ``@request.method`` and
  ``@request.body.<a.b>`` (the value the JSON request body writes at that path, see below;
  components ``[A-Za-z0-9_-]``) are interpolated at match time (never by re-parsing text, so
  a user property or a body field cannot inject syntax). A whole value may also be one of
  the exchange attributes ``%R``/``%U``/``%{RELATIVE_PATH}``/``%{REQUEST_PATH}`` (the
  normalised path), ``%m``/``%{METHOD}``, ``%USER``, ``%ROLES``.
* Request-body predicates look at ``RequestInfo.body`` (the parsed JSON body: an object, a
  list of objects for a bulk POST, or ``None`` when there is none). ``touched_paths`` lists
  the field paths a body writes: every plain (non-``$``) key as written (``"a.b"`` stays
  dotted), every key of an operator's object argument (``$set``, ``$unset``, ``$inc``,
  ``$rename`` -- whose targets are touched too -- ``$push`` ... and, conservatively, any other
  ``$key``), and an operator whose argument is not an object is itself reported as touched.
  "The value written at a path" merges the plain fields with ``$set`` and ``$setOnInsert``;
  the path is looked up as a literal key, then by dotted navigation (numeric components index
  arrays). Writers that disagree (two different values, or another operator touching the same
  path) make it unknown. The functions (keys are dotted paths, never ``$``-prefixed; an
  interpolated part of a key must be one component)::

      bson-request-contains(k, ...)      every k is present: a touched path equals k or is
                                         under it, or k is inside a value written at one
      bson-request-whitelist(k, ...)     every touched path equals or is under some k
      bson-request-blacklist(k, ...)     no touched path equals, is under or is above a k
                                         (positional ``$``/``$[..]`` components match any)
      bson-request-prop-equals(key=p, value=json)          the value written at p == value
      bson-request-array-contains(key=p, values=...)       it is an array holding every value
      bson-request-array-is-subset(key=p, values=...)      it is an array of listed values only

  A literal ``value``/``values`` item is JSON text (``value='"bar"'``, ``value=1``,
  ``value='{"a": 1}'``); a lone ``values`` argument that is a JSON array (or a variable
  holding a list) is the list of values, items of ``{...}`` are one value each. An
  interpolated value is the variable's raw value, never parsed as JSON (text around a
  variable gives plain text). Equality is BSON-like: booleans never equal numbers, ints and
  floats compare numerically, objects (key order ignored) and arrays compare deeply. Without
  a body, whitelist/blacklist hold and the others do not; a bulk body must satisfy the
  predicate in every element (an empty list: only whitelist/blacklist hold); a body of any
  other shape is unknown. NB: whitelist/blacklist hold vacuously without a body, so the
  server must refuse (400) a body it cannot parse instead of passing ``None``.
* Evaluation is three-valued: a variable that cannot be resolved (anonymous caller, missing
  or empty property, uncaptured ``${var}``) makes its function *unknown*; ``not unknown`` is
  unknown, ``and``/``or`` follow Kleene logic, and only a definite *true* matches. A missing
  variable therefore never widens a rule, not even under ``not``.
* ``load_permissions`` / ``decide`` implement MongoAclAuthorizer's order and decision.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, NoReturn

import re2

from . import updates
from .errors import BadRequest
from .linear_regex import compile_re2
from .paths import normalize_path

log = logging.getLogger(__name__)

__all__ = [
    "PredicateError",
    "AclError",
    "RequestInfo",
    "normalize_path",
    "Predicate",
    "parse_predicate",
    "touched_paths",
    "UPDATE_OPERATORS",
    "validate_acl_document",
    "Permission",
    "load_permissions",
    "Decision",
    "decide",
    "UNAUTHENTICATED",
    "MONGO_DEFAULTS",
]

UNAUTHENTICATED = "$unauthenticated"
MAX_PREDICATE_LENGTH = 16384
MAX_NESTING = 64


class PredicateError(BadRequest):
    """A predicate that does not parse; the message names fault and position (HTTP 400)."""


class AclError(BadRequest):
    """An ACL document that cannot be stored as written (HTTP 400); the message starts with
    ``invalid ACL document:`` and names the fault."""


@dataclass(frozen=True)
class RequestInfo:
    method: str
    path: str  # raw, percent-encoded, without the query string
    query: dict  # dict[str, list[str]], decoded
    user: dict | None = None  # authenticated user document without password, or None
    # the parsed JSON request body (a dict, or a list of dicts for a bulk POST); None when the
    # request has no JSON body or it could not be parsed; or a LazyBody that reads it only
    # when a body predicate needs it. Keep it last: callers pass it by name.
    body: Any = None


class LazyBody:
    """A request body that is read and parsed only if a body predicate asks for it, so that
    a request no body predicate concerns (most, and every anonymous one a rule refuses
    without looking at its body) is decided before its body is read."""

    __slots__ = ("_load", "_value", "_loaded")

    def __init__(self, load: Any):
        self._load, self._value, self._loaded = load, None, False

    def get(self) -> Any:
        if not self._loaded:
            self._value, self._loaded = self._load(), True
        return self._value


def _body_of(req: RequestInfo) -> Any:
    body = req.body
    return body.get() if isinstance(body, LazyBody) else body


# --------------------------------------------------------------------------- paths

# The canonical path every rule is matched against (and the router routes on) is
# services.paths.normalize_path: see there for what is decoded, resolved and refused.


def _rule_path(p: str) -> str:
    """A path written in a rule, in the normalised form: leading '/', no '//', no trailing '/'."""
    p = re.sub(r"/{2,}", "/", "/" + p.strip())
    if len(p) > 1:
        p = p.rstrip("/") or "/"
    return p


def _prefix_matches(path: str, prefix: str) -> bool:
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


# --------------------------------------------------------------------------- values

_MISSING = object()  # an unresolvable variable
_SEGMENT = object()  # _resolve_str mode: interpolated values must be single path segments


@dataclass(frozen=True)
class _Var:
    kind: str  # "user" | "capture" | "qparam" | "attr" | "body"
    name: Any  # tuple of keys for user; str otherwise (a dotted path for body)


_VAR_RE = re.compile(
    r"""
    (?<![\w@])@user(?P<user>(?:\.[A-Za-z0-9_-]+)*)(?![A-Za-z0-9_-])
  | \$\{(?P<cap>[A-Za-z_][A-Za-z0-9_-]*)\}
  | @qparams\[\s*(?:'(?P<q1>[^']*)'|"(?P<q2>[^"]*)")\s*\]
  | @request\.body(?P<body>(?:\.[A-Za-z0-9_-]+)+)(?![A-Za-z0-9_-])
  | @request\.(?P<req>path|method)(?![A-Za-z0-9_])
    """,
    re.X,
)

# exchange attributes accepted as a whole value
_ATTRS = {
    "%R": _Var("attr", "path"),
    "%U": _Var("attr", "path"),
    "%{RELATIVE_PATH}": _Var("attr", "path"),
    "%{REQUEST_PATH}": _Var("attr", "path"),
    "%m": _Var("attr", "method"),
    "%{METHOD}": _Var("attr", "method"),
    "%USER": _Var("user", ("_id",)),
    "%ROLES": _Var("user", ("roles",)),
}


@dataclass(frozen=True)
class _Template:
    """A scalar argument: literal text with interpolated variables."""

    parts: tuple  # of str | _Var
    text: str
    pos: int

    @property
    def literal(self) -> str | None:
        if all(isinstance(p, str) for p in self.parts):
            return "".join(self.parts)
        return None


@dataclass(frozen=True)
class _Array:
    items: tuple  # of _Template
    pos: int


def _template(text: str, pos: int) -> _Template:
    if text in _ATTRS:
        return _Template((_ATTRS[text],), text, pos)
    parts: list = []
    last = 0
    for m in _VAR_RE.finditer(text):
        if m.start() > last:
            parts.append(text[last : m.start()])
        if m.group("user") is not None and m.group(0).startswith("@user"):
            keys = tuple(k for k in m.group("user").split(".") if k)
            parts.append(_Var("user", keys))
        elif m.group("cap") is not None:
            parts.append(_Var("capture", m.group("cap")))
        elif m.group("body") is not None:
            parts.append(_Var("body", m.group("body")[1:]))
        elif m.group("req") is not None:
            parts.append(_Var("attr", m.group("req")))
        else:
            parts.append(_Var("qparam", m.group("q1") if m.group("q1") is not None else m.group("q2")))
        last = m.end()
    if last < len(text):
        parts.append(text[last:])
    return _Template(tuple(parts), text, pos)


class _Ctx:
    __slots__ = ("req", "path", "captures")

    def __init__(self, req: RequestInfo, path: str, captures: dict):
        self.req = req
        self.path = path
        self.captures = captures

    def fork(self) -> _Ctx:
        return _Ctx(self.req, self.path, dict(self.captures))


def _lookup(var: _Var, ctx: _Ctx) -> Any:
    if var.kind == "attr":
        return ctx.path if var.name == "path" else (ctx.req.method or "").upper()
    if var.kind == "capture":
        return ctx.captures.get(var.name, _MISSING)
    if var.kind == "qparam":
        values = (ctx.req.query or {}).get(var.name)
        if isinstance(values, (list, tuple)):
            return values[0] if values else _MISSING
        return _MISSING if values is None else values
    if var.kind == "body":
        body = _body_of(ctx.req)
        if not isinstance(body, dict):  # no body, or a bulk list: which element would it be?
            return _MISSING
        v = _written(body, var.name)
        return _MISSING if v is _AMBIGUOUS or v is None else v
    # user
    cur: Any = ctx.req.user
    if not isinstance(cur, dict):
        return _MISSING
    for key in var.name:
        if isinstance(cur, dict) and key in cur:
            cur = cur[key]
        elif isinstance(cur, list) and key.isdigit() and int(key) < len(cur):
            cur = cur[int(key)]
        else:
            return _MISSING
    if key_is_secret(var.name):
        return _MISSING
    return _MISSING if cur is None else cur


def key_is_secret(keys: tuple) -> bool:
    return bool(keys) and keys[0] == "password"


def _scalar_text(v: Any) -> Any:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, str):
        return v
    return _MISSING


def _resolve_raw(t: _Template, ctx: _Ctx) -> Any:
    """A value as a Python object: a lone variable keeps its type (a list stays a list)."""
    if len(t.parts) == 1 and isinstance(t.parts[0], _Var):
        v = _lookup(t.parts[0], ctx)
        if v is _MISSING or v == "" or v == []:
            return _MISSING
        return v
    return _resolve_str(t, ctx)


def _resolve_str(t: _Template, ctx: _Ctx, escape=None) -> Any:
    """A value as text; _MISSING if a variable is missing, empty, or not a scalar."""
    out = []
    for p in t.parts:
        if isinstance(p, str):
            out.append(p)
            continue
        v = _lookup(p, ctx)
        if v is _MISSING:
            return _MISSING
        s = _scalar_text(v)
        if s is _MISSING or s == "":
            return _MISSING
        if escape is _SEGMENT:
            if "/" in s or s in (".", "..") or "\\" in s:
                return _MISSING  # a value must stay one path segment: never widens a rule
            out.append(s)
        else:
            out.append(escape(s) if escape else s)
    return "".join(out)


def _canon(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return ("list", tuple(_canon(x) for x in v))
    if isinstance(v, dict):
        return ("dict", tuple(sorted((str(k), _canon(x)) for k, x in v.items())))
    s = _scalar_text(v)
    return ("str", s) if s is not _MISSING else ("other", repr(v))


def _any_true(results) -> bool | None:
    unknown = False
    for r in results:
        if r is True:
            return True
        if r is None:
            unknown = True
    return None if unknown else False


# --------------------------------------------------------------------------- request bodies

UPDATE_OPERATORS = updates.OPERATORS
# the writers whose argument value is what ends up at the path (None: a plain field)
_VALUE_WRITERS = (None, "$set", "$setOnInsert")
_AMBIGUOUS = object()  # writers disagree about the value at a path


def _body_entries(doc: dict) -> list[tuple[str, str | None, Any]]:
    """``(path, writer, value)`` for every field path one body document touches.

    ``writer`` is None for a plain field, else the ``$`` key it was found under. Any ``$`` key
    with an object argument (an update operator or not) touches the argument's keys; a
    ``$rename`` also touches each (string) target. A ``$`` key whose argument is not an object
    is reported as touching itself, so that a whitelist can never let it through.
    """
    out: list[tuple[str, str | None, Any]] = []
    for key, arg in doc.items():
        key = str(key)
        if not key.startswith("$"):
            out.append((key, None, arg))
        elif isinstance(arg, dict):
            for sub, val in arg.items():
                out.append((str(sub), key, val))
                if key == "$rename" and isinstance(val, str):
                    out.append((val, key, None))
        else:
            out.append((key, key, None))
    return out


def touched_paths(body: Any) -> list[str]:
    """The field paths a JSON request body writes, in order, without duplicates.

    For an object: every key not starting with ``$`` as written (a dotted key such as
    ``"a.b"`` stays one path); for an update operator (``UPDATE_OPERATORS``) and,
    conservatively, any other ``$`` key, every key of its object argument, plus each target of
    a ``$rename``; a ``$`` key whose argument is not an object is listed itself. For a list (a
    bulk POST): the union over its object elements (the body predicates test each element
    separately). Anything else touches nothing.
    """
    docs = body if isinstance(body, list) else [body]
    seen: dict[str, None] = {}
    for doc in docs:
        if isinstance(doc, dict):
            for path, _, _ in _body_entries(doc):
                seen.setdefault(path, None)
    return list(seen)


def _is_index(c: str) -> bool:
    return c.isascii() and c.isdigit()


def _values_at(cur: Any, comps: list[str]) -> list:
    """Every value found at the dotted path ``comps`` inside ``cur``.

    At each object level the rest of the path is tried as one literal key, then the next
    component is followed (a numeric component indexes an array).
    """
    found = []
    while comps:
        if isinstance(cur, dict):
            if len(comps) > 1:
                whole = ".".join(comps)
                if whole in cur:
                    found.append(cur[whole])
            if comps[0] not in cur:
                return found
            cur = cur[comps[0]]
        elif isinstance(cur, list) and _is_index(comps[0]) and int(comps[0]) < len(cur):
            cur = cur[int(comps[0])]
        else:
            return found
        comps = comps[1:]
    found.append(cur)
    return found


def _is_positional(c: str) -> bool:
    return c == "$" or (c.startswith("$[") and c.endswith("]"))


def _at_or_under(t: str, k: str) -> bool:
    return t == k or t.startswith(k + ".")


def _overlaps(t: str, k: str) -> bool:
    """t equals k, is under it or above it; a positional component ($, $[], $[x]) matches any."""
    for a, b in zip(t.split("."), k.split("."), strict=False):  # the shorter path decides
        if a != b and not _is_positional(a) and not _is_positional(b):
            return False
    return True


def _written(doc: dict, path: str) -> Any:
    """The value a body document writes at ``path``: _MISSING, _AMBIGUOUS or the value.

    The plain fields, ``$set`` and ``$setOnInsert`` are looked up separately; several values
    found that are not all equal, or any other operator touching the path (or a path above or
    below it), make the value ambiguous (MongoDB would reject such an update anyway).
    """
    comps = path.split(".")
    plain = {str(k): v for k, v in doc.items() if not str(k).startswith("$")}
    sources = [plain] + [doc[w] for w in _VALUE_WRITERS[1:] if isinstance(doc.get(w), dict)]
    candidates = []
    for src in sources:
        candidates.extend(_values_at(src, comps))
    if not candidates:
        return _MISSING
    for t, writer, _ in _body_entries(doc):
        if writer not in _VALUE_WRITERS and _overlaps(t, path):
            return _AMBIGUOUS
    first = candidates[0]
    if any(not _bson_equal(first, c) for c in candidates[1:]):
        return _AMBIGUOUS
    return first


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bson_equal(a: Any, b: Any) -> bool:
    """BSON-like equality: bool never equals a number, int and float compare numerically,
    strings exactly, objects (key order ignored) and arrays (in order) deeply. Iterative."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if isinstance(x, bool) or isinstance(y, bool):
            if not (isinstance(x, bool) and isinstance(y, bool) and x == y):
                return False
        elif _num(x) or _num(y):
            if not (_num(x) and _num(y) and x == y):
                return False
        elif isinstance(x, str) or isinstance(y, str):
            if not (isinstance(x, str) and isinstance(y, str) and x == y):
                return False
        elif isinstance(x, dict) or isinstance(y, dict):
            if not (isinstance(x, dict) and isinstance(y, dict)) or x.keys() != y.keys():
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif isinstance(x, (list, tuple)) or isinstance(y, (list, tuple)):
            if not (isinstance(x, (list, tuple)) and isinstance(y, (list, tuple))) or len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif x is None or y is None:
            if not (x is None and y is None):
                return False
        elif not (type(x) is type(y) and x == y):
            return False
    return True


# --------------------------------------------------------------------------- AST


class Predicate:
    """A parsed predicate. ``matches`` is true only when the predicate definitely holds."""

    source: str = ""

    def matches(self, req: RequestInfo, path: str | None = None) -> bool:
        if path is None:
            path = normalize_path(req.path)
            if path is None:
                return False
        try:
            return self._eval(_Ctx(req, path, {})) is True
        except RecursionError:  # absurdly nested user or body values: fail closed
            return False

    def _eval(self, ctx: _Ctx) -> bool | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __str__(self) -> str:
        return self.source or repr(self)


class _And(Predicate):
    def __init__(self, children):
        self.children = children

    def _eval(self, ctx):
        result: bool | None = True
        for c in self.children:  # shared captures: path-template feeds later ${var}
            r = c._eval(ctx)
            if r is False:
                return False
            if r is None:
                result = None
        return result

    def __repr__(self):
        return "And({})".format(", ".join(map(repr, self.children)))


class _Or(Predicate):
    def __init__(self, children):
        self.children = children

    def _eval(self, ctx):
        unknown = False
        for c in self.children:
            sub = ctx.fork()
            r = c._eval(sub)
            if r is True:
                ctx.captures.update(sub.captures)
                return True
            if r is None:
                unknown = True
        return None if unknown else False

    def __repr__(self):
        return "Or({})".format(", ".join(map(repr, self.children)))


class _Not(Predicate):
    def __init__(self, child):
        self.child = child

    def _eval(self, ctx):
        r = self.child._eval(ctx.fork())
        return None if r is None else not r

    def __repr__(self):
        return f"Not({self.child!r})"


class _Const(Predicate):
    def __init__(self, value: bool):
        self.value = value

    def _eval(self, ctx):
        return self.value

    def __repr__(self):
        return f"Const({self.value})"


class _PathFn(Predicate):
    def __init__(self, mode: str, paths: list):
        self.mode = mode  # "exact" | "prefix"
        self.paths = paths  # _Template list; literals pre-normalised

    def _eval(self, ctx):
        def one(t):
            p = _resolve_str(t, ctx, escape=_SEGMENT)
            if p is _MISSING:
                return None
            p = _rule_path(p)
            return ctx.path == p if self.mode == "exact" else _prefix_matches(ctx.path, p)

        return _any_true(one(t) for t in self.paths)

    def __repr__(self):
        return f"Path[{self.mode}]({[t.text for t in self.paths]})"


_TEMPLATE_VAR = re.compile(r"\{([A-Za-z_][A-Za-z0-9_-]*)\}")


class _PathTemplateFn(Predicate):
    def __init__(self, template: str, pos: int):
        self.template = _rule_path(template)
        names: list[str] = []
        regex = []
        body = self.template
        wildcard = False
        if body.endswith("/*"):
            body, wildcard = body[:-2] or "", True
        i = 0
        for m in _TEMPLATE_VAR.finditer(body):
            lit = body[i : m.start()]
            if "{" in lit or "}" in lit:
                raise PredicateError(f"malformed path-template {template!r} at {pos}")
            regex.append(re.escape(lit))
            if m.group(1) in names:
                raise PredicateError(f"duplicate path-template variable {m.group(1)!r} at {pos}")
            names.append(m.group(1))
            regex.append(f"(?P<v{len(names) - 1}>[^/]+)")
            i = m.end()
        tail = body[i:]
        if "{" in tail or "}" in tail or "*" in body:
            raise PredicateError(f"malformed path-template {template!r} at {pos}")
        regex.append(re.escape(tail))
        if wildcard:
            regex.append("(?:/.*)?")
        self.names = names
        self.regex = re.compile("".join(regex) or "/")

    def _eval(self, ctx):
        m = self.regex.fullmatch(ctx.path)
        if not m:
            return False
        for k, name in enumerate(self.names):
            ctx.captures[name] = m.group(f"v{k}")
        return True

    def __repr__(self):
        return f"PathTemplate({self.template!r})"


class _MethodFn(Predicate):
    def __init__(self, methods: list[str]):
        self.methods = frozenset(m.upper() for m in methods)

    def _eval(self, ctx):
        return (ctx.req.method or "").upper() in self.methods

    def __repr__(self):
        return f"Method({sorted(self.methods)})"


class _RegexFn(Predicate):
    """regex(): matched by RE2 in linear time, since the matched text (path, query, body
    values) is the client's and a backtracking engine lets one request hold the worker."""

    def __init__(self, pattern: _Template, value: _Template | None, full: bool, case_sensitive: bool):
        self.pattern = pattern
        self.value = value
        self.full = full
        self.case_sensitive = case_sensitive
        lit = pattern.literal
        self.compiled = None
        if lit is not None:
            try:
                re.compile(lit)  # the syntax error Python would give, if any, is the clearer one
            except re.error as e:
                raise PredicateError(f"invalid regex {lit!r}: {e} at {pattern.pos}") from None
            try:
                self.compiled = compile_re2(lit, case_sensitive)
            except re2.error:
                raise PredicateError(
                    f"regex {lit!r} needs backtracking (backreferences or lookaround), which "
                    f"is not supported: it could take exponential time at {pattern.pos}"
                ) from None

    def _eval(self, ctx):
        value = ctx.path if self.value is None else _resolve_str(self.value, ctx)
        if value is _MISSING:
            return None
        rx = self.compiled
        if rx is None:  # interpolated values are matched literally, never as regex syntax
            pat = _resolve_str(self.pattern, ctx, escape=re.escape)
            if pat is _MISSING:
                return None
            try:
                rx = compile_re2(pat, self.case_sensitive)
            except re2.error:
                return False
        return bool(rx.fullmatch(value) if self.full else rx.search(value))

    def __repr__(self):
        return f"Regex({self.pattern.text!r})"


class _QParamsFn(Predicate):
    def __init__(self, kind: str, names: list):
        self.kind = kind
        self.names = names

    def _eval(self, ctx):
        names = set()
        for t in self.names:
            n = _resolve_str(t, ctx)
            if n is _MISSING:
                return None
            names.add(n)
        present = set((ctx.req.query or {}).keys())
        if self.kind == "contain":
            return names <= present
        if self.kind == "blacklist":
            return not (names & present)
        return present <= names  # whitelist

    def __repr__(self):
        return f"QParams[{self.kind}]({[t.text for t in self.names]})"


class _QParamsSizeFn(Predicate):
    def __init__(self, size: int):
        self.size = size

    def _eval(self, ctx):
        return len(ctx.req.query or {}) == self.size


class _EqualsFn(Predicate):
    def __init__(self, values: list):
        self.values = values

    def _eval(self, ctx):
        resolved = []
        for t in self.values:
            v = _resolve_raw(t, ctx) if isinstance(t, _Template) else _resolve_array(t, ctx)
            if v is _MISSING:
                return None
            resolved.append(_canon(v))
        return all(r == resolved[0] for r in resolved[1:])

    def __repr__(self):
        return f"Equals({[getattr(t, 'text', t) for t in self.values]})"


def _resolve_array(a: _Array, ctx: _Ctx) -> Any:
    out = []
    for t in a.items:
        v = _resolve_raw(t, ctx)
        if v is _MISSING:
            return _MISSING
        out.append(v)
    return out


class _InFn(Predicate):
    def __init__(self, value, array):
        self.value = value
        self.array = array

    def _eval(self, ctx):
        v = _resolve_raw(self.value, ctx)
        if v is _MISSING:
            return None
        if isinstance(self.array, _Array):
            arr = _resolve_array(self.array, ctx)
        else:
            arr = _resolve_raw(self.array, ctx)
        if arr is _MISSING:
            return None
        if not isinstance(arr, (list, tuple)) or isinstance(v, (list, tuple, dict)):
            return False
        cv = _canon(v)
        return any(_canon(x) == cv for x in arr)

    def __repr__(self):
        return f"In({self.value.text!r}, {getattr(self.array, 'text', self.array)!r})"


class _ContainsFn(Predicate):
    def __init__(self, value: _Template, search: list):
        self.value = value
        self.search = search

    def _eval(self, ctx):
        v = _resolve_str(self.value, ctx)
        if v is _MISSING:
            return None

        def one(t):
            s = _resolve_str(t, ctx)
            return None if s is _MISSING else s in v

        return _any_true(one(t) for t in self.search)


_DYNAMIC = object()  # a value argument that is interpolated at match time


def _resolve_key(t: _Template, ctx: _Ctx) -> Any:
    """A body field path; _MISSING if a variable is missing or its value is not one path
    component (empty, contains '.', starts with '$'), or the path is empty or '$'-prefixed."""
    out = []
    for p in t.parts:
        if isinstance(p, str):
            out.append(p)
            continue
        v = _lookup(p, ctx)
        s = _MISSING if v is _MISSING else _scalar_text(v)
        if s is _MISSING or s == "" or "." in s or s.startswith("$"):
            return _MISSING
        out.append(s)
    key = "".join(out)
    return _MISSING if not key or key.startswith("$") else key


def _body_docs(body: Any) -> Any:
    """The documents a body predicate tests: None (no body), _MISSING (a shape that is neither
    an object nor a list of objects: unknown), or a list of dicts."""
    if body is None:
        return None
    if isinstance(body, dict):
        return [body]
    if isinstance(body, list) and all(isinstance(d, dict) for d in body):
        return body
    return _MISSING


class _BodyFn(Predicate):
    """The bson-request-* functions over RequestInfo.body."""

    _VACUOUS = ("whitelist", "blacklist")  # hold without a body and for an empty bulk list

    def __init__(self, kind: str, keys: list, value=None, values=None):
        self.kind = kind  # contains|whitelist|blacklist|prop-equals|array-contains|array-is-subset
        self.keys = keys  # _Template list (one for the key= functions)
        self.value = value  # (template, parsed JSON or _DYNAMIC) for prop-equals
        self.values = values  # ("items"|"lone", [(template, parsed or _DYNAMIC), ...])

    def _resolve_values(self, ctx) -> Any:
        def one(item):
            t, parsed = item
            return _resolve_raw(t, ctx) if parsed is _DYNAMIC else parsed

        if self.kind == "prop-equals":
            return one(self.value)
        mode, items = self.values
        out = []
        for item in items:
            v = one(item)
            if v is _MISSING:
                return _MISSING
            out.append(v)
        if mode == "lone" and isinstance(out[0], (list, tuple)):
            out = list(out[0])
        return out

    def _eval(self, ctx):
        keys = [_resolve_key(t, ctx) for t in self.keys]
        if any(k is _MISSING for k in keys):
            return None
        wanted = _MISSING
        if self.kind in ("prop-equals", "array-contains", "array-is-subset"):
            wanted = self._resolve_values(ctx)
            if wanted is _MISSING:
                return None
        docs = _body_docs(_body_of(ctx.req))
        if docs is _MISSING:
            return None
        if not docs:  # no body, or an empty bulk list
            return self.kind in self._VACUOUS
        result: bool | None = True
        for doc in docs:
            r = self._one(doc, keys, wanted)
            if r is False:
                return False
            if r is None:
                result = None
        return result

    def _one(self, doc: dict, keys: list[str], wanted: Any) -> bool | None:
        if self.kind in ("contains", "whitelist", "blacklist"):
            entries = _body_entries(doc)
            if self.kind == "whitelist":
                return all(any(_at_or_under(t, k) for k in keys) for t, _, _ in entries)
            if self.kind == "blacklist":
                return not any(_overlaps(t, k) for t, _, _ in entries for k in keys)
            return all(self._present(entries, k) for k in keys)
        v = _written(doc, keys[0])
        if v is _MISSING:
            return False
        if v is _AMBIGUOUS:
            return None
        if self.kind == "prop-equals":
            return _bson_equal(v, wanted)
        if not isinstance(v, list):
            return False
        if self.kind == "array-contains":
            return all(any(_bson_equal(x, w) for x in v) for w in wanted)
        return all(any(_bson_equal(x, w) for w in wanted) for x in v)  # array-is-subset

    @staticmethod
    def _present(entries, k: str) -> bool:
        for t, writer, val in entries:
            if _at_or_under(t, k):
                return True
            if writer in _VALUE_WRITERS and k.startswith(t + "."):
                if _values_at(val, k[len(t) + 1 :].split(".")):
                    return True
        return False

    def __repr__(self):
        return f"Body[{self.kind}]({[t.text for t in self.keys]})"


# --------------------------------------------------------------------------- functions

# name -> (parameters {name: "array"|"scalar"}, default parameter or None, builder)


def _need_literal(t: _Template, fn: str) -> str:
    lit = t.literal
    if lit is None:
        raise PredicateError(f"{fn} does not accept interpolated values at {t.pos}")
    return lit


def _need_bool(t: _Template | None, fn: str, default: bool) -> bool:
    if t is None:
        return default
    lit = _need_literal(t, fn).strip().lower()
    if lit not in ("true", "false"):
        raise PredicateError(f"{fn}: expected true or false, got {t.text!r} at {t.pos}")
    return lit == "true"


def _at_least(items: list, n: int, fn: str, pos: int) -> list:
    if len(items) < n:
        plural = "s" if n > 1 else ""
        raise PredicateError(f"{fn} expects at least {n} argument{plural}, got {len(items)} at {pos}")
    return items


def _b_path(mode):
    def build(a, pos):
        paths = _at_least(a.get("path", []), 1, "path" if mode == "exact" else "path-prefix", pos)
        paths = [_template(_rule_path(t.text), t.pos) if t.literal is not None else t for t in paths]
        return _PathFn(mode, paths)

    return build


def _b_path_template(a, pos):
    t = a.get("value")
    if t is None:
        raise PredicateError(f"path-template expects 1 argument, got 0 at {pos}")
    return _PathTemplateFn(_need_literal(t, "path-template"), t.pos)


def _b_method(a, pos):
    methods = _at_least(a.get("value", []), 1, "method", pos)
    out = []
    for t in methods:
        m = _need_literal(t, "method").strip()
        if not re.fullmatch(r"[A-Za-z]+", m):
            raise PredicateError(f"method: invalid method name {t.text!r} at {t.pos}")
        out.append(m)
    return _MethodFn(out)


def _b_regex(a, pos):
    pattern = a.get("pattern")
    if pattern is None:
        raise PredicateError(f"regex expects a pattern at {pos}")
    return _RegexFn(
        pattern,
        a.get("value"),
        _need_bool(a.get("full-match"), "regex", False),
        _need_bool(a.get("case-sensitive"), "regex", True),
    )


def _b_qparams(kind):
    def build(a, pos):
        return _QParamsFn(kind, _at_least(a.get("qparams", []), 1, f"qparams-{kind}", pos))

    return build


def _b_qparams_size(a, pos):
    t = a.get("size")
    if t is None:
        raise PredicateError(f"qparams-size expects 1 argument, got 0 at {pos}")
    lit = _need_literal(t, "qparams-size").strip()
    if not lit.isdigit():
        raise PredicateError(f"qparams-size: expected a non-negative integer, got {t.text!r} at {t.pos}")
    return _QParamsSizeFn(int(lit))


def _b_equals(a, pos):
    return _EqualsFn(_at_least(a.get("value", []), 2, "equals", pos))


def _b_in(a, pos):
    if "value" not in a or "array" not in a:
        raise PredicateError(f"in expects named arguments value= and array= at {pos}")
    return _InFn(a["value"], a["array"])


def _b_contains(a, pos):
    if "value" not in a or "search" not in a:
        raise PredicateError(f"contains expects named arguments value= and search= at {pos}")
    return _ContainsFn(a["value"], _at_least(a["search"], 1, "contains", pos))


def _body_key(t: _Template, fn: str) -> _Template:
    lit = t.literal
    if lit is not None and (not lit or lit.startswith("$")):
        raise PredicateError(f"{fn}: invalid field path {t.text!r} (empty or starting with '$') at {t.pos}")
    return t


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _json_value(t: _Template, fn: str, param: str) -> tuple:
    """(template, parsed JSON) for a literal, (template, _DYNAMIC) for an interpolated value."""
    lit = t.literal
    if lit is None:
        return (t, _DYNAMIC)
    try:
        return (t, json.loads(lit, parse_constant=_reject_constant))
    except (ValueError, RecursionError):
        raise PredicateError(
            f"{fn}: {param}= must be JSON (e.g. '\"text\"', 1, '{{\"a\": 1}}'), got {t.text!r} at {t.pos}"
        ) from None


def _b_body_keys(kind):
    fn = f"bson-request-{kind}"

    def build(a, pos):
        keys = _at_least(a.get("keys", []), 1, fn, pos)
        return _BodyFn(kind, [_body_key(t, fn) for t in keys])

    return build


def _b_body_prop_equals(a, pos):
    fn = "bson-request-prop-equals"
    if "key" not in a or "value" not in a:
        raise PredicateError(f"{fn} expects named arguments key= and value= at {pos}")
    return _BodyFn("prop-equals", [_body_key(a["key"], fn)], value=_json_value(a["value"], fn, "value"))


def _b_body_array(kind):
    fn = f"bson-request-{kind}"

    def build(a, pos):
        if "key" not in a or "values" not in a:
            raise PredicateError(f"{fn} expects named arguments key= and values= at {pos}")
        v = a["values"]
        if isinstance(v, _Array):
            items = [_json_value(t, fn, "values") for t in v.items]
            mode = "items"
        else:
            items = [_json_value(v, fn, "values")]
            mode = "lone"
        empty = not items or (mode == "lone" and items[0][1] is not _DYNAMIC and items[0][1] == [])
        if empty:
            raise PredicateError(f"{fn}: values= expects at least 1 value at {getattr(v, 'pos', pos)}")
        return _BodyFn(kind, [_body_key(a["key"], fn)], values=(mode, items))

    return build


_FUNCS: dict[str, tuple[dict, str | None, Any]] = {
    "path": ({"path": "array"}, "path", _b_path("exact")),
    "path-prefix": ({"path": "array"}, "path", _b_path("prefix")),
    "path-template": ({"value": "scalar"}, "value", _b_path_template),
    "method": ({"value": "array"}, "value", _b_method),
    "regex": (
        {"pattern": "scalar", "value": "scalar", "full-match": "scalar", "case-sensitive": "scalar"},
        "pattern",
        _b_regex,
    ),
    "qparams-contain": ({"qparams": "array"}, "qparams", _b_qparams("contain")),
    "qparams-blacklist": ({"qparams": "array"}, "qparams", _b_qparams("blacklist")),
    "qparams-whitelist": ({"qparams": "array"}, "qparams", _b_qparams("whitelist")),
    "qparams-size": ({"size": "scalar"}, "size", _b_qparams_size),
    "equals": ({"value": "array"}, "value", _b_equals),
    "in": ({"value": "scalar", "array": "any"}, None, _b_in),
    "contains": ({"value": "scalar", "search": "array"}, None, _b_contains),
    "bson-request-contains": ({"keys": "array"}, "keys", _b_body_keys("contains")),
    "bson-request-whitelist": ({"keys": "array"}, "keys", _b_body_keys("whitelist")),
    "bson-request-blacklist": ({"keys": "array"}, "keys", _b_body_keys("blacklist")),
    "bson-request-prop-equals": ({"key": "scalar", "value": "scalar"}, None, _b_body_prop_equals),
    "bson-request-array-contains": (
        {"key": "scalar", "values": "any"},
        None,
        _b_body_array("array-contains"),
    ),
    "bson-request-array-is-subset": (
        {"key": "scalar", "values": "any"},
        None,
        _b_body_array("array-is-subset"),
    ),
    "true": ({}, None, lambda a, pos: _Const(True)),
    "false": ({}, None, lambda a, pos: _Const(False)),
}

# --------------------------------------------------------------------------- parser

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_KEYWORDS = ("and", "or", "not")
_CLOSERS = {"(": ")", "[": "]", "{": "}"}


class _Parser:
    def __init__(self, text: str):
        self.s = text
        self.n = len(text)
        self.i = 0
        self.depth = 0

    # -- lexing helpers
    def fail(self, msg: str, pos: int | None = None) -> NoReturn:
        raise PredicateError(f"{msg} at {self.i if pos is None else pos}")

    def what(self, pos: int | None = None) -> str:
        pos = self.i if pos is None else pos
        return "end of input" if pos >= self.n else repr(self.s[pos])

    def ws(self):
        while self.i < self.n and self.s[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.ws()
        return self.s[self.i] if self.i < self.n else ""

    def token(self):
        """The next expression-level token: (kind, text, pos); kinds NAME, PUNCT, EOF."""
        self.ws()
        pos = self.i
        if pos >= self.n:
            return ("EOF", "", pos)
        m = _NAME.match(self.s, pos)
        if m:
            self.i = m.end()
            return ("NAME", m.group(0), pos)
        self.i += 1
        return ("PUNCT", self.s[pos], pos)

    def peek_keyword(self, kw: str) -> bool:
        save = self.i
        kind, text, _ = self.token()
        if kind == "NAME" and text.lower() == kw:
            return True
        self.i = save
        return False

    def enter(self):
        self.depth += 1
        if self.depth > MAX_NESTING:
            self.fail("predicate nested too deeply")

    # -- grammar
    def parse(self) -> Predicate:
        if not self.s.strip():
            raise PredicateError("empty predicate at 0")
        node = self.or_expr()
        kind, text, pos = self.token()
        if kind != "EOF":
            self.fail(f"unexpected {text!r}" + (" (missing 'and'/'or'?)" if kind == "NAME" else ""), pos)
        return node

    def or_expr(self) -> Predicate:
        items = [self.and_expr()]
        while self.peek_keyword("or"):
            items.append(self.and_expr())
        return items[0] if len(items) == 1 else _Or(items)

    def and_expr(self) -> Predicate:
        items = [self.not_expr()]
        while self.peek_keyword("and"):
            items.append(self.not_expr())
        return items[0] if len(items) == 1 else _And(items)

    def not_expr(self) -> Predicate:
        if self.peek_keyword("not"):
            self.enter()
            node = _Not(self.not_expr())
            self.depth -= 1
            return node
        return self.primary()

    def primary(self) -> Predicate:
        kind, text, pos = self.token()
        if kind == "PUNCT" and text == "(":
            self.enter()
            node = self.or_expr()
            k2, t2, p2 = self.token()
            if not (k2 == "PUNCT" and t2 == ")"):
                self.fail(f"expected ')' (opened at {pos}), found {self.what(p2)}", p2)
            self.depth -= 1
            return node
        if kind == "NAME":
            if text.lower() in _KEYWORDS:
                self.fail(f"unexpected keyword '{text}'", pos)
            return self.call(text, pos)
        if kind == "EOF":
            self.fail("unexpected end of input, expected a predicate", pos)
        self.fail(f"unexpected {text!r}", pos)

    def call(self, name: str, pos: int) -> Predicate:
        spec = _FUNCS.get(name.lower())
        if spec is None:
            self.fail(f"unknown predicate {name!r}", pos)
        params, default, build = spec
        fname = name.lower()
        positional: list = []
        named: dict = {}
        c = self.peek()
        if c in ("(", "["):
            close = _CLOSERS[c]
            open_pos = self.i
            self.i += 1
            if self.peek() == close:
                self.i += 1
            else:
                while True:
                    self.ws()
                    arg_pos = self.i
                    m = _NAME.match(self.s, self.i)
                    pname = None
                    if m and m.group(0).lower() in params:
                        j = m.end()
                        while j < self.n and self.s[j].isspace():
                            j += 1
                        if j < self.n and self.s[j] == "=" and not self.s.startswith("==", j):
                            pname = m.group(0).lower()
                            self.i = j + 1
                    value = self.value((",", close), nested=False)
                    if pname is None:
                        positional.append(value)
                    elif pname in named:
                        self.fail(f"{fname}: duplicate parameter {pname!r}", arg_pos)
                    else:
                        named[pname] = value
                    c = self.peek()
                    if c == ",":
                        self.i += 1
                        continue
                    if c == close:
                        self.i += 1
                        break
                    if c == "":
                        self.fail(
                            f"unexpected end of input, expected {close!r} "
                            f"to close {fname} opened at {open_pos}"
                        )
                    self.fail(f"unexpected {self.what()} in arguments of {fname}")
        elif params and default is not None:
            self.fail(f"{fname} expects arguments, found {self.what()}")
        elif params:
            self.fail(f"{fname} expects named arguments, found {self.what()}")
        args = self.bind(fname, params, default, positional, named, pos)
        return build(args, pos)

    def bind(self, fname, params, default, positional, named, pos) -> dict:
        if positional and named:
            self.fail(f"{fname}: cannot mix positional and named arguments", pos)
        if not params and (positional or named):
            self.fail(f"{fname} takes no arguments", pos)
        args: dict = {}
        if positional:
            if default is None:
                self.fail(f"{fname} expects named arguments ({', '.join(f'{p}=' for p in params)})", pos)
            if params[default] == "array":
                items: list = []
                for v in positional:
                    if isinstance(v, _Array):
                        if len(positional) > 1:
                            self.fail(f"{fname}: unexpected array among several arguments", v.pos)
                        items.extend(v.items)
                    else:
                        items.append(v)
                args[default] = items
            else:
                if len(positional) != 1:
                    self.fail(f"{fname} expects 1 argument, got {len(positional)}", pos)
                if isinstance(positional[0], _Array):
                    self.fail(f"{fname}: expected a single value, not an array", positional[0].pos)
                args[default] = positional[0]
        for k, v in named.items():
            kind = params[k]
            if kind == "array":
                args[k] = list(v.items) if isinstance(v, _Array) else [v]
            elif kind == "scalar":
                if isinstance(v, _Array):
                    self.fail(f"{fname}: parameter {k!r} expects a single value, not an array", v.pos)
                args[k] = v
            else:
                args[k] = v
        return args

    def value(self, terms: tuple, nested: bool):
        c = self.peek()
        pos = self.i
        if c == "":
            self.fail("unexpected end of input, expected an argument")
        if c in ("'", '"'):
            return _template(self.string(), pos)
        if c == "{":
            if nested:
                self.fail("nested arrays are not allowed")
            self.i += 1
            items: list = []
            if self.peek() == "}":
                self.i += 1
                return _Array(tuple(items), pos)
            while True:
                items.append(self.value((",", "}"), nested=True))
                c = self.peek()
                if c == ",":
                    self.i += 1
                    continue
                if c == "}":
                    self.i += 1
                    return _Array(tuple(items), pos)
                if c == "":
                    self.fail(f"unterminated array opened at {pos}, expected '}}'")
                self.fail(f"unexpected {self.what()} in array")
        if c in terms:
            self.fail(f"empty argument, found {self.what()}")
        return self.bare(terms)

    def string(self) -> str:
        q = self.s[self.i]
        start = self.i
        self.i += 1
        out = []
        while self.i < self.n:
            c = self.s[self.i]
            if c == "\\":
                if self.i + 1 >= self.n:
                    break
                nxt = self.s[self.i + 1]
                out.append(nxt if nxt in ("'", '"', "\\") else "\\" + nxt)
                self.i += 2
                continue
            if c == q:
                self.i += 1
                return "".join(out)
            out.append(c)
            self.i += 1
        self.fail(f"unterminated string opened at {start}", start)

    def bare(self, terms: tuple) -> _Template:
        start = self.i
        stack: list[str] = []
        while self.i < self.n:
            c = self.s[self.i]
            if not stack and c in terms:
                break
            if c in _CLOSERS:
                stack.append(_CLOSERS[c])
            elif c in (")", "]", "}"):
                if not stack or stack[-1] != c:
                    self.fail(f"unexpected {c!r}")
                stack.pop()
            elif c in ("'", '"') and stack:
                self.string()
                continue
            elif c in ("'", '"'):
                self.fail(f"unexpected quote {c!r} inside an unquoted argument")
            self.i += 1
        if self.i >= self.n:
            self.fail(f"unexpected end of input, expected {' or '.join(repr(t) for t in terms)}")
        text = self.s[start : self.i].strip()
        if not text:
            self.fail("empty argument", start)
        return _template(text, start)


def parse_predicate(text: str) -> Predicate:
    """Parse predicate text into an AST; PredicateError names the fault and its position."""
    if not isinstance(text, str):
        raise PredicateError("predicate must be a string at 0")
    if len(text) > MAX_PREDICATE_LENGTH:
        limit = MAX_PREDICATE_LENGTH
        raise PredicateError(f"predicate longer than {limit} characters at {limit}")
    node = _Parser(text).parse()
    node.source = text
    return node


# --------------------------------------------------------------------------- ACL documents

MONGO_DEFAULTS: dict = {
    "allowManagementRequests": False,
    "allowBulkPatch": False,
    "allowBulkDelete": False,
    "allowWriteMode": False,
    "readFilter": None,
    "writeFilter": None,
    "mergeRequest": None,
    "projectResponse": None,
}
ACL_KEYS = ("_id", "roles", "predicate", "priority", "mongo", "_etag")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_acl_document(doc: dict) -> dict:
    """Validate an ACL document and return it; :raise AclError: naming the fault."""
    try:
        _check_acl_document(doc)
    except (ValueError, BadRequest) as e:  # the checks below name a fault; say whose
        raise AclError(f"invalid ACL document: {e}") from None
    return doc


def _check_acl_document(doc: Any) -> None:
    """Raise ValueError or PredicateError naming what is wrong with an ACL document."""
    if not isinstance(doc, dict):
        raise ValueError("an ACL document must be an object")
    if "roles" not in doc:
        raise ValueError("roles: missing (a non-empty array of role names is required)")
    roles = doc["roles"]
    if not isinstance(roles, list) or not roles:
        raise ValueError("roles: must be a non-empty array of strings")
    if not all(isinstance(r, str) and r.strip() for r in roles):
        raise ValueError("roles: every role must be a non-empty string")
    if "predicate" not in doc:
        raise ValueError("predicate: missing")
    pred = doc["predicate"]
    if not isinstance(pred, str):
        raise ValueError("predicate: must be a string")
    try:
        parse_predicate(pred)
    except PredicateError as e:
        raise PredicateError(f"predicate: {e}") from None
    if "priority" in doc:
        p = doc["priority"]
        if not _is_number(p):
            raise ValueError("priority: must be a number")
        if not math.isfinite(p):
            raise ValueError("priority: must be a finite number")
    unknown = sorted(str(k) for k in doc if k not in ACL_KEYS)
    if unknown:
        raise ValueError(
            f"unknown key {', '.join(repr(k) for k in unknown)}; an ACL document has only "
            f"{', '.join(ACL_KEYS)} (any other key would be stored and ignored)"
        )
    from .permissions import validate_mongo  # the mongo object's meaning lives there

    validate_mongo(doc.get("mongo"))


@dataclass
class Permission:
    id: object
    roles: list[str]
    priority: float
    predicate: Predicate
    mongo: dict


_BSON_RANK = {type(None): 0, int: 1, float: 1, str: 2, dict: 3, list: 4, bytes: 5, bool: 8}


def _id_key(v: Any):
    """Approximately BSON's sort order, so mixed _id types sort without TypeError."""
    rank = _BSON_RANK.get(type(v), 7)  # 7: ObjectId and anything else
    if rank == 1:
        return (rank, float(v), "")
    if rank in (2, 7):
        return (rank, 0.0, str(v))
    if rank == 8:
        return (rank, float(v), "")
    return (rank, 0.0, repr(v))


def load_permissions(docs: list[dict]) -> list[Permission]:
    """Parse ACL docs (invalid ones skipped with a warning); priority desc, then _id desc."""
    perms: list[Permission] = []
    for doc in docs:
        try:
            validate_acl_document(doc)
            predicate = parse_predicate(doc["predicate"])
        except (AclError, PredicateError) as e:
            ident = doc.get("_id") if isinstance(doc, dict) else None
            log.warning("ACL document %r skipped: %s", ident, e)
            continue
        priority = float(doc["priority"]) if "priority" in doc else float("-inf")
        mongo = {**MONGO_DEFAULTS, **(doc.get("mongo") or {})}
        perms.append(Permission(doc.get("_id"), list(doc["roles"]), priority, predicate, mongo))
    perms.sort(key=lambda p: (p.priority, _id_key(p.id)), reverse=True)
    return perms


@dataclass(frozen=True)
class Decision:
    allowed: bool
    permission: Permission | None


def decide(
    permissions: list[Permission], roles: list[str], req: RequestInfo, admin_role: str = "admin"
) -> Decision:
    """The first permission (in the given, priority, order) for one of the caller's roles whose
    predicate matches allows the request. An anonymous caller (``req.user is None``) has exactly
    ``["$unauthenticated"]``; ``admin_role`` passes everything; OPTIONS (CORS preflight) passes.
    """
    if req.user is None:
        roles = [UNAUTHENTICATED]
    roles = [r for r in (roles or []) if isinstance(r, str)]
    if admin_role and admin_role in roles:
        return Decision(True, None)
    if (req.method or "").upper() == "OPTIONS":
        return Decision(True, None)
    path = normalize_path(req.path)
    if path is None:
        return Decision(False, None)
    wanted = set(roles)
    for perm in permissions:
        if wanted.intersection(perm.roles) and perm.predicate.matches(req, path):
            return Decision(True, perm)
    return Decision(False, None)
