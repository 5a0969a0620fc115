"""The garbage collector's policy (runtime/gcpolicy.py): freezing is only
safe because the core's state makes no reference cycles (what it drops is
freed by reference counting, frozen or not); the periodic step freezes what
survived; every collection is timed into
``metacenter_gc_pause_seconds{generation}``; a real node freezes at start,
after its warm start and every ``--gc-freeze-interval``."""

import gc
import time

import pytest
from twisted.internet.task import Clock

from metacenter.api import bodies
from metacenter.core.events import (EVENT_ADD, EVENT_DELETE, EVENT_ENGINE_RESET, EVENT_LEASE_KEEPALIVE,
                                    EVENT_LEASE_REVOKE, EVENT_PROMPT_DELETE, EVENT_REFRESH, EngineReset,
                                    LeaseKeepalive, LeaseRevoke, LoadAdd, LoadDelete, Refresh)
from metacenter.core.leases import Lease
from metacenter.runtime.gcpolicy import GcPolicy
from metacenter.runtime.metrics import Metrics
from metacenter.runtime.node import build_node
from metacenter.runtime.periodic import Periodic
from tests.nodeproc import NodeProcess


@pytest.fixture
def saveall():
    """gc.garbage holds everything a collection finds unreachable (instead of
    freeing it); the collector back as it was afterwards."""
    gc.collect()
    del gc.garbage[:]
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)
    yield gc.garbage
    gc.set_debug(flags)
    del gc.garbage[:]
    gc.collect()


def core_objects(objects):
    return [o for o in objects if type(o).__module__.startswith("metacenter.core")]


def test_the_detector_sees_a_cycle_of_core_objects(saveall):
    # A test that could not fail would prove nothing: a Lease that holds
    # itself is found.
    lease = Lease("cycle", 1, 1000, 0.0)
    lease.requests["me"] = lease
    del lease
    gc.collect()
    assert [type(o).__name__ for o in core_objects(saveall)] == ["Lease"]


def _workload(node, clock):
    """Every kind of mutation the core has, then everything removed again."""
    state = node.state
    for c in range(20):
        for e in range(5):
            for r in range(4):
                rid = f"r-{c}-{e}-{r}"
                node.run(EVENT_ADD, LoadAdd((f"m{c}", rid, f"10.0.{c}.{e}", 100, None, 10, f"gw-{r}")))
                node.save_cache((f"m{c}", [c * 100 + e, r + 1, 7], f"10.0.{c}.{e}"))
            node.run(EVENT_PROMPT_DELETE, LoadDelete((f"r-{c}-{e}-0", None)))
            node.run(EVENT_DELETE, LoadDelete((f"r-{c}-{e}-1", None)))
        node.run(EVENT_ENGINE_RESET, EngineReset((f"m{c}", f"10.0.{c}.0")))
    node.run(EVENT_LEASE_KEEPALIVE, LeaseKeepalive(("gw-9", 1000)))
    node.run(EVENT_REFRESH, Refresh(([f"r-3-3-{r}" for r in range(4)],)))
    node.pick(bodies.route_pick({"cluster": "m1", "request_id": "picked", "prompt_length": 5,
                                 "ips": ["10.0.1.1", "10.0.1.9"], "lease": "gw-0"}))
    node.run(EVENT_LEASE_REVOKE, LeaseRevoke(("gw-1",)))
    for _ in state.lease_steps():
        pass
    # Leases end, requests, tombstones, engines and clusters expire, KV blocks go.
    clock.advance(2000)
    for _ in state.lease_steps():
        pass
    state.expire_all()
    clock.advance(2000)  # engines and clusters idle since the requests went
    state.expire_all()
    for _ in node.cache.expire(1000):
        pass
    assert state.request_count == 0 and not state.clusters and state.engine_count == 0
    assert state.lease_count == 0


def test_the_cores_state_makes_no_reference_cycles(saveall):
    clock = Clock()
    clock.advance(1_700_000_000)
    node = build_node(clock, request_expire=600, tombstone_ttl=60, cache_ttl=600)
    _workload(node, clock)
    gc.collect()
    leftovers = core_objects(saveall)
    assert leftovers == [], f"cycles among the core's objects: {sorted({type(o).__name__ for o in leftovers})}"


def test_the_periodic_step_freezes_what_survived_and_counts_it():
    clock = Clock()
    metrics = Metrics(build_node(clock).state)
    policy = GcPolicy().observe_to(metrics)
    Periodic(60.0, policy.freeze, what="gc freeze", clock=clock, now=False).startService()
    try:
        kept = [{"n": i} for i in range(1000)]  # tracked, alive, not frozen yet
        before = gc.get_freeze_count()
        clock.advance(60)
        assert gc.get_freeze_count() >= before + len(kept)
        assert policy.freezes == 1 and metrics.registry.get_sample_value("metacenter_gc_freezes_total") == 1
        gc.collect()  # frozen objects are not walked: a full collection leaves them where they are
        assert gc.get_freeze_count() >= before + len(kept)
    finally:
        gc.unfreeze()


def test_every_collection_moves_the_pause_histogram():
    metrics = Metrics(build_node(Clock()).state)
    policy = GcPolicy().observe_to(metrics).install()

    def count(generation):
        return metrics.registry.get_sample_value("metacenter_gc_pause_seconds_count", {"generation": generation})

    try:
        assert count("0") == count("2") == 0
        gc.collect(0)
        gc.collect(2)
        assert count("0") >= 1 and count("2") >= 1
        assert metrics.registry.get_sample_value("metacenter_gc_pause_seconds_sum", {"generation": "2"}) > 0
    finally:
        policy.uninstall()
    assert policy._callback not in gc.callbacks


def test_a_node_freezes_at_start_after_its_warm_start_and_periodically():
    node = NodeProcess("127.0.0.1", None, "--gc-freeze-interval", "200ms").start(wait_ready=True)
    try:
        def freezes():
            _, _, text = node.call("GET", "/metrics")
            text = text.decode() if isinstance(text, bytes) else text
            values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("metacenter_gc_freezes_total ")]
            pauses = [line for line in text.splitlines() if line.startswith("metacenter_gc_pause_seconds_count")]
            return values[0], pauses

        deadline = time.monotonic() + 30
        count, pauses = freezes()
        while count < 3 and time.monotonic() < deadline:  # start, warm start, then the timer's
            time.sleep(0.1)
            count, pauses = freezes()
        assert count >= 3
        assert {p.split('"')[1] for p in pauses} == {"0", "1", "2"}
    finally:
        node.stop()


def test_a_state_that_grew_is_frozen_before_the_interval():
    clock = Clock()
    node = build_node(clock)
    state = node.state
    policy = GcPolicy(size=lambda: len(state.clusters) + state.engine_count + state.lease_count, growth=50)
    Periodic(1.0, policy.freeze_if_grown, what="gc growth check", clock=clock, now=False).startService()
    try:
        policy.freeze("start")

        def add_clusters(first, count):
            for i in range(first, first + count):
                node.apply(EVENT_ADD, bodies.load_event(EVENT_ADD, {
                    "cluster": f"grown-{i}", "request_id": f"r-{i}", "ip": "10.0.0.1", "prompt_length": 1}),
                    None, 0)

        add_clusters(0, 20)  # 40 new objects (a cluster and its engine each): below the growth
        clock.advance(1)
        assert policy.freezes == 1
        add_clusters(20, 5)  # 50 since the freeze
        before = gc.get_freeze_count()
        clock.advance(1)
        assert policy.freezes == 2 and gc.get_freeze_count() > before
        clock.advance(1)  # nothing new since: no freeze
        assert policy.freezes == 2
    finally:
        gc.unfreeze()
