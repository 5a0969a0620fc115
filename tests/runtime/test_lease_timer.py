"""The runtime's lease timer: a Periodic every second drives
LoadState.lease_steps over reactor turns; leases expire, their requests are
released in steps, a revoke kicks the timer, refresh keeps requests alive
through the sweep. All on a task.Clock."""

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from metacenter.core.events import EVENT_LEASE_KEEPALIVE, EVENT_LEASE_REVOKE, EVENT_REFRESH, LeaseKeepalive, \
    LeaseRevoke, LoadAdd, Refresh, EVENT_ADD
from metacenter.runtime.node import build_node
from metacenter.runtime.periodic import Periodic
from metacenter.runtime.sweeper import LEASE_INTERVAL, LeaseTimer, Sweeper
from metacenter.runtime.turns import chunk_per_turn


def started_node(lease_ttl=10.0, request_expire=660.0):
    clock = Clock()
    clock.advance(1_700_000_000)
    node = build_node(clock, lease_ttl=lease_ttl, request_expire=request_expire,
                      cooperate=chunk_per_turn(clock).cooperate)
    timer = Periodic(LEASE_INTERVAL, node.lease_timer.run, what="lease expiry", clock=clock)
    timer.startService()
    return clock, node, timer


def advance(clock, seconds, step=0.1):
    """Time passes in steps, each followed by the reactor turns it causes."""
    for _ in range(round(seconds / step)):
        clock.advance(step)
        for _ in range(50):
            clock.advance(0)


def sample(node, name, labels=None):
    return node.metrics.registry.get_sample_value(name, labels or {})


def test_a_lease_without_keepalive_expires_and_its_requests_are_released():
    clock, node, timer = started_node(lease_ttl=3.0)
    node.apply(EVENT_LEASE_KEEPALIVE, LeaseKeepalive(("gw", None)))
    for i in range(1200):  # more than one release step (500)
        node.apply(EVENT_ADD, LoadAdd(("m", f"r{i}", f"10.0.0.{i % 4}", 10, None, 3, "gw")))
    node.apply(EVENT_ADD, LoadAdd(("m", "free", "10.0.0.9", 10, None)))
    advance(clock, 2.5)
    assert node.state.request_count == 1201 and node.state.lease_count == 1
    advance(clock, 0.5 + LEASE_INTERVAL + 0.1)  # the TTL, then at most one timer interval
    assert node.state.request_count == 1 and node.state.lease_of("r0") is None
    assert node.state.released("r0") and node.state.request_state("free") == "live"
    assert sample(node, "metacenter_lease_expiries_total") == 1
    assert sample(node, "metacenter_released_requests_total", {"reason": "lease"}) == 1200
    assert sample(node, "metacenter_leases") == 0
    assert node.lease_timer.running is None
    timer.stopService()


def test_keepalives_keep_a_lease_and_its_requests():
    clock, node, timer = started_node(lease_ttl=2.0)
    node.apply(EVENT_ADD, LoadAdd(("m", "r1", "10.0.0.1", 10, None, 0, "gw")))  # an add starts the lease
    for _ in range(5):
        advance(clock, 1.5)
        node.apply(EVENT_LEASE_KEEPALIVE, LeaseKeepalive(("gw", None)))
    assert node.state.request_state("r1") == "live"
    advance(clock, 1.9)
    assert node.state.request_state("r1") == "live"
    advance(clock, LEASE_INTERVAL + 0.2)  # the TTL, then at most one timer interval
    assert node.state.request_state("r1") == "deleted" and node.state.released("r1")
    timer.stopService()


def test_a_revoke_releases_at_once_and_kicks_the_timer_for_the_rest():
    clock, node, timer = started_node()
    timer.stopService()  # only the revoke's kick may release the rest
    for i in range(1100):
        node.apply(EVENT_ADD, LoadAdd(("m", f"r{i}", "10.0.0.1", 0, None, 0, "gw")))
    held = node.run(EVENT_LEASE_REVOKE, LeaseRevoke(("gw",)))
    assert held == 1100
    assert 0 < node.state.request_count < 1100  # the first step at once, the rest in later turns
    assert node.lease_timer.running is not None
    for _ in range(10):
        clock.advance(0)
    assert node.state.request_count == 0 and node.lease_timer.running is None


def test_refresh_keeps_a_long_request_through_the_expiry_sweep():
    clock, node, timer = started_node(request_expire=60.0)
    sweeper = Sweeper(node.state, node.metrics, node.cooperate)
    node.apply(EVENT_ADD, LoadAdd(("m", "long", "10.0.0.1", 10, None)))
    node.apply(EVENT_ADD, LoadAdd(("m", "short", "10.0.0.1", 10, None)))
    advance(clock, 50, step=1.0)
    assert node.run(EVENT_REFRESH, Refresh((("long", "gone"),))) == 1
    advance(clock, 20, step=1.0)
    sweeper.sweep()
    advance(clock, 1)
    assert node.state.request_state("long") == "live" and node.state.request_state("short") == "deleted"
    assert sample(node, "metacenter_refreshed_requests_total") == 1
    timer.stopService()


def test_a_failing_lease_pass_is_logged_and_the_next_one_runs():
    clock, node, timer = started_node()
    timer.stopService()
    advance(clock, 0.1)  # the pass the timer started with ends
    assert node.lease_timer.running is None
    failures = []
    observer = lambda e: failures.append(e) if e.get("log_failure") else None  # noqa: E731
    real = node.state.lease_steps

    def steps(chunk=500):
        yield 0
        raise RuntimeError("mid-pass")

    globalLogPublisher.addObserver(observer)
    try:
        node.state.lease_steps = steps
        d = node.lease_timer.run()
        for _ in range(5):
            clock.advance(0)
        assert d.called and node.lease_timer.running is None  # a timer callback never fails
    finally:
        globalLogPublisher.removeObserver(observer)
    assert failures and "mid-pass" in str(failures[0]["log_failure"].value)
    node.state.lease_steps = real
    node.apply(EVENT_LEASE_KEEPALIVE, LeaseKeepalive(("gw", 1000)))
    advance(clock, 1.1)
    d = node.lease_timer.run()
    advance(clock, 0.1)
    assert node.state.lease_count == 0


def test_lease_timer_is_what_build_node_wires():
    _, node, timer = started_node()
    assert isinstance(node.lease_timer, LeaseTimer)
    timer.stopService()
