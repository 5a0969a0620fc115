"""Issue 10 over the HTTP API in-process (a real Klein resource through
treq's StubTreq, the state on a task.Clock): engine reset, gateway leases,
refresh, conditional adds, saturated rows, ip spellings and pick-and-book,
and a 400 naming the field, state unchanged, for every bad input of every
new field."""

import pytest
import pytest_twisted
from prometheus_client.utils import floatToGoString

from harness import Harness
from metacenter.core.events import (EVENT_ADD, EVENT_ENGINE_RESET, EVENT_LEASE_KEEPALIVE, EVENT_LEASE_REVOKE,
                                    EVENT_REFRESH)

INT32 = 2**31 - 1
NS = 10**9


@pytest.fixture(params=["routed", "klein"])
def node(request):
    return Harness(through_klein=request.param == "klein")


def add_body(request_id="r1", cluster="llama", ip="10.0.0.1", prompt_length=100, **extra):
    return {"cluster": cluster, "request_id": request_id, "ip": ip, "prompt_length": prompt_length, **extra}


def assert_ok(response, body):
    assert response.code == 200, body
    assert body["status"] == "OK" and body["error"] is None


def assert_error(response, body, status, code, reason_contains):
    assert response.code == status, body
    assert body["status"] == "ERROR" and body["error"]["code"] == code, body
    assert reason_contains in body["error"]["reason"], body["error"]["reason"]


@pytest_twisted.inlineCallbacks
def rows(node, cluster="llama"):
    _, b = yield node.call_json("GET", f"/v1/load/stats?cluster={cluster}")
    return b["data"]


# -- engine reset ---------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_engine_reset_releases_requests_and_cache_and_is_replicated(node):
    for i in range(3):
        yield node.call_json("POST", "/v1/load/stats", add_body(f"r{i}", prompt_tokens=10))
    yield node.call_json("POST", "/v1/load/stats", add_body("other", ip="10.0.0.2"))
    yield node.call_json("POST", "/v1/cache/save", {"cluster": "llama", "ip": "10.0.0.1", "prompt_hash": [1, 2, 3]})
    r, b = yield node.call_json("DELETE", "/v1/load/engine", {"cluster": "llama", "ip": "10.0.0.1"})
    assert_ok(r, b)
    assert b["data"] == {"released_requests": 3, "cache_blocks": 3}
    assert [e["ip"] for e in (yield rows(node))] == ["10.0.0.2"]
    # A late delete, prompt delete or duplicate add of a released request changes nothing.
    yield node.call_json("DELETE", "/v1/load/prompt", {"request_id": "r0"})
    yield node.call_json("DELETE", "/v1/load/stats", {"request_id": "r1"})
    yield node.call_json("POST", "/v1/load/stats", add_body("r2"))
    assert [e["ip"] for e in (yield rows(node))] == ["10.0.0.2"]
    assert (EVENT_ENGINE_RESET, ("llama", "10.0.0.1")) in [(t, tuple(e)) for t, e, _ in node.events]
    # An unknown engine: 200 with zeros.
    r, b = yield node.call_json("DELETE", "/v1/load/engine", {"cluster": "nope", "ip": "10.9.9.9"})
    assert_ok(r, b)
    assert b["data"] == {"released_requests": 0, "cache_blocks": 0}


# -- leases -----------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_lease_keepalive_list_revoke(node):
    r, b = yield node.call_json("POST", "/v1/load/lease/keepalive", {"lease": "gw-a"})
    assert_ok(r, b)
    assert b["data"] == {"lease": "gw-a", "ttl_ms": 10000, "requests": 0}
    yield node.call_json("POST", "/v1/load/stats", add_body("r1", lease="gw-a"))
    yield node.call_json("POST", "/v1/load/stats", add_body("r2", lease="gw-a"))
    yield node.call_json("POST", "/v1/load/stats", add_body("r3"))
    r, b = yield node.call_json("POST", "/v1/load/lease/keepalive", {"lease": "gw-a", "ttl_ms": 5000})
    assert b["data"] == {"lease": "gw-a", "ttl_ms": 5000, "requests": 2}
    node.clock.advance(1.5)
    _, b = yield node.call_json("GET", "/v1/load/leases")
    assert b["data"] == [{"lease": "gw-a", "ttl_ms": 5000, "expires_in_ms": 3500, "requests": 2}]
    r, b = yield node.call_json("DELETE", "/v1/load/lease", {"lease": "gw-a"})
    assert_ok(r, b)
    assert b["data"] == {"released_requests": 2}
    assert [e["queued_req_num"] for e in (yield rows(node))] == [1]
    _, b = yield node.call_json("GET", "/v1/load/leases")
    assert b["data"] == []
    replicated = [(t, tuple(e)) for t, e, _ in node.events if t in (EVENT_LEASE_KEEPALIVE, EVENT_LEASE_REVOKE)]
    # The keepalive replicates with its resolved ttl, not the client's null.
    assert replicated == [(EVENT_LEASE_KEEPALIVE, ("gw-a", 10000)), (EVENT_LEASE_KEEPALIVE, ("gw-a", 5000)),
                          (EVENT_LEASE_REVOKE, ("gw-a",))]
    adds = [tuple(e) for t, e, _ in node.events if t == EVENT_ADD]
    assert adds[0][5:] == (0, "gw-a") and len(adds[2]) == 5  # an add without a lease: the reference's 5 fields


@pytest_twisted.inlineCallbacks
def test_refresh_restarts_expiry(node):
    node.node.state.request_expire = 100.0
    yield node.call_json("POST", "/v1/load/stats", add_body("r1"))
    yield node.call_json("POST", "/v1/load/stats", add_body("r2"))
    node.clock.advance(80)
    r, b = yield node.call_json("POST", "/v1/load/refresh", {"request_ids": ["r1", "r1", "unknown"]})
    assert_ok(r, b)
    assert b["data"] == {"refreshed": 1}
    node.clock.advance(30)
    node.state.expire_all()
    assert node.state.request_state("r1") == "live" and node.state.request_state("r2") == "deleted"
    assert (EVENT_REFRESH, (("r1", "r1", "unknown"),)) in [(t, tuple(e)) for t, e, _ in node.events]


# -- conditional add, saturation, spellings ------------------------------------------


@pytest_twisted.inlineCallbacks
def test_conditional_add_conflict_and_success(node):
    # Unknown engine: its updated_time is 0.
    r, b = yield node.call_json("POST", "/v1/load/stats", add_body("r1", if_updated_time=0))
    assert_ok(r, b)
    (row,) = yield rows(node)
    before = node.snapshot()
    r, b = yield node.call_json("POST", "/v1/load/stats", add_body("r2", if_updated_time=row["updated_time"] - 1))
    assert_error(r, b, 409, 40001409, "updated_time")
    assert b["data"] == row  # the engine's current row
    assert node.snapshot() == before
    r, b = yield node.call_json("POST", "/v1/load/stats", add_body("r2", if_updated_time=row["updated_time"]))
    assert_ok(r, b)
    assert [e["queued_req_num"] for e in (yield rows(node))] == [2]
    # Never replicated as a condition.
    assert all(len(e) <= 7 for t, e, _ in node.events if t == EVENT_ADD)


@pytest_twisted.inlineCallbacks
def test_rows_saturate_at_int32_and_metrics_keep_exact_values(node):
    for i in range(3):
        yield node.call_json("POST", "/v1/load/stats", add_body(f"r{i}", prompt_length=INT32, prompt_tokens=INT32))
    (row,) = yield rows(node)
    assert row["prompt_length"] == row["prefill_tokens"] == row["queued_tokens"] == INT32
    assert row["queued_req_num"] == row["prefill_req_num"] == 3
    engine = node.state.engine("llama", "10.0.0.1")
    assert engine.prompt == engine.queued_tokens == 3 * INT32


SPELLINGS = ["10.0.0.1", "::ffff:10.0.0.1", "::FFFF:A00:1", "2001:DB8::1", "2001:db8:0:0::1", "fe80::1"]


@pytest.mark.parametrize("ip", SPELLINGS)
@pytest_twisted.inlineCallbacks
def test_ip_spelling_round_trip_through_load_cache_and_pick(node, ip):
    r, b = yield node.call_json("POST", "/v1/load/stats", add_body("r1", ip=ip))
    assert_ok(r, b)
    assert [e["ip"] for e in (yield rows(node))] == [ip]
    yield node.call_json("POST", "/v1/cache/save", {"cluster": "llama", "ip": ip, "prompt_hash": [7, 8]})
    _, b = yield node.call_json("POST", "/v1/cache/query", {"cluster": "llama", "prompt_hash": [7, 8]})
    assert b["data"]["locations"] == [{"ip": ip, "length": 2}]
    _, b = yield node.call_json("POST", "/v1/route/pick", {"cluster": "llama", "request_id": "p1", "prompt_hash": [7]})
    assert b["data"]["ip"] == ip
    _, b = yield node.call_json("POST", "/v1/route/pick", {"cluster": "llama", "request_id": "p2", "ips": [ip]})
    assert b["data"]["ip"] == ip
    assert [(e["ip"], e["queued_req_num"]) for e in (yield rows(node))] == [(ip, 3)]


# -- pick-and-book ----------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_pick_books_and_a_retry_books_nothing(node):
    body = {"cluster": "llama", "request_id": "p1", "ips": ["10.0.0.1", "10.0.0.2"], "prompt_length": 50,
            "prompt_tokens": 5, "lease": "gw"}
    r, b = yield node.call_json("POST", "/v1/route/pick", body)
    assert_ok(r, b)
    assert set(b["data"]) == {"ip", "score", "cache_length", "queued_req_num"} and b["data"]["queued_req_num"] == 1
    first = b["data"]["ip"]
    r, b = yield node.call_json("POST", "/v1/route/pick", body)
    assert b["data"]["ip"] == first and b["data"]["queued_req_num"] == 1
    adds = [tuple(e) for t, e, _ in node.events if t == EVENT_ADD]
    assert len(adds) == 1 and adds[0][:4] == ("llama", "p1", first, 50) and adds[0][5:] == (5, "gw")
    assert node.state.lease_of("p1") == "gw"


@pytest_twisted.inlineCallbacks
def test_pick_without_candidates_is_404_and_of_a_finished_request_409(node):
    r, b = yield node.call_json("POST", "/v1/route/pick", {"cluster": "empty", "request_id": "p1"})
    assert_error(r, b, 404, 40001404, "pass 'ips'")
    yield node.call_json("DELETE", "/v1/load/stats", {"request_id": "done"})
    r, b = yield node.call_json("POST", "/v1/route/pick", {"cluster": "llama", "request_id": "done",
                                                           "ips": ["10.0.0.1"]})
    assert_error(r, b, 409, 40001409, "already finished")


# -- every bad input of every new field --------------------------------------------------

LONG = "x" * 129
BAD = [
    # (method, path, body, field named in the reason)
    ("POST", "/v1/load/stats", add_body(prompt_tokens=-1), "prompt_tokens"),
    ("POST", "/v1/load/stats", add_body(prompt_tokens=INT32 + 1), "prompt_tokens"),
    ("POST", "/v1/load/stats", add_body(prompt_tokens=True), "prompt_tokens"),
    ("POST", "/v1/load/stats", add_body(prompt_tokens="1"), "prompt_tokens"),
    ("POST", "/v1/load/stats", add_body(prompt_tokens=1.5), "prompt_tokens"),
    ("POST", "/v1/load/stats", add_body(lease=""), "lease"),
    ("POST", "/v1/load/stats", add_body(lease=LONG), "lease"),
    ("POST", "/v1/load/stats", add_body(lease=7), "lease"),
    ("POST", "/v1/load/stats", add_body(lease=True), "lease"),
    ("POST", "/v1/load/stats", add_body(lease="\ud800"), "lease"),
    ("POST", "/v1/load/stats", add_body(if_updated_time=-1), "if_updated_time"),
    ("POST", "/v1/load/stats", add_body(if_updated_time=True), "if_updated_time"),
    ("POST", "/v1/load/stats", add_body(if_updated_time="0"), "if_updated_time"),
    ("POST", "/v1/load/stats", add_body(if_updated_time=2**63), "if_updated_time"),
    ("POST", "/v1/load/stats", add_body(ip="10.0.0.256"), "ip"),
    ("POST", "/v1/load/stats", add_body(ip="fe80::1%eth0"), "ip"),
    ("DELETE", "/v1/load/engine", {"ip": "10.0.0.1"}, "cluster"),
    ("DELETE", "/v1/load/engine", {"cluster": "llama"}, "ip"),
    ("DELETE", "/v1/load/engine", {"cluster": "llama", "ip": "not-an-ip"}, "ip"),
    ("DELETE", "/v1/load/engine", {"cluster": "llama", "ip": 10}, "ip"),
    ("DELETE", "/v1/load/engine", {"cluster": "", "ip": "10.0.0.1"}, "cluster"),
    ("POST", "/v1/load/lease/keepalive", {}, "lease"),
    ("POST", "/v1/load/lease/keepalive", {"lease": ""}, "lease"),
    ("POST", "/v1/load/lease/keepalive", {"lease": LONG}, "lease"),
    ("POST", "/v1/load/lease/keepalive", {"lease": ["a"]}, "lease"),
    ("POST", "/v1/load/lease/keepalive", {"lease": "gw", "ttl_ms": 999}, "ttl_ms"),
    ("POST", "/v1/load/lease/keepalive", {"lease": "gw", "ttl_ms": 300001}, "ttl_ms"),
    ("POST", "/v1/load/lease/keepalive", {"lease": "gw", "ttl_ms": True}, "ttl_ms"),
    ("POST", "/v1/load/lease/keepalive", {"lease": "gw", "ttl_ms": 1500.5}, "ttl_ms"),
    ("POST", "/v1/load/lease/keepalive", {"lease": "gw", "ttl_ms": "2000"}, "ttl_ms"),
    ("DELETE", "/v1/load/lease", {}, "lease"),
    ("DELETE", "/v1/load/lease", {"lease": ""}, "lease"),
    ("DELETE", "/v1/load/lease", {"lease": LONG}, "lease"),
    ("DELETE", "/v1/load/lease", {"lease": False}, "lease"),
    ("POST", "/v1/load/refresh", {}, "request_ids"),
    ("POST", "/v1/load/refresh", {"request_ids": "r1"}, "request_ids"),
    ("POST", "/v1/load/refresh", {"request_ids": ["r1", ""]}, "request_ids"),
    ("POST", "/v1/load/refresh", {"request_ids": ["r1", 2]}, "request_ids"),
    ("POST", "/v1/load/refresh", {"request_ids": [f"r{i}" for i in range(10001)]}, "request_ids"),
    ("POST", "/v1/route/pick", {"request_id": "p"}, "cluster"),
    ("POST", "/v1/route/pick", {"cluster": "llama"}, "request_id"),
    ("POST", "/v1/route/pick", {"cluster": "llama", "request_id": "p", "prompt_length": -1}, "prompt_length"),
    ("POST", "/v1/route/pick", {"cluster": "llama", "request_id": "p", "prompt_tokens": True}, "prompt_tokens"),
    ("POST", "/v1/route/pick", {"cluster": "llama", "request_id": "p", "prompt_hash": [-1]}, "prompt_hash"),
    ("POST", "/v1/route/pick", {"cluster": "llama", "request_id": "p", "prompt_hash": "1"}, "prompt_hash"),
    ("POST", "/v1/route/pick", {"cluster": "llama", "request_id": "p", "ips": "10.0.0.1"}, "ips"),
    ("POST", "/v1/route/pick", {"cluster": "llama", "request_id": "p", "ips": ["10.0.0.1", "x"]}, "ips"),
    ("POST", "/v1/route/pick", {"cluster": "llama", "request_id": "p", "ips": [1]}, "ips"),
    ("POST", "/v1/route/pick", {"cluster": "llama", "request_id": "p", "ips": ["10.0.0.1"], "lease": ""}, "lease"),
    ("POST", "/v1/route/pick", {"cluster": "llama", "request_id": "p", "ips": ["10.0.0.1"], "lease": 3}, "lease"),
]


@pytest.mark.parametrize("method,path,body,field", BAD,
                         ids=[f"{m} {p} {f} {i}" for i, (m, p, _, f) in enumerate(BAD)])
@pytest_twisted.inlineCallbacks
def test_every_bad_new_field_is_a_400_naming_it_with_state_unchanged(node, method, path, body, field):
    # Some state to leave unchanged: a lease, a booked request, a cache entry.
    yield node.call_json("POST", "/v1/load/stats", add_body("keep", lease="gw"))
    yield node.call_json("POST", "/v1/cache/save", {"cluster": "llama", "ip": "10.0.0.1", "prompt_hash": [1]})
    before = node.snapshot(), node.state.leases()
    r, b = yield node.call_json(method, path, body)
    assert_error(r, b, 400, 40001400, f"'{field}'")
    assert (node.snapshot(), node.state.leases()) == before


@pytest_twisted.inlineCallbacks
def test_metrics_render_the_new_per_engine_series_and_lease_counters(node):
    yield node.call_json("POST", "/v1/load/stats", add_body("r1", prompt_length=INT32, prompt_tokens=INT32, lease="gw"))
    yield node.call_json("POST", "/v1/load/stats", add_body("r2", prompt_length=INT32, prompt_tokens=INT32))
    yield node.call_json("DELETE", "/v1/load/prompt", {"request_id": "r2"})
    yield node.call_json("DELETE", "/v1/load/engine", {"cluster": "llama", "ip": "10.0.0.9"})
    yield node.call_json("POST", "/v1/load/stats", add_body("r3", ip="10.0.0.9"))
    yield node.call_json("DELETE", "/v1/load/engine", {"cluster": "llama", "ip": "10.0.0.9"})
    r, content = yield node.call("GET", "/metrics")
    text = content.decode()
    labels = '{engine_ip="10.0.0.1",model_name="llama"}'
    exact = {"queued_num": 2, "prompt_length": INT32, "metacenter_engine_prefill_requests": 1,
             "metacenter_engine_prefill_tokens": INT32, "metacenter_engine_queued_tokens": 2 * INT32}
    for series, value in exact.items():
        assert f"# TYPE {series} gauge" in text
        assert f"{series}{labels} {floatToGoString(value)}\n" in text, series
    assert "metacenter_leases 1.0" in text
    assert 'metacenter_released_requests_total{reason="reset"} 1.0' in text
    assert 'metacenter_released_requests_total{reason="lease"} 0.0' in text
    assert "metacenter_engine_resets_total 1.0" in text  # an unknown engine's reset changes nothing
    assert "metacenter_lease_expiries_total 0.0" in text
