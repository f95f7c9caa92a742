"""Tests of the request-body predicates (bson-request-*) and @request.body in services.acl."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.acl import PredicateError, RequestInfo, parse_predicate, touched_paths

ALICE = {
    "_id": "alice",
    "roles": ["user"],
    "field": "owner",
    "tags": ["a", "b"],
    "n": 1,
    "dotted": "x.y",
    "dollar": "$set",
    "empty": "",
}
BOB = {"_id": "bob", "roles": ["user"]}


def matches(text, body, user=None, method="PATCH", path="/db/coll/doc"):
    return parse_predicate(text).matches(RequestInfo(method, path, {}, user, body))


# --------------------------------------------------------------------------- RequestInfo / touched_paths


def test_request_info_body_defaults_to_none():
    info = RequestInfo("GET", "/x", {}, None)
    assert info.body is None
    assert RequestInfo("GET", "/x", {}, None, {"a": 1}).body == {"a": 1}


TOUCHED = [
    (None, []),
    ({}, []),
    ({"a": 1, "b.c": {"d": 2}}, ["a", "b.c"]),
    ({"$set": {"a": 1, "b.c": 2}}, ["a", "b.c"]),
    ({"$unset": {"a": ""}}, ["a"]),
    ({"$inc": {"n": 1}, "$mul": {"m": 2}}, ["n", "m"]),
    ({"$rename": {"old": "new"}}, ["old", "new"]),
    (
        {"$push": {"tags": "x"}, "$addToSet": {"s": 1}, "$pull": {"p": 1}, "$pullAll": {"q": [1]}},
        ["tags", "s", "p", "q"],
    ),
    (
        {
            "$min": {"lo": 1},
            "$max": {"hi": 2},
            "$currentDate": {"ts": True},
            "$pop": {"st": 1},
            "$bit": {"flags": {"and": 1}},
            "$setOnInsert": {"created": 1},
        },
        ["lo", "hi", "ts", "st", "flags", "created"],
    ),
    ({"$whatever": {"w": 1}}, ["w"]),  # unknown $key: conservative
    ({"$set": 5}, ["$set"]),  # a non-object argument is reported itself
    ({"a": 1, "$set": {"a": 2}}, ["a"]),  # no duplicates
    ([{"a": 1}, {"$set": {"b": 1}}, {"a": 2}], ["a", "b"]),  # bulk: union
    ("text", []),
]


@pytest.mark.parametrize("body,expected", TOUCHED)
def test_touched_paths(body, expected):
    assert touched_paths(body) == expected


# --------------------------------------------------------------------------- the predicate table

C = "bson-request-contains"
W = "bson-request-whitelist"
B = "bson-request-blacklist"
PE = "bson-request-prop-equals"
AC = "bson-request-array-contains"
AS = "bson-request-array-is-subset"

BODY = [
    # contains: plain, nested, dotted
    (f"{C}(a)", {"a": 1}, None, True),
    (f"{C}(a, b)", {"a": 1}, None, False),
    (f"{C}(a, b)", {"a": 1, "b": None}, None, True),
    (f"{C}(a)", {"a.b": 1}, None, True),  # a path under a
    (f"{C}(a.b)", {"a": {"b": 1}}, None, True),  # inside the value written at a
    (f"{C}(a.b.c)", {"a": {"b": {"c": 0}}}, None, True),
    (f"{C}(a.b)", {"a": {"c": 1}}, None, False),
    (f"{C}(a.b)", {"a": 5}, None, False),
    (f"{C}(a.b)", {"a.b": 1}, None, True),
    (f"{C}(a.0.b)", {"a": [{"b": 1}]}, None, True),
    (f"{C}(a.1.b)", {"a": [{"b": 1}]}, None, False),
    (f"{C}(ab)", {"a": 1}, None, False),
    (f"{C}(a)", {"ab": 1}, None, False),
    (f"{C}(a)", {}, None, False),
    (f"{C}(a)", None, None, False),
    # contains: update operators
    (f"{C}(a)", {"$set": {"a": 1}}, None, True),
    (f"{C}(a.b)", {"$set": {"a": {"b": 1}}}, None, True),
    (f"{C}(a)", {"$unset": {"a": ""}}, None, True),
    (f"{C}(a)", {"$inc": {"a": 1}}, None, True),
    (f"{C}(a.b)", {"$inc": {"a": 1}}, None, False),  # $inc writes no object at a
    (f"{C}(old)", {"$rename": {"old": "new"}}, None, True),
    (f"{C}(new)", {"$rename": {"old": "new"}}, None, True),
    (f"{C}(tags)", {"$push": {"tags": "x"}}, None, True),
    (f"{C}(c)", {"$setOnInsert": {"c": 1}}, None, True),
    (f"{C}(c)", {"$set": {"a": 1}}, None, False),
    # whitelist
    (f"{W}(a)", {"a": 1}, None, True),
    (f"{W}(a)", {"a": 1, "b": 1}, None, False),
    (f"{W}(a, b)", {"a": 1, "b": 1}, None, True),
    (f"{W}(a)", {"a.b": 1}, None, True),  # under a
    (f"{W}(a)", {"a": {"b": {"c": 1}}}, None, True),
    (f"{W}(a.b)", {"a": {"b": 1}}, None, False),  # an ancestor of a listed path
    (f"{W}(a.b)", {"a.b.c": 1}, None, True),
    (f"{W}(a)", {"ab": 1}, None, False),
    (f"{W}(a)", {}, None, True),
    (f"{W}(a)", None, None, True),  # no JSON body: nothing outside the list
    (f"{W}(a)", {"$set": {"a": 1}}, None, True),
    (f"{W}(a)", {"$set": {"a": 1, "b": 2}}, None, False),
    (f"{W}(a)", {"$unset": {"b": ""}}, None, False),
    (f"{W}(a)", {"$inc": {"b": 1}}, None, False),
    (f"{W}(a)", {"$rename": {"a": "b"}}, None, False),  # the target is touched
    (f"{W}(a)", {"$rename": {"b": "a"}}, None, False),  # so is the source
    (f"{W}(a, b)", {"$rename": {"b": "a"}}, None, True),
    (f"{W}(a)", {"$push": {"b": 1}}, None, False),
    (f"{W}(a)", {"$setOnInsert": {"b": 1}}, None, False),
    (f"{W}(a)", {"$bogus": {"b": 1}}, None, False),
    (f"{W}(a)", {"$set": "not an object"}, None, False),
    (f"{W}(a, c, us.d, d.n)", {"a": {"b": 1}, "c": True, "$unset": {"us.d": True}}, None, True),
    (f"{W}(a, c, us.d, d.n)", {"d.n.foo": True}, None, True),
    (f"{W}(a, c, us.d, d.n)", {"d": {"n": 1}}, None, False),
    # blacklist
    (f"{B}(a)", {"b": 1}, None, True),
    (f"{B}(a)", {"a": 1}, None, False),
    (f"{B}(a)", {"a.b": 1}, None, False),  # under
    (f"{B}(a.b)", {"a": {"c": 1}}, None, False),  # an ancestor replaces a.b
    (f"{B}(a.b)", {"a.c": 1}, None, True),
    (f"{B}(a)", {"ab": 1}, None, True),
    (f"{B}(a)", {}, None, True),
    (f"{B}(a)", None, None, True),
    (f"{B}(a)", {"$set": {"a": 1}}, None, False),
    (f"{B}(a)", {"$unset": {"a": ""}}, None, False),
    (f"{B}(a)", {"$inc": {"a": 1}}, None, False),
    (f"{B}(a)", {"$rename": {"a": "b"}}, None, False),
    (f"{B}(a)", {"$rename": {"b": "a"}}, None, False),
    (f"{B}(a)", {"$push": {"a": 1}}, None, False),
    (f"{B}(a)", {"$setOnInsert": {"a": 1}}, None, False),
    (f"{B}(a.0.b)", {"$set": {"a.$.b": 1}}, None, False),  # a positional component may be 0
    (f"{B}(a.0.b)", {"$set": {"a.$[].b": 1}}, None, False),
    (f"{B}(password, roles)", {"name": "x"}, None, True),
    (f"{B}(password, roles)", {"name": "x", "roles": []}, None, False),
    # prop-equals: JSON literals, BSON-like equality
    (f"{PE}(key=a, value='\"bar\"')", {"a": "bar"}, None, True),
    (f"{PE}(key=a, value='\"bar\"')", {"a": "baz"}, None, False),
    (f"{PE}(key=a, value=1)", {"a": 1}, None, True),
    (f"{PE}(key=a, value=1)", {"a": 1.0}, None, True),  # int and float numerically
    (f"{PE}(key=a, value=1.5)", {"a": 1.5}, None, True),
    (f"{PE}(key=a, value=1)", {"a": "1"}, None, False),  # not string equality
    (f"{PE}(key=a, value=1)", {"a": True}, None, False),  # bool is never a number
    (f"{PE}(key=a, value=true)", {"a": True}, None, True),
    (f"{PE}(key=a, value=true)", {"a": 1}, None, False),
    (f"{PE}(key=a, value=0)", {"a": False}, None, False),
    (f"{PE}(key=a, value=null)", {"a": None}, None, True),
    (f"{PE}(key=a, value=null)", {}, None, False),  # missing is not null
    (f'{PE}(key=a, value=\'{{"foo": "bar"}}\')', {"a": {"foo": "bar"}}, None, True),
    (f'{PE}(key=a, value=\'{{"foo": "bar"}}\')', {"a": {"foo": "bar", "x": 1}}, None, False),
    (
        f'{PE}(key=a, value=\'{{"x": 1, "y": [1, {{"z": 2}}]}}\')',
        {"a": {"y": [1.0, {"z": 2}], "x": 1}},
        None,
        True,
    ),
    (f"{PE}(key=a, value='[1, 2]')", {"a": [1, 2]}, None, True),
    (f"{PE}(key=a, value='[1, 2]')", {"a": [2, 1]}, None, False),
    (f"{PE}(key=a.b, value=1)", {"a": {"b": 1}}, None, True),  # dotted navigation
    (f"{PE}(key=a.b, value=1)", {"a.b": 1}, None, True),  # literal dotted key
    (f"{PE}(key=a.b.c, value=1)", {"a": {"b.c": 1}}, None, True),
    (f"{PE}(key=a.1, value=5)", {"a": [4, 5]}, None, True),  # numeric component into an array
    (f"{PE}(key=a.2, value=5)", {"a": [4, 5]}, None, False),
    (f"{PE}(key=a, value=1)", {"a.b": 1}, None, False),
    (f"{PE}(key=a, value=1)", {"$set": {"a": 1}}, None, True),
    (f"{PE}(key=a.b, value=1)", {"$set": {"a.b": 1}}, None, True),
    (f"{PE}(key=a.b, value=1)", {"$set": {"a": {"b": 1}}}, None, True),
    (f"{PE}(key=a, value=1)", {"$setOnInsert": {"a": 1}}, None, True),
    (f"{PE}(key=a, value=1)", {"$inc": {"a": 1}}, None, False),  # not a written value
    (f"{PE}(key=a, value=1)", {"$unset": {"a": 1}}, None, False),
    (f"{PE}(key=a, value=1)", {"$push": {"a": 1}}, None, False),
    (f"{PE}(key=a, value=1)", None, None, False),
    (f"{PE}(key=a, value=1)", {}, None, False),
    # writers that disagree are unknown: neither the predicate nor its negation matches
    (f"{PE}(key=a, value=1)", {"a": 1, "$set": {"a": 2}}, None, False),
    (f"not {PE}(key=a, value=1)", {"a": 1, "$set": {"a": 2}}, None, False),
    (f"{PE}(key=a, value=1)", {"a": 1, "$set": {"a": 1.0}}, None, True),
    (f"not {PE}(key=a, value=2)", {"$set": {"a": 1}, "$rename": {"x": "a"}}, None, False),
    (f"not {PE}(key=a.b, value=2)", {"$set": {"a.b": 1}, "$unset": {"a": ""}}, None, False),
    # array-contains / array-is-subset
    (f"{AC}(key=tags, values='\"a\"')", {"tags": ["a", "b"]}, None, True),
    (f"{AC}(key=tags, values='\"c\"')", {"tags": ["a", "b"]}, None, False),
    (f"{AC}(key=tags, values={{'\"a\"', '\"b\"'}})", {"tags": ["b", "x", "a"]}, None, True),
    (f"{AC}(key=tags, values={{'\"a\"', '\"c\"'}})", {"tags": ["b", "x", "a"]}, None, False),
    (f'{AC}(key=tags, values=\'["a", "b"]\')', {"tags": ["b", "a"]}, None, True),  # a lone array
    (f'{AC}(key=tags, values={{\'["a", "b"]\'}})', {"tags": ["b", "a"]}, None, False),  # one value
    (f'{AC}(key=tags, values={{\'["a", "b"]\'}})', {"tags": [["a", "b"]]}, None, True),
    (f"{AC}(key=n, values=1)", {"n": [1.0, 2]}, None, True),
    (f"{AC}(key=n, values=1)", {"n": [True]}, None, False),
    (f"{AC}(key=n, values='{{\"x\": 1}}')", {"n": [{"x": 1}]}, None, True),
    (f"{AC}(key=tags, values='\"a\"')", {"tags": "a"}, None, False),  # not an array
    (f"{AC}(key=tags, values='\"a\"')", {}, None, False),
    (f"{AC}(key=tags, values='\"a\"')", None, None, False),
    (f"{AC}(key=tags, values='\"a\"')", {"$set": {"tags": ["a"]}}, None, True),
    (f"{AC}(key=tags, values='\"a\"')", {"$push": {"tags": "a"}}, None, False),
    (f"{AC}(key=p.tags, values='\"a\"')", {"p": {"tags": ["a"]}}, None, True),
    (f"{AS}(key=tags, values={{'\"a\"', '\"b\"'}})", {"tags": ["a"]}, None, True),
    (f"{AS}(key=tags, values={{'\"a\"', '\"b\"'}})", {"tags": ["a", "b", "a"]}, None, True),
    (f"{AS}(key=tags, values={{'\"a\"', '\"b\"'}})", {"tags": []}, None, True),
    (f"{AS}(key=tags, values={{'\"a\"', '\"b\"'}})", {"tags": ["a", "c"]}, None, False),
    (f'{AS}(key=tags, values=\'["a", "b"]\')', {"tags": ["b"]}, None, True),
    (f"{AS}(key=tags, values='\"a\"')", {"tags": "a"}, None, False),
    (f"{AS}(key=tags, values='\"a\"')", None, None, False),
    (f"{AS}(key=n, values={{1, 2}})", {"n": [2.0, 1]}, None, True),
    (f"{AS}(key=n, values={{1, 2}})", {"n": [True]}, None, False),
    # bulk list bodies: every element
    (f"{C}(a)", [{"a": 1}, {"a": 2}], None, True),
    (f"{C}(a)", [{"a": 1}, {"b": 2}], None, False),
    (f"{C}(a)", [], None, False),
    (f"{W}(a)", [{"a": 1}, {"a": 2}], None, True),
    (f"{W}(a)", [{"a": 1}, {"b": 2}], None, False),
    (f"{W}(a)", [], None, True),
    (f"{B}(a)", [{"b": 1}, {"c": 2}], None, True),
    (f"{B}(a)", [{"b": 1}, {"a": 2}], None, False),
    (f"{B}(a)", [], None, True),
    (f"{PE}(key=a, value=1)", [{"a": 1}, {"a": 1.0}], None, True),
    (f"{PE}(key=a, value=1)", [{"a": 1}, {"a": 2}], None, False),
    (f"{PE}(key=a, value=1)", [], None, False),
    (f"{AC}(key=t, values=1)", [{"t": [1]}, {"t": [2, 1]}], None, True),
    (f"{AC}(key=t, values=1)", [{"t": [1]}, {"t": [2]}], None, False),
    (f"{AC}(key=t, values=1)", [], None, False),
    (f"{AS}(key=t, values=1)", [], None, False),
    # a body of another shape is unknown, also under not
    (f"{W}(a)", [{"a": 1}, 5], None, False),
    (f"not {W}(a)", [{"a": 1}, 5], None, False),
    (f"{B}(a)", "text", None, False),
    (f"not {B}(a)", "text", None, False),
    # interpolated keys and values
    (f"{C}(@user.field)", {"owner": 1}, ALICE, True),
    (f"{W}(@user.field)", {"owner": 1}, ALICE, True),
    (f"{W}(@user.field)", {"owner": 1, "x": 1}, ALICE, False),
    (f"{B}(@user.field)", {"owner": 1}, ALICE, False),
    (f"{W}('profile.@user._id')", {"profile.alice": 1}, ALICE, True),
    (f"{W}('profile.@user._id')", {"profile.bob": 1}, ALICE, False),
    (f"{PE}(key=owner, value=@user._id)", {"owner": "alice"}, ALICE, True),
    (f"{PE}(key=owner, value=@user._id)", {"owner": "bob"}, ALICE, False),
    (f"{PE}(key=n, value=@user.n)", {"n": 1.0}, ALICE, True),  # raw value keeps its type
    (f"{PE}(key=n, value=@user.n)", {"n": "1"}, ALICE, False),
    (f"{PE}(key=@user.field, value=@user._id)", {"$set": {"owner": "alice"}}, ALICE, True),
    (f"{PE}(key=owner, value='@user._id')", {"owner": "alice"}, ALICE, True),  # quoted: still a variable
    (f"{PE}(key=t, value=@user.tags)", {"t": ["a", "b"]}, ALICE, True),
    (f"{AC}(key=t, values=@user.tags)", {"t": ["b", "a", "c"]}, ALICE, True),  # a list: the values
    (f"{AC}(key=t, values=@user.tags)", {"t": ["b"]}, ALICE, False),
    (f"{AS}(key=t, values=@user.tags)", {"t": ["b"]}, ALICE, True),
    (f"{AS}(key=t, values=@user.tags)", {"t": ["b", "c"]}, ALICE, False),
    (f"{AS}(key=t, values={{@user._id, '\"x\"'}})", {"t": ["alice", "x"]}, ALICE, True),
    (f"{PE}(key=a, value=${{id}}) and path-template(/u/{{id}})", {"a": "q"}, None, False),  # not yet captured
    (f"path-template(/db/coll/{{id}}) and {PE}(key=_id, value=${{id}})", {"_id": "doc"}, None, True),
    (f"path-template(/db/coll/{{id}}) and {PE}(key=_id, value=${{id}})", {"_id": "other"}, None, False),
    # unknown variables: never match, not even under not
    (f"{C}(@user.field)", {"owner": 1}, None, False),
    (f"not {C}(@user.field)", {"owner": 1}, None, False),
    (f"{W}(@user.nosuch)", {"a": 1}, ALICE, False),
    (f"not {W}(@user.nosuch)", {"a": 1}, ALICE, False),
    (f"{W}(@user.nosuch)", None, ALICE, False),  # unknown even without a body
    (f"not {B}(@user.nosuch)", {"a": 1}, ALICE, False),
    (f"{B}(@user.nosuch)", {"a": 1}, ALICE, False),
    (f"{B}(@user.empty)", {"a": 1}, ALICE, False),
    (f"{B}(@user.dotted)", {"a": 1}, ALICE, False),  # an interpolated part must be one component
    (f"not {B}(@user.dotted)", {"x": 1}, ALICE, False),
    (f"{W}(@user.dollar)", {"$set": {"a": 1}}, ALICE, False),  # never a '$' key
    (f"{PE}(key=owner, value=@user._id)", {"owner": "alice"}, None, False),
    (f"not {PE}(key=owner, value=@user._id)", {"owner": "bob"}, None, False),
    (f"{PE}(key=@user.nosuch, value=1)", {"a": 1}, ALICE, False),
    (f"not {PE}(key=@user.nosuch, value=1)", {"a": 1}, ALICE, False),
    (f"{AC}(key=t, values=@user.nosuch)", {"t": [1]}, ALICE, False),
    (f"not {AC}(key=t, values=@user.nosuch)", {"t": [1]}, ALICE, False),
    (f"not {AS}(key=t, values={{1, @user.nosuch}})", {"t": [5]}, ALICE, False),
    (f"{W}(a) or {W}(@user.nosuch)", {"a": 1}, None, True),
    # names are case-insensitive
    ("BSON-Request-Whitelist(a)", {"a": 1}, None, True),
    ("bson-request-whitelist[keys={a, b}]", {"b": 1}, None, True),
    ("bson-request-prop-equals[key=a, value=1]", {"a": 1}, None, True),
]


@pytest.mark.parametrize("text,body,user,expected", BODY)
def test_body_predicates(text, body, user, expected):
    assert matches(text, body, user) is expected


# --------------------------------------------------------------------------- @request.body interpolation

INTERP = [
    ("equals(@request.body.owner, @user._id)", {"owner": "alice"}, ALICE, True),
    ("equals(@request.body.owner, @user._id)", {"owner": "bob"}, ALICE, False),
    ("equals(@request.body.owner, @user._id)", {"$set": {"owner": "alice"}}, ALICE, True),
    ("equals(@request.body.owner, @user._id)", {}, ALICE, False),
    ("not equals(@request.body.owner, @user._id)", {}, ALICE, False),  # missing: unknown
    ("not equals(@request.body.owner, @user._id)", None, ALICE, False),
    ("not equals(@request.body.owner, bob)", [{"owner": "alice"}], ALICE, False),  # bulk: unknown
    ("not equals(@request.body.owner, bob)", {"owner": None}, ALICE, False),  # null: unknown
    ("not equals(@request.body.a, 1)", {"a": 1, "$set": {"a": 2}}, None, False),  # ambiguous
    ("equals(@request.body.a.b, 1)", {"a": {"b": 1}}, None, True),  # parsed whole
    ("equals(@request.body.a.b, 1)", {"a.b": 1}, None, True),
    ("equals(@request.body.a.b, 1)", {"$set": {"a.b": 1}}, None, True),
    ("equals(@request.body.a-b_c.0, x)", {"a-b_c": ["x"]}, None, True),
    ("in(value=@request.body.tenant, array=@user.tags)", {"tenant": "b"}, ALICE, True),
    ("in(value=@request.body.tenant, array=@user.tags)", {"tenant": "z"}, ALICE, False),
    ("path('/db/coll/@request.body.name')", {"name": "doc"}, None, True),
    ("path('/db/coll/@request.body.name')", {"name": "other"}, None, False),
    ("path-prefix('/db/@request.body.name')", {"name": "../x"}, None, False),  # stays one segment
    ("equals(@request.path, '/db/coll/doc')", {"a": 1}, None, True),  # the others still work
    ("equals(@request.method, PATCH)", None, None, True),
    ("equals('@request.body', '@request.body')", None, None, True),  # no path: plain text
    ("regex(pattern='^/db/@request.body.c/', value=%R)", {"c": "coll"}, None, True),
    ("regex(pattern='^/db/@request.body.c/', value=%R)", {"c": ".*"}, None, False),  # escaped
    ("path-template(/db/coll/{id}) and equals(${id}, @request.body._id)", {"_id": "doc"}, None, True),
]


@pytest.mark.parametrize("text,body,user,expected", INTERP)
def test_request_body_interpolation(text, body, user, expected):
    assert matches(text, body, user) is expected


def test_body_field_cannot_inject_syntax():
    pred = parse_predicate("equals(@request.body.x, 'a')")
    body = {"x": "a') or true or equals('b"}
    assert not pred.matches(RequestInfo("POST", "/c", {}, None, body))


# --------------------------------------------------------------------------- parse

VALID = [
    "bson-request-contains(a)",
    "bson-request-contains(a, b.c, 'd e')",
    "bson-request-whitelist({a, b})",
    "bson-request-blacklist[keys={password, roles}]",
    "bson-request-prop-equals(key=a.b, value='\"bar\"')",
    'bson-request-prop-equals(key=a, value=\'{"foo": "bar"}\')',
    "bson-request-prop-equals(key=a, value=[1, 2])",
    "bson-request-prop-equals(key=a, value=@user._id)",
    "bson-request-array-contains(key=tags, values={'\"a\"', 1, true})",
    "bson-request-array-is-subset[key=tags, values='[\"a\"]']",
    "bson-request-array-is-subset(key=@user.field, values=@user.tags)",
    "equals(@request.body.a.b, x)",
]


@pytest.mark.parametrize("text", VALID)
def test_parse_valid(text):
    assert str(parse_predicate(text)) == text


INVALID = [
    ("bson-request-contains()", "expects at least 1"),
    ("bson-request-whitelist()", "expects at least 1"),
    ("bson-request-blacklist", "expects arguments"),
    ("bson-request-whitelist($set)", "invalid field path '$set'"),
    ("bson-request-contains(a, '')", "invalid field path"),
    ("bson-request-prop-equals(key=a, value=bar)", "value= must be JSON"),
    ("bson-request-prop-equals(key=a, value=bar)", "'bar'"),
    ('bson-request-prop-equals(key=a, value="bar")', "got 'bar'"),  # the quotes are the predicate's
    ("bson-request-prop-equals(key=a, value='{foo: 1}')", "must be JSON"),
    ("bson-request-prop-equals(key=a, value=NaN)", "must be JSON"),
    ("bson-request-prop-equals(key=a, value='[' )", "must be JSON"),
    ("bson-request-prop-equals(value=1)", "key= and value="),
    ("bson-request-prop-equals(key=a)", "key= and value="),
    ("bson-request-prop-equals(a, 1)", "named arguments"),
    ("bson-request-prop-equals(key=$a, value=1)", "invalid field path"),
    ("bson-request-prop-equals(key={a, b}, value=1)", "not an array"),
    ("bson-request-prop-equals(key=a, value={1, 2})", "not an array"),
    ("bson-request-array-contains(key=a)", "key= and values="),
    ("bson-request-array-contains(values=1)", "key= and values="),
    ("bson-request-array-contains(key=a, values={1, nope})", "values= must be JSON"),
    ("bson-request-array-contains(key=a, values={})", "at least 1 value"),
    ("bson-request-array-is-subset(key=a, values='[]')", "at least 1 value"),
    ("bson-request-array-is-subset(key='', values=1)", "invalid field path"),
]


@pytest.mark.parametrize("text,fault", INVALID)
def test_parse_invalid(text, fault):
    with pytest.raises(PredicateError) as e:
        parse_predicate(text)
    assert fault in str(e.value)


# --------------------------------------------------------------------------- the self-service rule

SELF = "path-template(/users/{id}) and equals(@user._id, ${id}) and bson-request-whitelist(password)"


@pytest.mark.parametrize(
    "body,user,expected",
    [
        ({"password": "x"}, {"_id": "alice"}, True),
        ({"$set": {"password": "x"}}, {"_id": "alice"}, True),
        ({"$set": {"roles": ["admin"]}}, {"_id": "alice"}, False),
        ({"password": "x", "roles": []}, {"_id": "alice"}, False),
        ({"$rename": {"password": "roles"}}, {"_id": "alice"}, False),
        ({"$unset": {"roles": ""}}, {"_id": "alice"}, False),
        ({"password": "x"}, {"_id": "bob"}, False),
        ({"password": "x"}, None, False),
    ],
)
def test_self_service_rule(body, user, expected):
    assert matches(SELF, body, user, method="PATCH", path="/users/alice") is expected


# --------------------------------------------------------------------------- properties

FIELDS = ["a", "b", "a.b", "a.c", "ab", "b.a", "a.b.c"]
OPERATORS = ["$set", "$unset", "$inc", "$push", "$setOnInsert", "$rename", "$addToSet", "$bogus"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from(["x", "a"]))
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(FIELDS), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def documents(draw):
    """A body document and the paths it touches, computed independently of the module."""
    doc: dict = {}
    touched: set = set()
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        doc[field] = draw(VALUES)
        touched.add(field)
    for op in draw(st.lists(st.sampled_from(OPERATORS), max_size=3, unique=True)):
        if draw(st.integers(0, 9)) == 0:
            doc[op] = draw(SCALARS)  # not an object: the operator itself counts as touched
            touched.add(op)
            continue
        arg = {}
        for field in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
            if op == "$rename":
                arg[field] = draw(st.sampled_from(FIELDS))
                touched.add(arg[field])
            else:
                arg[field] = draw(VALUES)
            touched.add(field)
        doc[op] = arg
    return doc, touched


@st.composite
def bodies(draw):
    if draw(st.booleans()):
        return draw(documents())
    docs = draw(st.lists(documents(), max_size=3))
    return [d for d, _ in docs], set().union(*(t for _, t in docs))


def related(t, k):
    return t == k or t.startswith(k + ".") or k.startswith(t + ".")


@settings(max_examples=400, deadline=None)
@given(bodies(), st.sampled_from(["a", "a.b", "b"]))
def test_whitelist_blacklist_properties(body_touched, key):
    body, touched = body_touched
    assert set(touched_paths(body)) == touched
    wl = matches(f"bson-request-whitelist({key})", body)
    bl = matches(f"bson-request-blacklist({key})", body)
    assert wl is all(t == key or t.startswith(key + ".") for t in touched)
    assert bl is (not any(related(t, key) for t in touched))
    if any(related(t, key) for t in touched):
        assert not (wl and bl)
    # the three-valued negations agree: the body is always well formed here, so never unknown
    assert matches(f"not bson-request-whitelist({key})", body) is (not wl)
    assert matches(f"not bson-request-blacklist({key})", body) is (not bl)


@settings(max_examples=200, deadline=None)
@given(documents())
def test_contains_every_touched_path(doc_touched):
    doc, touched = doc_touched
    for t in touched:
        if not t.startswith("$"):
            assert matches(f"bson-request-contains('{t}')", doc)
            assert not matches(f"bson-request-blacklist('{t}')", doc)
