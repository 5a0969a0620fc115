"""The KV-cache routes over HTTP (in-process): /v1/cache/save, /v1/cache/query,
/v1/route/score, /v1/cache/stats, and every bad input leaving state unchanged."""

import json

import mmh3
import pytest
import pytest_twisted

from harness import Harness
from metacenter.core.hashing import prompt_hashes


@pytest.fixture(params=["routed", "klein"])
def node(request):
    return Harness(through_klein=request.param == "klein")


def ok(response, body):
    assert response.code == 200, body
    assert body["status"] == "OK" and body["error"] is None
    return body["data"]


def prompt(n, seed=0):
    return bytes((7 * i + seed) % 256 for i in range(n))


@pytest_twisted.inlineCallbacks
def test_save_then_query_longest_prefix_best_first(node):
    shared = prompt(2048)
    a = prompt_hashes(shared + b"A" * 1024)  # 6 blocks
    b = prompt_hashes(shared + b"B" * 512)  # 5 blocks, first 4 shared with a
    yield node.call_json("POST", "/v1/cache/save", {"cluster": "m", "prompt_hash": a, "ip": "10.0.0.1"})
    yield node.call_json("POST", "/v1/cache/save", {"cluster": "m", "prompt_hash": b, "ip": "10.0.0.2"})
    r, body = yield node.call_json("POST", "/v1/cache/query", {"cluster": "m", "prompt_hash": a, "topk": 10})
    assert ok(r, body) == {"locations": [{"ip": "10.0.0.1", "length": 6}, {"ip": "10.0.0.2", "length": 4}]}
    r, body = yield node.call_json("POST", "/v1/cache/query", {"cluster": "m", "prompt_hash": a, "topk": 1})
    assert ok(r, body) == {"locations": [{"ip": "10.0.0.1", "length": 6}]}
    # Another cluster knows nothing of it.
    r, body = yield node.call_json("POST", "/v1/cache/query", {"cluster": "other", "prompt_hash": a, "topk": 10})
    assert ok(r, body) == {"locations": []}
    r, body = yield node.call_json("POST", "/v1/cache/query", {"cluster": "m", "prompt_hash": [], "topk": 10})
    assert ok(r, body) == {"locations": []}


@pytest_twisted.inlineCallbacks
def test_full_uint64_range_round_trips(node):
    hashes = [2**64 - 1, 2**63, 0, 4269816323887316428]
    r, body = yield node.call("POST", "/v1/cache/save",
                              raw=json.dumps({"cluster": "m", "prompt_hash": hashes, "ip": "10.0.0.1"}).encode())
    assert r.code == 200
    r, body = yield node.call_json("POST", "/v1/cache/query", {"cluster": "m", "prompt_hash": hashes, "topk": 10})
    assert ok(r, body) == {"locations": [{"ip": "10.0.0.1", "length": 4}]}


@pytest_twisted.inlineCallbacks
def test_gateway_hashes_known_answer_over_http(node):
    text = bytes((7 * i) % 256 for i in range(1200))
    expected = [mmh3.hash64(text[:end], 0, True, signed=False)[0] for end in (512, 1024, 1200)]
    assert prompt_hashes(text) == expected
    yield node.call_json("POST", "/v1/cache/save", {"cluster": "m", "prompt_hash": expected, "ip": "10.0.0.7"})
    r, body = yield node.call_json("POST", "/v1/cache/query",
                                   {"cluster": "m", "prompt_hash": expected[:2] + [1], "topk": 10})
    assert ok(r, body) == {"locations": [{"ip": "10.0.0.7", "length": 2}]}


@pytest_twisted.inlineCallbacks
def test_saves_are_published_for_replication(node):
    yield node.call_json("POST", "/v1/cache/save", {"cluster": "m", "prompt_hash": [1, 2], "ip": "10.0.0.1"},
                         headers={"TraceId": "t-cache"})
    event_type, event, trace_id = node.events[-1]
    assert (event_type, tuple(event), trace_id) == ("cache.save", ("m", [1, 2], "10.0.0.1"), "t-cache")


@pytest_twisted.inlineCallbacks
def test_route_score_uses_load_and_cache(node):
    hashes = [11, 12, 13, 14]
    for i, ip in enumerate(["10.0.0.1", "10.0.0.2", "10.0.0.3"]):
        for n in range(i * 3):
            yield node.call_json("POST", "/v1/load/stats",
                                 {"cluster": "m", "request_id": f"{ip}-{n}", "ip": ip, "prompt_length": 512})
    yield node.call_json("POST", "/v1/cache/save", {"cluster": "m", "prompt_hash": hashes, "ip": "10.0.0.3"})
    r, body = yield node.call_json("POST", "/v1/route/score", {"cluster": "m", "prompt_hash": hashes})
    rows = ok(r, body)
    by_ip = {row["ip"]: row for row in rows}
    # Engines with load: 10.0.0.2 (3 queued, 1536 B) and 10.0.0.3 (6, 3072 B);
    # spread max(2, 6-3) = 3, so w_req = ceil(3/5) = 1.
    # 10.0.0.3: full cache match 2*1.0, request_load (6-3)/3 = 1, prefill 3072/3072.
    assert by_ip["10.0.0.3"]["score"] == pytest.approx(2.0 - 1 * 1.0 - 3 * 1.0)
    # 10.0.0.2: no cache, least queued, prefill 1536/3072.
    assert by_ip["10.0.0.2"]["score"] == pytest.approx(0.0 - 0.0 - 3 * 0.5)
    assert [row["ip"] for row in rows] == sorted(by_ip, key=lambda ip: (-by_ip[ip]["score"], ip))
    r, body = yield node.call_json("POST", "/v1/route/score",
                                   {"cluster": "m", "prompt_hash": hashes, "ips": ["10.0.0.2"]})
    assert [row["ip"] for row in ok(r, body)] == ["10.0.0.2"]


@pytest_twisted.inlineCallbacks
def test_engine_expiry_takes_its_cache_along():
    node = Harness(request_expire=60)
    yield node.call_json("POST", "/v1/load/stats", {"cluster": "m", "request_id": "r", "ip": "10.0.0.1"})
    yield node.call_json("POST", "/v1/cache/save", {"cluster": "m", "prompt_hash": [1, 2], "ip": "10.0.0.1"})
    node.clock.advance(61)
    node.state.expire_all()
    r, body = yield node.call_json("POST", "/v1/cache/query", {"cluster": "m", "prompt_hash": [1, 2], "topk": 5})
    assert ok(r, body) == {"locations": []}
    r, body = yield node.call_json("GET", "/v1/cache/stats")
    assert ok(r, body)["blocks"] == 0


@pytest_twisted.inlineCallbacks
def test_cache_stats_and_metrics(node):
    yield node.call_json("POST", "/v1/cache/save", {"cluster": "m", "prompt_hash": [1, 2, 3], "ip": "10.0.0.1"})
    yield node.call_json("POST", "/v1/cache/query", {"cluster": "m", "prompt_hash": [1, 2, 9, 9], "topk": 3})
    yield node.call_json("POST", "/v1/cache/query", {"cluster": "m", "prompt_hash": [7], "topk": 3})
    r, body = yield node.call_json("GET", "/v1/cache/stats")
    data = ok(r, body)
    assert data["clusters"] == [{"cluster": "m", "blocks": 3, "engines": 1}]
    _, text = yield node.call("GET", "/metrics")
    text = text.decode()
    assert 'metacenter_cache_blocks{cluster="m"} 3.0' in text
    assert "metacenter_cache_queries_total 2.0" in text
    assert "metacenter_cache_hit_ratio 0.5" in text
    assert "metacenter_cache_matched_fraction_mean 0.25" in text


SAVE = {"cluster": "m", "prompt_hash": [1, 2], "ip": "10.0.0.1"}
BAD_SAVES = [
    ({**SAVE, "prompt_hash": []}, "'prompt_hash' must not be empty"),
    ({**SAVE, "prompt_hash": [1, -1]}, "'prompt_hash' item 1 must be an unsigned 64-bit integer, got -1"),
    ({**SAVE, "prompt_hash": [2**64]}, "'prompt_hash' item 0 must be an unsigned 64-bit integer"),
    ({**SAVE, "prompt_hash": [1.5]}, "'prompt_hash' item 0"),
    ({**SAVE, "prompt_hash": ["1"]}, "'prompt_hash' item 0"),
    ({**SAVE, "prompt_hash": [True]}, "'prompt_hash' item 0"),
    ({**SAVE, "prompt_hash": "1,2"}, "'prompt_hash'"),
    ({"cluster": "m", "ip": "10.0.0.1"}, "'prompt_hash'"),
    ({**SAVE, "cluster": ""}, "'cluster' must not be empty"),
    ({**SAVE, "ip": "engine-1"}, "'ip' must be an IPv4 or IPv6 address"),
    ({"cluster": "m", "prompt_hash": [1]}, "'ip' is required"),
]


@pytest.mark.parametrize("body,reason", BAD_SAVES)
@pytest_twisted.inlineCallbacks
def test_bad_save_is_rejected_and_changes_nothing(node, body, reason):
    yield node.call_json("POST", "/v1/cache/save", {"cluster": "m", "prompt_hash": [5, 6], "ip": "10.0.0.9"})
    before = node.snapshot()
    r, b = yield node.call_json("POST", "/v1/cache/save", body)
    assert r.code == 400 and b["error"]["code"] == 40001400, b
    assert reason in b["error"]["reason"], b["error"]["reason"]
    assert node.snapshot() == before


QUERY = {"cluster": "m", "prompt_hash": [1, 2], "topk": 10}


@pytest.mark.parametrize("path,body,reason", [
    ("/v1/cache/query", {**QUERY, "topk": 0}, "'topk' must be an integer in [1, 1000], got 0"),
    ("/v1/cache/query", {**QUERY, "topk": "10"}, "'topk'"),
    ("/v1/cache/query", {**QUERY, "topk": True}, "'topk'"),
    ("/v1/cache/query", {**QUERY, "prompt_hash": [-3]}, "'prompt_hash' item 0"),
    ("/v1/cache/query", {**QUERY, "prompt_hash": None}, "'prompt_hash'"),
    ("/v1/cache/query", {"prompt_hash": [1], "topk": 1}, "'cluster' is required"),
    ("/v1/route/score", {"cluster": "m", "prompt_hash": [1], "ips": ["nope"]}, "'ips' item 0"),
    ("/v1/route/score", {"cluster": "m", "prompt_hash": [1], "ips": "10.0.0.1"}, "'ips'"),
    ("/v1/route/score", {"cluster": "m", "prompt_hash": [1.0]}, "'prompt_hash' item 0"),
])
@pytest_twisted.inlineCallbacks
def test_bad_query_is_rejected(node, path, body, reason):
    before = node.snapshot()
    r, b = yield node.call_json("POST", path, body)
    assert r.code == 400 and b["error"]["code"] == 40001400, b
    assert reason in b["error"]["reason"], b["error"]["reason"]
    assert node.snapshot() == before


@pytest.mark.parametrize("path", ["/v1/cache/save", "/v1/cache/query", "/v1/route/score"])
@pytest.mark.parametrize("raw", [b"", b"{", b"[1,2]"])
@pytest_twisted.inlineCallbacks
def test_malformed_bodies(node, path, raw):
    before = node.snapshot()
    r, b = yield node.call_json("POST", path, raw=raw)
    assert r.code == 400 and b["error"]["code"] == 40001400
    assert b["error"]["message"] == "Invalid input parameters: invalid JSON format"
    assert node.snapshot() == before
