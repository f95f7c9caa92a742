"""Change-stream cursors a MongoDB server is asked for: W workers x K bindings of one stream.

Run by `python -m bench --only scoped` (and usable alone):

    python bench/mongo_cursors.py --root <checkout> [--workers 4] [--bindings 1000]

The server is mockupdb speaking MongoDB's wire protocol as a replica-set primary: it answers
every `aggregate` with an empty change-stream cursor and every `getMore` with an empty batch
after 50 ms (a quiet collection), and counts the `$changeStream` aggregates on the stream's
collection: each one is a cursor the server keeps open. Each worker is one MongoEngine (its
own MongoClient and connection pool, as in a gunicorn worker process) and one Hub of the
checkout under test (`--root`, imported from there), with K subscribers, each binding a
different value of the stream's variable. The collection metadata read is stubbed: the
figure is the cursors, not the metadata.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

ARGS = argparse.ArgumentParser()
ARGS.add_argument("--root", required=True)
ARGS.add_argument("--workers", type=int, default=4)
ARGS.add_argument("--bindings", type=int, default=1000)
ARGS.add_argument("--seconds", type=float, default=3.0, help="how long the streams stay open")
ARGS.add_argument("--deadline", type=float, default=120.0, help="stop opening subscribers after this")


def main() -> int:
    args = ARGS.parse_args()
    sys.path.insert(0, args.root)
    from gevent import monkey

    monkey.patch_all()
    import gevent
    from mockupdb import MockupDB

    from services.hub import Hub
    from services.storage.mongo import MongoEngine

    server = MockupDB(request_timeout=30)
    server.run()
    address = server.address_string
    hello = {
        "ismaster": True,
        "isWritablePrimary": True,
        "helloOk": True,
        "setName": "rs0",
        "hosts": [address],
        "me": address,
        "minWireVersion": 0,
        "maxWireVersion": 21,
        "logicalSessionTimeoutMinutes": 30,
        "ok": 1,
    }
    server.autoresponds("ismaster", hello)
    server.autoresponds("hello", hello)
    counts = {"stream_aggregates": 0, "other_aggregates": 0, "get_mores": 0}
    token = {"_data": "8264A0000000000001" + "2B0229296E04"}
    cursor_ids = iter(range(1000, 10**9))

    def respond(request):
        name = request.command_name
        if name == "aggregate":
            pipeline = request.doc.get("pipeline") or [{}]
            ns = f"db.{request.doc['aggregate']}"
            if "$changeStream" in pipeline[0] and request.doc["aggregate"] == "c":
                counts["stream_aggregates"] += 1
            else:
                counts["other_aggregates"] += 1
            return request.ok(
                cursor={"id": next(cursor_ids), "ns": ns, "firstBatch": [], "postBatchResumeToken": token}
            )
        if name == "getMore":
            counts["get_mores"] += 1
            gevent.sleep(0.05)
            return request.ok(
                cursor={
                    "id": request.doc["getMore"],
                    "ns": "db.c",
                    "nextBatch": [],
                    "postBatchResumeToken": token,
                }
            )
        if name == "killCursors":
            return request.ok(cursorsKilled=request.doc["cursors"])
        if name in ("endSessions", "ping"):
            return request.ok()
        return False  # hello / ismaster: the responders above

    server.autoresponds(respond)
    config = {
        "STREAM_CLIENT_QUEUE": 1000,
        "STREAM_REPLAY_BUFFER": 100,
        "STREAM_LINGER_SECONDS": 60,
        "STREAM_MAX_PER_USER": 10**6,
        "STREAM_MAX_PER_ADDRESS": 10**6,
        "STREAM_MAX_WATCHERS": 10**6,
    }
    props = {"streams": [{"uri": "mine", "stages": [{"$match": {"fullDocument.k": {"$var": "k"}}}]}]}
    engines, hubs, subs = [], [], []
    t0 = time.perf_counter()
    for _ in range(args.workers):
        engine = MongoEngine(f"mongodb://{address}/?replicaSet=rs0", "db", server_selection_timeout_ms=10000)
        engine.get_collection = lambda coll: props  # type: ignore[method-assign]
        engines.append(engine)
        hubs.append(Hub(engine, config))
    deadline = time.perf_counter() + args.deadline
    for k in range(args.bindings):  # round-robin over the workers, as clients would arrive
        if time.perf_counter() > deadline:
            break
        for hub in hubs:
            subs.append(hub.subscribe("c", "mine", json.dumps({"k": k}), None, "sse"))
    open_s = time.perf_counter() - t0
    aggregates_after_open = counts["stream_aggregates"]
    get_mores_before = counts["get_mores"]
    gevent.sleep(args.seconds)
    result = {
        "workers": args.workers,
        "bindings_per_worker": args.bindings,
        "subscribers": len(subs),
        "all_opened": len(subs) == args.workers * args.bindings,
        "cursors_opened": aggregates_after_open,
        "watchers": sum(len(h.watchers) for h in hubs),
        "open_s": round(open_s, 2),
        "get_mores_per_s": round((counts["get_mores"] - get_mores_before) / args.seconds, 1),
    }
    for sub in subs:
        sub.close()
    for hub in hubs:
        hub.close_all()
        for watcher in list(hub.watchers.values()):
            watcher.stop()
    for engine in engines:
        engine.close()
    server.stop()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
