"""Storage engines behind one port (`base.Engine`); `open_engine` picks one from the config."""

from __future__ import annotations

from .base import Change, ChangeStream, Engine, MetaChange, UnsuitableServer

__all__ = ["Change", "ChangeStream", "Engine", "MetaChange", "UnsuitableServer", "open_engine"]


def open_engine(config: dict) -> Engine:
    """Open the MongoDB engine when MONGO_URI is set, else the embedded one in DATA_DIR."""
    if config.get("MONGO_URI"):
        from .mongo import MongoEngine

        return MongoEngine(config["MONGO_URI"], config["MONGO_DB"])
    from .embedded import EmbeddedEngine

    return EmbeddedEngine(
        config["DATA_DIR"],
        db_name=config["MONGO_DB"],
        retention_days=config["CHANGE_LOG_DAYS"],
        max_events=config["CHANGE_LOG_MAX_EVENTS"],
        poll_seconds=config["EMBEDDED_POLL_SECONDS"],
        busy_timeout_seconds=config["EMBEDDED_BUSY_TIMEOUT_SECONDS"],
    )
