"""Periodic: the one way the node repeats work; a failing call is logged and
never stops the timer; calls never overlap."""

from twisted.internet import defer, task
from twisted.logger import Logger

from metacenter.runtime.periodic import Periodic


def recorder():
    events = []
    return events, Logger(namespace="test.periodic", observer=events.append)


def failures(events):
    return [str(e["log_failure"].value) for e in events if e.get("log_failure") is not None]


def test_a_raising_or_failing_call_is_logged_and_the_next_one_runs():
    clock = task.Clock()
    events, log = recorder()
    calls = []

    def work():
        calls.append(clock.seconds())
        if len(calls) == 1:
            raise RuntimeError("sync boom")
        if len(calls) == 2:
            return defer.fail(ValueError("async boom"))
        return None

    timer = Periodic(5.0, work, what="the test job", clock=clock, log=log)
    timer.startService()
    clock.advance(5.0)
    clock.advance(5.0)
    assert calls == [0.0, 5.0, 10.0]
    assert failures(events) == ["sync boom", "async boom"]
    assert all("the test job failed" == e["log_format"].format(what=e["what"]) for e in events)
    timer.stopService()
    clock.advance(5.0)
    assert len(calls) == 3


def test_now_false_waits_one_interval():
    clock = task.Clock()
    calls = []
    timer = Periodic(5.0, lambda: calls.append(clock.seconds()), what="x", clock=clock, now=False)
    timer.startService()
    assert calls == []
    clock.advance(5.0)
    assert calls == [5.0]
    timer.stopService()


def test_an_attached_call_is_awaited_and_stopping_waits_for_it():
    clock = task.Clock()
    pending = []
    timer = Periodic(1.0, lambda: pending.append(defer.Deferred()) or pending[-1], what="x", clock=clock)
    timer.startService()
    clock.advance(3.0)
    assert len(pending) == 1  # the first call has not finished: no second one
    stopped = timer.stopService()
    assert not stopped.called
    pending[0].callback(None)
    assert stopped.called


def test_a_detached_call_is_not_overlapped_and_does_not_hold_up_stopping():
    clock = task.Clock()
    pending = []
    timer = Periodic(1.0, lambda: pending.append(defer.Deferred()) or pending[-1], what="x", clock=clock,
                     detached=True)
    timer.startService()
    clock.advance(3.0)
    assert len(pending) == 1 and timer.in_progress is pending[0]  # ticks skipped while it runs
    pending[0].callback(None)
    assert timer.in_progress is None
    clock.advance(1.0)
    assert len(pending) == 2
    stopped = timer.stopService()
    assert stopped.called  # the call in progress finishes on its own
