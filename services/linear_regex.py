"""MongoDB regular expressions matched in linear time (RE2), wherever mongomock evaluates them.

The embedded engine evaluates `$regex` (filters, stream `$match` stages, `$pull`
conditions, `$in` with regexes) and `$regexMatch` (expressions) with mongomock, which uses
Python's backtracking `re`. A pattern such as `^(a+)+$` against 31 characters of data
took 30 s, holding the GIL and the gevent loop: one request or one inserted document
stalled every stream of the worker until gunicorn killed it. Python cannot interrupt a
running match, so the only safe evaluator is one without backtracking: Google's RE2
(`google-re2`), whose matching time is linear in the input.

This module is the RE2 side: `compile_linear` (cached by (pattern, flags)), the `$regex`
operator `regex_matches`, and `LinearRe`, a stand-in for the `re` module. It patches
nothing; services.mongomock_compat installs the last two into mongomock.

MongoDB's options map onto RE2's: `i` (case-insensitive), `m` (^/$ at line breaks), `s`
(dot matches newline); `x` (extended) is refused, and so are the backtracking-only
constructs RE2 does not have (backreferences, lookaround): a 400 that says so, where
MongoDB's PCRE would run them under its own time limit.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import re2
from bson.regex import Regex
from mongomock import OperationFailure
from mongomock import helpers as _mm_helpers

_SUPPORTED_FLAGS = re.I | re.M | re.S | re.U  # re.U is implied for str patterns
_CACHE_SIZE = 1024


def compile_re2(pattern: str, case_sensitive: bool = True, dot_nl: bool = False) -> Any:
    """An RE2 pattern (linear-time matching); :raise re2.error: if RE2 cannot run it."""
    options = re2.Options()
    options.log_errors = False  # a client's bad pattern is its 4xx, not a line in our log
    options.case_sensitive = case_sensitive
    options.dot_nl = dot_nl
    return re2.compile(pattern, options=options)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def compile_linear(pattern: str, flags: int = 0) -> Any:
    """An RE2 pattern for a MongoDB regex; OperationFailure (a 400) if RE2 cannot run it."""
    if flags & re.X:
        raise OperationFailure("$regex option 'x' (extended) is not supported by the embedded engine")
    if flags & ~_SUPPORTED_FLAGS & ~re.X:
        raise OperationFailure(f"$regex has unsupported flags: {flags}")
    prefix = "(?m)" if flags & re.M else ""
    try:
        return compile_re2(prefix + pattern, case_sensitive=not flags & re.I, dot_nl=bool(flags & re.S))
    except re2.error as exc:
        reason = (
            exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        )
        raise OperationFailure(
            f"$regex {pattern[:100]!r} cannot be run by the embedded engine ({reason}); "
            "backreferences and lookaround are not supported, they can take exponential time"
        ) from None


def _pattern_of(regex: Any) -> tuple[str, int]:
    if isinstance(regex, str):
        return regex, 0
    if isinstance(regex, _mm_helpers.RE_TYPE):
        return regex.pattern, regex.flags
    if isinstance(regex, Regex):
        flags = regex.flags
        if isinstance(flags, str):  # bson keeps the option letters in some versions
            flags = sum({"i": re.I, "m": re.M, "s": re.S, "x": re.X, "u": re.U}.get(c, 0) for c in flags)
        return regex.pattern, int(flags)
    raise OperationFailure(f"$regex needs a string or a regular expression, got {type(regex).__name__}")


def _search(regex: Any, text: str) -> bool:
    pattern, flags = _pattern_of(regex)
    return compile_linear(pattern, flags & ~re.U).search(text) is not None


def regex_matches(doc_val: Any, regex: Any) -> bool:
    """mongomock's `_regex` (a document value against a `$regex`), in linear time."""
    if not isinstance(doc_val, (str, list)):
        return False
    values = doc_val if isinstance(doc_val, list) else [doc_val]
    return any(_search(regex, item) for item in values if isinstance(item, str))


class LinearRe:
    """Stands in for the `re` module inside mongomock's aggregation code: `compile` gives a
    pattern whose `search` is RE2's; the flag constants are re's."""

    I = IGNORECASE = re.I  # noqa: E741 - the name `re` gives it
    M = MULTILINE = re.M
    S = DOTALL = re.S
    X = VERBOSE = re.X
    U = UNICODE = re.U
    error = re.error
    escape = staticmethod(re.escape)

    class _Pattern:
        def __init__(self, pattern: str, flags: int):
            self.pattern, self.flags = pattern, flags
            self._compiled = compile_linear(pattern, flags & ~re.U)

        def search(self, text: str) -> Any:
            return self._compiled.search(text)

    @classmethod
    def compile(cls, pattern: Any, flags: int = 0) -> Any:
        if isinstance(pattern, _mm_helpers.RE_TYPE):
            pattern, flags = pattern.pattern, pattern.flags | flags
        return cls._Pattern(pattern, flags)
