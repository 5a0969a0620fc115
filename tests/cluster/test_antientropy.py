"""Anti-entropy between two in-process nodes: this node's PeerClient reaches
the real API resource of the peer through treq's StubTreq, both on one
task.Clock, so the digest, bucket, records and repair steps (and both sides'
scans, a chunk per turn) run as the test turns the clock. One test keeps a
real refused connection: that failure is the socket's.
"""

import random

import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import reactor
from twisted.web.resource import Resource

from cluster_nodes import FlakyPeer, LocalNode, clocked, fill, real_client, settle, stub_client
from metacenter.cluster.antientropy import HORIZON_FRACTION, AntiEntropy

A, B = ("10.2.0.1", 8080), ("10.2.0.2", 8080)


def pair(clock=None, ttl=60.0):
    clock = clock or clocked()
    a, b = LocalNode(clock, tombstone_ttl=ttl, turns=True), LocalNode(clock, tombstone_ttl=ttl, turns=True)
    return clock, a, b


def anti_entropy(a, clock, peers, registry=None, **options):
    client = stub_client(clock, peers)
    return AntiEntropy(a.node, client, lambda: sorted(peers), clock, registry=registry or CollectorRegistry(),
                       **options), client


def test_anti_entropy_repairs_missing_requests_and_missed_deletes_both_ways():
    clock, a, b = pair()
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

    registry = CollectorRegistry()
    anti, client = anti_entropy(a, clock, {B: b.api.resource()}, registry)
    outcome = settle(clock, client, anti.exchange(B))
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
    assert registry.get_sample_value("metacenter_antientropy_repairs_total", {"kind": "adopted"}) == 1
    assert registry.get_sample_value("metacenter_antientropy_exchanges_total",
                                     {"peer": "10.2.0.2:8080", "result": "repaired"}) == 1
    again = settle(clock, client, anti.exchange(B))
    assert again["result"] == "in_sync"


def test_anti_entropy_sees_prompt_deletes_missed_in_pairs():
    """Two requests that differ only by their prompt flag must not hide each
    other in the cluster digest."""
    clock, a, b = pair()
    for node in (a, b):
        for rid in ("p1", "p2", "p3"):
            node.add(rid, cluster="m", prompt_length=10)
    a.delete_prompt("p1")
    a.delete_prompt("p2")
    assert a.digest() != b.digest()
    anti, client = anti_entropy(a, clock, {B: b.api.resource()})
    outcome = settle(clock, client, anti.exchange(B))
    assert outcome["sent_prompt_deletes"] == 2
    assert b.view() == a.view() == {"m": [("10.0.0.1", 3, 10)]}


def test_anti_entropy_never_resurrects_a_request_whose_delete_was_forgotten():
    ttl = 60.0
    clock, a, b = pair(ttl=ttl)
    for node in (a, b):
        node.add("old", cluster="m", ip="10.0.0.1", timestamp=int(clock.seconds() * 1e9))
        node.add("young", cluster="m", ip="10.0.0.2", timestamp=int(clock.seconds() * 1e9))
    # a deletes "old"; b misses it; a's tombstone expires.
    a.delete("old")
    clock.advance(ttl + 1)
    a.state.expire_all()
    assert a.state.request_state("old") is None
    # "fresh" went to b only, just now: a never heard of it, and it is young.
    b.add("fresh", cluster="m", ip="10.0.0.3")

    anti, client = anti_entropy(a, clock, {B: b.api.resource()})
    outcome = settle(clock, client, anti.exchange(B))
    # "old" is older than the horizon and unknown to a: never adopted.
    assert a.state.request_state("old") is None
    assert outcome["unresolved"] == 1
    assert a.state.request_state("fresh") == "live"
    assert HORIZON_FRACTION < 1


def test_a_peer_that_refuses_a_step_fails_the_exchange_naming_the_step():
    clock, a, b = pair()
    a.add("only-on-a", cluster="m")
    peer = FlakyPeer(b.api.resource())
    anti, client = anti_entropy(a, clock, {B: peer})
    b.node.readiness.hold("warm start: fetching the state from a peer")
    outcome = settle(clock, client, anti.exchange(B))
    assert outcome["result"] == "failed"
    assert outcome["reason"].startswith("digest: HTTP 503: warm start")
    assert b.state.request_state("only-on-a") is None


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


def test_anti_entropy_notices_that_no_peer_answered_for_too_long():
    clock, a, b = pair()
    dead = FlakyPeer(b.api.resource())
    dead.down = True  # answers 503 to everything
    peers = [A]
    isolations = []
    client = stub_client(clock, {A: dead, B: b.api.resource()})
    anti = AntiEntropy(a.node, client, lambda: peers, clock, interval=1.0, registry=CollectorRegistry(),
                       on_isolation=lambda since, seconds: isolations.append((since, seconds)))
    anti.running = True
    anti.last_contact = clock.seconds()
    settle(clock, client, anti.round())
    clock.advance(anti.isolation_threshold + 5)
    settle(clock, client, anti.round())
    assert isolations == []  # still nobody
    peers[:] = [B]
    settle(clock, client, anti.round())
    assert len(isolations) == 1 and isolations[0][1] > anti.isolation_threshold
    settle(clock, client, anti.round())
    assert len(isolations) == 1


def test_rounds_start_after_the_warm_start_and_run_every_interval():
    from twisted.internet import defer

    clock, a, b = pair()
    a.add("only-on-a", cluster="m")
    warm = defer.Deferred()
    anti, client = anti_entropy(a, clock, {B: b.api.resource()}, interval=10.0, start_after=warm)
    anti.startService()
    clock.advance(30)
    assert anti.last == {}  # waiting for the warm start
    warm.callback(None)
    clock.advance(9)
    assert anti.last == {}  # the first round is an interval after it
    clock.advance(1)
    settle(clock, client, anti.namedServices["rounds"].in_progress or defer.succeed(None))
    assert anti.last["10.2.0.2:8080"]["result"] == "repaired"
    assert b.state.request_state("only-on-a") == "live"
    b.add("only-on-b", cluster="m")
    clock.advance(10)
    settle(clock, client, anti.namedServices["rounds"].in_progress or defer.succeed(None))
    assert a.state.request_state("only-on-b") == "live"
    anti.stopService()
    clock.advance(10)
    assert anti.namedServices["rounds"].in_progress is None  # stopped: no more rounds


def test_untagged_repair_entries_whose_id_is_a_tag_letter_are_read_as_ids():
    from metacenter.cluster.snapshot import parse_record, parse_tombstone

    assert parse_record(["r", "c", "10.0.0.1", 5, 0, 100]) == ("r", "c", "10.0.0.1", 5, False, 100)
    assert parse_record(["r", "x", "c", "10.0.0.1", 5, 1, 100]) == ("x", "c", "10.0.0.1", 5, True, 100)
    assert parse_tombstone(["t", 2]) == ("t", 2)
    assert parse_tombstone(["t", "x", 2, 100]) == ("x", 2)


def test_an_anti_entropy_round_never_fails_into_its_loop():
    from twisted.logger import globalLogPublisher

    from harness import Harness

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


class _BodySizes(Resource):
    """The peer's API, recording each request body's size: a real node
    refuses one over its --max-body with 413."""

    isLeaf = True

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.sizes = []

    def render(self, request):
        body = request.content.read()
        request.content.seek(0)
        self.sizes.append((request.path, len(body)))
        return self.inner.render(request)


def test_thousands_of_differing_clusters_go_in_requests_within_the_peers_body_limit():
    clock, a, b = pair()
    for i in range(400):  # 400 clusters b lacks: their names alone are ~10 KB
        a.add(f"r{i}", cluster=f"model-with-a-long-name-{i:04d}", ip="10.0.0.1", prompt_length=i + 1)
    peer = _BodySizes(b.api.resource())
    anti, client = anti_entropy(a, clock, {B: peer}, max_body=2048)
    outcome = settle(clock, client, anti.exchange(B))
    assert outcome["result"] == "repaired", outcome
    assert a.view() == b.view() and a.digest() == b.digest()
    posted = [(path, size) for path, size in peer.sizes if path != b"/v1/replica/digest"]
    assert {path for path, _ in posted} == {b"/v1/replica/buckets", b"/v1/replica/records", b"/v1/replica/repair"}
    assert all(size <= 2048 for _, size in posted), posted
    assert sum(path == b"/v1/replica/buckets" for path, _ in posted) > 3  # split, not one body
