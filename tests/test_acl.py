"""Table-driven tests of services.acl: path normalisation, the predicate language, ACL docs, decide()."""

import logging

import pytest

from services.acl import (
    AclError,
    Decision,
    PredicateError,
    RequestInfo,
    decide,
    load_permissions,
    normalize_path,
    parse_predicate,
    validate_acl_document,
)

ALICE = {
    "_id": "alice",
    "roles": ["user", "ops"],
    "tenant": "acme",
    "tenants": ["acme", "globex"],
    "profile": {"team": "red"},
    "empty": "",
    "age": 30,
}
BOB = {"_id": "bob", "roles": ["user"], "tenant": "globex", "tenants": []}

# --------------------------------------------------------------------------- normalize_path

NORMALIZE = [
    ("/", "/"),
    ("/messages", "/messages"),
    ("/messages/", "/messages"),
    ("/messages//_streams///all", "/messages/_streams/all"),
    ("//messages", "/messages"),
    ("/messages/./_streams/all", "/messages/_streams/all"),
    ("/messages/_streams/all/../other", "/messages/_streams/other"),
    ("/messages/%2e%2e/acl", "/acl"),
    ("/messages/%2E/x", "/messages/x"),
    ("/../../etc/passwd", "/etc/passwd"),
    ("/a/b/../../..", "/"),
    ("/Messages/_streams/all", "/Messages/_streams/all"),
    ("/my%20coll/x", "/my coll/x"),
    ("/caf%C3%A9", "/café"),
    ("/a...b/...", "/a...b/..."),
    ("/messages/_streams/all;x", "/messages/_streams/all;x"),
    # refused
    # the id segment of /<coll>/<id> may hold any character; it stays encoded, one segment
    ("/messages/_streams%2fall", "/messages/_streams%2Fall"),
    ("/messages/_streams%2Fall", "/messages/_streams%2Fall"),
    ("/things/a%0Ab%25", "/things/a%0Ab%25"),
    ("/things/%2e%2e", "/things/%2E%2E"),
    ("/things/caf%C3%A9", "/things/café"),
    ("/messages%2f_streams/all", None),
    ("/messages/_streams%2fall/x", None),
    ("/messages%5c..%5cacl", None),
    ("/messages\\..\\acl", None),
    ("/messages/_streams/all%00", None),
    ("/messages/_streams/all%0a", None),
    ("/messages/%252e%252e/acl", None),
    ("/messages/%252fx", "/messages/%252fx"),  # document '%2fx'
    ("/messages/%252fx/y", None),
    ("/messages/%zz", None),
    ("/messages/%2", None),
    ("/messages/%c0%ae%c0%ae/acl", None),  # overlong UTF-8 '.'
    ("/messages/%ff", None),
    ("messages", None),
    ("", None),
]


@pytest.mark.parametrize("raw,expected", NORMALIZE)
def test_normalize_path(raw, expected):
    assert normalize_path(raw) == expected


# --------------------------------------------------------------------------- parse

VALID = [
    "path-prefix(/messages/_streams/all)",
    "path-prefix('/messages/_streams/all')",
    'path-prefix("/messages/_streams/all")',
    "path-prefix( /messages/_streams/all )",
    "path-prefix(/a, /b, '/c')",
    "path-prefix({'/a', '/b'})",
    "path-prefix[path='/a']",
    "path-prefix[path={'/a', /b}]",
    "path(/messages)",
    "path('/messages/@user._id')",
    "path-template('/{tenant}/_streams/{s}')",
    'path-template[value="/{tenant}/x"]',
    "path-template(/{a}/x/*)",
    "method(GET)",
    "method(get, Post)",
    "method[value={GET, POST}]",
    "regex('^/messages/_streams/[a-z]+$')",
    "regex(^/a(b|c)$)",
    'regex[pattern="^/x", value="%R"]',
    "regex[pattern='^/X', case-sensitive=false, full-match=true]",
    "qparams-contain(a)",
    "qparams-contain(a, b)",
    "qparams-blacklist(avars, filter)",
    "qparams-whitelist(page, pagesize)",
    "qparams-size(0)",
    "qparams-size[size=2]",
    "equals(@user._id, 'alice')",
    "equals[value={@user.tenant, acme}]",
    "equals(${tenant}, @user.tenant)",
    "in(value=${tenant}, array=@user.tenants)",
    "in[value=@user.tenant, array={acme, globex}]",
    "in(value=@qparams['x'], array=@user.roles)",
    "contains[value=%R, search={_streams}]",
    "true",
    "false",
    "TRUE",
    "true()",
    "path(/a) and method(GET)",
    "path(/a) AND method(GET) Or not true",
    "not not path(/a)",
    "(path(/a) or path(/b)) and not (method(POST) or method(PUT))",
    "((((true))))",
    "path-prefix(/messages/_streams/all) and method(GET) and qparams-blacklist(avars)",
    "path('/it\\'s')",
    "path-prefix(/a)and(method(GET))",
]


@pytest.mark.parametrize("text", VALID)
def test_parse_valid(text):
    pred = parse_predicate(text)
    assert str(pred) == text


INVALID = [
    ("", "empty"),
    ("   ", "empty"),
    ("foo(/a)", "unknown predicate 'foo' at 0"),
    ("path-prefix(/a", "at 14"),
    ("path-prefix(/a))", "unexpected ')' at 15"),
    ("(path(/a)", "expected ')'"),
    ("path(/a) and", "end of input"),
    ("and path(/a)", "unexpected keyword"),
    ("path(/a) or or path(/b)", "unexpected keyword"),
    ("path(/a) path(/b)", "unexpected 'path' (missing 'and'/'or'?) at 9"),
    ("path('/a)", "unterminated string"),
    ("path(\"/a')", "unterminated string"),
    ("path()", "expects at least 1"),
    ("path(/a,)", "empty argument"),
    ("path(,/a)", "empty argument"),
    ("path", "expects arguments"),
    ("method()", "expects at least 1"),
    ("method(G E T)", "invalid method"),
    ("equals(a)", "at least 2"),
    ("in(a, b)", "named arguments"),
    ("in(value=a)", "named arguments"),
    ("qparams-size(x)", "non-negative integer"),
    ("qparams-size(1, 2)", "expects 1 argument"),
    ("regex('(')", "invalid regex"),
    ("regex[pattern='a', full-match=maybe]", "true or false"),
    ("path-template('/{a}/{a}')", "duplicate"),
    ("path-template('/{a/x')", "malformed"),
    ("path-prefix[path='/a', path='/b']", "duplicate parameter"),
    ("path-prefix(/a, path='/b')", "cannot mix"),
    ("true(x)", "no arguments"),
    ("path({'/a', {'/b'}})", "nested arrays"),
    ("path-prefix(/a])", "unexpected ']'"),
    ("path(/a) and not", "end of input"),
    ("path(/a) # comment", "unexpected '#'"),
    ("not " * 100 + "true", "nested too deeply"),
]


@pytest.mark.parametrize("text,fault", INVALID)
def test_parse_invalid(text, fault):
    with pytest.raises(PredicateError) as e:
        parse_predicate(text)
    assert fault in str(e.value)


def test_error_names_position():
    with pytest.raises(PredicateError, match=r"unexpected '\)' at 14"):
        parse_predicate("path(/a/b/c/d))")


# --------------------------------------------------------------------------- match

T = "path-template('/{tenant}/_streams/{s}') and equals(${tenant}, @user.tenant)"
PUB = "path-prefix(/messages/_streams/all)"

MATCH = [
    # the tutorial rule and segment awareness
    (PUB, "GET", "/messages/_streams/all", {}, None, True),
    (PUB, "GET", "/messages/_streams/all/", {}, None, True),
    (PUB, "GET", "/messages/_streams/all/x", {}, None, True),
    (PUB, "GET", "/messages/_streams/allx", {}, None, False),
    (PUB, "GET", "/messages/_streams", {}, None, False),
    (PUB, "GET", "/messages", {}, None, False),
    (PUB, "GET", "/messages/_streams/other", {}, None, False),
    ("path-prefix('/messages/_streams/all/')", "GET", "/messages/_streams/all", {}, None, True),
    ("path-prefix(/)", "GET", "/anything/at/all", {}, None, True),
    ("path-prefix(/a, /b)", "GET", "/b/c", {}, None, True),
    ("path-prefix({/a, /b})", "GET", "/c", {}, None, False),
    # normalisation tricks cannot escape (or sneak into) a rule
    (PUB, "GET", "/messages/_streams/all/../other", {}, None, False),
    (PUB, "GET", "/messages//_streams/all", {}, None, True),
    (PUB, "GET", "/messages/_streams%2fall", {}, None, False),
    (PUB, "GET", "/messages/_streams/all/%2e%2e/%2e%2e/secret", {}, None, False),
    ("path-prefix(/messages)", "GET", "/messages/%2e%2e/acl", {}, None, False),
    ("path-prefix(/acl)", "GET", "/messages/%2e%2e/acl", {}, None, True),
    (PUB, "GET", "/Messages/_streams/all", {}, None, False),
    (PUB, "GET", "/messages/_streams/all%00", {}, None, False),
    (PUB, "GET", "/messages/_streams/all/%252e%252e/x", {}, None, False),
    ("path-prefix(/x)", "GET", "/messages/%252e%252e/x", {}, None, False),
    (PUB, "GET", "/messages/_streams/%61ll", {}, None, True),
    (PUB, "GET", "/messages/_streams/all?x=1", {}, None, False),  # raw path must exclude the query
    # a document id may hold '/' and dots: '/x/..%2facl' is document '../acl' of 'x', not /acl
    ("not path-prefix(/acl)", "GET", "/x/..%2facl", {}, None, True),
    ("path-prefix(/acl)", "GET", "/x/..%2facl", {}, None, False),
    # path (exact)
    ("path(/messages)", "GET", "/messages", {}, None, True),
    ("path(/messages)", "GET", "/messages/", {}, None, True),
    ("path(/messages)", "GET", "/messages/x", {}, None, False),
    ("path('/my coll')", "GET", "/my%20coll", {}, None, True),
    # method
    ("method(GET)", "GET", "/x", {}, None, True),
    ("method(get)", "GET", "/x", {}, None, True),
    ("method(GET, POST)", "PUT", "/x", {}, None, False),
    (
        "method(GET) and path-prefix(/messages/_streams/all)",
        "POST",
        "/messages/_streams/all",
        {},
        None,
        False,
    ),
    # regex
    ("regex('^/messages/_streams/[a-z]+$')", "GET", "/messages/_streams/all", {}, None, True),
    ("regex('^/messages/_streams/[a-z]+$')", "GET", "/messages/_streams/all/x", {}, None, False),
    ("regex(_streams)", "GET", "/messages/_streams/all", {}, None, True),  # search, not full match
    ("regex(^/messages)", "GET", "/Messages/x", {}, None, False),
    ("regex[pattern='^/messages', case-sensitive=false]", "GET", "/Messages/x", {}, None, True),
    ("regex[pattern='/all', full-match=true]", "GET", "/messages/all", {}, None, False),
    ("regex('^/a/b$')", "GET", "/a//b/", {}, None, True),
    ("regex('^/messages/[^.]+$')", "GET", "/messages/%2e%2e/acl", {}, None, False),
    ("regex('^/u/@user._id$')", "GET", "/u/alice", {}, ALICE, True),
    ("regex('^/u/@user._id$')", "GET", "/u/alice", {}, None, False),
    ("regex('^/u/@user._id$')", "GET", "/u/aXb", {}, {"_id": "a.b"}, False),  # interpolation escaped
    # path-template and ${var}
    (T, "GET", "/acme/_streams/all", {}, ALICE, True),
    (T, "GET", "/globex/_streams/all", {}, ALICE, False),
    (T, "GET", "/acme/_streams/all", {}, BOB, False),
    (T, "GET", "/acme/_streams/all", {}, None, False),
    (T, "GET", "/acme/_streams/all/x", {}, ALICE, False),
    (T, "GET", "/acme/_streams", {}, ALICE, False),
    ("path-template(/{a}/x/*)", "GET", "/q/x/y/z", {}, None, True),
    ("path-template(/{a}/x/*)", "GET", "/q/x", {}, None, True),
    ("path-template(/{a}/x/*)", "GET", "/q/xy", {}, None, False),
    (
        "path-template('/{tenant}/x') and in(value=${tenant}, array=@user.tenants)",
        "GET",
        "/globex/x",
        {},
        ALICE,
        True,
    ),
    (
        "path-template('/{tenant}/x') and in(value=${tenant}, array=@user.tenants)",
        "GET",
        "/globex/x",
        {},
        BOB,
        False,
    ),
    ("equals(${tenant}, acme) and path-template('/{tenant}/x')", "GET", "/acme/x", {}, ALICE, False),
    (
        "(path-template('/{t}/a') or path-template('/{t}/b')) and equals(${t}, @user.tenant)",
        "GET",
        "/acme/b",
        {},
        ALICE,
        True,
    ),
    ("not path-template('/{t}/a') and equals(${t}, acme)", "GET", "/acme/b", {}, ALICE, False),
    # @user interpolation; anonymous or missing never widens, not even under `not`
    ("path-prefix('/users/@user._id')", "GET", "/users/alice/x", {}, ALICE, True),
    ("path-prefix('/users/@user._id')", "GET", "/users/bob", {}, ALICE, False),
    ("path-prefix('/users/@user._id')", "GET", "/users/alicex", {}, ALICE, False),
    ("path-prefix('/users/@user._id')", "GET", "/users/alice", {}, None, False),
    ("path-prefix('/users/@user.empty')", "GET", "/users/x", {}, ALICE, False),
    ("path-prefix('/users/@user._id')", "GET", "/users/bob", {}, {"_id": "/"}, False),
    ("path-prefix('/users/@user._id')", "GET", "/users/bob", {}, {"_id": ".."}, False),
    ("path-prefix('/users/@user._id')", "GET", "/acl", {}, {"_id": "../../acl"}, False),
    ("path('/users/@user._id')", "GET", "/users", {}, {"_id": "."}, False),
    ("path-prefix('/t/@user.profile.team')", "GET", "/t/red", {}, ALICE, True),
    ("equals(@user._id, alice)", "GET", "/", {}, ALICE, True),
    ("equals(@user._id, alice)", "GET", "/", {}, None, False),
    ("not equals(@user._id, alice)", "GET", "/", {}, None, False),
    ("not equals(@user.nosuch, x)", "GET", "/", {}, ALICE, False),
    ("equals(@user.nosuch, x) or path(/p)", "GET", "/p", {}, None, True),
    ("equals(@user.age, '30')", "GET", "/", {}, ALICE, True),
    ("equals(%USER, alice)", "GET", "/", {}, ALICE, True),
    ("equals(%R, '/a/b')", "GET", "/a//b", {}, None, True),
    ("in(value=ops, array=@user.roles)", "GET", "/", {}, ALICE, True),
    ("in(value=admin, array=@user.roles)", "GET", "/", {}, ALICE, False),
    ("in(value=ops, array=@user.roles)", "GET", "/", {}, None, False),
    ("in(value=acme, array=@user.tenant)", "GET", "/", {}, ALICE, False),  # not a list
    ("in[value=@qparams['t'], array={acme, globex}]", "GET", "/", {"t": ["globex"]}, None, True),
    ("in[value=@qparams['t'], array={acme, globex}]", "GET", "/", {"t": ["x"]}, None, False),
    ("in[value=@qparams['t'], array={acme, globex}]", "GET", "/", {}, None, False),
    # qparams
    ("qparams-contain(a)", "GET", "/", {"a": ["1"]}, None, True),
    ("qparams-contain(a, b)", "GET", "/", {"a": ["1"]}, None, False),
    ("qparams-blacklist(avars)", "GET", "/", {"filter": ["{}"]}, None, True),
    ("qparams-blacklist(avars)", "GET", "/", {"avars": ['{"x":1}']}, None, False),
    ("qparams-whitelist(page, pagesize)", "GET", "/", {"page": ["1"]}, None, True),
    ("qparams-whitelist(page, pagesize)", "GET", "/", {}, None, True),
    ("qparams-whitelist(page, pagesize)", "GET", "/", {"page": ["1"], "avars": ["{}"]}, None, False),
    ("qparams-size(0)", "GET", "/", {}, None, True),
    ("qparams-size(1)", "GET", "/", {"a": ["1"], "b": ["2"]}, None, False),
    # logic and precedence
    ("true", "GET", "/", {}, None, True),
    ("false", "GET", "/", {}, None, False),
    ("true or false and false", "GET", "/", {}, None, True),  # and binds tighter
    ("(true or false) and false", "GET", "/", {}, None, False),
    ("not false and false", "GET", "/", {}, None, False),  # not binds tighter
    ("not (false and false)", "GET", "/", {}, None, True),
    ("contains[value=%R, search={_streams}]", "GET", "/m/_streams/x", {}, None, True),
]


@pytest.mark.parametrize("text,method,path,query,user,expected", MATCH)
def test_match(text, method, path, query, user, expected):
    req = RequestInfo(method, path, query, user)
    assert parse_predicate(text).matches(req, normalize_path(path)) is expected


def test_user_property_cannot_inject_syntax():
    pred = parse_predicate("path-prefix('/users/@user._id')")
    evil = {"_id": "x') or true or path('/"}
    assert not pred.matches(RequestInfo("GET", "/acl", {}, evil), "/acl")


# --------------------------------------------------------------------------- ACL documents

BAD_DOCS = [
    ({"predicate": "true"}, "roles"),
    ({"roles": [], "predicate": "true"}, "roles"),
    ({"roles": "user", "predicate": "true"}, "roles"),
    ({"roles": ["user", ""], "predicate": "true"}, "roles"),
    ({"roles": ["user", 3], "predicate": "true"}, "roles"),
    ({"roles": ["user"]}, "predicate: missing"),
    ({"roles": ["user"], "predicate": 5}, "predicate"),
    ({"roles": ["user"], "predicate": "path-prefix(/a"}, "predicate: unexpected end of input"),
    ({"roles": ["user"], "predicate": "nope(/a)"}, "unknown predicate"),
    ({"roles": ["user"], "predicate": "true", "priority": "1"}, "priority"),
    ({"roles": ["user"], "predicate": "true", "priority": True}, "priority"),
    ({"roles": ["user"], "predicate": "true", "priority": float("nan")}, "priority"),
    ({"roles": ["user"], "predicate": "true", "mongo": []}, "mongo"),
    ({"roles": ["user"], "predicate": "true", "mongo": {"readFilter": "x"}}, "mongo.readFilter"),
    ({"roles": ["user"], "predicate": "true", "mongo": {"allowBulkPatch": 1}}, "mongo.allowBulkPatch"),
    ({"roles": ["user"], "predicate": "true", "mongo": {"bogus": True}}, "unknown key 'bogus'"),
    ("not a dict", "object"),
]


@pytest.mark.parametrize("doc,fault", BAD_DOCS)
def test_validate_acl_document_errors(doc, fault):
    with pytest.raises(AclError) as e:
        validate_acl_document(doc)
    assert e.value.status == 400
    assert e.value.message.startswith("invalid ACL document: ")
    assert fault in str(e.value)


def test_validate_acl_document_ok():
    doc = {
        "_id": "r",
        "roles": ["$unauthenticated"],
        "predicate": "path-prefix(/messages/_streams/all)",
        "priority": 0,
        "mongo": {"allowWriteMode": False, "readFilter": {"public": True}, "projectResponse": None},
    }
    assert validate_acl_document(doc) is doc
    assert validate_acl_document({"roles": ["u"], "predicate": "true", "priority": 1.5})


def test_load_permissions_order_and_skip(caplog):
    docs = [
        {"_id": "a", "roles": ["u"], "predicate": "true", "priority": 1},
        {"_id": "b", "roles": ["u"], "predicate": "true", "priority": 2},
        {"_id": "c", "roles": ["u"], "predicate": "true", "priority": 1},
        {"_id": "nopri", "roles": ["u"], "predicate": "true"},
        {"_id": "bad", "roles": ["u"], "predicate": "path-prefix("},
        {"_id": "neg", "roles": ["u"], "predicate": "true", "priority": -5},
        {"_id": 7, "roles": ["u"], "predicate": "true", "priority": 1},
    ]
    with caplog.at_level(logging.WARNING, logger="services.acl"):
        perms = load_permissions(docs)
    assert [p.id for p in perms] == ["b", "c", "a", 7, "neg", "nopri"]
    assert "bad" in caplog.text
    assert perms[0].mongo["readFilter"] is None and perms[0].mongo["allowWriteMode"] is False


# --------------------------------------------------------------------------- decide

PERMS = load_permissions(
    [
        {
            "_id": "public",
            "roles": ["$unauthenticated"],
            "predicate": "path-prefix(/messages/_streams/all) and method(GET)",
            "priority": 0,
        },
        {
            "_id": "users-read",
            "roles": ["user"],
            "predicate": "method(GET) and path-prefix(/messages)",
            "priority": 1,
            "mongo": {"readFilter": {"owner": "@user._id"}},
        },
        {
            "_id": "users-read-hi",
            "roles": ["user"],
            "predicate": "method(GET) and path-prefix(/messages/_streams)",
            "priority": 5,
            "mongo": {"readFilter": {"hi": True}},
        },
        {"_id": "ops", "roles": ["ops"], "predicate": "path-prefix(/ops)", "priority": 3},
    ]
)


def req(method, path, user=None):
    return RequestInfo(method, path, {}, user)


def test_decide_admin_passes_everything():
    d = decide(PERMS, ["admin"], req("DELETE", "/acl/x", {"_id": "root", "roles": ["admin"]}))
    assert d == Decision(True, None)


def test_decide_unauthenticated():
    d = decide(PERMS, [], req("GET", "/messages/_streams/all"))
    assert d.allowed and d.permission.id == "public"
    assert not decide(PERMS, [], req("GET", "/messages")).allowed
    assert not decide(PERMS, [], req("POST", "/messages/_streams/all")).allowed
    assert not decide(PERMS, [], req("GET", "/messages/_streams/all/../../acl")).allowed
    # an anonymous request cannot claim roles
    assert not decide(PERMS, ["admin"], req("GET", "/acl")).allowed


def test_decide_priority_order():
    d = decide(PERMS, ["user"], req("GET", "/messages/_streams/all", BOB))
    assert d.permission.id == "users-read-hi"
    d = decide(PERMS, ["user"], req("GET", "/messages/1", BOB))
    assert d.permission.id == "users-read" and d.permission.mongo["readFilter"] == {"owner": "@user._id"}


def test_decide_no_matching_rule():
    assert decide(PERMS, ["user"], req("POST", "/messages", BOB)) == Decision(False, None)
    assert not decide(PERMS, [], req("GET", "/messages/_streams/all", {"_id": "norole", "roles": []})).allowed


def test_decide_rule_for_other_role_does_not_apply():
    assert not decide(PERMS, ["user"], req("GET", "/ops/x", BOB)).allowed
    assert decide(PERMS, ["user", "ops"], req("GET", "/ops/x", ALICE)).permission.id == "ops"
    # authenticated users do not inherit $unauthenticated rules (RESTHeart behaviour)
    assert not decide(PERMS, ["ops"], req("GET", "/messages/_streams/all", {"_id": "o"})).allowed


def test_decide_options_and_bad_path():
    assert decide(PERMS, [], req("OPTIONS", "/acl")).allowed
    assert not decide(PERMS, ["user"], req("GET", "/messages%2f_streams", BOB)).allowed


def test_regex_predicates_run_in_linear_time_and_refuse_backtracking_patterns():
    """`^/docs/([a-z0-9]+/?)*$` against a crafted path held a worker 30 s on Python's re."""
    pred = parse_predicate("regex(pattern='^/docs/([a-z0-9]+/?)*$', full-match=true)")
    path = "/docs/" + "a" * 5000 + "!"
    assert pred.matches(RequestInfo("GET", path, {}, None), path) is False  # at once, not 2^5000 steps
    assert pred.matches(RequestInfo("GET", "/docs/a/b", {}, None), "/docs/a/b") is True
    for pattern in ("(a)\\\\1", "a(?=b)"):
        with pytest.raises(PredicateError, match="backtracking"):
            parse_predicate(f"regex(pattern='{pattern}')")
