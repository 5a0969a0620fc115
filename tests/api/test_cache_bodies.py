"""The KV-cache routes' request bodies -> events, or a 400 naming the field."""

import pytest

from metacenter.api.bodies import parse_cache_query, parse_cache_save, parse_json_object, parse_route_score
from metacenter.core.cache import PROMPT_HASH_MAX_ITEMS, TOPK_MAX
from metacenter.core.errors import InvalidInput
from metacenter.core.fields import UINT64_MAX as HASH_MAX


# -- request bodies ----------------------------------------------------------------


def reason_of(parse, body):
    with pytest.raises(InvalidInput) as caught:
        parse(body)
    return caught.value.reason


def test_parse_cache_save():
    body = {"cluster": "m", "prompt_hash": [0, 2**63, HASH_MAX], "ip": "10.0.0.1", "other": 1}
    assert parse_cache_save(body) == ("m", [0, 2**63, HASH_MAX], "10.0.0.1")
    assert parse_cache_save({**body, "ip": "::FFFF:10.0.0.1"})[2] == "::FFFF:10.0.0.1"  # as spelled (issue 10)


def test_parse_cache_query():
    body = {"cluster": "m", "prompt_hash": [1, 2], "topk": 3}
    assert parse_cache_query(body) == ("m", [1, 2], 3)
    assert parse_cache_query({"cluster": "m", "prompt_hash": []}) == ("m", [], 10)
    assert parse_cache_query({**body, "topk": TOPK_MAX})[2] == TOPK_MAX


def test_parse_route_score():
    body = {"cluster": "m", "prompt_hash": [1]}
    assert parse_route_score(body) == ("m", [1], None)
    # As spelled (issue 10): the rows they are matched with carry the engines' first spellings.
    assert parse_route_score({**body, "ips": ["10.0.0.2", "::0:1"]}) == ("m", [1], ["10.0.0.2", "::0:1"])


@pytest.mark.parametrize("item, shown", [
    (-1, "-1"),
    (2**64, str(2**64)),
    (1.0, "1.0"),
    (2.5, "2.5"),
    ("5", "string"),
    (True, "boolean"),
    (None, "null"),
    ([1], "array"),
    ({"a": 1}, "object"),
])
def test_bad_hash_items_are_named(item, shown):
    hashes = [1, 2, 3, item, 5]
    expected = f"field 'prompt_hash' item 3 must be an unsigned 64-bit integer, got {shown}"
    for parse, extra in ((parse_cache_save, {"ip": "10.0.0.1"}), (parse_cache_query, {"topk": 1}),
                         (parse_route_score, {})):
        assert reason_of(parse, {"cluster": "m", "prompt_hash": hashes, **extra}) == expected


@pytest.mark.parametrize("body, reason", [
    ({"prompt_hash": [1], "ip": "10.0.0.1"}, "field 'cluster' is required"),
    ({"cluster": "", "prompt_hash": [1], "ip": "10.0.0.1"}, "field 'cluster' must not be empty"),
    ({"cluster": 5, "prompt_hash": [1], "ip": "10.0.0.1"}, "field 'cluster' must be a string, got number"),
    ({"cluster": "m", "ip": "10.0.0.1"}, "field 'prompt_hash' is required"),
    ({"cluster": "m", "prompt_hash": [], "ip": "10.0.0.1"}, "field 'prompt_hash' must not be empty"),
    ({"cluster": "m", "prompt_hash": "1,2", "ip": "10.0.0.1"},
     "field 'prompt_hash' must be an array of unsigned 64-bit integers, got string"),
    ({"cluster": "m", "prompt_hash": {"0": 1}, "ip": "10.0.0.1"},
     "field 'prompt_hash' must be an array of unsigned 64-bit integers, got object"),
    ({"cluster": "m", "prompt_hash": [1]}, "field 'ip' is required"),
    ({"cluster": "m", "prompt_hash": [1], "ip": "invalid"},
     "field 'ip' must be an IPv4 or IPv6 address, got 'invalid'"),
])
def test_bad_save_bodies(body, reason):
    assert reason_of(parse_cache_save, body) == reason


@pytest.mark.parametrize("body, reason", [
    ({"cluster": "m", "prompt_hash": [1], "topk": 0}, f"field 'topk' must be an integer in [1, {TOPK_MAX}], got 0"),
    ({"cluster": "m", "prompt_hash": [1], "topk": TOPK_MAX + 1},
     f"field 'topk' must be an integer in [1, {TOPK_MAX}], got {TOPK_MAX + 1}"),
    ({"cluster": "m", "prompt_hash": [1], "topk": "10"},
     f"field 'topk' must be an integer in [1, {TOPK_MAX}], got string"),
    ({"cluster": "m", "prompt_hash": [1], "topk": 2.0},
     f"field 'topk' must be an integer in [1, {TOPK_MAX}], got number"),
    ({"cluster": "m", "prompt_hash": [1], "topk": False},
     f"field 'topk' must be an integer in [1, {TOPK_MAX}], got boolean"),
    ({"cluster": "m", "prompt_hash": None, "topk": 1}, "field 'prompt_hash' is required"),
    ({"prompt_hash": [1], "topk": 1}, "field 'cluster' is required"),
])
def test_bad_query_bodies(body, reason):
    assert reason_of(parse_cache_query, body) == reason


@pytest.mark.parametrize("ips, reason", [
    ("10.0.0.1", "field 'ips' must be an array of IP addresses, got string"),
    (["10.0.0.1", 7], "field 'ips' item 1 must be an IP address string, got number"),
    (["10.0.0.1", "10.0.0.300"], "field 'ips' item 1 must be an IPv4 or IPv6 address, got '10.0.0.300'"),
])
def test_bad_route_score_bodies(ips, reason):
    assert reason_of(parse_route_score, {"cluster": "m", "prompt_hash": [1], "ips": ips}) == reason


def test_prompt_hash_length_is_capped():
    too_many = [1] * (PROMPT_HASH_MAX_ITEMS + 1)
    assert reason_of(parse_cache_query, {"cluster": "m", "prompt_hash": too_many}) == \
        f"field 'prompt_hash' has {PROMPT_HASH_MAX_ITEMS + 1} items; at most {PROMPT_HASH_MAX_ITEMS} are allowed"
    assert parse_cache_query({"cluster": "m", "prompt_hash": [1] * PROMPT_HASH_MAX_ITEMS})[1][-1] == 1


def test_json_numbers_above_two_to_the_63_arrive_intact():
    body = parse_json_object(b'{"cluster":"m","prompt_hash":[18446744073709551615,9223372036854775808],'
                             b'"ip":"10.0.0.1"}')
    assert parse_cache_save(body)[1] == [HASH_MAX, 2**63]
    body = parse_json_object(b'{"cluster":"m","prompt_hash":[18446744073709551616],"ip":"10.0.0.1"}')
    assert reason_of(parse_cache_save, body) == \
        "field 'prompt_hash' item 0 must be an unsigned 64-bit integer, got 18446744073709551616"
