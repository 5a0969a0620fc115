"""The replication log: offsets, the bounded ring, frames, cursors, the
window, resuming, and a cursor falling off the tail."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from metacenter.core.errors import InvalidInput
from metacenter.core.events import (EVENT_ADD, EVENT_CACHE_SAVE, EVENT_DELETE, EVENT_PROMPT_DELETE, CacheSave,
                                    LoadAdd, LoadDelete)
from metacenter.core.replog import FRESH, REPAIR, RESUMED, ReplicationLog, encode_event


def make_log(**kwargs):
    clock = Clock()
    clock.advance(1000)
    return ReplicationLog(clock, **kwargs), clock


def add(i):
    return EVENT_ADD, LoadAdd(("c", f"r{i}", "10.0.0.1", i, 1_700_000_000_000_000_000 + i))


def fill(log, n):
    return [log.append(*add(i)) for i in range(n)]


def decoded(log, start, stop):
    return json.loads(log.frame(start, stop))


# -- encoding and offsets ----------------------------------------------------------


def test_each_event_type_is_its_name_and_its_tuple_in_order():
    assert json.loads(encode_event(*add(7))) == ["load.stats.set", "c", "r7", "10.0.0.1", 7,
                                                 1_700_000_000_000_000_007]
    assert json.loads(encode_event(EVENT_DELETE, LoadDelete(("r1", None)))) == ["load.stats.delete", "r1", None]
    assert json.loads(encode_event(EVENT_PROMPT_DELETE, LoadDelete(("r1", 5)))) == ["load.prompt.delete", "r1", 5]
    assert json.loads(encode_event(EVENT_CACHE_SAVE, CacheSave(("c", [2**64 - 1, 0], "::1")))) == [
        "cache.save", "c", [2**64 - 1, 0], "::1"]
    # A type the log has never heard of needs nothing new here.
    assert json.loads(encode_event("engine.reset", ("c", "10.0.0.1", 3))) == ["engine.reset", "c", "10.0.0.1", 3]


def test_non_ascii_text_survives_as_ascii_json():
    entry = encode_event(EVENT_ADD, LoadAdd(("集群", "r\u00e9", "10.0.0.1", 0, None)))
    assert entry.isascii()
    assert json.loads(entry)[1:3] == ["集群", "r\u00e9"]


def test_offsets_are_consecutive_and_a_frame_is_the_entries_in_order():
    log, _ = make_log()
    assert fill(log, 5) == [0, 1, 2, 3, 4]
    assert (log.base, log.end, len(log)) == (0, 5, 5)
    assert decoded(log, 1, 4) == [json.loads(encode_event(*add(i))) for i in (1, 2, 3)]
    assert decoded(log, 2, 2) == []


def test_each_log_has_its_own_random_id():
    assert make_log()[0].log_id != make_log()[0].log_id
    assert len(make_log()[0].log_id) == 32


def test_the_last_frame_is_shared_by_peers_in_step():
    log, _ = make_log()
    fill(log, 10)
    first = log.frame(0, 10)
    assert log.frame(0, 10) is first
    assert log.frame(0, 9) is not first


def test_span_bytes_and_cut_respect_a_byte_budget():
    log, _ = make_log()
    fill(log, 20)
    sizes = [len(e) for e in log.entries(0, 20)]
    assert log.span_bytes(3, 9) == sum(sizes[3:9])
    budget = sum(sizes[5:12])
    assert log.cut(5, 20, budget) == 12
    assert log.cut(5, 20, budget - 1) == 11
    assert log.cut(5, 20, 1) == 6  # one entry at least
    assert log.cut(5, 8, 10**9) == 8


# -- bounds --------------------------------------------------------------------------


def test_the_ring_holds_capacity_entries_and_evicts_the_oldest():
    log, _ = make_log(capacity=8)
    fill(log, 13)
    assert (log.base, log.end, log.evicted) == (5, 13, 5)
    assert decoded(log, 5, 13) == [json.loads(encode_event(*add(i))) for i in range(5, 13)]
    with pytest.raises(InvalidInput):
        log.frame(4, 6)
    with pytest.raises(InvalidInput):
        log.appended_at(4)


def test_frames_across_the_ring_boundary():
    log, _ = make_log(capacity=5)
    fill(log, 12)
    assert [e[2] for e in decoded(log, 7, 12)] == [f"r{i}" for i in range(7, 12)]
    assert [e[2] for e in decoded(log, 9, 11)] == ["r9", "r10"]


def test_the_byte_bound_evicts_too_and_keeps_the_newest_entry():
    size = len(encode_event(*add(10)))
    log, _ = make_log(max_bytes=3 * size)
    fill(log, 10)
    assert log.bytes <= 3 * size and len(log) == 3 and log.base == 7
    log.append_encoded(b"x" * (10 * size))  # larger than the whole budget
    assert (log.base, log.end) == (10, 11)


# -- cursors and the window --------------------------------------------------------------


def test_a_new_cursor_starts_at_the_end():
    log, _ = make_log()
    fill(log, 3)
    cursor = log.cursor("p")
    assert (cursor.acked, cursor.sent, cursor.pending) == (3, 3, 0)
    assert cursor.next_frame(4, 100, 10**6) is None
    fill(log, 2)
    assert cursor.next_frame(4, 100, 10**6) == (3, 5)


def test_frames_are_bounded_and_the_window_stops_sending():
    log, _ = make_log()
    cursor = log.cursor("p")
    fill(log, 10)
    assert cursor.next_frame(2, 4, 10**6) == (0, 4)
    assert cursor.next_frame(2, 4, 10**6) == (4, 8)
    assert cursor.next_frame(2, 4, 10**6) is None  # two frames unacknowledged
    assert list(cursor.in_flight) == [4, 8]
    assert cursor.ack(4) == 1
    assert cursor.next_frame(2, 4, 10**6) == (8, 10)
    assert cursor.ack(10) == 2  # cumulative
    assert (cursor.acked, cursor.sent, list(cursor.in_flight)) == (10, 10, [])


def test_events_appended_while_the_window_is_full_leave_together():
    log, _ = make_log()
    cursor = log.cursor("p")
    fill(log, 1)
    assert cursor.next_frame(1, 1000, 10**6) == (0, 1)
    fill(log, 50)  # the window is full: they wait
    assert cursor.next_frame(1, 1000, 10**6) is None
    cursor.ack(1)
    assert cursor.next_frame(1, 1000, 10**6) == (1, 51)


def test_an_ack_beyond_what_was_sent_is_refused_and_an_old_one_ignored():
    log, _ = make_log()
    cursor = log.cursor("p")
    fill(log, 6)
    cursor.next_frame(4, 3, 10**6)
    cursor.next_frame(4, 3, 10**6)
    with pytest.raises(InvalidInput, match="beyond the last one sent"):
        cursor.ack(7)
    cursor.ack(6)
    assert cursor.ack(3) == 0 and cursor.acked == 6


def test_lag_in_events_and_seconds():
    log, clock = make_log()
    cursor = log.cursor("p")
    assert (cursor.lag_events(), cursor.lag_seconds()) == (0, 0.0)
    fill(log, 3)
    clock.advance(0.25)
    fill(log, 2)
    clock.advance(0.5)
    assert cursor.lag_events() == 5
    assert cursor.lag_seconds() == pytest.approx(0.75)
    cursor.next_frame(4, 100, 10**6)
    cursor.ack(3)
    assert (cursor.lag_events(), cursor.lag_seconds()) == (2, pytest.approx(0.5))


def test_wake_is_called_once_by_the_next_append():
    log, _ = make_log()
    calls = []
    log.wake = lambda: calls.append(log.end)
    fill(log, 3)
    assert calls == [1]  # once, by the first append, with its entry in
    assert log.wake is None


# -- falling off the tail ---------------------------------------------------------------


def test_a_cursor_falling_off_the_tail_is_reported_once_and_jumps_to_the_end():
    log, _ = make_log(capacity=10)
    slow, fast = log.cursor("slow"), log.cursor("fast")
    reports = []
    slow.on_fell_behind = lambda cursor, skipped: reports.append((cursor.name, skipped, log.end))
    fast.on_fell_behind = lambda cursor, skipped: reports.append((cursor.name, skipped, log.end))
    for i in range(10):
        log.append(*add(i))
        fast.next_frame(4, 100, 10**6)
        fast.ack(fast.sent)
    slow.next_frame(4, 3, 10**6)
    slow.ack(3)
    assert reports == []
    for i in range(10, 13):  # evicts 0..2: slow (acked 3) still fine
        log.append(*add(i))
        fast.next_frame(4, 100, 10**6)
        fast.ack(fast.sent)
    assert reports == [] and log.base == 3
    log.append(*add(13))  # evicts entry 3, which slow still needs
    assert reports == [("slow", 10, 13)]  # entries 3..12 are skipped; the new one is not
    assert (slow.acked, slow.sent, slow.lost) == (13, 13, True)
    assert log.fell_behind == 1 and not fast.lost
    log.append(*add(14))
    assert len(reports) == 1  # not again
    assert slow.next_frame(4, 100, 10**6) == (13, 15)


def test_a_falling_cursor_is_found_even_after_the_others_moved_on():
    # The log only keeps a lower bound of the cursors' positions; a cursor
    # that was lowest, then acked, must not hide one that stayed behind.
    log, _ = make_log(capacity=4)
    a, b = log.cursor("a"), log.cursor("b")
    fallen = []
    b.on_fell_behind = lambda cursor, skipped: fallen.append(skipped)
    fill(log, 3)
    a.next_frame(4, 100, 10**6)
    a.ack(3)
    b.next_frame(4, 1, 10**6)
    b.ack(1)
    fill(log, 2)  # evicts 0: fine; the walk recomputes the bound as b's 1
    assert fallen == [] and log.base == 1
    fill(log, 1)  # evicts 1 (b's next): b falls
    assert fallen == [4] and b.lost  # it jumps to 5: entries 1..4 are skipped


def test_every_cursor_stays_within_the_log():
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from("aapfr"), st.integers(0, 5), st.integers(1, 6)), max_size=80))
    def run(steps):
        log, _ = make_log(capacity=6)
        cursors = [log.cursor("x"), log.cursor("y")]
        for action, which, n in steps:
            cursor = cursors[which % 2]
            if action == "a":
                fill(log, n)
            elif action == "p":
                cursor.next_frame(2, n, 10**6)
            elif action == "f":  # ack some of what was sent
                cursor.ack(min(cursor.sent, cursor.acked + n))
            else:
                cursor.restart(None)
            for c in cursors:
                assert log.base <= c.acked <= c.sent <= log.end
                assert all(c.acked < end <= c.sent for end in c.in_flight) or c.lost
                assert list(c.in_flight) == sorted(c.in_flight)
            # What a cursor may still need is held.
            log.entries(min(c.acked for c in cursors), log.end)

    run()


# -- restarting a connection -------------------------------------------------------------


def test_restart_resumes_from_the_peers_offset_when_it_is_held():
    log, _ = make_log(capacity=100)
    cursor = log.cursor("p")
    fill(log, 30)
    cursor.next_frame(4, 10, 10**6)
    cursor.next_frame(4, 10, 10**6)
    cursor.ack(10)
    # The connection dropped; the peer had applied 15 (an ack was lost).
    assert cursor.restart(15) == (15, RESUMED, 0)
    assert (cursor.acked, cursor.sent, list(cursor.in_flight)) == (15, 15, [])
    assert cursor.next_frame(4, 100, 10**6) == (15, 30)


def test_restart_of_a_peer_that_does_not_know_the_log_starts_at_the_cursor():
    log, _ = make_log()
    cursor = log.cursor("p")
    fill(log, 5)
    cursor.next_frame(4, 10, 10**6)
    cursor.ack(2)
    assert cursor.restart(None) == (2, FRESH, 0)


def test_restart_of_a_peer_behind_the_tail_needs_a_repair_reported_once():
    log, _ = make_log(capacity=5)
    cursor = log.cursor("p")
    reports = []
    cursor.on_fell_behind = lambda c, skipped: reports.append(skipped)
    fill(log, 4)
    cursor.next_frame(4, 10, 10**6)
    cursor.ack(4)
    fill(log, 4)  # base 3: the cursor (4) is fine, but the peer says 1
    assert cursor.restart(1) == (4, REPAIR, 3)
    assert reports == [3] and log.fell_behind == 1


def test_restart_after_the_cursor_fell_off_declares_the_gap_without_reporting_again():
    log, _ = make_log(capacity=5)
    cursor = log.cursor("p")
    reports = []
    cursor.on_fell_behind = lambda c, skipped: reports.append(skipped)
    fill(log, 7)  # nothing acked: falls off at the 6th append
    assert reports == [5] and cursor.lost
    assert cursor.restart(0) == (5, REPAIR, 5)
    assert reports == [5] and not cursor.lost
    # The same for a peer that lost its memory of the log.
    fill(log, 6)
    assert cursor.lost
    assert cursor.restart(None)[1] == REPAIR and len(reports) == 2


def test_a_peer_that_knew_more_after_the_fall_resumes():
    # A warm start seeded the peer with a later position: no gap after all.
    log, _ = make_log(capacity=5)
    cursor = log.cursor("p")
    fill(log, 8)
    assert cursor.lost
    assert cursor.restart(6) == (6, RESUMED, 0)


def test_restart_refuses_an_offset_beyond_the_end():
    log, _ = make_log()
    cursor = log.cursor("p")
    fill(log, 3)
    with pytest.raises(InvalidInput, match="ends at 3"):
        cursor.restart(4)
    with pytest.raises(InvalidInput):
        cursor.restart(True)
    assert (cursor.acked, cursor.sent) == (0, 0)  # unchanged


def test_a_cursor_can_start_anywhere_held_and_be_removed():
    log, _ = make_log(capacity=10)
    fill(log, 15)
    with pytest.raises(InvalidInput):
        log.cursor("p", 4)
    cursor = log.cursor("p", 5)
    assert cursor.next_frame(4, 100, 10**6) == (5, 15)
    log.remove_cursor(cursor)
    assert log.cursors == ()
    fill(log, 30)
    assert not cursor.lost  # no longer watched


def test_position_is_where_a_snapshot_leaves_the_log():
    log, _ = make_log()
    fill(log, 4)
    assert log.position() == (log.log_id, 4)
