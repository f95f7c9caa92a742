"""The changefeed application factory: config -> engine -> auth -> blueprints -> errors."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask

from blueprints import collections, cors, demo, documents, errors, health, security, streams, tokens
from services import config as settings
from services.auth import Users
from services.hub import Hub
from services.storage import open_engine
from services.tokens import Tokens, load_key

log = logging.getLogger("changefeed")


def create_app(config: Mapping[str, Any] | None = None, engine=None) -> Flask:
    """Build the app. `config` overrides settings from the environment (tests use it).

    The engine is opened here, once per worker process after the fork, never at import.
    """
    conf = settings.load(overrides=config)
    app = Flask(__name__)
    app.config.update(conf)
    app.config["MAX_CONTENT_LENGTH"] = conf["MAX_CONTENT_LENGTH"]
    app.json.sort_keys = False

    engine = engine or open_engine(conf)
    for coll in ("users", "acl"):
        engine.ensure_collection(coll)
    users = Users(engine)
    users.ensure_default_admin(conf["ADMIN_PASSWORD"])
    hub = Hub(engine, conf)
    engine.start()

    app.extensions["changefeed.engine"] = engine
    app.extensions["changefeed.users"] = users
    app.extensions["changefeed.hub"] = hub
    app.extensions["changefeed.tokens"] = Tokens(load_key(conf["JWT_SECRET"], conf["DATA_DIR"]),
                                                 conf["TOKEN_TTL_SECONDS"])

    cors.init_app(app)
    security.init_app(app)
    hub.access_changes_from(engine)
    app.register_blueprint(health.bp)
    app.register_blueprint(demo.bp)
    app.register_blueprint(tokens.bp)
    app.register_blueprint(streams.bp)
    app.register_blueprint(collections.bp)
    app.register_blueprint(documents.bp)
    errors.init_app(app)
    log.info("changefeed ready: %s engine", engine.name)
    return app
