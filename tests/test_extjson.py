"""The fast relaxed Extended JSON encoder writes exactly what bson.json_util writes."""

import datetime as dt
import math

import pytest
from bson import Binary, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp, json_util

from services.extjson import dumps

VALUES = [
    {"a": 1},
    {"o": ObjectId("62166d53ebdcd56455a1a7ab"), "i": Int64(5), "f": 3.0, "dec": Decimal128("9.99")},
    {"d": dt.datetime(2023, 4, 3, 13, 36, 43, 512000), "d0": dt.datetime(2023, 4, 3, 13, 36, 43)},
    {"nan": float("nan"), "inf": math.inf, "ninf": -math.inf},
    {"old": dt.datetime(1960, 1, 1)},
    {"b": Binary(b"xy", 0), "u": Binary(b"0123456789abcdef", 4)},
    {"ts": Timestamp(1680529003, 1)},
    {"r": Regex("^a", "i")},
    {"tz": dt.datetime(2023, 1, 1, tzinfo=dt.UTC)},
    {"tz2": dt.datetime(2023, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=2)))},
    ["x", {"y": [1, None, True, "é\u2028", {"z": []}]}],
    {"big": 2**62, "neg": -(2**40)},
    {"uni": "\u00e9\U0001f600", "ctl": 'a\nb\t"c"'},
    {"mk": MinKey(), "xk": MaxKey()},
]


@pytest.mark.parametrize("value", VALUES)
def test_same_text_as_json_util(value):
    assert dumps(value) == json_util.dumps(value, json_options=json_util.RELAXED_JSON_OPTIONS)
