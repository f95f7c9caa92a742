"""The changefeed application factory: config -> engine -> auth -> blueprints -> errors."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import gevent
from flask import Flask

from blueprints import (
    collections,
    console,
    cors,
    documents,
    errors,
    health,
    metrics,
    security,
    streams,
    tokens,
)
from blueprints.openapi import bp as openapi_bp
from blueprints.paths import CanonicalPaths
from services import config as settings
from services.auth import Users
from services.backoff import Backoff
from services.hub import Hub
from services.logs import JsonFormatter
from services.storage import UnsuitableServer, open_engine
from services.tokens import Tokens, load_key

log = logging.getLogger("changefeed")


def _configure_logging(level: str, form: str = "text") -> None:
    """Give the app's loggers gunicorn's line format on stderr (gunicorn only sets up its own),
    or JSON lines (LOG_FORMAT=json: gunicorn.conf.py has then set up the root logger)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            JsonFormatter()
            if form == "json"
            else logging.Formatter(
                "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S %z"
            )
        )
        root.addHandler(handler)
    for name in ("changefeed", "services", "blueprints"):
        logging.getLogger(name).setLevel(level.upper())


def _bootstrap(engine, users: Users, conf: dict, state: dict | None = None) -> None:
    """Create the users and acl collections, and the default admin when there are no users;
    then the worker is ready (`state["set_up"]`, which `/_ready` reports)."""
    for coll in ("users", "acl"):
        engine.ensure_collection(coll)
    users.ensure_default_admin(conf["ADMIN_PASSWORD"])
    if state is not None:
        state["set_up"] = True


# gunicorn's arbiter halts the whole server, with this exit code, when a worker exits with it
WORKER_BOOT_ERROR = 3


def _stop_the_server(message: str) -> None:
    """A fault no retry can mend: say so, and end the server (not just this worker)."""
    log.critical("%s", message)
    logging.shutdown()
    os._exit(WORKER_BOOT_ERROR)


def _bootstrap_until_done(
    engine, users: Users, conf: dict, state: dict | None = None, fatal=_stop_the_server
) -> None:
    """Set up the security collections, retrying while the database is unreachable. A
    reachable server that cannot serve change streams (a standalone mongod) ends start-up:
    `fatal` (default: the worker exits with WORKER_BOOT_ERROR, and gunicorn stops)."""
    backoff = Backoff(0.5, 30.0)
    while True:
        try:
            _bootstrap(engine, users, conf, state)
            return
        except UnsuitableServer as exc:  # a standalone mongod: no change streams
            fatal(str(exc))
            return
        except Exception as exc:
            delay = backoff.next()
            log.warning("waiting for the database: %s (retry in %.0f s)", exc, delay)
            gevent.sleep(delay)


def create_app(config: Mapping[str, Any] | None = None, engine=None) -> Flask:
    """Build the app. `config` overrides settings from the environment (tests use it).

    The engine is opened here, once per worker process after the fork, never at import.
    """
    conf = settings.load(overrides=config)
    _configure_logging(conf["LOG_LEVEL"], conf["LOG_FORMAT"])
    # no static route: the console serves its own files (with its CSP), and a collection
    # named "static" is the user's
    app = Flask(__name__, static_folder=None)
    app.wsgi_app = CanonicalPaths(app.wsgi_app)  # type: ignore[method-assign]
    app.config.update(conf)
    app.config["MAX_CONTENT_LENGTH"] = conf["MAX_CONTENT_LENGTH"]
    app.json.sort_keys = False

    engine = engine or open_engine(conf)
    users = Users(engine)
    state = {"set_up": False}  # the security collections exist (/_ready)
    hub = Hub(engine, conf)
    engine.start()
    if engine.name == "embedded":
        _bootstrap(engine, users, conf, state)
    else:
        # A MongoDB that is down must not keep the worker from booting (gunicorn would kill
        # it): the security collections are set up in the background, /_health says 503.
        gevent.spawn(_bootstrap_until_done, engine, users, conf, state)

    app.extensions["changefeed.engine"] = engine
    app.extensions["changefeed.users"] = users
    app.extensions["changefeed.hub"] = hub
    app.extensions["changefeed.state"] = state
    app.extensions["changefeed.tokens"] = Tokens(
        load_key(conf["JWT_SECRET"], conf["DATA_DIR"]), conf["TOKEN_TTL_SECONDS"]
    )

    cors.init_app(app)
    metrics.init_app(app)  # first: its timer starts before auth runs
    security.init_app(app)
    hub.access_changes_from(engine)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi_bp)
    app.register_blueprint(console.bp)
    app.register_blueprint(tokens.bp)
    app.register_blueprint(streams.bp)
    app.register_blueprint(collections.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(documents.bp)
    errors.init_app(app)
    log.info("changefeed ready: %s engine", engine.name)
    return app
