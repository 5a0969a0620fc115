"""The periodic expiry sweep: chunked over reactor turns, never overlapping,
never raising into its TimerService."""

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from metacenter.core.cache import CacheIndex
from metacenter.runtime.metrics import Metrics
from metacenter.core.load import LoadState
from metacenter.runtime.sweeper import Sweeper
from metacenter.runtime.turns import chunk_per_turn


def pump(clock, d, turns=10000):
    done = []
    d.addBoth(done.append)
    for _ in range(turns):
        if done:
            return turns
        clock.advance(0)
    raise AssertionError("sweep did not finish")


def registry_value(metrics, name, labels=None):
    return metrics.registry.get_sample_value(name, labels or {})


def test_sweep_runs_in_chunks_over_reactor_turns():
    clock = Clock()
    state = LoadState(clock, request_expire=60)
    cache = CacheIndex(clock, ttl=30)
    metrics = Metrics(state)
    for i in range(2500):
        state.add("m", f"r{i}", f"10.0.0.{i % 5}", 10)
    cache.save("m", "10.0.0.1", [1, 2, 3])
    clock.advance(61)
    sweeper = Sweeper(state, metrics, chunk_per_turn(clock).cooperate, chunk=100, cache=cache)
    d = sweeper.sweep()
    assert state.request_count == 2500  # nothing happens before the reactor turns
    assert sweeper.sweep() is d  # a sweep in progress is not started twice
    turns = pump(clock, d)
    assert turns > 25  # 2500 requests in chunks of 100
    assert state.request_count == 0 and state.engine_count == 0 and not state.clusters
    assert cache.block_count == 0
    assert registry_value(metrics, "metacenter_expired_total", {"kind": "request"}) == 2500
    assert registry_value(metrics, "metacenter_expired_total", {"kind": "engine"}) == 5
    assert registry_value(metrics, "metacenter_gc_sweep_duration_seconds_count") == 1
    assert sweeper.running is None


def test_a_failing_sweep_is_logged_and_the_next_one_runs():
    clock = Clock()
    state = LoadState(clock, request_expire=60)
    metrics = Metrics(state)
    sweeper = Sweeper(state, metrics, chunk_per_turn(clock).cooperate)
    broken = {"on": True}
    real_expire = state.expire

    def expire(chunk):
        if broken["on"]:
            raise RuntimeError("boom")
        return real_expire(chunk)

    state.expire = expire
    failures = []
    observer = lambda e: failures.append(e) if e.get("log_failure") else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        assert sweeper.sweep() is None  # did not raise into the TimerService
    finally:
        globalLogPublisher.removeObserver(observer)
    assert failures and "boom" in str(failures[0]["log_failure"].value)
    broken["on"] = False
    state.add("m", "r", "10.0.0.1")
    clock.advance(61)
    pump(clock, sweeper.sweep())
    assert state.request_count == 0


def test_an_error_inside_a_step_is_logged_and_clears_the_sweep():
    clock = Clock()
    state = LoadState(clock, request_expire=60)
    metrics = Metrics(state)
    sweeper = Sweeper(state, metrics, chunk_per_turn(clock).cooperate)

    def steps(chunk):
        yield 1
        raise RuntimeError("mid-sweep")

    state.expire = steps
    seen = []
    observer = lambda e: seen.append(e) if e.get("log_failure") else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        pump(clock, sweeper.sweep())
    finally:
        globalLogPublisher.removeObserver(observer)
    assert any("mid-sweep" in str(e["log_failure"].value) for e in seen)
    assert sweeper.running is None
