"""The HTTP server's edges (api/site.py) and the bodies over the whole state
(api/views.py): slow clients, idle keep-alive, the connection cap, 413 before
the body, quiet HEAD, and big bodies built while other requests are served.

The Site and its channels run on a ``task.Clock`` over ``StringTransport``s
(Twisted's own timeout machinery, driven by the clock); the 413 test uses a
real socket on loopback.
"""

import json
import socket

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from harness import Turns, http_responses
from metacenter.api.server import MetacenterAPI
from metacenter.api.site import MetacenterSite
from metacenter.api.views import Views
from metacenter.runtime.node import build_node
from metacenter.runtime.turns import _one_step


class Server:
    """A node's Site on a task.Clock; ``connect()`` gives a client connection
    over a StringTransport."""

    def __init__(self, budget=None, **site_options):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.node = build_node(self.clock)
        self.turns = Turns()
        self.node.cooperate = task.Cooperator(scheduler=self.turns.schedule,
                                              terminationPredicateFactory=_one_step).cooperate
        self.metrics = self.node.metrics
        self.api = MetacenterAPI(self.node, self.metrics)
        if budget is not None:
            self.api.views = Views(self.node, self.metrics, self.api.load_bodies, budget=budget)
        self.site = MetacenterSite(self.api.resource(), max_body=65536, reactor=self.clock, metrics=self.metrics,
                                   **site_options)

    def connect(self):
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        channel.makeConnection(transport)
        return channel, transport

    def sample(self, name, labels=None):
        return self.metrics.registry.get_sample_value(name, labels or {})


def request(method, path, body=None, headers=()):
    lines = [f"{method} {path} HTTP/1.1", "Host: node"]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines.extend(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def responses(raw):
    """Complete HTTP responses in ``raw``: [(status, headers dict, body)]."""
    return http_responses(raw)



ADD = json.dumps({"cluster": "c", "request_id": "r1", "ip": "10.0.0.1", "prompt_length": 5}).encode()


# -- slow clients --------------------------------------------------------------


def test_a_client_whose_headers_do_not_arrive_in_time_is_dropped():
    server = Server(request_deadline=30.0)
    channel, transport = server.connect()
    channel.dataReceived(b"POST /v1/load/stats HTTP/1.1\r\nHost: node\r\n")
    # A byte now and then restarts Twisted's idle timer, not the deadline.
    for _ in range(2):
        server.clock.advance(14)
        channel.dataReceived(b"X")
    assert not transport.disconnecting
    server.clock.advance(2.1)
    assert transport.disconnecting and transport.disconnected  # aborted
    assert transport.value() == b""  # nothing was answered
    assert server.sample("metacenter_http_connections_dropped_total", {"reason": "slow_request"}) == 1
    assert server.node.state.request_count == 0


def test_a_client_whose_body_does_not_arrive_in_time_is_dropped():
    server = Server(request_deadline=30.0)
    channel, transport = server.connect()
    channel.dataReceived(request("POST", "/v1/load/stats", ADD)[:-10])  # all but the body's last 10 bytes
    for _ in range(5):
        server.clock.advance(5.9)
        channel.dataReceived(b" ")  # one byte at a time, never the whole body
    assert not transport.disconnecting
    server.clock.advance(1)
    assert transport.disconnected
    assert server.sample("metacenter_http_connections_dropped_total", {"reason": "slow_request"}) == 1
    assert server.node.state.request_count == 0


def test_requests_within_the_deadline_each_get_their_own():
    server = Server(request_deadline=30.0)
    channel, transport = server.connect()
    for i in range(3):
        server.clock.advance(25)  # idle between requests: not part of any deadline
        data = request("POST", "/v1/load/stats", json.dumps(
            {"cluster": "c", "request_id": f"r{i}", "ip": "10.0.0.1"}).encode())
        channel.dataReceived(data[:20])
        server.clock.advance(25)  # slow, but within 30 s
        channel.dataReceived(data[20:])
    assert [r[0] for r in responses(transport.value())] == [200, 200, 200]
    assert not transport.disconnecting
    assert server.node.state.request_count == 3
    assert server.sample("metacenter_http_connections_dropped_total", {"reason": "slow_request"}) == 0


def test_an_idle_keepalive_connection_outlives_the_gateways_five_minute_pool():
    server = Server()  # the default idle timeout
    channel, transport = server.connect()
    channel.dataReceived(request("POST", "/v1/load/stats", ADD))
    for _ in range(300):
        server.clock.advance(1)
    assert not transport.disconnecting  # 5 minutes idle: still open
    channel.dataReceived(request("GET", "/v1/load/stats?cluster=c"))
    answers = responses(transport.value())
    assert [a[0] for a in answers] == [200, 200]
    assert json.loads(answers[1][2])["data"][0]["queued_req_num"] == 1
    server.clock.advance(359)
    assert not transport.disconnecting
    server.clock.advance(1.1)  # 6 minutes idle: closed
    assert transport.disconnecting
    assert server.sample("metacenter_http_connections_dropped_total", {"reason": "idle"}) == 1


# -- the connection cap ----------------------------------------------------------


def test_connections_over_the_cap_are_refused_with_a_503_in_the_envelope():
    server = Server(max_connections=2)
    first, second = server.connect(), server.connect()
    assert server.sample("metacenter_http_connections") == 2
    refused = server.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    transport = StringTransport()
    refused.makeConnection(transport)
    (status, headers, body), = responses(transport.value())
    assert status == 503 and headers["connection"] == "close"
    answer = json.loads(body)
    assert answer["status"] == "ERROR" and "--max-connections" in answer["error"]["reason"]
    assert transport.disconnecting
    assert server.sample("metacenter_http_connections_refused_total") == 1
    # One closes: the next one is served.
    first[0].connectionLost(None)
    assert server.sample("metacenter_http_connections") == 1
    channel, transport = server.connect()
    channel.dataReceived(request("GET", "/livez"))
    assert responses(transport.value())[0][0] == 200


# -- HEAD, 413 -------------------------------------------------------------------


@pytest.fixture
def log_events():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.mark.parametrize("path", ["/livez", "/metrics", "/v1/load/overview", "/nowhere"])
def test_head_is_answered_without_a_body_and_leaves_nothing_in_the_log(path, log_events):
    server = Server()
    channel, transport = server.connect()
    channel.dataReceived(request("HEAD", path) + request("GET", "/livez"))
    while server.turns.run():  # a render that took more than its first step (a loaded machine)
        pass
    raw = transport.value()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404" if path == "/nowhere" else b"HTTP/1.1 200")
    if path != "/nowhere":  # Klein answers unknown paths later, without a length: fine for HEAD
        assert b"Content-Length: " in head
    assert rest.startswith(b"HTTP/1.1 200")  # no body after HEAD's headers: the next answer follows
    assert log_events == []


@pytest_twisted.inlineCallbacks
def test_a_declared_body_over_the_limit_gets_413_at_once_without_100_continue():
    """Over a real socket: the headers say 10 MB; the answer comes before any
    of the body is sent, and is not preceded by 100 Continue."""
    node = build_node(reactor)
    api = MetacenterAPI(node, node.metrics)
    site = MetacenterSite(api.resource(), max_body=65536, metrics=node.metrics)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        def client():
            with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5) as s:
                s.sendall(b"POST /v1/load/stats HTTP/1.1\r\nHost: node\r\nContent-Length: 10000000\r\n"
                          b"Expect: 100-continue\r\n\r\n")
                raw = b""
                while chunk := s.recv(65536):  # the node closes after its answer
                    raw += chunk
                return raw

        raw = yield threads.deferToThread(client)
    finally:
        yield port.stopListening()
    assert b"100 Continue" not in raw
    (status, headers, body), = responses(raw)
    assert status == 413 and headers["connection"] == "close"
    answer = json.loads(body)
    assert answer["error"]["code"] == 40001413 and "65536 bytes" in answer["error"]["reason"]
    assert node.state.request_count == 0


def test_a_declared_body_over_the_limit_is_never_read():
    server = Server()
    channel, transport = server.connect()
    channel.dataReceived(b"POST /v1/load/stats HTTP/1.1\r\nHost: node\r\nContent-Length: 500000000\r\n\r\n")
    (status, _, _), = responses(transport.value())
    assert status == 413
    answered = len(transport.value())
    request_object = channel.requests[0] if channel.requests else None
    channel.dataReceived(b"x" * 1_000_000)  # the body arrives anyway: dropped, not kept
    assert request_object is None or request_object.content.tell() == 0
    assert len(transport.value()) == answered  # no second answer: the "body" is not a request
    assert server.node.state.request_count == 0


def test_an_integer_over_the_digit_limit_gets_a_reason_naming_the_field():
    server = Server()
    channel, transport = server.connect()
    too_long = b'{"cluster":"c","request_id":"r","ip":"10.0.0.1","prompt_length":' + b"9" * 5000 + b"}"
    hashes = b'{"cluster":"c","ip":"10.0.0.1","prompt_hash":[1,' + b"7" * 4301 + b"]}"
    channel.dataReceived(request("POST", "/v1/load/stats", too_long) + request("POST", "/v1/cache/save", hashes))
    first, second = responses(transport.value())
    for (status, _, body), reason in ((first, "field 'prompt_length' has 5000 digits"),
                                      (second, "field 'prompt_hash' item 1 has 4301 digits")):
        answer = json.loads(body)
        assert status == 400 and answer["error"]["code"] == 40001400
        assert answer["error"]["reason"].startswith(reason)
        assert "sys." not in answer["error"]["reason"] and "set_int" not in answer["error"]["reason"]
    assert server.node.state.request_count == 0 and server.node.cache.block_count == 0


# -- bodies over the whole state, while other requests are served ------------------


@pytest.mark.parametrize("path, marker", [("/metrics", b'model_engine_count{model_name="m'),
                                          ("/v1/load/overview", b'{"cluster":"m'),
                                          ("/v1/node/status", b'"m')])
def test_a_big_body_is_built_over_reactor_turns_while_other_requests_are_served(path, marker):
    # Budget 0: a step is the smallest slice (32 items), whatever the machine's speed.
    server = Server(budget=0)
    for i in range(3000):
        server.node.state.add(f"m{i}", f"r{i}", "10.0.0.1", 1)
    poll, poll_transport = server.connect()
    gateway, gateway_transport = server.connect()
    poll.dataReceived(request("GET", path))
    assert responses(poll_transport.value()) == []  # not done in the turn it arrived
    served, turns = 0, 0
    while not responses(poll_transport.value()):
        # Between two slices of the body, a gateway's request is answered.
        gateway.dataReceived(request("POST", "/v1/load/stats", json.dumps(
            {"cluster": "live", "request_id": f"g{turns}", "ip": "10.0.0.9"}).encode()))
        served = len(responses(gateway_transport.value()))
        assert served == turns + 1
        assert server.turns.run()
        turns += 1
    assert turns > 10 and served == turns
    (status, _, body), = responses(poll_transport.value())
    assert status == 200
    # Every cluster that existed when the poll arrived is in its answer.
    assert body.count(marker) >= 3000
    if path != "/metrics":
        json.loads(body)


def test_polls_arriving_during_a_build_share_it():
    server = Server(budget=0)
    for i in range(1000):
        server.node.state.add(f"m{i}", f"r{i}", "10.0.0.1", 1)
    first, first_transport = server.connect()
    second, second_transport = server.connect()
    first.dataReceived(request("GET", "/v1/load/overview"))
    second.dataReceived(request("GET", "/v1/load/overview"))
    while server.turns.run():
        pass
    assert server.api.views.overview.builds == 1
    a, b = responses(first_transport.value())[0][2], responses(second_transport.value())[0][2]
    assert json.loads(a)["data"] == json.loads(b)["data"]


LOAD_SERIES = ("model_engine_count", "queued_num", "prompt_length")


def prometheus_client_lines(state):
    """The per-engine series as prometheus-client itself renders them."""

    class Collector:
        def collect(self):
            families = [GaugeMetricFamily(n, "-", labels=labels) for n, labels in
                        (("model_engine_count", ["model_name"]), ("queued_num", ["model_name", "engine_ip"]),
                         ("prompt_length", ["model_name", "engine_ip"]))]
            for name, cluster in state.clusters.items():
                families[0].add_metric([name], len(cluster.engines))
                for ip, engine in cluster.engines.items():
                    families[1].add_metric([name, ip], engine.queued)
                    families[2].add_metric([name, ip], engine.prompt)
            return families

    registry = CollectorRegistry()
    registry.register(Collector())
    return [line for line in generate_latest(registry).decode().splitlines() if not line.startswith("#")]


def test_overview_metrics_and_status_agree_with_the_state_after_changes():
    """The caches by version follow every change (engines added, counters
    moved, clusters expired)."""
    server = Server(budget=0)
    state = server.node.state
    for i in range(100):
        state.add(f"m{i % 10}", f"r{i}", f"10.0.0.{i % 7}", i)

    def get(path):
        channel, transport = server.connect()
        channel.dataReceived(request("GET", path))
        while server.turns.run():
            pass
        return responses(transport.value())[0][2]

    def check():
        overview = json.loads(get("/v1/load/overview"))["data"]["clusters"]
        assert {c["cluster"]: c["engines"] for c in overview} == {n: state.cluster_load(n) for n in state.clusters}
        status = json.loads(get("/v1/node/status"))["data"]
        # The same answer as Node.status() would give in one go (a field added there must be added here).
        expected = json.loads(json.dumps(server.node.status()))
        assert {k: v for k, v in status.items() if k in expected} == expected
        text = get("/metrics").decode()
        expected = prometheus_client_lines(state)
        assert [line for line in text.splitlines() if line.split("{")[0] in LOAD_SERIES] == expected

    check()
    for i in range(0, 100, 3):
        state.delete(f"r{i}")
    state.delete_prompt("r1")
    state.add('quote"and\\slash\nnewline', "q", "10.0.0.1", 3)
    check()
    assert 'model_engine_count{model_name="quote\\"and\\\\slash\\nnewline"} 1.0' in get("/metrics").decode()
    server.clock.advance(700)
    state.expire_all()
    check()
    assert "model_engine_count{" not in get("/metrics").decode()


@pytest.mark.parametrize("raw", [
    b"HELLO\r\n\r\n",
    b"POST /v1/load/stats HTTP/1.1\r\nHost: node\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/load/stats HTTP/1.1\r\nHost: node\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/load/stats HTTP/1.1\r\nHost: node\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /v1/load/stats HTTP/1.1\r\nHost: node\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
    b"POST /v1/load/stats HTTP/1.1\r\nHost: node\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    b"GET /readyz HTTP/1.1\r\nno colon here\r\n\r\n",
], ids=["request-line", "length-not-a-number", "length-negative", "two-lengths", "length-and-chunked",
        "bad-chunk-size", "header-line"])
def test_unreadable_http_framing_gets_a_400_in_the_envelope(raw):
    server = Server()
    channel, transport = server.connect()
    channel.dataReceived(raw)
    (status, headers, body), = responses(transport.value())
    answer = json.loads(body)
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert answer["status"] == "ERROR" and "not valid HTTP/1.1" in answer["error"]["reason"]
    assert server.node.state.request_count == 0
