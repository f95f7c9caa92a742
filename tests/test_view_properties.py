"""One shared watcher gives each subscriber exactly what its own bound pipeline would (issue 11).

For random stream definitions (shared filters, bound `$match`es, `$ifvar`, reshaping stages,
notify_when), random subscribers (variables, readFilter, projectResponse) and random writes
on the embedded engine, every subscriber of the hub (one watcher, views, the equality index)
receives the same messages, with the same ids, as a private engine stream through that
subscriber's whole bound pipeline (readFilter first), projected and notify-filtered, would;
and a subscriber resuming after any of those ids gets exactly the rest, from the replay
buffer or the engine.
"""

from __future__ import annotations

import itertools
import json
import time

import gevent
import pytest
from bson import Decimal128, Int64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services import extjson, query
from services import pipeline as pipelines
from services.errors import ChangefeedError
from services.hub import Hub
from services.messages import change_message, payload
from services.permissions import Grant
from services.storage import Change
from services.storage.embedded import EmbeddedEngine
from services.updates import normalize_patch

from .test_hub import RecordingSink

CONFIG = {
    "STREAM_CLIENT_QUEUE": 10_000,
    "STREAM_REPLAY_BUFFER": 4,  # small: resumes exercise both the buffer and the engine
    "STREAM_LINGER_SECONDS": 0.0,
    "STREAM_MAX_PER_USER": 1000,
    "STREAM_MAX_PER_ADDRESS": 1000,
    "STREAM_MAX_WATCHERS": 1000,
}
OWNERS = ["a", "b", "c"]
NUMBERS = [1, 2, 2.0, Int64(2), Decimal128("2"), "2", True, 3]

owner = st.sampled_from(OWNERS)
number = st.sampled_from(NUMBERS)
document = st.fixed_dictionaries(
    {
        "owner": owner,
        "n": number,
        "tags": st.lists(owner, max_size=2),
        "team": st.fixed_dictionaries({"id": number}),
    },
    optional={"items": st.lists(st.fixed_dictionaries({"who": owner}), max_size=2)},
)
# writes: ("insert", doc) | ("replace", i, doc) | ("set", i, fields) | ("delete", i); i picks a live id
write = st.one_of(
    st.tuples(st.just("insert"), document),
    st.tuples(st.just("replace"), st.integers(0, 9), document),
    st.tuples(
        st.just("set"), st.integers(0, 9), st.fixed_dictionaries({}, optional={"owner": owner, "n": number})
    ),
    st.tuples(st.just("delete"), st.integers(0, 9)),
)

var_field = st.sampled_from(
    ["fullDocument::owner", "fullDocument::tags", "fullDocument::n", "fullDocument::items.who"]
)
shared_stage = st.sampled_from(
    [
        {"_$match": {"operationType": {"_$in": ["insert", "replace", "update"]}}},
        {"_$match": {"fullDocument::n": {"_$in": [2, 3]}}},
        {"_$match": {"_$or": [{"fullDocument::owner": "a"}, {"fullDocument::owner": "b"}]}},
    ]
)


@st.composite
def bound_stage(draw):
    field = draw(var_field)
    name = draw(st.sampled_from(["o", "v"]))
    placeholder = (
        {"_$var": [name, draw(st.sampled_from(OWNERS + [2]))]} if draw(st.booleans()) else {"_$var": name}
    )
    kind = draw(st.sampled_from(["eq", "$eq", "$in", "$ne", "or", "ifvar"]))
    if kind == "eq":
        return {"_$match": {field: placeholder}}
    if kind == "$eq":
        return {"_$match": {field: {"_$eq": placeholder}}}
    if kind == "$in":
        return {"_$match": {field: {"_$in": [placeholder, "c"]}}}
    if kind == "$ne":
        return {"_$match": {field: {"_$ne": placeholder}}}
    if kind == "or":
        return {"_$match": {"_$or": [{field: placeholder}, {"fullDocument::team.id": placeholder}]}}
    return {"_$ifvar": [name, {"_$match": {field: {"_$var": name}}}]}


reshaping_stage = st.sampled_from(
    [
        {"_$addFields": {"seen": {"_$literal": True}}},
        {"_$project": {"operationType": 1, "documentKey": 1, "fullDocument::owner": 1, "fullDocument::n": 1}},
        {"_$unset": "fullDocument.tags"},
    ]
)
stages = st.tuples(
    st.lists(shared_stage, max_size=2),
    st.lists(st.one_of(bound_stage(), reshaping_stage), max_size=3),
).map(lambda parts: parts[0] + parts[1])
definition = st.fixed_dictionaries(
    {"uri": st.just("s"), "stages": stages},
    optional={
        "notify_when": st.sampled_from(
            [{"fullDocument::owner": {"$var": "t"}}, {"fullDocument::n": {"_$var": "t"}}]
        )
    },
)
binding = st.fixed_dictionaries(
    {},
    optional={"o": owner, "v": st.sampled_from([1, 2, "2", 3]), "t": st.sampled_from(OWNERS + [2, 3])},
)
grant = st.sampled_from(
    [
        None,
        {"readFilter": {"owner": "a"}},
        {"readFilter": {"$or": [{"owner": "b"}, {"team.id": 2}]}},
        {"projectResponse": {"tags": 0}},
        {"readFilter": {"n": 2}, "projectResponse": {"team": 0}},
    ]
)
subscriber = st.tuples(binding, grant, st.booleans())

_collections = itertools.count()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = EmbeddedEngine(str(tmp_path_factory.mktemp("views") / "data"))
    yield eng
    eng.close()


def apply_writes(engine: EmbeddedEngine, coll: str, writes: list) -> None:
    live: list[int] = []
    next_id = itertools.count()
    for op in writes:
        if op[0] == "insert":
            doc_id = next(next_id)
            engine.insert_documents(coll, [{"_id": doc_id, **op[1]}])
            live.append(doc_id)
        elif live:
            doc_id = live[op[1] % len(live)]
            if op[0] == "replace":
                engine.replace_document(coll, doc_id, {"_id": doc_id, **op[2]}, False)
            elif op[0] == "set" and op[2]:
                engine.update_document(coll, doc_id, normalize_patch({"$set": op[2]}))
            elif op[0] == "delete":
                engine.delete_document(coll, doc_id)
                live.remove(doc_id)


def reference_scope(event: dict, read_filter: dict) -> dict | None:
    """The readFilter rule, restated: the document after the change, or before it, must match;
    a pre-image that did not match is not shown, nor is a post-image that does not."""
    after, prior = event.get("fullDocument"), event.get("fullDocumentBeforeChange")
    now_in = isinstance(after, dict) and query.matches(read_filter, after)
    was_in = isinstance(prior, dict) and query.matches(read_filter, prior)
    if not (now_in or was_in):
        return None
    out = dict(event)
    if not was_in:
        out.pop("fullDocumentBeforeChange", None)
    if not now_in:
        out.pop("fullDocument", None)
        out.pop("updateDescription", None)
    return out


def expected(engine: EmbeddedEngine, coll: str, spec: dict, sub: tuple, start: dict) -> list:
    """What a private engine stream through the subscriber's whole bound pipeline gives."""
    variables, grant_of, before = sub
    stored = spec["stages"]
    if grant_of is not None:
        grant_of.check_stream_stages(stored, variables)
    own = pipelines.compile_pipeline(stored, variables)
    notify = pipelines.notify_filter(spec, variables)
    visibility = grant_of.visibility if grant_of is not None else None
    read_filter = grant_of.read_filter if grant_of is not None else None
    out = []
    with engine.watch(coll, None if read_filter else own, start) as stream:
        engine.tail_once()
        while (change := stream.try_next(0)) is not None:
            if read_filter and change.event is not None:
                event = reference_scope(change.event, read_filter)
                if event is None:
                    continue
                try:
                    change = Change(change.position, change.token, own.apply(event))
                except pipelines.EventError as exc:
                    change = Change(change.position, change.token, None, error=str(exc))
            message = change_message(change, visibility)
            if message is None or (
                message.kind == "change" and notify is not None and not notify(message.event)
            ):
                continue
            if before and message.event is not None:
                message.data = extjson.dumps(payload(message.event, before=True))
            out.append((message.kind, message.id, message.data))
    return out


def open_stream(hub: Hub, coll: str, binding_of: tuple, resume: dict | None = None):
    variables, grant_of, before = binding_of
    prepared = hub.prepare(coll, "s", None, grant_of, variables, None, before)
    return hub.subscribe(coll, "s", None, resume, "sse", grant=grant_of, prepared=prepared)


def received(messages) -> list:
    return [(m.kind, m.id, m.data) for m in messages]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spec=definition,
    subs=st.lists(subscriber, min_size=1, max_size=6),
    writes=st.lists(write, min_size=1, max_size=14),
)
def test_one_watcher_delivers_what_each_bound_pipeline_would(engine, spec, subs, writes):
    coll = f"p{next(_collections)}"
    pipelines.validate_streams([spec])
    engine.put_collection(coll, {"streams": [spec]})
    engine.tail_once()
    hub = Hub(engine, CONFIG)
    start = engine.current_token()
    try:
        opened = []
        for variables, mongo, before in subs:
            grant_of = Grant.of(mongo, {"_id": "u"}, coll, False) if mongo is not None else None
            binding_of = (variables, grant_of, before)
            try:
                sub = open_stream(hub, coll, binding_of)
            except ChangefeedError as exc:  # 400 unbound variable, 403 a stage reads a hidden field
                with pytest.raises(type(exc)):
                    expected(engine, coll, spec, binding_of, start)
                continue
            opened.append((RecordingSink(sub), binding_of))
        assert len(hub.watchers) <= 1 and hub.status()["cursors"] == len(hub.watchers)
        apply_writes(engine, coll, writes)
        engine.tail_once()
        end = engine.position(engine.current_token())
        deadline = time.monotonic() + 5
        for watcher in list(hub.watchers.values()):
            while watcher.position < end:
                assert time.monotonic() < deadline, "the watcher did not catch up"
                gevent.sleep(0.005)
        gevent.sleep(0.01)
        for sink, binding_of in opened:
            want = expected(engine, coll, spec, binding_of, start)
            assert received(sink.messages) == want, binding_of
            # resuming after any of them gives exactly the rest (buffer or engine history)
            for i in sorted({0, len(want) // 2, len(want) - 1}) if want else ():
                with open_stream(hub, coll, binding_of, json.loads(want[i][1])) as again:
                    replayed = [m for batch in again.catch_up() for m in batch] + again.take()
                assert received(replayed) == want[i + 1 :]
    finally:
        hub.close_all()
        for watcher in list(hub.watchers.values()):
            watcher.stop()
