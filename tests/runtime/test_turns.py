"""The node's cooperator: big jobs a chunk per reactor turn."""

import pytest
from twisted.internet import task

from metacenter.runtime.turns import chunk_per_turn, in_chunks, run, scan


def test_in_chunks_cuts_an_iterable_into_lists():
    assert list(in_chunks(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(in_chunks([], 3)) == []
    with pytest.raises(ValueError):
        list(in_chunks(range(3), 0))


def turn(clock):
    """One reactor turn: runs the calls already due, not those they schedule
    (task.Clock.advance would run those too)."""
    due = [call for call in clock.getDelayedCalls() if call.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.func(*call.args, **call.kw)


def test_a_scan_visits_one_chunk_per_reactor_turn():
    clock = task.Clock()
    cooperate = chunk_per_turn(clock).cooperate
    visited = []
    done = []
    scan(cooperate, iter(range(10)), 3, visited.append).addCallback(done.append)
    assert visited == []  # nothing before the reactor turns
    for turns in range(1, 5):
        turn(clock)
        assert len(visited) == turns
    turn(clock)
    assert visited == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]] and done == [None]


def test_two_jobs_share_the_turns_one_step_each_turn():
    clock = task.Clock()
    cooperate = chunk_per_turn(clock).cooperate
    log = []
    run(cooperate, (log.append(("a", i)) for i in range(3)))
    run(cooperate, (log.append(("b", i)) for i in range(3)))
    turn(clock)
    assert len(log) == 1
    turn(clock)
    assert len(log) == 2
    for _ in range(10):
        turn(clock)
    assert sorted(log) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2)]


def test_a_failing_step_fails_the_deferred():
    clock = task.Clock()

    def visit(chunk):
        raise RuntimeError("bad chunk")

    results = []
    scan(chunk_per_turn(clock).cooperate, range(5), 2, visit).addErrback(results.append)
    clock.advance(0)
    assert results and results[0].check(RuntimeError)
