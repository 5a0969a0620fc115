"""The stream's wiring into a node, in process: frames applied by
``Node.apply_frame``, the log position a snapshot carries and a warm start
hands to the receiver, and the snapshot walk that position relies on."""

import random

from prometheus_client import CollectorRegistry
from twisted.internet import task

from cluster_nodes import LocalNode, clocked, fill, settle, static_discovery, stub_client
from metacenter.cluster.replication import stream_port
from metacenter.cluster.snapshot import SnapshotMerger, state_chunks
from metacenter.cluster.stream import ReceiverFactory, decode_entries
from metacenter.cluster.warmstart import WarmStart
from metacenter.core.events import (EVENT_ADD, EVENT_CACHE_SAVE, EVENT_DELETE, EVENT_PROMPT_DELETE, ORIGIN_PEER,
                                    LoadAdd, LoadDelete)
from metacenter.core.replog import ReplicationLog, encode_event
from metacenter.runtime.node import build_node

SOURCE = ("10.1.0.1", 8080)
NOW_NS = 1_700_000_000 * 10**9


def frame(*events):
    """Events as the receiver hands them over: encoded, then decoded."""
    entries = [encode_event(event_type, event) for event_type, event in events]
    decoded, rejected, first = decode_entries(b"[" + b",".join(entries) + b"]", len(entries))
    assert rejected == 0, first
    return decoded


def mixed_events(count, rng):
    events = []
    for i in range(count):
        rid = f"req-{i}"
        events.append((EVENT_ADD, LoadAdd((f"m{i % 3}", rid, f"10.0.0.{i % 5}", rng.randrange(5000),
                                           NOW_NS - 10**9 + i))))
        roll = rng.random()
        if roll < 0.4:
            events.append((EVENT_PROMPT_DELETE, LoadDelete((rid, NOW_NS))))
        if roll < 0.2 or roll > 0.8:
            events.append((EVENT_DELETE, LoadDelete((rid, NOW_NS))))
    events.append((EVENT_DELETE, LoadDelete(("never-added", NOW_NS))))
    events.append((EVENT_CACHE_SAVE, ("m0", [11, 12, 13], "10.0.0.1")))
    rng.shuffle(events)
    return events


def test_a_frame_applies_like_the_same_peer_events_one_by_one_with_metrics_counted_per_frame():
    clock = clocked()
    events = mixed_events(400, random.Random(3))
    by_frame = build_node(clock, registry=CollectorRegistry())
    one_by_one = build_node(clock, registry=CollectorRegistry())
    for event_type, event in events:
        if event_type == EVENT_CACHE_SAVE:
            one_by_one.save_cache(event, None, ORIGIN_PEER)
        else:
            one_by_one.apply(event_type, event, None, ORIGIN_PEER)
    decoded = frame(*events)
    changed = sum(by_frame.apply_frame(decoded[i:i + 64]) for i in range(0, len(decoded), 64))

    def view(node):
        return {name: sorted((e.ip, e.queued, e.prompt) for e in c.engines.values())
                for name, c in node.state.clusters.items()}

    assert view(by_frame) == view(one_by_one)
    assert by_frame.state.tombstone_count == one_by_one.state.tombstone_count
    assert by_frame.cache.query("m0", [11, 12, 13]) == one_by_one.cache.query("m0", [11, 12, 13])
    # The same effect counts, though added once per frame and type.
    assert by_frame.metrics.events.values == one_by_one.metrics.events.values
    assert changed == sum(v for (_, _, effect), v in by_frame.metrics.events.values.items() if effect == "applied")
    # One latency observation per frame (its newest timestamp), not per event.
    frames = (len(decoded) + 63) // 64
    assert sum(by_frame.metrics.replication_latency.series[()][0]) == frames
    assert sum(one_by_one.metrics.replication_latency.series[()][0]) > frames


def test_an_event_type_without_an_applier_stops_the_frame_after_the_events_before_it():
    node = build_node(clocked(), registry=CollectorRegistry())
    events = frame((EVENT_ADD, LoadAdd(("m", "r1", "10.0.0.1", 5, None))))
    events.append(("engine.reset", ("m", "10.0.0.1")))
    try:
        node.apply_frame(events)
    except KeyError:
        pass
    else:
        raise AssertionError("an unknown event type was applied")
    assert node.state.request_count == 1


def test_a_snapshot_carries_the_log_position_taken_when_it_starts():
    clock = clocked()
    log = ReplicationLog(clock)
    source = build_node(clock, registry=CollectorRegistry(), log_position=log.position)
    for i in range(5):
        log.append(EVENT_ADD, LoadAdd(("m", f"r{i}", "10.0.0.1", 1, None)))
        source.apply(EVENT_ADD, LoadAdd(("m", f"r{i}", "10.0.0.1", 1, None)))
    chunks = state_chunks(source)
    merger = SnapshotMerger(build_node(clock, registry=CollectorRegistry()))
    for line in next(chunks).splitlines():
        merger.line(line)
    log.append(EVENT_ADD, LoadAdd(("m", "late", "10.0.0.1", 1, None)))  # after the start: not in the position
    for chunk in chunks:
        for line in chunk.splitlines():
            merger.line(line)
    assert merger.complete and merger.position == (log.log_id, 5)
    # Anti-entropy's filtered record streams are not snapshots: no position.
    filtered = SnapshotMerger(build_node(clock, registry=CollectorRegistry()))
    for chunk in state_chunks(source, clusters={"m"}):
        for line in chunk.splitlines():
            filtered.line(line)
    assert filtered.position is None


def test_a_malformed_position_in_a_header_is_ignored():
    merger = SnapshotMerger(build_node(clocked(), registry=CollectorRegistry()))
    for header in (b'{"snapshot":1,"log":"abc","offset":3}', b'{"snapshot":1,"log":"' + b"a" * 32 + b'","offset":true}',
                   b'{"snapshot":1,"log":"' + b"a" * 32 + b'","offset":-1}'):
        merger.line(header)
        assert merger.position is None


def test_a_prompt_tombstone_turned_into_a_request_during_the_walk_is_still_in_the_snapshot():
    clock = clocked()
    source = build_node(clock, registry=CollectorRegistry())
    fill_source = LocalNode(clock)
    fill(fill_source, 3000, random.Random(4))
    for record in fill_source.state.iter_requests():
        source.merge_record(*record)
    source.state.delete_prompt("late-add")  # a prompt delete before its add
    chunks = state_chunks(source)
    newcomer = build_node(clock, registry=CollectorRegistry())
    merger = SnapshotMerger(newcomer)
    for i, chunk in enumerate(chunks):
        for line in chunk.splitlines():
            merger.line(line)
        if i == 2:
            # The add arrives (from another peer) in the middle of the walk.
            source.apply(EVENT_ADD, LoadAdd(("m", "late-add", "10.0.0.1", 700, NOW_NS)), None, ORIGIN_PEER)
    assert merger.complete
    # The add comes to the newcomer again through the other peer's stream.
    newcomer.apply(EVENT_ADD, LoadAdd(("m", "late-add", "10.0.0.1", 700, NOW_NS)), None, ORIGIN_PEER)
    engine = newcomer.state.clusters["m"].engines["10.0.0.1"]
    assert (engine.queued, engine.prompt) == (1, 0)


def test_a_warm_start_seeds_the_receiver_with_the_serving_peers_log_position():
    clock = clocked()
    log = ReplicationLog(clock)
    source = LocalNode(clock, turns=True)
    source.node.log_position = log.position
    for i in range(7):
        log.append(EVENT_ADD, LoadAdd(("m", f"r{i}", "10.0.0.1", 1, None)))
    newcomer = LocalNode(clock, turns=True)
    receiver = ReceiverFactory("newcomer", (), newcomer.node.apply_frame, clock)
    client = stub_client(clock, {SOURCE: source.api.resource()}, timeout=5.0)
    warm = WarmStart(newcomer.node, client, static_discovery(SOURCE), clock, timeout=20.0,
                     registry=CollectorRegistry(), on_position=receiver.set_applied)
    warm.startService()
    summary = settle(clock, client, warm.when_done())
    assert summary["outcome"] == "complete" and "position" not in summary
    assert dict(receiver.applied) == {log.log_id: 7}


def test_the_stream_port_is_read_from_a_peers_status():
    assert stream_port(b'{"data":{"stream":{"port":7070,"log":"x"}}}') == 7070
    for content in (b'{"data":{"peers":[]}}', b"404 page not found", b'{"data":{"stream":{"port":true}}}',
                    b'{"data":{"stream":{"port":70000}}}', b'{"data":{"stream":null}}'):
        assert stream_port(content) is None


def test_the_status_shows_the_stream_only_with_a_listener():
    clock = task.Clock()
    assert "stream" not in build_node(clock, registry=CollectorRegistry()).status()
    info = {"port": 7070, "log": "a" * 32}
    assert build_node(clock, registry=CollectorRegistry(), replication=lambda: info).status()["stream"] == info
    assert "stream" not in build_node(clock, registry=CollectorRegistry(), replication=lambda: None).status()


def test_a_reset_engines_untouched_requests_travel_as_released_and_a_late_add_changes_nothing():
    clock = clocked()
    source = build_node(clock, registry=CollectorRegistry())
    for i in range(50):
        source.apply(EVENT_ADD, LoadAdd(("m", f"r{i}", "10.0.0.1", 100, NOW_NS)), None, ORIGIN_PEER)
    source.apply(EVENT_ADD, LoadAdd(("m", "other", "10.0.0.2", 100, NOW_NS)), None, ORIGIN_PEER)
    assert source.state.reset_engine("m", "10.0.0.1") == 50  # O(1): the requests stay untouched
    newcomer = build_node(clock, registry=CollectorRegistry())
    merger = SnapshotMerger(newcomer)
    for chunk in state_chunks(source):
        for line in chunk.splitlines():
            merger.line(line)
    assert merger.complete and merger.invalid == 0
    # A late (replicated) add of a released request changes nothing on the newcomer either.
    assert not newcomer.apply(EVENT_ADD, LoadAdd(("m", "r7", "10.0.0.1", 100, NOW_NS)), None, ORIGIN_PEER)
    assert newcomer.state.request_state("r7") == "deleted"
    assert [e.queued for e in newcomer.state.clusters["m"].engines.values()] == [1]
