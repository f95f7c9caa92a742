"""Request paths: one canonical form that the ACL and the router both see.

A client sends a percent-encoded path. Rules (``services.acl``) and routes must agree on
what it names, or a rule and a handler could disagree about the target (``/a%2fb`` is
one segment to a decoder of segments and two to a decoder of the whole path). So every
path is turned into one canonical text, once, before anything looks at it:

* segments are split on the literal ``/`` the client sent, then percent-decoded once
  (UTF-8, strict: invalid or overlong UTF-8 is refused);
* empty segments (``//``) collapse, ``.`` and ``..`` resolve (never above the root), a
  trailing slash is dropped;
* in the *document id* segment -- the second of exactly two segments, ``/<coll>/<id>`` --
  any character is allowed, because a string ``_id`` may hold any character: there the
  characters that would change the path's structure or could not be shown (``/``, ``\\``,
  ``%``, control characters, and an id that is exactly ``.`` or ``..``) stay percent-encoded
  in the canonical text, so it still names one segment. The handler decodes it once
  (``decode_segment``) to get the id. ``quote_id`` is the inverse, for ``Location`` headers;
* in every other segment such characters are refused (``None``: the caller answers 400):
  an encoded ``/`` or ``\\``, NUL or another control character, or a ``%XX`` left after
  decoding (double encoding such as ``%252e``, which a second decoder would turn into ``.``).

``is_normal`` tells whether the client's path already was in this form (no ``..``, ``.``
or inner ``//``); the server refuses paths that are not, rather than guess.
"""

from __future__ import annotations

import re
import urllib.parse

_MALFORMED_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PCT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_STRUCTURAL = frozenset("/\\%")


def _is_control(ch: str) -> bool:
    o = ord(ch)
    return o < 0x20 or 0x7F <= o <= 0x9F


def _decode(raw: str) -> str | None:
    try:
        return urllib.parse.unquote_to_bytes(raw).decode("utf-8", errors="strict")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return None


def quote_id(text: str) -> str:
    """The canonical text of an id segment: structural and control characters encoded."""
    if text in (".", ".."):
        return text.replace(".", "%2E")
    out = []
    for ch in text:
        if ch in _STRUCTURAL or _is_control(ch):
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8", errors="surrogatepass")))
        else:
            out.append(ch)
    return "".join(out)


def decode_segment(segment: str) -> str:
    """The text a canonical segment stands for (inverse of ``quote_id``)."""
    return urllib.parse.unquote(segment, errors="strict") if "%" in segment else segment


def location_segment(text: str) -> str:
    """An id for a ``Location`` header: fully percent-encoded (headers carry ASCII only)."""
    return (
        urllib.parse.quote(text, safe="!$&'()*+,;=:@-._~")
        if text not in (".", "..")
        else text.replace(".", "%2E")
    )


def _raw_segments(raw_path: str) -> list[str] | None:
    if not isinstance(raw_path, str) or not raw_path.startswith("/"):
        return None
    if _MALFORMED_PCT.search(raw_path):
        return None
    return [s for s in raw_path.split("/") if s != ""]


def _is_id_path(raw_segments: list[str]) -> bool:
    """``/<coll>/<id>``: exactly two segments, neither of them a literal dot segment."""
    return len(raw_segments) == 2 and not any(s in (".", "..") for s in raw_segments)


def normalize_path(raw_path: str) -> str | None:
    """The canonical form of a raw, percent-encoded path; ``None`` if it is ambiguous."""
    segments = _raw_segments(raw_path)
    if segments is None:
        return None
    id_path = _is_id_path(segments)
    out: list[str] = []
    for index, raw in enumerate(segments):
        text = _decode(raw)
        if text is None:
            return None
        if id_path and index == 1:
            out.append(quote_id(text))
            continue
        if "/" in text or "\\" in text or any(_is_control(c) for c in text) or _PCT_ESCAPE.search(text):
            return None
        if text == ".":
            continue
        if text == "..":
            if out:
                out.pop()
            continue
        out.append(text)
    return "/" + "/".join(out)


def is_normal(raw_path: str) -> bool:
    """True when the raw path needs no resolving: no ``.``/``..`` and no inner ``//``.

    Leading slashes and one trailing slash are tolerated (``//x`` and ``/x/`` are ``/x``).
    """
    if not isinstance(raw_path, str) or not raw_path.startswith("/"):
        return False
    inner = raw_path.lstrip("/")
    if inner.endswith("/"):
        inner = inner[:-1]
    if not inner:
        return True
    raw_segments = inner.split("/")
    if any(s == "" for s in raw_segments):
        return False
    id_path = _is_id_path(raw_segments)
    for index, raw in enumerate(raw_segments):
        if id_path and index == 1:
            continue  # an encoded dot in an id is part of the id
        if _decode(raw) in (".", ".."):
            return False
    return True
