"""Replication between nodes, in process: the sender (batches, bounds,
back-off, the reference's single events), the receiver (validation, no
forwarding, authentication), warm start and anti-entropy.

Deterministic timing tests drive the sender with a task.Clock over treq's
StubTreq; the streaming ones (snapshots, anti-entropy) run real nodes on
loopback in the test's reactor.
"""

import json
import random

import pytest
import pytest_twisted
import treq
from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet import defer, reactor, task
from twisted.web import resource

from metacenter.cluster import auth
from metacenter.cluster.antientropy import AntiEntropy, HORIZON_FRACTION
from metacenter.api.server import MetacenterAPI
from metacenter.cluster.auth import PeerAuthenticator
from metacenter.cluster.discovery import PeerDiscovery
from metacenter.core.events import EVENT_ADD, EVENT_DELETE, EVENT_PROMPT_DELETE, ORIGIN_CLIENT
from metacenter.runtime.node import build_node
from metacenter.cluster.replication import MODE_BATCH, MODE_SINGLE, PeerClient, Replicator, make_http_client
from metacenter.api.site import MetacenterSite
from metacenter.core.events import LoadAdd, LoadDelete
from reference_node import ReferenceNode

EPOCH = 1_700_000_000.0
SECRET = "test-cluster-secret"


class LocalNode:
    """A whole node in this process (state, node, API), optionally listening
    on loopback. ``clock`` drives the state; the network uses the reactor."""

    def __init__(self, clock=None, secret="", tombstone_ttl=60.0, max_body=65536):
        self.clock = clock if clock is not None else reactor
        self.node = build_node(self.clock, tombstone_ttl=tombstone_ttl, advertise="127.0.0.1")
        self.state, self.metrics = self.node.state, self.node.metrics
        self.api = MetacenterAPI(self.node, self.metrics)
        if secret:
            self.api.peer_auth = PeerAuthenticator(secret, self.clock)
        self.max_body = max_body
        self.port = None
        self.peer = None
        self.forwarded = []
        self.node.event_listeners.append(lambda *event: self.forwarded.append(event))

    def listen(self):
        site = MetacenterSite(self.api.resource(), max_body=self.max_body)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.peer = ("127.0.0.1", self.port.getHost().port)
        return self

    def stub(self):
        return StubTreq(self.api.resource())

    def add(self, request_id, cluster="llama", ip="10.0.0.1", prompt_length=100, timestamp=None):
        self.node.apply(EVENT_ADD, LoadAdd((cluster, request_id, ip, prompt_length, timestamp)), None, ORIGIN_CLIENT)

    def delete(self, request_id):
        self.node.apply(EVENT_DELETE, LoadDelete((request_id, None)), None, ORIGIN_CLIENT)

    def delete_prompt(self, request_id):
        self.node.apply(EVENT_PROMPT_DELETE, LoadDelete((request_id, None)), None, ORIGIN_CLIENT)

    def view(self):
        """Every cluster's engines as comparable tuples."""
        return {name: sorted((e.ip, e.queued, e.prompt) for e in c.engines.values())
                for name, c in self.state.clusters.items() if c.engines}

    def digest(self):
        return {name: (c.live, c.digest) for name, c in self.state.clusters.items()}

    def close(self):
        return self.port.stopListening() if self.port is not None else defer.succeed(None)


def real_client(secret="", timeout=5.0):
    http, pool = make_http_client(reactor, dial_timeout=0.5)
    return PeerClient(http, reactor, PeerAuthenticator(secret) if secret else None, timeout, pool)


def clocked():
    clock = task.Clock()
    clock.advance(EPOCH)
    return clock


def replicate(sender, client, clock, **options):
    """A Replicator of ``sender``'s client mutations (subscribed as a node
    listener, as makeService wires it) over ``client``."""
    replicator = Replicator(client, clock, registry=CollectorRegistry(), **options)
    sender.node.event_listeners.append(replicator.event_accepted)
    return replicator


def stub_replicator(sender, peer_resource, peer=("10.9.9.9", 8080), clock=None, secret="", **options):
    """A Replicator on ``sender`` whose one peer is ``peer_resource`` (through
    StubTreq: requests complete synchronously), driven by ``clock``."""
    clock = clock or sender.clock
    client = PeerClient(StubTreq(peer_resource), clock, PeerAuthenticator(secret, clock) if secret else None, 1.0)
    replicator = replicate(sender, client, clock, **options)
    replicator.peers_changed(frozenset([peer]), frozenset())
    return replicator, replicator.links[peer]


def sample(registry, name, labels=None):
    value = registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


@pytest_twisted.inlineCallbacks
def wait_until(predicate, timeout=10.0, interval=0.02):
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError("condition not reached in time")
        yield task.deferLater(reactor, interval, lambda: None)


# -- sender --------------------------------------------------------------------


def test_a_batch_goes_when_it_is_full_or_an_interval_after_the_previous_one():
    clock = clocked()
    sender, receiver = LocalNode(clock), LocalNode(clocked())
    replicator, link = stub_replicator(sender, receiver.api.resource(), batch_size=5, batch_interval=0.010)

    for i in range(5):
        sender.add(f"r{i}")
    assert receiver.state.request_count == 0  # queued only: the client's request does no I/O
    clock.advance(0)
    assert receiver.state.request_count == 5
    assert link.sent == 5 and link.status()["queue_depth"] == 0

    for i in range(5, 8):
        sender.add(f"r{i}")
    clock.advance(0.009)
    assert receiver.state.request_count == 5  # 3 events, the previous batch left just now
    clock.advance(0.001)
    assert receiver.state.request_count == 8
    assert link.sent == 8
    assert receiver.view() == sender.view()
    # Two requests: one of 5 events, one of 3.
    histogram = replicator.metrics.batch_size.labels(link.name)
    assert histogram._sum.get() == 8
    assert sum(bucket.get() for bucket in histogram._buckets) == 2
    clock.advance(1.0)
    sender.add("after-a-quiet-spell")
    clock.advance(0)
    assert receiver.state.request_state("after-a-quiet-spell") == "live"  # no wait at all


def test_replicated_events_are_applied_with_their_timestamp_and_not_forwarded_again():
    clock = clocked()
    sender, receiver = LocalNode(clock), LocalNode(clocked())
    stub_replicator(sender, receiver.api.resource(), batch_size=1)
    sender.add("r1", prompt_length=7)
    sender.delete_prompt("r1")
    clock.advance(0)
    assert receiver.state.request_state("r1") == "live-prompt-deleted"
    # Born when the sender stamped it, not when it arrived.
    assert receiver.state.request_record("r1")[4] == int(EPOCH)
    assert receiver.forwarded == []  # peer events never reach the replication listeners


class FlakyPeer(resource.Resource):
    """A peer node's API behind a switch: while ``down``, every request gets
    503 (as from a node that is shutting down)."""

    isLeaf = True

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.down = False
        self.requests = 0

    def render(self, request):
        self.requests += 1
        if self.down:
            request.setResponseCode(503)
            return b"unavailable"
        return self.inner.render(request)


def test_a_dead_peer_is_retried_with_back_off_its_queue_is_bounded_and_it_catches_up():
    clock = clocked()
    sender, receiver = LocalNode(clock), LocalNode(clocked())
    peer = FlakyPeer(receiver.api.resource())
    peer.down = True
    replicator, link = stub_replicator(sender, peer, batch_size=10, batch_interval=0.001, queue_size=50)

    for i in range(10):
        sender.add(f"r{i}")
    clock.advance(0)
    assert peer.requests == 2  # the reference's two attempts
    assert link.failed == 10 and link.status()["queue_depth"] == 10  # kept for later
    assert link.lag_seconds() >= 0
    requests_before = peer.requests
    clock.advance(0.01)
    assert peer.requests == requests_before  # backing off, not hammering

    for i in range(10, 100):
        sender.add(f"r{i}")
    assert link.status()["queue_depth"] == 50
    assert link.dropped == 50  # the oldest ones
    for _ in range(40):
        clock.advance(0.1)
    assert link.failures_in_a_row > 2
    peer.down = False
    for _ in range(30):
        clock.advance(1.0)
    status = link.status()
    assert status["queue_depth"] == 0 and status["lag_ms"] == 0
    assert status["sent"] == 50 and status["dropped"] == 50
    # Exactly the newest 50 arrived; anti-entropy is what repairs the rest.
    assert receiver.state.request_count == 50
    assert receiver.state.request_state("r99") == "live"
    assert receiver.state.request_state("r0") is None
    assert sample(replicator.metrics.registry, "metacenter_replication_events_dropped_total",
                  {"peer": link.name}) == 50


def test_one_dead_peer_does_not_delay_another():
    clock = clocked()
    sender = LocalNode(clock)
    healthy, dead = LocalNode(clocked()), LocalNode(clocked())
    dead_peer = FlakyPeer(dead.api.resource())
    dead_peer.down = True
    client_healthy = StubTreq(healthy.api.resource())
    client_dead = StubTreq(dead_peer)

    class TwoPeers:
        """Routes each request to the StubTreq of its peer by port."""

        def request(self, method, url, **kwargs):
            return (client_dead if ":2/" in url else client_healthy).request(method, url, **kwargs)

    replicator = replicate(sender, PeerClient(TwoPeers(), clock, None, 1.0), clock,
                            batch_size=4, batch_interval=0.001)
    replicator.peers_changed(frozenset([("10.0.0.1", 1), ("10.0.0.2", 2)]), frozenset())
    for step in range(20):
        sender.add(f"r{step}")
        clock.advance(0.002)
    assert healthy.state.request_count == 20
    status = {s["peer"]: s for s in replicator.peer_status()}
    assert status["10.0.0.1:1"]["queue_depth"] == 0 and status["10.0.0.1:1"]["sent"] == 20
    assert status["10.0.0.2:2"]["queue_depth"] == 20 and status["10.0.0.2:2"]["sent"] == 0
    assert status["10.0.0.2:2"]["lag_ms"] > 0


@pytest_twisted.inlineCallbacks
def test_a_stopping_node_sends_what_is_queued_first():
    clock = clocked()
    sender, receiver = LocalNode(clock), LocalNode(clocked())
    replicator, link = stub_replicator(sender, receiver.api.resource(), batch_size=1000, batch_interval=5.0)
    for i in range(10):
        sender.add(f"r{i}")
    assert receiver.state.request_count == 0  # waiting for the batch to fill
    stopped = replicator.stopService()
    for _ in range(10):
        clock.advance(0.01)
    assert stopped.called
    yield stopped
    assert receiver.state.request_count == 10
    assert link.dropped == 0


def test_a_peer_that_leaves_takes_its_queue_and_series_with_it():
    clock = clocked()
    sender = LocalNode(clock)
    peer = FlakyPeer(LocalNode(clocked()).api.resource())
    peer.down = True
    replicator, link = stub_replicator(sender, peer, peer=("10.0.0.7", 80))
    for i in range(5):
        sender.add(f"r{i}")
    clock.advance(0)
    assert replicator.metrics.registry.get_sample_value(
        "metacenter_replication_queue_depth", {"peer": "10.0.0.7:80"}) == 5
    replicator.peers_changed(frozenset(), frozenset([("10.0.0.7", 80)]))
    assert replicator.peer_status() == []
    assert link.dropped == 5
    assert replicator.metrics.registry.get_sample_value(
        "metacenter_replication_queue_depth", {"peer": "10.0.0.7:80"}) is None
    sender.add("later")  # no peer, nothing queued anywhere
    clock.advance(10)


def test_a_reference_peer_gets_single_events_and_is_asked_for_batches_again_later():
    clock = clocked()
    sender = LocalNode(clock)
    reference = ReferenceNode()
    replicator, link = stub_replicator(sender, reference, batch_size=10, probe_interval=60.0)
    sender.add("r1", cluster="m", ip="10.0.0.1", prompt_length=30)
    sender.delete_prompt("r1")
    sender.add("r2", cluster="m", ip="10.0.0.2", prompt_length=5)
    sender.delete("r2")
    clock.advance(0.01)
    assert link.mode == MODE_SINGLE
    assert reference.load("m") == {"10.0.0.1": (1, 0), "10.0.0.2": (0, 0)}
    batch_probes = [r for r in reference.received if r[0] == "/v1/replica/batch"]
    singles = [r for r in reference.received if r[0] == "/v1/replica/event"]
    assert len(batch_probes) == 1 and len(singles) == 4
    path, method, headers, body = singles[0]
    assert method == "POST"
    assert headers["event-type"] == "load.stats.set"
    assert headers["content-type"] == "application/json"
    assert headers["traceid"]
    sent = json.loads(body)
    assert sent["cluster"] == "m" and sent["request_id"] == "r1" and sent["ip"] == "10.0.0.1"
    assert sent["prompt_length"] == 30 and sent["timestamp"] == int(EPOCH * 1e9)
    assert [h["event-type"] for _, _, h, _ in singles] == [
        "load.stats.set", "load.prompt.delete", "load.stats.set", "load.stats.delete"]
    assert json.loads(singles[1][3]) == {"request_id": "r1", "timestamp": int(EPOCH * 1e9)}
    assert replicator.peer_status()[0]["mode"] == "single"

    # Before the probe interval: singles only. After it: one batch probe,
    # still 404, so single events again.
    sender.add("r3")
    clock.advance(1)
    assert len([r for r in reference.received if r[0] == "/v1/replica/batch"]) == 1
    clock.advance(60)
    sender.add("r4")
    clock.advance(0.01)
    assert len([r for r in reference.received if r[0] == "/v1/replica/batch"]) == 2
    assert link.mode == MODE_SINGLE
    assert set(reference.requests) == {"r1", "r3", "r4"}


def test_a_peer_that_gained_the_batch_endpoint_gets_batches_again():
    clock = clocked()
    sender, receiver = LocalNode(clock), LocalNode(clocked())
    reference = ReferenceNode()

    class Upgradable(resource.Resource):
        isLeaf = True
        target = reference

        def render(self, request):
            return self.target.render(request)

    peer = Upgradable()
    replicator, link = stub_replicator(sender, peer, probe_interval=5.0)
    sender.add("r1")
    clock.advance(0.01)
    assert link.mode == MODE_SINGLE
    peer.target = receiver.api.resource()  # the reference node was replaced by ours
    clock.advance(5)
    sender.add("r2")
    clock.advance(0.01)
    assert link.mode == MODE_BATCH
    assert receiver.state.request_state("r2") == "live"


def test_kv_cache_saves_go_to_our_peers_in_batches_and_are_not_sent_to_reference_peers():
    from metacenter.core.events import ORIGIN_CLIENT as CLIENT

    clock = clocked()
    sender, receiver = LocalNode(clock), LocalNode(clocked())
    stub_replicator(sender, receiver.api.resource(), batch_size=1)
    reference = ReferenceNode()
    _, reference_link = stub_replicator(sender, reference, peer=("10.0.0.9", 1), batch_size=1)
    sender.node.save_cache(("m", [11, 22, 33], "10.0.0.1"), None, CLIENT)
    sender.add("r1", cluster="m")
    clock.advance(0.01)
    assert receiver.node.cache.query("m", [11, 22, 33]) == sender.node.cache.query("m", [11, 22, 33])
    assert receiver.node.cache.match_lengths("m", [11, 22, 33])
    assert reference_link.mode == MODE_SINGLE
    assert [h["event-type"] for path, _, h, _ in reference.received if path == "/v1/replica/event"] == [
        "load.stats.set"]
    assert reference_link.failed == 0 and reference_link.status()["queue_depth"] == 0


# -- receiver ------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_the_batch_endpoint_validates_every_event_like_a_client_request():
    receiver = LocalNode(clocked())
    stub = receiver.stub()
    events = [
        {"type": "load.stats.set", "body": {"cluster": "m", "request_id": "ok1", "ip": "10.0.0.1",
                                            "prompt_length": 3, "timestamp": int(EPOCH * 1e9)}},
        {"type": "load.stats.set", "body": {"cluster": "m", "request_id": "bad-ip", "ip": "invalid"}},
        {"type": "load.stats.set", "body": {"cluster": "m", "request_id": "bad-len", "ip": "10.0.0.1",
                                            "prompt_length": -1}},
        {"type": "load.bogus", "body": {"request_id": "x"}},
        {"type": "load.stats.delete", "body": {"request_id": ""}},
        "not an object",
        {"type": "load.prompt.delete", "body": {"request_id": "ok1", "cluster": "", "ip": ""}},
    ]
    response = yield stub.post("http://node/v1/replica/batch", data=json.dumps({"events": events}).encode())
    body = json.loads((yield response.content()))
    assert response.code == 200
    assert body["data"]["applied"] == 2 and body["data"]["unchanged"] == 0
    assert [r["index"] for r in body["data"]["rejected"]] == [1, 2, 3, 4, 5]
    assert "ip" in body["data"]["rejected"][0]["reason"]
    assert body["data"]["rejected"][2]["reason"] == "Unsupported event type"
    assert receiver.view() == {"m": [("10.0.0.1", 1, 0)]}
    assert receiver.forwarded == []

    for raw in (b"", b"[1]", b'{"events": 3}', b"{nope"):
        response = yield stub.post("http://node/v1/replica/batch", data=raw)
        body = json.loads((yield response.content()))
        assert response.code == 400 and body["error"]["code"] == 40001400


@pytest_twisted.inlineCallbacks
def test_the_reference_single_event_endpoint_still_works():
    receiver = LocalNode(clocked())
    stub = receiver.stub()
    response = yield stub.post("http://node/v1/replica/event", headers={"Event-Type": "load.stats.set"},
                               data=b'{"cluster":"m","request_id":"a","ip":"10.0.0.3","prompt_length":4}')
    assert response.code == 200
    response = yield stub.post("http://node/v1/replica/event", data=b'{"request_id":"a"}')
    body = json.loads((yield response.content()))
    assert response.code == 400 and body["error"]["reason"] == "missing Event-Type header"
    assert receiver.view() == {"m": [("10.0.0.3", 1, 4)]}


# -- authentication --------------------------------------------------------------


PEER_ROUTES = [
    ("POST", "/v1/replica/event", b'{"cluster":"m","request_id":"evil","ip":"10.0.0.66"}',
     {"Event-Type": "load.stats.set"}),
    ("POST", "/v1/replica/batch",
     b'{"events":[{"type":"load.stats.set","body":{"cluster":"m","request_id":"evil","ip":"10.0.0.66"}}]}', {}),
    ("POST", "/v1/replica/repair", b'{"records":[["evil","m","10.0.0.66",5,0,1700000000]],'
                                   b'"tombstones":[["r1",2]]}', {}),
    ("GET", "/v1/replica/snapshot", b"", {}),
    ("GET", "/v1/replica/digest", b"", {}),
    ("POST", "/v1/replica/buckets", b'{"clusters":["m"]}', {}),
    ("POST", "/v1/replica/records", b'{"clusters":["m"]}', {}),
]


@pytest.mark.parametrize("method,path,body,extra", PEER_ROUTES, ids=[r[1] for r in PEER_ROUTES])
@pytest_twisted.inlineCallbacks
def test_with_a_secret_unsigned_badly_signed_and_replayed_requests_are_refused(method, path, body, extra):
    clock = clocked()
    receiver = LocalNode(clock, secret=SECRET).listen()
    receiver.add("r1")
    before = (receiver.view(), receiver.state.tombstone_count, receiver.digest())
    url = "http://%s:%d%s" % (receiver.peer + (path,))

    def headers_with(signature_headers):
        return {name: [value] for name, value in {**extra, **signature_headers}.items()}

    stale = auth.sign(SECRET, method, path, body, clock.seconds() - auth.DEFAULT_WINDOW - 1)
    attempts = {
        "unsigned": {},
        "wrong secret": auth.sign("another-secret", method, path, body, clock.seconds()),
        "other body": auth.sign(SECRET, method, path, body + b" ", clock.seconds()),
        "replayed after the window": stale,
        "garbage": {auth.SIGNATURE_HEADER: "zz", auth.TIMESTAMP_HEADER: "now"},
    }
    try:
        for name, signature in attempts.items():
            response = yield treq.request(method, url, data=body or None, headers=headers_with(signature))
            answer = json.loads((yield response.content()))
            assert response.code == 401, name
            assert answer["error"]["code"] == 40101001, name
            assert (receiver.view(), receiver.state.tombstone_count, receiver.digest()) == before, name

        good = auth.sign(SECRET, method, path, body, clock.seconds())
        response = yield treq.request(method, url, data=body or None, headers=headers_with(good))
        yield response.content()
        assert response.code == 200
    finally:
        yield receiver.close()


@pytest_twisted.inlineCallbacks
def test_signed_batches_from_a_node_with_the_same_secret_are_accepted():
    clock = clocked()
    sender, receiver = LocalNode(clock), LocalNode(clock, secret=SECRET)
    _, link = stub_replicator(sender, receiver.api.resource(), secret=SECRET, batch_size=1)
    sender.add("r1")
    clock.advance(0)
    assert receiver.state.request_state("r1") == "live" and link.sent == 1
    outsider = LocalNode(clock)
    _, refused = stub_replicator(outsider, receiver.api.resource(), secret="wrong", batch_size=1)
    outsider.add("r2")
    clock.advance(0)
    assert receiver.state.request_state("r2") is None
    assert refused.failed == 1 and refused.status()["queue_depth"] == 1  # kept: secrets get fixed
    yield defer.succeed(None)


# -- warm start ------------------------------------------------------------------


def fill(node, count, rng, cluster_count=3):
    """A mixed state: live requests, prompt-deleted ones, deleted ones."""
    for i in range(count):
        rid = f"req-{i}"
        node.add(rid, cluster=f"model-{i % cluster_count}", ip=f"10.0.{i % 7}.{i % 5}",
                 prompt_length=rng.randrange(0, 5000))
        roll = rng.random()
        if roll < 0.3:
            node.delete(rid)
        elif roll < 0.6:
            node.delete_prompt(rid)
    for i in range(count // 10):
        node.delete(f"never-added-{i}")  # deletes before their add
        node.delete_prompt(f"prompt-first-{i}")


def static_discovery(*peers):
    discovery = PeerDiscovery(static_peers=peers, registry=CollectorRegistry())
    discovery.startService()
    return discovery


@pytest_twisted.inlineCallbacks
def test_warm_start_streams_the_whole_state_and_merges_concurrent_events_once():
    from metacenter.cluster.warmstart import WarmStart

    from metacenter.core.cache import CacheIndex

    source = LocalNode().listen()
    fill(source, 6000, random.Random(1))
    newcomer = LocalNode()
    for node in (source, newcomer):
        node.node.cache = CacheIndex(reactor)
    for i in range(40):
        source.node.save_cache((f"model-{i % 3}", [i * 1000 + k for k in range(50)], f"10.0.{i % 7}.1"))
    client = real_client()
    warm = WarmStart(newcomer.node, client, static_discovery(source.peer), reactor, timeout=20.0,
                     registry=CollectorRegistry())
    assert newcomer.node.ready is False
    # Events that reach the newcomer by replication before and during the
    # snapshot (the same requests the snapshot also holds).
    live = [r[0] for r in source.state.iter_requests()]
    cluster, ip, prompt_length, _, created_s = source.state.request_record(live[0])
    newcomer.node.apply(EVENT_ADD, LoadAdd((cluster, live[0], ip, prompt_length, int(created_s * 1e9))), None,
                        "peer")
    newcomer.node.apply(EVENT_DELETE, LoadDelete((live[1], None)), None, "peer")
    source.delete(live[1])
    warm.startService()
    summary = yield warm.when_done()
    try:
        assert summary["outcome"] == "complete"
        assert summary["merged"]["requests"] == source.state.request_count
        assert newcomer.node.ready is True
        assert newcomer.view() == source.view()
        assert newcomer.digest() == source.digest()
        assert newcomer.state.tombstone_count == source.state.tombstone_count
        assert summary["merged"]["cache_engines"] == source.node.cache.engine_count
        for i in range(0, 40, 7):
            query = [i * 1000 + k for k in range(50)]
            assert newcomer.node.cache.query(f"model-{i % 3}", query) == source.node.cache.query(f"model-{i % 3}", query)
        # Birth times travel with the snapshot, so expiry agrees.
        some = [r for r in source.state.iter_requests()][:50]
        for record in some:
            assert newcomer.state.request_record(record[0]) == source.state.request_record(record[0])
    finally:
        yield client.close()
        yield source.close()


@pytest_twisted.inlineCallbacks
def test_warm_start_is_bounded_when_no_peer_answers():
    from metacenter.cluster.warmstart import WarmStart

    silent = reactor.listenTCP(0, _Silent(), interface="127.0.0.1")  # accepts, never answers
    newcomer = LocalNode()
    client = real_client(timeout=0.3)
    warm = WarmStart(newcomer.node, client, static_discovery(("127.0.0.1", silent.getHost().port)), reactor,
                     timeout=2.0, registry=CollectorRegistry())
    started = reactor.seconds()
    warm.startService()
    try:
        summary = yield warm.when_done()
        assert newcomer.node.ready is True
        assert summary["outcome"] in ("no snapshot", "timed out")
        assert reactor.seconds() - started < 10
    finally:
        yield client.close()
        yield silent.stopListening()


class _Silent:
    """A TCP server factory whose connections never say anything."""

    def doStart(self):
        pass

    def doStop(self):
        pass

    def buildProtocol(self, addr):
        from twisted.internet.protocol import Protocol

        return Protocol()


@pytest_twisted.inlineCallbacks
def test_a_node_still_warming_up_refuses_to_serve_snapshots():
    node = LocalNode()
    node.node.readiness.hold("warm start in progress")
    stub = node.stub()
    for method, path in (("GET", "/v1/replica/snapshot"), ("GET", "/v1/replica/digest")):
        response = yield stub.request(method, "http://node" + path)
        yield response.content()
        assert response.code == 503


# -- anti-entropy ------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_anti_entropy_repairs_missing_requests_and_missed_deletes_both_ways():
    clock_a, clock_b = clocked(), clocked()
    a, b = LocalNode(clock_a).listen(), LocalNode(clock_b).listen()
    rng = random.Random(7)
    fill(a, 800, rng)
    # b got most of it (a snapshot), then missed some events in both directions.
    for record in list(a.state.iter_requests()):
        b.node.merge_record(*record)
    for request_id, kind, _ in list(a.state.iter_tombstones()):
        b.node.merge_tombstone(request_id, kind)
    assert a.view() == b.view()
    a.add("only-on-a", cluster="model-9", ip="10.9.0.1", prompt_length=11)
    b.add("only-on-b", cluster="model-0", ip="10.0.0.1", prompt_length=13)
    live = [r[0] for r in a.state.iter_requests()]
    a.delete(live[0])  # b missed this delete
    b.delete(live[1])  # a missed this one
    prompted = [rid for rid in live[2:] if a.state.request_state(rid) == "live"][:2]
    a.delete_prompt(prompted[0])
    b.delete_prompt(prompted[1])
    assert a.digest() != b.digest()

    client = real_client()
    anti = AntiEntropy(a.node, client, lambda: [b.peer], reactor, registry=CollectorRegistry())
    try:
        outcome = yield anti.exchange(b.peer)
        assert outcome["result"] == "repaired", outcome
        assert a.view() == b.view()
        assert a.digest() == b.digest()
        assert a.state.request_state(live[1]) == "deleted" and b.state.request_state(live[0]) == "deleted"
        assert a.state.request_state("only-on-b") == "live" and b.state.request_state("only-on-a") == "live"
        assert outcome["adopted"] == 1 and outcome["peer_adopted"] == 1
        assert outcome["deleted"] == 1 and outcome["sent_deletes"] == 1
        assert outcome["unresolved"] == 0
        # Only the differing buckets were listed, not every live request.
        assert outcome["listed"] < a.state.request_count / 10
        again = yield anti.exchange(b.peer)
        assert again["result"] == "in_sync"
    finally:
        yield client.close()
        yield a.close()
        yield b.close()


@pytest_twisted.inlineCallbacks
def test_anti_entropy_sees_prompt_deletes_missed_in_pairs():
    """Two requests that differ only by their prompt flag must not hide each
    other in the cluster digest."""
    a, b = LocalNode(clocked()).listen(), LocalNode(clocked()).listen()
    for node in (a, b):
        for rid in ("p1", "p2", "p3"):
            node.add(rid, cluster="m", prompt_length=10)
    a.delete_prompt("p1")
    a.delete_prompt("p2")
    assert a.digest() != b.digest()
    client = real_client()
    anti = AntiEntropy(a.node, client, lambda: [b.peer], reactor, registry=CollectorRegistry())
    try:
        outcome = yield anti.exchange(b.peer)
        assert outcome["sent_prompt_deletes"] == 2
        assert b.view() == a.view() == {"m": [("10.0.0.1", 3, 10)]}
    finally:
        yield client.close()
        yield a.close()
        yield b.close()


@pytest_twisted.inlineCallbacks
def test_anti_entropy_never_resurrects_a_request_whose_delete_was_forgotten():
    ttl = 60.0
    clock = clocked()
    a, b = LocalNode(clock, tombstone_ttl=ttl).listen(), LocalNode(clock, tombstone_ttl=ttl).listen()
    for node in (a, b):
        node.add("old", cluster="m", ip="10.0.0.1", timestamp=int(clock.seconds() * 1e9))
        node.add("young", cluster="m", ip="10.0.0.2", timestamp=int(clock.seconds() * 1e9))
    # a deletes "old"; b misses it; a's tombstone expires.
    a.delete("old")
    clock.advance(ttl + 1)
    a.state.expire_all()
    assert a.state.request_state("old") is None
    # "young" went to b only, just now: a never heard of it, and it is young.
    a_missing_young = "fresh"
    b.add(a_missing_young, cluster="m", ip="10.0.0.3")

    client = real_client()
    anti = AntiEntropy(a.node, client, lambda: [b.peer], reactor, registry=CollectorRegistry())
    try:
        outcome = yield anti.exchange(b.peer)
        # "old" is older than the horizon and unknown to a: never adopted.
        assert a.state.request_state("old") is None
        assert outcome["unresolved"] == 1
        assert a.state.request_state(a_missing_young) == "live"
        assert HORIZON_FRACTION < 1
    finally:
        yield client.close()
        yield a.close()
        yield b.close()


@pytest_twisted.inlineCallbacks
def test_anti_entropy_rounds_survive_an_unreachable_peer():
    a = LocalNode()
    client = real_client(timeout=0.5)
    registry = CollectorRegistry()
    anti = AntiEntropy(a.node, client, lambda: [("127.0.0.1", 9)], reactor, registry=registry)
    anti.startService()
    try:
        yield anti.round()
        assert anti.last["127.0.0.1:9"]["result"] == "failed"
        assert registry.get_sample_value("metacenter_antientropy_exchanges_total",
                                         {"peer": "127.0.0.1:9", "result": "failed"}) == 1
    finally:
        anti.stopService()
        yield client.close()


# -- resync after being away ---------------------------------------------------------


def test_the_stall_watch_notices_a_process_that_did_not_run():
    from metacenter.cluster.warmstart import StallWatch

    clock = clocked()
    stalls = []
    watch = StallWatch(clock, threshold=5.0, on_stall=lambda since, seconds: stalls.append((since, seconds)))
    watch.startService()
    for _ in range(10):
        clock.advance(1.0)
    assert stalls == []
    before = clock.seconds()
    clock.advance(30.0)  # one tick, thirty seconds late
    assert stalls == [(before, 29.0)]
    watch.stopService()


@pytest_twisted.inlineCallbacks
def test_anti_entropy_notices_that_no_peer_answered_for_too_long():
    clock = clocked()
    a, b = LocalNode(clock), LocalNode(clock).listen()
    peers = [("127.0.0.1", 9)]  # nobody there
    isolations = []
    client = real_client(timeout=0.5)
    anti = AntiEntropy(a.node, client, lambda: peers, clock, interval=1.0, registry=CollectorRegistry(),
                       on_isolation=lambda since, seconds: isolations.append((since, seconds)))
    anti.running = True
    anti.last_contact = clock.seconds()
    try:
        yield anti.round()
        clock.advance(anti.isolation_threshold + 5)
        yield anti.round()
        assert isolations == []  # still nobody
        peers[:] = [b.peer]
        yield anti.round()
        assert len(isolations) == 1 and isolations[0][1] > anti.isolation_threshold
        yield anti.round()
        assert len(isolations) == 1
    finally:
        yield client.close()
        yield b.close()


@pytest_twisted.inlineCallbacks
def test_a_resync_takes_the_clusters_state_and_drops_what_finished_while_away():
    """What anti-entropy must leave alone (old, one-sided requests) a node
    that knows it was away takes from a peer."""
    from metacenter.cluster.warmstart import WarmStart

    clock = clocked()
    ttl = 60.0
    stale, peer = LocalNode(clock, tombstone_ttl=ttl), LocalNode(clock, tombstone_ttl=ttl).listen()
    client = real_client()
    warm = WarmStart(stale.node, client, static_discovery(peer.peer), reactor, timeout=10.0,
                     registry=CollectorRegistry())
    warm.startService()
    yield warm.when_done()

    born = int(clock.seconds() * 1e9)
    for node in (stale, peer):
        node.add("kept", cluster="m", ip="10.0.0.1", timestamp=born)
        node.add("finished", cluster="m", ip="10.0.0.1", timestamp=born)
    peer.add("missed", cluster="m", ip="10.0.0.2", timestamp=born)  # the stale node was away
    away_since = clock.seconds() + 1
    peer.delete("finished")  # the stale node was away
    clock.advance(ttl + 5)
    peer.state.expire_all()  # the peer forgot the delete
    stale.add("fresh", cluster="m", ip="10.0.0.3")  # after the node came back
    anti = AntiEntropy(stale.node, client, lambda: [peer.peer], reactor, registry=CollectorRegistry())
    try:
        outcome = yield anti.exchange(peer.peer)
        assert outcome["unresolved"] == 2  # "finished" and "missed": anti-entropy cannot tell
        assert stale.state.request_state("finished") == "live"

        summary = yield warm.resync(away_since, "a test")
        assert summary["outcome"] == "complete" and summary["deleted"] == 1
        assert stale.node.ready is True
        assert stale.state.request_state("finished") == "deleted"
        assert stale.state.request_state("missed") == "live"
        assert stale.state.request_state("kept") == "live"
        assert stale.state.request_state("fresh") == "live"  # born after the node came back: kept
        again = yield anti.exchange(peer.peer)
        assert peer.state.request_state("fresh") == "live" and again["result"] == "in_sync"
        assert stale.view() == peer.view()
    finally:
        yield client.close()
        yield peer.close()


# -- end to end in process: batches over real connections ------------------------------


@pytest_twisted.inlineCallbacks
def test_two_nodes_over_loopback_converge_in_batches():
    a, b = LocalNode().listen(), LocalNode().listen()
    client = real_client()
    replicator = replicate(a, client, reactor, batch_size=64,
                            batch_interval=0.002)
    replicator.peers_changed(frozenset([b.peer]), frozenset())
    rng = random.Random(3)
    try:
        fill(a, 3000, rng)
        yield wait_until(lambda: replicator.peer_status()[0]["lag_ms"] == 0 and a.view() == b.view())
        assert a.digest() == b.digest()
        assert a.state.tombstone_count == b.state.tombstone_count
        status = replicator.peer_status()[0]
        assert status["mode"] == "batch" and status["failed"] == 0 and status["dropped"] == 0
        assert status["sent"] == len(a.forwarded)
        requests = sum(bucket.get() for bucket in replicator.metrics.batch_size.labels(status["peer"])._buckets)
        assert requests < status["sent"] / 10  # batched, not one request per event
    finally:
        replicator.stopService()
        yield a.close()
        yield b.close()


def test_untagged_repair_entries_whose_id_is_a_tag_letter_are_read_as_ids():
    from metacenter.cluster.snapshot import parse_record, parse_tombstone

    assert parse_record(["r", "c", "10.0.0.1", 5, 0, 100]) == ("r", "c", "10.0.0.1", 5, False, 100)
    assert parse_record(["r", "x", "c", "10.0.0.1", 5, 1, 100]) == ("x", "c", "10.0.0.1", 5, True, 100)
    assert parse_tombstone(["t", 2]) == ("t", 2)
    assert parse_tombstone(["t", "x", 2, 100]) == ("x", 2)


def test_an_anti_entropy_round_never_fails_into_its_loop():
    from twisted.logger import globalLogPublisher

    from harness import Harness
    from metacenter.cluster.antientropy import AntiEntropy

    node = Harness().node

    def broken_peers():
        raise RuntimeError("peer list broke")

    anti_entropy = AntiEntropy(node, client=None, peers=broken_peers, clock=node.clock)
    seen = []
    observer = lambda e: seen.append(e) if e.get("log_failure") else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        results = []
        anti_entropy.round().addBoth(results.append)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert results == [None]
    assert any("peer list broke" in str(e["log_failure"].value) for e in seen)
