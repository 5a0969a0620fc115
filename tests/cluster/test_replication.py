"""Replication between nodes, in process: the sender (batches, bounds,
back-off, the reference's single events), the receiver (validation, no
forwarding, authentication).

Deterministic timing tests drive the sender with a task.Clock over treq's
StubTreq; the last one runs two nodes over real loopback connections. Warm
start and anti-entropy have their own files.
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

from cluster_nodes import EPOCH, FlakyPeer, LocalNode, clocked, fill, real_client
from metacenter.cluster import auth
from metacenter.cluster.auth import PeerAuthenticator
from metacenter.cluster.replication import MODE_BATCH, MODE_SINGLE, PeerClient, Replicator
from reference_node import ReferenceNode

SECRET = "test-cluster-secret"


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


