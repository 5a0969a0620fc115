"""Issue 10 against a real `twistd metacenter` process over real HTTP:
the pick race (50 concurrent picks over 10 idle engines book 5 each, and
never two bookings for one request_id), the conditional add, int32
saturation and an ip-spelling round trip through load, cache and pick."""

import json
from collections import Counter

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool

from nodeproc import NodeProcess

INT32 = 2**31 - 1


@pytest.fixture(scope="module")
def node():
    n = NodeProcess("127.0.0.1").start(wait_ready=True)
    yield n
    n.stop()


@pytest.fixture
def http():
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 64
    client = HTTPClient(Agent(reactor, pool=pool))
    yield client
    pytest_twisted.blockon(pool.closeCachedConnections())


@defer.inlineCallbacks
def call(http, node, method, path, body=None):
    response = yield http.request(method, node.url + path, data=json.dumps(body).encode() if body else None)
    content = yield response.content()
    return response.code, json.loads(content)


@pytest_twisted.inlineCallbacks
def test_pick_race_books_evenly_and_never_twice(node, http):
    ips = [f"10.50.0.{i}" for i in range(1, 11)]
    # 50 request ids, each sent twice, all at once: 100 concurrent picks.
    bodies = [{"cluster": "race", "request_id": f"race-{i}", "ips": ips, "prompt_length": 10} for i in range(50)]
    results = yield defer.gatherResults([call(http, node, "POST", "/v1/route/pick", b) for b in bodies + bodies],
                                        consumeErrors=True)
    assert all(code == 200 for code, _ in results), [a for c, a in results if c != 200][:3]
    first, again = results[:50], results[50:]
    # A retry (or a concurrent duplicate) answers the same engine.
    assert [a["data"]["ip"] for _, a in first] == [a["data"]["ip"] for _, a in again]
    per_engine = Counter(a["data"]["ip"] for _, a in first)
    assert set(per_engine) == set(ips)
    assert all(4 <= n <= 6 for n in per_engine.values()), per_engine
    code, answer = yield call(http, node, "GET", "/v1/load/stats?cluster=race")
    queued = {e["ip"]: e["queued_req_num"] for e in answer["data"]}
    assert queued == dict(per_engine) and sum(queued.values()) == 50  # 50 bookings, not 100


@pytest_twisted.inlineCallbacks
def test_conditional_add_over_http(node, http):
    add = {"cluster": "cas", "request_id": "c1", "ip": "10.51.0.1", "if_updated_time": 0}
    code, answer = yield call(http, node, "POST", "/v1/load/stats", add)
    assert code == 200, answer
    code, answer = yield call(http, node, "GET", "/v1/load/stats?cluster=cas")
    row = answer["data"][0]
    code, answer = yield call(http, node, "POST", "/v1/load/stats", {**add, "request_id": "c2", "if_updated_time": 0})
    assert code == 409 and answer["error"]["code"] == 40001409 and answer["data"] == row
    code, answer = yield call(http, node, "POST", "/v1/load/stats",
                              {**add, "request_id": "c2", "if_updated_time": row["updated_time"]})
    assert code == 200, answer
    code, answer = yield call(http, node, "GET", "/v1/load/stats?cluster=cas")
    assert answer["data"][0]["queued_req_num"] == 2


@pytest_twisted.inlineCallbacks
def test_int32_saturation_over_http(node, http):
    for i in range(2):
        code, answer = yield call(http, node, "POST", "/v1/load/stats",
                                  {"cluster": "big", "request_id": f"b{i}", "ip": "10.52.0.1",
                                   "prompt_length": INT32, "prompt_tokens": INT32})
        assert code == 200, answer
    code, answer = yield call(http, node, "GET", "/v1/load/stats?cluster=big")
    row = answer["data"][0]
    assert (row["prompt_length"], row["prefill_tokens"], row["queued_tokens"]) == (INT32, INT32, INT32)
    response = yield http.get(node.url + "/metrics")
    text = (yield response.content()).decode()
    # Metrics keep the exact values.
    assert 'prompt_length{engine_ip="10.52.0.1",model_name="big"} 4.294967294e+09' in text


@pytest.mark.parametrize("ip", ["10.53.0.1", "::ffff:10.53.0.2", "::FFFF:A35:3", "2001:DB8::53", "2001:db8:0:0::54"])
@pytest_twisted.inlineCallbacks
def test_ip_spelling_round_trip_over_http(node, http, ip):
    cluster = f"spell-{ip}"
    code, _ = yield call(http, node, "POST", "/v1/load/stats", {"cluster": cluster, "request_id": f"s-{ip}", "ip": ip})
    assert code == 200
    code, answer = yield call(http, node, "GET", f"/v1/load/stats?cluster={cluster}")
    assert [e["ip"] for e in answer["data"]] == [ip]
    yield call(http, node, "POST", "/v1/cache/save", {"cluster": cluster, "ip": ip, "prompt_hash": [9]})
    code, answer = yield call(http, node, "POST", "/v1/cache/query", {"cluster": cluster, "prompt_hash": [9]})
    assert answer["data"]["locations"] == [{"ip": ip, "length": 1}]
    code, answer = yield call(http, node, "POST", "/v1/route/pick",
                              {"cluster": cluster, "request_id": f"p-{ip}", "prompt_hash": [9]})
    assert code == 200 and answer["data"]["ip"] == ip
