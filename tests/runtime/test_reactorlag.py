"""The reactor lag probe (runtime/reactorlag.py) and its histogram."""

import time

import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from metacenter.core.load import LoadState
from metacenter.runtime.metrics import Metrics
from metacenter.runtime.reactorlag import LagProbe


def lag_sample(metrics, suffix, le=None):
    return metrics.registry.get_sample_value("metacenter_reactor_lag_seconds" + suffix,
                                             {} if le is None else {"le": le})


def test_a_late_tick_is_observed_once_with_its_lateness():
    clock = Clock()
    seen = []
    probe = LagProbe(clock, seen.append, interval=0.05)
    probe.startService()
    clock.advance(0.05)
    clock.advance(0.05)
    assert seen == [0.0, 0.0]
    # The reactor was busy for 0.3 s past the next due time: one tick, 0.3 s late
    # (not a burst of catch-up ticks), then on time again.
    clock.advance(0.35)
    assert len(seen) == 3 and abs(seen[2] - 0.3) < 1e-9
    clock.advance(0.05)
    assert len(seen) == 4 and seen[3] == 0.0
    probe.stopService()
    clock.advance(1)
    assert len(seen) == 4 and not clock.getDelayedCalls()


def test_an_error_while_observing_is_logged_and_the_probe_goes_on():
    clock = Clock()
    calls = []

    def observe(lag):
        calls.append(lag)
        if len(calls) == 1:
            raise RuntimeError("observer broke")

    failures = []
    observer = lambda e: failures.append(e) if e.get("log_failure") else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        probe = LagProbe(clock, observe, interval=0.1)
        probe.startService()
        clock.advance(0.1)
        clock.advance(0.1)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert len(calls) == 2
    assert failures and "observer broke" in str(failures[0]["log_failure"].value)


def test_a_long_lag_is_logged_at_most_once_per_interval():
    clock = Clock()
    warnings = []
    observer = lambda e: warnings.append(e) if e.get("log_namespace") == "metacenter.runtime.reactorlag" else None  # noqa: E731,E501
    globalLogPublisher.addObserver(observer)
    try:
        probe = LagProbe(clock, lambda lag: None, interval=0.05, warn_above=0.1, warn_interval=60)
        probe.startService()
        for _ in range(3):
            clock.advance(0.5)  # three ticks 0.45 s late within a minute
        clock.advance(61)
    finally:
        globalLogPublisher.removeObserver(observer)
        probe.stopService()
    assert len(warnings) == 2
    assert warnings[0]["lag_ms"] > 400


@pytest_twisted.inlineCallbacks
def test_the_histogram_moves_when_the_real_reactor_is_blocked():
    metrics = Metrics(LoadState(Clock()))
    probe = LagProbe(reactor, lambda lag: metrics.reactor_lag.observe((), lag), interval=0.01)
    probe.startService()
    try:
        yield task.deferLater(reactor, 0.05, lambda: None)
        before_count = lag_sample(metrics, "_count")
        before_fast = lag_sample(metrics, "_bucket", "0.1")
        assert before_count >= 1
        # Block the reactor for 0.25 s: the tick due meanwhile runs at least
        # 0.25 - 0.01 s late.
        yield task.deferLater(reactor, 0, time.sleep, 0.25)
        yield task.deferLater(reactor, 0.05, lambda: None)
    finally:
        probe.stopService()
    slow_before = before_count - before_fast
    slow_after = lag_sample(metrics, "_count") - lag_sample(metrics, "_bucket", "0.1")
    assert slow_after - slow_before >= 1  # observed above 0.1 s
    assert lag_sample(metrics, "_sum") >= 0.24
    assert probe.worst >= 0.24
