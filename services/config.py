"""Settings read from the environment, with documented defaults.

Every setting has one name, one parser and one default here, so that `make run`,
gunicorn.conf.py and the tests agree. A bad value raises `ConfigError` with one line
that names the variable; start-up prints that line and stops.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A setting has a value that cannot be used."""


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(f"must be a whole number, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")
        return value

    return parse


def _float(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError(f"must be a number, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")
        return value

    return parse


def _nonempty(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw.strip()


def _log_level(raw: str) -> str:
    level = raw.strip().lower()
    if level not in ("debug", "info", "warning", "error", "critical"):
        raise ValueError(f"must be one of debug, info, warning, error, critical, got {raw!r}")
    return level


def _host(raw: str) -> str:
    host = raw.strip()
    if not host or any(c in host for c in " /?#"):
        raise ValueError(f"must be a host name or IP address, got {raw!r}")
    return host


def _mongo_uri(raw: str) -> str:
    uri = raw.strip()
    if uri and not uri.startswith(("mongodb://", "mongodb+srv://")):
        raise ValueError(f"must start with mongodb:// or mongodb+srv://, got {raw!r}")
    return uri


def _db_name(raw: str) -> str:
    name = raw.strip()
    if not name or any(c in name for c in '/\\. "$\0') or len(name) > 63:
        raise ValueError(f"is not a valid MongoDB database name: {raw!r}")
    return name


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ValueError(f"entries must be * or start with http:// or https://, got {origin!r}")
    return origins


def _networks(raw: str) -> tuple:
    nets = []
    for item in (p.strip() for p in raw.split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"entries must be IP addresses or networks (10.0.0.0/8), got {item!r}") from None
    return tuple(nets)


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {raw!r}")
        return value

    return parse


def _public_url(raw: str) -> str:
    url = raw.strip().rstrip("/")
    if url and (not url.startswith(("http://", "https://")) or any(c in url for c in " ?#")):
        raise ValueError(f"must be an http:// or https:// URL without query, got {raw!r}")
    return url


# name -> (parser, default as the environment would spell it, meaning)
SETTINGS: dict[str, tuple[Callable[[str], Any], str, str]] = {
    "HOST": (_host, "127.0.0.1", "address gunicorn binds to"),
    "PORT": (_int(1, 65535), "8080", "port gunicorn binds to"),
    "WORKERS": (_int(1, 64), "1", "gunicorn worker processes"),
    "LOG_LEVEL": (_log_level, "info", "gunicorn and app log level"),
    "LOG_FORMAT": (_choice("text", "json"), "text", "log lines as text, or one JSON object per line"),
    "DATA_DIR": (_nonempty, "./data", "embedded engine data directory"),
    "MONGO_URI": (_mongo_uri, "", "use the MongoDB engine at this URI (empty: embedded engine)"),
    "MONGO_DB": (_db_name, "restheart", "database that holds the collections"),
    "ADMIN_PASSWORD": (_nonempty, "secret", "password of the default admin user"),
    "MAX_CONTENT_LENGTH": (_int(1, 1 << 31), str(16 * 1024 * 1024), "largest request body in bytes"),
    "CHANGE_LOG_DAYS": (_float(0.0007, 3650), "7", "embedded change log retention window in days"),
    "CHANGE_LOG_MAX_EVENTS": (_int(100, 1_000_000_000), "1000000", "embedded change log size cap"),
    "EMBEDDED_POLL_SECONDS": (
        _float(0.001, 5),
        "0.02",
        "how often a worker checks for other workers' writes",
    ),
    "EMBEDDED_BUSY_TIMEOUT_SECONDS": (
        _float(0.05, 600),
        "5",
        "how long a write waits for another process's write lock before a 503",
    ),
    "SSE_HEARTBEAT_SECONDS": (_float(0.05, 3600), "15", "seconds between SSE heartbeat comments"),
    "SSE_RETRY_MS": (_int(0, 3_600_000), "3000", "reconnect delay sent in the SSE retry: field"),
    "WS_PING_SECONDS": (_float(0.05, 3600), "25", "seconds between WebSocket pings"),
    "STREAM_CLIENT_QUEUE": (
        _int(1, 1_000_000),
        "1000",
        "events a client may fall behind before it is dropped",
    ),
    "STREAM_CLIENT_QUEUE_BYTES": (
        _int(65_536, 1 << 34),
        str(16 * 1024 * 1024),
        "bytes of events a client may fall behind before it is dropped",
    ),
    "STREAM_REPLAY_BUFFER": (_int(0, 1_000_000), "1000", "recent events each watcher keeps for resume"),
    "STREAM_REPLAY_BYTES": (
        _int(0, 1 << 34),
        str(8 * 1024 * 1024),
        "bytes of recent events each watcher keeps for resume",
    ),
    "STREAM_LINGER_SECONDS": (_float(0, 3600), "2", "how long a watcher outlives its last client"),
    "JWT_SECRET": (str, "", "token signing key (empty: generated and kept in DATA_DIR)"),
    "TOKEN_TTL_SECONDS": (_int(1, 31_536_000), "900", "lifetime of tokens from POST /token"),
    "CORS_ORIGINS": (_origins, "", "comma-separated origins allowed to call from a browser"),
    "PUBLIC_URL": (
        _public_url,
        "",
        "the server's URL as clients see it, for absolute links (empty: relative)",
    ),
    "TRUSTED_PROXIES": (_networks, "", "proxies whose X-Forwarded-For last hop names the client"),
    "AUTH_MAX_FAILURES": (_int(1, 1_000_000), "10", "failed logins per (address, user) before 429"),
    "AUTH_FAILURE_WINDOW_SECONDS": (_float(1, 86_400), "60", "the window those failures are counted in"),
    "AUTH_MAX_CHECKS_PER_ADDRESS": (_int(1, 10_000), "4", "password checks in progress per client address"),
    "AUTH_MAX_CHECKS": (_int(1, 100_000), "32", "password checks in progress per worker"),
    "STREAM_MAX_PER_USER": (_int(1, 10_000_000), "1000", "open streams per authenticated user, per worker"),
    "STREAM_MAX_PER_ADDRESS": (
        _int(1, 10_000_000),
        "200",
        "open anonymous streams per client address, per worker",
    ),
    "STREAM_MAX_WATCHERS": (_int(1, 10_000_000), "5000", "distinct streams (watchers) per worker"),
    "STREAM_MAX_BINDINGS": (
        _int(1, 10_000_000),
        "20000",
        "distinct bindings (variables, permission) of streams per worker",
    ),
    "WS_MAX_MESSAGE_BYTES": (_int(126, 1 << 30), "65536", "largest WebSocket message a client may send"),
    "REQUEST_HEAD_SECONDS": (
        _float(0.5, 3600),
        "10",
        "time a client has to send its request line and headers",
    ),
    "REQUEST_BODY_SECONDS": (_float(0.5, 3600), "60", "time a client has to send its request body"),
}


_EMPTY_OK = ("MONGO_URI", "JWT_SECRET", "CORS_ORIGINS", "PUBLIC_URL", "TRUSTED_PROXIES")


def load(environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> dict:
    """Return every setting, parsed: overrides first, then the environment, then defaults."""
    environ = os.environ if environ is None else environ
    overrides = overrides or {}
    config: dict[str, Any] = {}
    for name, (parse, default, _meaning) in SETTINGS.items():
        if name in overrides:
            value = overrides[name]
            try:
                config[name] = parse(value) if isinstance(value, str) else value
            except ValueError as exc:
                raise ConfigError(f"{name} {exc}") from None
            continue
        raw = environ.get(name)
        if raw is None or (raw == "" and name not in _EMPTY_OK):
            raw = default
        try:
            config[name] = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{name} {exc}") from None
    for name, value in overrides.items():
        config.setdefault(name, value)
    return config
