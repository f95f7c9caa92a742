"""The hub's own CPU per event for one stream with many bindings, in-process, no sockets.

    python bench/hub_dispatch.py [--bindings 1000] [--per 10] [--events 2000]

A Hub over a fake engine (events handed over in memory) serves one stream
`{"$match": {"fullDocument.k": {"$var": "k"}}}` to `--bindings` bindings of `--per`
subscribers each, whose sinks only count what they get. Each event matches one binding.
The figure is the watcher greenlet's CPU per event: router, index, one evaluation, the
pushes; what the socket layer and the engine add is measured by `python -m bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gevent import monkey  # noqa: E402

monkey.patch_all()

from services.hub import Hub  # noqa: E402
from services.messages import Batch, change_message  # noqa: E402
from services.storage import Change  # noqa: E402

ARGS = argparse.ArgumentParser()
ARGS.add_argument("--bindings", type=int, default=1000)
ARGS.add_argument("--per", type=int, default=10)
ARGS.add_argument("--events", type=int, default=2000)


class CountingSink:
    def __init__(self, sub):
        self.got = 0
        sub.attach(self)

    def write_now(self, batch: Batch) -> None:
        self.got += len(batch.items)


class IdleEngine:
    """Enough of an engine for Hub.subscribe: its streams never produce anything."""

    def __init__(self, props):
        self.props = props

    def get_collection(self, coll):
        return self.props

    def on_meta_change(self, listener):
        pass

    def position(self, token):
        return 0

    def resume_problem(self, token):
        return None

    def token(self, position):
        return {"_data": f"{position:032X}"}

    def watch(self, coll, pipeline, resume_after=None):

        class Quiet:
            ended = False
            position = 0

            def try_next(self, timeout):
                time.sleep(min(timeout, 0.5))

            def close(self):
                pass

        return Quiet()


def main() -> int:
    args = ARGS.parse_args()
    props = {"streams": [{"uri": "mine", "stages": [{"$match": {"fullDocument.k": {"$var": "k"}}}]}]}
    config = {
        "STREAM_CLIENT_QUEUE": 1000,
        "STREAM_REPLAY_BUFFER": 0,
        "STREAM_LINGER_SECONDS": 60,
        "STREAM_MAX_PER_USER": 10**7,
        "STREAM_MAX_PER_ADDRESS": 10**7,
        "STREAM_MAX_WATCHERS": 10,
        "STREAM_MAX_BINDINGS": 10**7,
    }
    hub = Hub(IdleEngine(props), config)
    sinks = []
    for k in range(args.bindings):
        for _ in range(args.per):
            sinks.append(CountingSink(hub.subscribe("c", "mine", json.dumps({"k": k}), None, "sse")))
    (watcher,) = hub.watchers.values()
    changes = []
    for i in range(args.events):
        event = {
            "_id": {"_data": f"{i + 1:032X}"},
            "operationType": "insert",
            "fullDocument": {"_id": i, "k": (i * 7919) % args.bindings, "text": "x" * 100},
            "documentKey": {"_id": i},
        }
        changes.append(Change(i + 1, event["_id"], event))
    t0 = time.process_time()
    for change in changes:
        message = change_message(change)
        watcher._send(Batch([message]))
    cpu = time.process_time() - t0
    delivered = sum(s.got for s in sinks)
    assert delivered == args.events * args.per, delivered
    print(
        json.dumps(
            {
                "bindings": args.bindings,
                "subscribers": len(sinks),
                "events": args.events,
                "watchers": len(hub.watchers),
                "hub_cpu_us_per_event": round(cpu / args.events * 1e6, 1),
                "deliveries_per_event": args.per,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
