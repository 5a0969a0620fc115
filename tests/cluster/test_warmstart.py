"""Warm start and resync, in process: the newcomer's PeerClient reaches the
real API resource of a second node through treq's StubTreq, both on one
task.Clock, so every step (the snapshot stream, timeouts, the chunked drop
of what finished while away) happens when the test turns the clock.
"""

import random

from prometheus_client import CollectorRegistry

from cluster_nodes import (LocalNode, SilentPeer, clocked, fill, settle, static_discovery, stub_client)
from metacenter.cluster.antientropy import AntiEntropy
from metacenter.cluster.warmstart import StallWatch, WarmStart
from metacenter.core.events import EVENT_ADD, EVENT_DELETE, LoadAdd, LoadDelete

SOURCE = ("10.1.0.1", 8080)


def test_warm_start_streams_the_whole_state_and_merges_concurrent_events_once():
    clock = clocked()
    source, newcomer = LocalNode(clock, turns=True), LocalNode(clock, turns=True)
    fill(source, 6000, random.Random(1))
    for i in range(40):
        source.node.save_cache((f"model-{i % 3}", [i * 1000 + k for k in range(50)], f"10.0.{i % 7}.1"))
    client = stub_client(clock, {SOURCE: source.api.resource()}, timeout=5.0)
    warm = WarmStart(newcomer.node, client, static_discovery(SOURCE), clock, timeout=20.0,
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
    summary = settle(clock, client, warm.when_done())
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


def test_warm_start_is_bounded_when_no_peer_answers():
    clock = clocked()
    newcomer = LocalNode(clock, turns=True)
    silent = ("10.1.0.9", 8080)
    client = stub_client(clock, {silent: SilentPeer()}, timeout=0.3)
    warm = WarmStart(newcomer.node, client, static_discovery(silent), clock, timeout=2.0,
                     registry=CollectorRegistry())
    started = clock.seconds()
    warm.startService()
    assert newcomer.node.ready is False
    summary = settle(clock, client, warm.when_done(), step=0.05)
    assert newcomer.node.ready is True
    assert summary["outcome"] in ("no snapshot", "timed out")
    # The peer's silence cost the answer timeout, far less than the warm start's.
    assert clock.seconds() - started <= 2.0


def test_a_warm_start_without_peers_is_ready_at_once():
    clock = clocked()
    newcomer = LocalNode(clock, turns=True)
    warm = WarmStart(newcomer.node, stub_client(clock, {}), static_discovery(), clock, registry=CollectorRegistry())
    assert newcomer.node.ready is False and "warm start" in newcomer.node.not_ready_reason
    warm.startService()
    assert warm.summary["outcome"] == "alone"
    assert newcomer.node.ready is True and newcomer.node.not_ready_reason is None


def test_the_stall_watch_notices_a_process_that_did_not_run():
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


def test_a_stall_handler_that_fails_is_logged_and_the_watch_goes_on():
    from twisted.logger import globalLogPublisher

    clock = clocked()
    calls = []

    def broken(since, seconds):
        calls.append(seconds)
        raise RuntimeError("resync broke")

    watch = StallWatch(clock, threshold=5.0, on_stall=broken)
    seen = []
    observer = lambda e: seen.append(e) if e.get("log_failure") else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        watch.startService()
        clock.advance(30.0)
        clock.advance(1.0)
        clock.advance(30.0)
    finally:
        globalLogPublisher.removeObserver(observer)
        watch.stopService()
    assert len(calls) == 2  # still watching after the first failure
    assert any("resync broke" in str(e["log_failure"].value) for e in seen)


def test_a_resync_takes_the_clusters_state_and_drops_what_finished_while_away():
    """What anti-entropy must leave alone (old, one-sided requests) a node
    that knows it was away takes from a peer."""
    clock = clocked()
    ttl = 60.0
    stale, peer = LocalNode(clock, tombstone_ttl=ttl, turns=True), LocalNode(clock, tombstone_ttl=ttl, turns=True)
    address = ("10.1.0.2", 8080)
    client = stub_client(clock, {address: peer.api.resource()}, timeout=5.0)
    warm = WarmStart(stale.node, client, static_discovery(address), clock, timeout=10.0,
                     registry=CollectorRegistry())
    warm.startService()
    settle(clock, client, warm.when_done())

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
    anti = AntiEntropy(stale.node, client, lambda: [address], clock, registry=CollectorRegistry())
    outcome = settle(clock, client, anti.exchange(address))
    assert outcome["unresolved"] == 2  # "finished" and "missed": anti-entropy cannot tell
    assert stale.state.request_state("finished") == "live"

    resync = warm.resync(away_since, "a test")
    assert stale.node.ready is False and "resync: a test" in stale.node.not_ready_reason
    summary = settle(clock, client, resync)
    assert summary["outcome"] == "complete" and summary["deleted"] == 1
    assert stale.node.ready is True
    assert stale.state.request_state("finished") == "deleted"
    assert stale.state.request_state("missed") == "live"
    assert stale.state.request_state("kept") == "live"
    assert stale.state.request_state("fresh") == "live"  # born after the node came back: kept
    again = settle(clock, client, anti.exchange(address))
    assert peer.state.request_state("fresh") == "live" and again["result"] == "in_sync"
    assert stale.view() == peer.view()
