"""``endpoint``'s options: ``peer`` (401 unless signed with the cluster
secret, refusals logged at most once a minute) and ``ready`` (503 while the
node is not ready) in-process through StubTreq on a task.Clock, over both
resources (RoutingResource and Klein's own); ``stream`` (NDJSON; 413, the
trace id, metrics and errors before the first line like any route) through
the real site on loopback, since a stream is written under the connection's
back-pressure, which StubTreq's in-memory transport never exerts."""

import json

import pytest
import pytest_twisted
import treq
from klein import Klein
from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.web.client import ResponseFailed

from harness import Harness
from metacenter.api.endpoint import endpoint, register_routes, routes_of
from metacenter.api.server import MetacenterAPI
from metacenter.api.site import MetacenterSite
from metacenter.cluster import auth
from metacenter.core.errors import InvalidInput

SECRET = "endpoint-test-secret"


def routes(option):
    """(method, path) of every route registered with ``option`` set, from
    the app's own table."""
    found = set()
    for _, handler in routes_of(MetacenterAPI):
        if getattr(handler.route, option):
            found.update((method, handler.route.url) for method in handler.route.methods)
    return found


PEER_ROUTES = routes("peer")
READY_ROUTES = routes("ready")
STREAM_ROUTES = routes("stream")

# A body each peer route accepts (and the header the reference's event needs).
VALID = {
    "/v1/replica/event": (b'{"cluster":"c","request_id":"r1","ip":"10.0.0.1"}', {"Event-Type": "load.stats.set"}),
    "/v1/replica/batch": (b'{"events":[]}', {}),
    "/v1/replica/digest": (b"", {}),
    "/v1/replica/buckets": (b'{"clusters":["c"]}', {}),
    "/v1/replica/repair": (b'{"records":[],"tombstones":[]}', {}),
    "/v1/replica/snapshot": (b"", {}),
    "/v1/replica/records": (b'{"clusters":["c"]}', {}),
}


def test_the_options_cover_the_routes_they_must():
    assert PEER_ROUTES == {(m, p) for m, p in all_routes() if p.startswith("/v1/replica/")}
    assert set(VALID) == {p for _, p in PEER_ROUTES}
    assert READY_ROUTES == PEER_ROUTES - {("POST", "/v1/replica/event"), ("POST", "/v1/replica/batch")}
    assert STREAM_ROUTES == {("GET", "/v1/replica/snapshot"), ("POST", "/v1/replica/records")}


def all_routes():
    return {(m, rule.rule) for rule in MetacenterAPI.app.url_map.iter_rules() for m in rule.methods if m != "HEAD"}


class Node(Harness):
    """A Harness with a cluster secret."""

    def __init__(self, through_klein):
        super().__init__(through_klein=through_klein)
        self.api.peer_auth = auth.PeerAuthenticator(SECRET, self.clock)


@pytest.fixture(params=["routed", "klein"])
def node(request):
    return Node(through_klein=request.param == "klein")


def signed(method, path, body, secret=SECRET, now=None, node=None):
    return auth.sign(secret, method, path, body, node.clock.seconds() if now is None else now)


def assert_envelope_error(response, content, status, code, trace_id):
    answer = json.loads(content)
    assert response.code == status, answer
    assert answer["status"] == "ERROR" and answer["data"] is None, answer
    assert answer["error"]["code"] == code, answer
    assert answer["trace_id"] == trace_id
    assert response.headers.getRawHeaders("X-Trace-ID") == [trace_id]
    assert response.headers.getRawHeaders("Content-Type") == ["application/json; charset=utf-8"]
    return answer["error"]["reason"]


# -- peer=True ------------------------------------------------------------------------


@pytest.mark.parametrize("method,path", sorted(PEER_ROUTES))
@pytest_twisted.inlineCallbacks
def test_every_peer_route_refuses_unsigned_and_badly_signed_requests(node, method, path):
    body, extra = VALID[path]
    before = node.snapshot()
    attempts = {
        "unsigned": {},
        "another secret": signed(method, path, body, secret="another-secret", node=node),
        "another body": signed(method, path, body + b" ", node=node),
        "another path": signed(method, path + "?x=1", body, node=node),
        "too old": signed(method, path, body, now=node.clock.seconds() - 31, node=node),
        "garbage": {auth.SIGNATURE_HEADER: "zz", auth.TIMESTAMP_HEADER: "now"},
    }
    for name, headers in attempts.items():
        response, content = yield node.call(method, path, raw=body or None,
                                            headers={**extra, **headers, "TraceId": f"t-{name}"})
        reason = assert_envelope_error(response, content, 401, 40101001, f"t-{name}")
        assert reason, name
    assert node.snapshot() == before
    if (method, path) not in STREAM_ROUTES:  # served signed: see test_signed_streams_are_served
        response, content = yield node.call(method, path, raw=body or None,
                                            headers={**extra, **signed(method, path, body, node=node)})
        assert response.code == 200, content


@pytest_twisted.inlineCallbacks
def test_without_a_secret_peer_routes_take_unsigned_requests(node):
    node.api.peer_auth = None
    for method, path in sorted(PEER_ROUTES - STREAM_ROUTES):
        body, extra = VALID[path]
        response, content = yield node.call(method, path, raw=body or None, headers=extra)
        assert response.code == 200, (path, content)


@pytest_twisted.inlineCallbacks
def test_refused_peer_requests_are_logged_at_most_once_a_minute(node):
    lines = []
    globalLogPublisher.addObserver(lines.append)
    try:
        for _ in range(3):
            yield node.call("POST", "/v1/replica/batch", raw=b'{"events":[]}')
        node.clock.advance(60)
        yield node.call("GET", "/v1/replica/digest")
    finally:
        globalLogPublisher.removeObserver(lines.append)
    refused = [e for e in lines if e.get("log_format", "").startswith("refused a peer request")]
    assert [e["path"] for e in refused] == ["/v1/replica/batch", "/v1/replica/digest"]
    assert "missing X-Metacenter-Signature" in refused[0]["refusal"]


# -- ready=True -----------------------------------------------------------------------


def not_ready(harness, reason):
    # The node's readiness as the warm start sets it.
    harness.node.readiness.hold(reason)


@pytest.mark.parametrize("method,path", sorted(READY_ROUTES))
@pytest_twisted.inlineCallbacks
def test_every_ready_gated_route_is_503_while_the_node_is_not_ready(node, method, path):
    body, extra = VALID[path]
    not_ready(node, "warm start from 10.0.0.9:8080 in progress")
    before = node.snapshot()
    response, content = yield node.call(method, path, raw=body or None,
                                        headers={**extra, **signed(method, path, body, node=node), "TraceId": "t"})
    reason = assert_envelope_error(response, content, 503, 50301503, "t")
    assert reason == "warm start from 10.0.0.9:8080 in progress"
    assert node.snapshot() == before
    # Authentication comes first: an outsider learns nothing of our state.
    response, content = yield node.call(method, path, raw=body or None, headers={**extra, "TraceId": "t"})
    assert_envelope_error(response, content, 401, 40101001, "t")


@pytest.mark.parametrize("method,path", sorted(PEER_ROUTES - READY_ROUTES))
@pytest_twisted.inlineCallbacks
def test_replicated_events_are_taken_while_not_ready(node, method, path):
    # Events arriving during a warm start merge with the snapshot.
    body, extra = VALID[path]
    not_ready(node, "warm start")
    response, content = yield node.call(method, path, raw=body or None,
                                        headers={**extra, **signed(method, path, body, node=node)})
    assert response.code == 200, content


# -- stream=True ----------------------------------------------------------------------

MAX_BODY = 64


class Served:
    """A Harness's API behind the real site (MetacenterSite, BoundedRequest
    with a ``MAX_BODY`` limit) on a loopback port, called with treq."""

    def __init__(self, api_class=MetacenterAPI, secret=SECRET):
        self.harness = Harness()
        self.api = api_class(self.harness.node, self.harness.metrics,
                             peer_auth=auth.PeerAuthenticator(secret, self.harness.clock) if secret else None)
        self.port = reactor.listenTCP(0, MetacenterSite(self.api.resource(), max_body=MAX_BODY),
                                      interface="127.0.0.1")

    def call(self, method, path, raw=b"", headers=None, sign=True):
        headers = dict(headers or {})
        if sign:
            headers.update(auth.sign(SECRET, method, path, raw, self.harness.clock.seconds()))
        url = f"http://127.0.0.1:{self.port.getHost().port}{path}"
        d = treq.request(method, url, data=raw or None, headers=headers, persistent=False)
        return d.addCallback(lambda response: treq.content(response).addCallback(lambda c: (response, c)))

    def close(self):
        return self.port.stopListening()


def http_count(harness, url, method, status):
    family = next(harness.metrics.http_status.collect())
    return sum(s.value for s in family.samples
               if s.labels == {"url": url, "method": method, "status_code": str(status)})


@pytest.mark.parametrize("method,path", sorted(STREAM_ROUTES))
@pytest_twisted.inlineCallbacks
def test_signed_streams_are_served_as_ndjson_with_the_trace_id_and_counted(method, path):
    served = Served()
    try:
        served.harness.state.add("c", "r1", "10.0.0.1", 5)
        body, _ = VALID[path]
        response, content = yield served.call(method, path, body, {"TraceId": "t-stream"})
        assert response.code == 200, content
        assert response.headers.getRawHeaders("Content-Type") == ["application/x-ndjson"]
        assert response.headers.getRawHeaders("X-Trace-ID") == ["t-stream"]
        lines = [json.loads(line) for line in content.splitlines()]
        assert lines[0]["snapshot"] == 1 and lines[-1]["end"] is True and lines[-1]["requests"] == 1
        # A snapshot's records carry prompt_tokens and lease; anti-entropy's do not.
        record = ["r", "r1", "c", "10.0.0.1", 5, 0, 1_700_000_000]
        assert (record + [0, None] if path.endswith("snapshot") else record) in lines
        assert http_count(served.harness, path, method, 200) == 1
        # Unsigned: refused before a line is written.
        response, content = yield served.call(method, path, body, {"TraceId": "t-401"}, sign=False)
        assert_envelope_error(response, content, 401, 40101001, "t-401")
        assert http_count(served.harness, path, method, 401) == 1
    finally:
        yield served.close()


@pytest.mark.parametrize("method,path", sorted(STREAM_ROUTES))
@pytest_twisted.inlineCallbacks
def test_an_oversized_body_to_a_stream_is_413_in_the_envelope(method, path):
    served = Served()
    try:
        raw = json.dumps({"clusters": ["c" * 100]}).encode()
        response, content = yield served.call(method, path, raw, {"TraceId": "t-big"})
        reason = assert_envelope_error(response, content, 413, 40001413, "t-big")
        assert f"{MAX_BODY} bytes" in reason
        assert http_count(served.harness, path, method, 413) == 1
    finally:
        yield served.close()


@pytest_twisted.inlineCallbacks
def test_a_stream_request_refused_before_the_first_line_is_answered_in_the_envelope():
    served = Served()
    try:
        raw = b'{"clusters":["c"],"buckets":{"c":[256]}}'
        response, content = yield served.call("POST", "/v1/replica/records", raw, {"TraceId": "t-bad"})
        reason = assert_envelope_error(response, content, 400, 40001400, "t-bad")
        assert "field 'buckets'" in reason
        assert http_count(served.harness, "/v1/replica/records", "POST", 400) == 1
        not_ready(served.harness, "warm start")
        response, content = yield served.call("GET", "/v1/replica/snapshot", b"", {"TraceId": "t-503"})
        assert assert_envelope_error(response, content, 503, 50301503, "t-503") == "warm start"
    finally:
        yield served.close()


@register_routes
class FailingStreams(MetacenterAPI):
    """The real API plus streams whose producer fails at a chosen point."""

    app = Klein()

    @endpoint("/test/invalid-first", ["GET"], stream=True)
    def invalid_first(self, request, trace_id):
        raise InvalidInput("field 'x' is wrong")
        yield b"never\n"

    @endpoint("/test/bug-first", ["GET"], stream=True)
    def bug_first(self, request, trace_id):
        raise RuntimeError("a bug before the first line")
        yield b"never\n"

    @endpoint("/test/bug-later", ["GET"], stream=True)
    def bug_later(self, request, trace_id):
        yield b'{"first":true}\n'
        raise RuntimeError("a bug after the first line")


@pytest_twisted.inlineCallbacks
def test_an_error_in_the_generator_before_its_first_line_is_an_envelope_answer():
    served = Served(FailingStreams, secret="")
    lines = []
    globalLogPublisher.addObserver(lines.append)
    try:
        response, content = yield served.call("GET", "/test/invalid-first", headers={"TraceId": "t1"}, sign=False)
        assert assert_envelope_error(response, content, 400, 40001400, "t1") == "field 'x' is wrong"
        response, content = yield served.call("GET", "/test/bug-first", headers={"TraceId": "t2"}, sign=False)
        assert_envelope_error(response, content, 500, 50001000, "t2")
    finally:
        globalLogPublisher.removeObserver(lines.append)
        yield served.close()
    assert any("bug before" in str(getattr(e.get("log_failure"), "value", "")) for e in lines)


@pytest_twisted.inlineCallbacks
def test_an_error_after_the_first_line_breaks_the_stream():
    served = Served(FailingStreams, secret="")
    lines = []
    globalLogPublisher.addObserver(lines.append)
    try:
        with pytest.raises(ResponseFailed):
            yield served.call("GET", "/test/bug-later", sign=False)
    finally:
        globalLogPublisher.removeObserver(lines.append)
        yield served.close()
    assert any(e.get("log_format") == "streaming {url} failed" for e in lines)
