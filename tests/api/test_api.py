"""The HTTP API in-process: a real Klein resource driven through treq's
StubTreq, with the state on a task.Clock."""

import json

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from harness import Harness
from metacenter.runtime import logs


@pytest.fixture(params=["routed", "klein"])
def node(request):
    return Harness(through_klein=request.param == "klein")


def add_body(request_id="r1", cluster="llama", ip="10.0.0.1", prompt_length=100, **extra):
    body = {"cluster": cluster, "request_id": request_id, "ip": ip, "prompt_length": prompt_length}
    body.update(extra)
    return body


def assert_ok(response, body):
    assert response.code == 200, body
    assert body["status"] == "OK"
    assert body["error"] is None
    assert isinstance(body["trace_id"], str) and body["trace_id"]
    assert response.headers.getRawHeaders("X-Trace-ID") == [body["trace_id"]]
    assert response.headers.getRawHeaders("Content-Type") == ["application/json; charset=utf-8"]


def assert_error(response, body, status, code, reason_contains=""):
    assert response.code == status, body
    assert body["status"] == "ERROR"
    assert body["data"] is None
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert reason_contains in body["error"]["reason"], body["error"]["reason"]
    assert response.headers.getRawHeaders("X-Trace-ID") == [body["trace_id"]]


# -- happy paths ---------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_gateway_request_lifecycle(node):
    r, b = yield node.call_json("POST", "/v1/load/stats", add_body(prompt_length=1200))
    assert_ok(r, b)
    assert b["data"] is None
    r, b = yield node.call_json("GET", "/v1/load/stats?cluster=llama")
    assert_ok(r, b)
    assert b["data"] == [{"ip": "10.0.0.1", "queued_req_num": 1, "prompt_length": 1200,
                          "updated_time": 1_700_000_000 * 10**9, "prefill_req_num": 1, "prefill_tokens": 0,
                          "queued_tokens": 0}]
    # The gateway's prompt delete: its whole struct, no Content-Type.
    r, b = yield node.call_json("DELETE", "/v1/load/prompt", {"request_id": "r1", "cluster": "", "ip": ""})
    assert_ok(r, b)
    r, b = yield node.call_json("GET", "/v1/load/stats?cluster=llama")
    assert [(e["queued_req_num"], e["prompt_length"]) for e in b["data"]] == [(1, 0)]
    r, b = yield node.call_json("DELETE", "/v1/load/stats", {"request_id": "r1", "cluster": "", "ip": ""})
    assert_ok(r, b)
    r, b = yield node.call_json("GET", "/v1/load/stats?cluster=llama")
    assert [(e["queued_req_num"], e["prompt_length"]) for e in b["data"]] == [(0, 0)]


@pytest_twisted.inlineCallbacks
def test_delete_before_add_leaves_no_phantom(node):
    yield node.call_json("DELETE", "/v1/load/stats", {"request_id": "late"})
    r, b = yield node.call_json("POST", "/v1/load/stats", add_body("late"))
    assert_ok(r, b)
    r, b = yield node.call_json("GET", "/v1/load/stats?cluster=llama")
    assert [(e["queued_req_num"], e["prompt_length"]) for e in b["data"]] == [(0, 0)]


@pytest_twisted.inlineCallbacks
def test_duplicate_add_is_idempotent_and_prompt_delete_once(node):
    for _ in range(3):
        r, b = yield node.call_json("POST", "/v1/load/stats", add_body(prompt_length=10))
        assert_ok(r, b)
    for _ in range(2):
        yield node.call_json("DELETE", "/v1/load/prompt", {"request_id": "r1"})
    r, b = yield node.call_json("GET", "/v1/load/stats?cluster=llama")
    assert [(e["queued_req_num"], e["prompt_length"]) for e in b["data"]] == [(1, 0)]


@pytest_twisted.inlineCallbacks
def test_unknown_cluster_is_an_empty_list(node):
    r, b = yield node.call_json("GET", "/v1/load/stats?cluster=nobody")
    assert_ok(r, b)
    assert b["data"] == []


@pytest_twisted.inlineCallbacks
def test_get_body_cache_follows_every_change(node):
    yield node.call_json("POST", "/v1/load/stats", add_body("a", prompt_length=5))
    _, first = yield node.call_json("GET", "/v1/load/stats?cluster=llama")
    _, again = yield node.call_json("GET", "/v1/load/stats?cluster=llama")
    assert first["data"] == again["data"] and first["trace_id"] != again["trace_id"]
    yield node.call_json("POST", "/v1/load/stats", add_body("b", prompt_length=7))
    _, after = yield node.call_json("GET", "/v1/load/stats?cluster=llama")
    assert after["data"][0]["queued_req_num"] == 2 and after["data"][0]["prompt_length"] == 12


@pytest_twisted.inlineCallbacks
def test_ipv6_engines_are_one_engine_shown_as_first_spelled(node):
    # Issue 10: the Go gateway finds engines by the exact string it sent.
    r, b = yield node.call_json("POST", "/v1/load/stats", add_body(ip="2001:DB8:0:0::1"))
    assert_ok(r, b)
    r, b = yield node.call_json("POST", "/v1/load/stats", add_body("r2", ip="2001:db8::1"))
    assert_ok(r, b)
    _, b = yield node.call_json("GET", "/v1/load/stats?cluster=llama")
    assert [(e["ip"], e["queued_req_num"]) for e in b["data"]] == [("2001:DB8:0:0::1", 2)]


@pytest_twisted.inlineCallbacks
def test_trace_id_is_taken_from_the_request(node):
    r, b = yield node.call_json("GET", "/v1/load/stats?cluster=x", headers={"TraceId": "abc-123"})
    assert b["trace_id"] == "abc-123"
    assert r.headers.getRawHeaders("X-Trace-ID") == ["abc-123"]
    r, b = yield node.call_json("POST", "/v1/load/stats", {"cluster": ""}, headers={"TraceId": "t-err"})
    assert b["trace_id"] == "t-err"


@pytest_twisted.inlineCallbacks
def test_unknown_fields_are_ignored(node):
    r, b = yield node.call_json("POST", "/v1/load/stats", add_body(model="x", extra={"a": 1}))
    assert_ok(r, b)
    assert node.state.request_count == 1


@pytest_twisted.inlineCallbacks
def test_client_events_are_stamped_and_published(node):
    yield node.call_json("POST", "/v1/load/stats", add_body(), headers={"TraceId": "t1"})
    yield node.call_json("POST", "/v1/load/stats", add_body("r2", timestamp=1_699_999_999_000_000_000))
    (event_type, event, trace_id), (_, event2, _) = node.events
    assert event_type == "load.stats.set" and trace_id == "t1"
    assert event.timestamp == 1_700_000_000 * 10**9
    assert event2.timestamp == 1_699_999_999_000_000_000


@pytest_twisted.inlineCallbacks
def test_overview_and_status(node):
    yield node.call_json("POST", "/v1/load/stats", add_body("a", cluster="m1"))
    yield node.call_json("POST", "/v1/load/stats", add_body("b", cluster="m2", ip="10.0.0.2"))
    r, b = yield node.call_json("GET", "/v1/load/overview")
    assert_ok(r, b)
    assert sorted(c["cluster"] for c in b["data"]["clusters"]) == ["m1", "m2"]
    r, b = yield node.call_json("GET", "/v1/node/status")
    assert_ok(r, b)
    data = b["data"]
    assert (data["requests"], data["engines"], data["clusters"], data["ready"]) == (2, 2, 2, True)
    assert set(data["digest"]) == {"m1", "m2"} and data["digest"]["m1"]["live"] == 1


@pytest_twisted.inlineCallbacks
def test_health_endpoints(node):
    r, b = yield node.call_json("GET", "/livez")
    assert_ok(r, b)
    r, b = yield node.call_json("GET", "/readyz")
    assert_ok(r, b)
    node.node.readiness.hold("warm start in progress")
    r, b = yield node.call_json("GET", "/readyz")
    assert_error(r, b, 503, 50301503, "warm start")


@pytest_twisted.inlineCallbacks
def test_openapi_document_is_served(node):
    r, b = yield node.call_json("GET", "/openapi.json")
    assert r.code == 200
    assert b["openapi"].startswith("3.1")


# -- bad inputs: status, code, reason naming the field, state unchanged --------

BAD_ADDS = [
    (b"{not json", "malformed JSON"),
    (b"", "empty"),
    (b"   ", "empty"),
    (b"[]", "expected a JSON object"),
    (b'"text"', "expected a JSON object"),
    (b"\xff\xfe", "UTF-8"),
    (b"\xef\xbb\xbf" + json.dumps(add_body()).encode(), "byte order mark"),
    (json.dumps({"request_id": "x", "ip": "10.0.0.1"}).encode(), "'cluster' is required"),
    (json.dumps(add_body(cluster="")).encode(), "'cluster' must not be empty"),
    (json.dumps(add_body(cluster=5)).encode(), "'cluster' must be a string"),
    (json.dumps(add_body(request_id="")).encode(), "'request_id' must not be empty"),
    (json.dumps({"cluster": "c", "ip": "10.0.0.1"}).encode(), "'request_id' is required"),
    (json.dumps(add_body(request_id=["x"])).encode(), "'request_id' must be a string"),
    (json.dumps({"cluster": "c", "request_id": "x"}).encode(), "'ip' is required"),
    (json.dumps(add_body(ip="")).encode(), "'ip' must not be empty"),
    (json.dumps(add_body(ip="invalid")).encode(), "'ip' must be an IPv4 or IPv6 address"),
    (json.dumps(add_body(ip="10.0.0.256")).encode(), "'ip' must be an IPv4 or IPv6 address"),
    (json.dumps(add_body(ip=167772161)).encode(), "'ip' must be a string"),
    (json.dumps(add_body(prompt_length=-1)).encode(), "'prompt_length' must be an integer in [0, 2147483647], got -1"),
    (json.dumps(add_body(prompt_length=1.5)).encode(), "'prompt_length' must be an integer"),
    (json.dumps(add_body(prompt_length=10.0)).encode(), "'prompt_length' must be an integer"),
    (json.dumps(add_body(prompt_length="10")).encode(), "got string"),
    (json.dumps(add_body(prompt_length=True)).encode(), "got boolean"),
    (json.dumps(add_body(prompt_length=2**31)).encode(), "got 2147483648"),
    (json.dumps(add_body(prompt_length=10**30)).encode(), "'prompt_length'"),
    (json.dumps(add_body(timestamp="now")).encode(), "'timestamp' must be an integer"),
    (json.dumps(add_body(timestamp=-5)).encode(), "'timestamp'"),
]


@pytest.mark.parametrize("raw,reason", BAD_ADDS)
@pytest_twisted.inlineCallbacks
def test_bad_add_is_rejected_and_changes_nothing(node, raw, reason):
    yield node.call_json("POST", "/v1/load/stats", add_body("existing"))
    before = node.snapshot()
    r, b = yield node.call_json("POST", "/v1/load/stats", raw=raw)
    assert_error(r, b, 400, 40001400, reason)
    assert node.snapshot() == before


@pytest.mark.parametrize("path", ["/v1/load/stats", "/v1/load/prompt"])
@pytest.mark.parametrize("raw,reason", [
    (b"", "empty"),
    (b"{", "malformed JSON"),
    (b"{}", "'request_id' is required"),
    (b'{"request_id": ""}', "'request_id' must not be empty"),
    (b'{"request_id": 7}', "'request_id' must be a string, got number"),
    (b'{"request_id": null}', "'request_id' is required"),
    (b'{"request_id": "x", "timestamp": 1.5}', "'timestamp' must be an integer"),
])
@pytest_twisted.inlineCallbacks
def test_bad_delete_is_rejected_and_changes_nothing(node, path, raw, reason):
    yield node.call_json("POST", "/v1/load/stats", add_body("existing"))
    before = node.snapshot()
    r, b = yield node.call_json("DELETE", path, raw=raw)
    assert_error(r, b, 400, 40001400, reason)
    assert node.snapshot() == before


@pytest_twisted.inlineCallbacks
def test_invalid_json_message_class(node):
    r, b = yield node.call_json("POST", "/v1/load/stats", raw=b"{oops")
    assert b["error"]["message"] == "Invalid input parameters: invalid JSON format"
    r, b = yield node.call_json("POST", "/v1/load/stats", add_body(ip="nope"))
    assert b["error"]["message"] == "Invalid input parameters"


@pytest.mark.parametrize("query", ["", "?cluster=", "?other=x"])
@pytest_twisted.inlineCallbacks
def test_query_without_cluster_is_400(node, query):
    r, b = yield node.call_json("GET", "/v1/load/stats" + query)
    assert_error(r, b, 400, 40001400, "'cluster'")


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/load", "/v1/load/stats/extra", "/v2/load/stats"])
@pytest_twisted.inlineCallbacks
def test_unknown_route_is_404_in_envelope(node, path):
    before = node.snapshot()
    r, b = yield node.call_json("POST", path, add_body())
    assert_error(r, b, 404, 40001404, path)
    assert node.snapshot() == before


@pytest.mark.parametrize("method,path,allowed", [
    ("PUT", "/v1/load/stats", "DELETE, GET, HEAD, POST"),
    ("GET", "/v1/load/prompt", "DELETE"),
    ("POST", "/v1/load/prompt", "DELETE"),
    ("GET", "/log/level", "POST"),
    ("DELETE", "/metrics", "GET, HEAD"),
])
@pytest_twisted.inlineCallbacks
def test_wrong_method_is_405_with_allow(node, method, path, allowed):
    before = node.snapshot()
    r, b = yield node.call_json(method, path, add_body())
    assert_error(r, b, 405, 40001405, allowed)
    assert r.headers.getRawHeaders("Allow") == [allowed]
    assert node.snapshot() == before


# -- operations ------------------------------------------------------------------


@pytest.fixture
def restore_log_level():
    yield
    logs.set_level("INFO")


@pytest.mark.parametrize("body", [
    {"LevelParam": "VERBOSE"}, {"LevelParam": "debug"}, {"LevelParam": 3}, {}, {"level": "INFO"}, "not json",
])
@pytest_twisted.inlineCallbacks
def test_unknown_log_level_is_400(node, body, restore_log_level):
    raw = body.encode() if isinstance(body, str) else None
    r, b = yield node.call_json("POST", "/log/level", None if raw else body, raw=raw)
    assert_error(r, b, 400, 40001400, "log LevelParam can only be [TRACE DEBUG INFO WARN ERROR FATAL]")
    assert logs.current_level() == "INFO"


@pytest_twisted.inlineCallbacks
def test_log_level_changes_what_is_emitted(node, restore_log_level):
    seen = []
    observer = lambda event: seen.append(event.get("log_format"))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        r, b = yield node.call_json("POST", "/log/level", {"LevelParam": "ERROR"})
        assert_ok(r, b)
        assert b["data"] == "log level updated successfully"
        logs.logger("metacenter.test").info("hidden {n}", n=1)
        logs.logger("metacenter.test").error("shown {n}", n=2)
        r, b = yield node.call_json("POST", "/log/level", {"LevelParam": "DEBUG"})
        logs.logger("metacenter.test").debug("debug now shown {n}", n=3)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert "hidden {n}" not in seen
    assert "shown {n}" in seen and "debug now shown {n}" in seen


@pytest_twisted.inlineCallbacks
def test_metrics_count_real_statuses_and_follow_expiry():
    node = Harness(request_expire=60)
    yield node.call_json("POST", "/v1/load/stats", add_body("a", cluster="m", prompt_length=42))
    yield node.call_json("POST", "/v1/load/stats", add_body(ip="bad"))
    yield node.call_json("GET", "/nowhere")
    r, text = yield node.call("GET", "/metrics")
    assert r.code == 200
    assert r.headers.getRawHeaders("Content-Type")[0].startswith("text/plain")
    text = text.decode()
    assert 'http_request_status_code_total{method="POST",status_code="200",url="/v1/load/stats"} 1.0' in text
    assert 'http_request_status_code_total{method="POST",status_code="400",url="/v1/load/stats"} 1.0' in text
    assert 'http_request_status_code_total{method="GET",status_code="404",url="unmatched"} 1.0' in text
    assert 'http_request_duration_us_bucket{le="50.0",method="POST",url="/v1/load/stats"}' in text
    assert 'model_engine_count{model_name="m"} 1.0' in text
    assert 'queued_num{engine_ip="10.0.0.1",model_name="m"} 1.0' in text
    assert 'prompt_length{engine_ip="10.0.0.1",model_name="m"} 42.0' in text
    assert "metacenter_node_alive 1.0" in text
    assert 'app_version_info{version="' in text
    assert "metacenter_inflight_requests 1.0" in text
    assert "process_resident_memory_bytes" in text
    assert "replication_latency_ms_bucket" in text
    node.clock.advance(61)
    node.state.expire_all()
    _, text = yield node.call("GET", "/metrics")
    text = text.decode()
    assert 'model_engine_count{model_name="m"}' not in text
    assert 'queued_num{engine_ip="10.0.0.1"' not in text
    assert "metacenter_inflight_requests 0.0" in text
