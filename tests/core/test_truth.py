"""Load truth in the pure core (issue 10): engine reset, gateway leases,
refresh, prefill and token counts, conditional adds, int32 saturation and ip
spellings, each on a fake clock."""

import pytest
from twisted.internet.task import Clock

from metacenter.core.cache import CacheIndex
from metacenter.core.errors import Conflict, InvalidInput
from metacenter.core.load import TOMB_DELETED, TOMB_RELEASED, LoadState, _pack, _created, _engine_id, \
    _lease_number, _prompt, _prompt_deleted, _tokens, request_fingerprint
from metacenter.core.picking import reset_engine

T0 = 1_700_000_000.0
EXPIRE = 660.0
TTL = 60.0
MAX = 2**31 - 1


def new_state(now=T0, **kwargs):
    clock = Clock()
    clock.advance(now)
    kwargs.setdefault("request_expire", EXPIRE)
    kwargs.setdefault("tombstone_ttl", TTL)
    return LoadState(clock, **kwargs), clock


def row(state, cluster, ip):
    return state.engine(cluster, ip).as_dict()


def counters(state):
    """{(cluster, ip): (queued, prompt, prefill, prefill_tokens, queued_tokens)}."""
    return {(name, e.ip): (e.queued, e.prompt, e.prefill, e.prefill_tokens, e.queued_tokens)
            for name, c in state.clusters.items() for e in c.engines.values()}


def drain(steps):
    return list(steps)


# -- the packed request ---------------------------------------------------------


@pytest.mark.parametrize("fields", [
    (0, 1, 0, False, 0, 0),
    (int(T0), 2**32 - 1, MAX, True, MAX, 2**32 - 1),
    (2**32, 12345, 1, False, MAX, 1),  # past 2106: still exact
    (int(T0), 1, MAX, False, 0, 0),
])
def test_every_packed_field_round_trips_at_its_limits(fields):
    created, engine_id, prompt, deleted, tokens, lease = fields
    packed = _pack(created, engine_id, prompt, deleted, tokens, lease)
    assert (_created(packed), _engine_id(packed), _prompt(packed), _prompt_deleted(packed), _tokens(packed),
            _lease_number(packed)) == fields


# -- prefill and token counts ---------------------------------------------------


def test_prefill_and_token_counts_follow_every_transition():
    state, _ = new_state()
    state.add("c", "a", "10.0.0.1", 100, prompt_tokens=25)
    state.add("c", "b", "10.0.0.1", 40, prompt_tokens=10)
    state.add("c", "n", "10.0.0.1", 7)  # no prompt_tokens: counts 0 tokens
    assert counters(state) == {("c", "10.0.0.1"): (3, 147, 3, 35, 35)}
    state.delete_prompt("a")
    assert counters(state) == {("c", "10.0.0.1"): (3, 47, 2, 10, 35)}
    state.delete_prompt("a")  # once only
    assert counters(state) == {("c", "10.0.0.1"): (3, 47, 2, 10, 35)}
    state.delete("a")
    assert counters(state) == {("c", "10.0.0.1"): (2, 47, 2, 10, 10)}
    state.delete("b")
    state.delete("n")
    assert counters(state) == {("c", "10.0.0.1"): (0, 0, 0, 0, 0)}
    assert row(state, "c", "10.0.0.1")["prefill_req_num"] == 0


def test_a_prompt_delete_before_the_add_keeps_its_tokens_out_of_prefill():
    state, _ = new_state()
    state.delete_prompt("a")
    state.add("c", "a", "10.0.0.1", 100, prompt_tokens=25)
    assert counters(state) == {("c", "10.0.0.1"): (1, 0, 0, 0, 25)}


@pytest.mark.parametrize("tokens", [-1, 2**31, 2**40])
def test_prompt_tokens_outside_the_range_are_refused_naming_the_field(tokens):
    state, _ = new_state()
    with pytest.raises(InvalidInput, match="prompt_tokens"):
        state.add("c", "a", "10.0.0.1", 1, prompt_tokens=tokens)
    assert state.request_count == 0 and state.clusters == {}


# -- int32 saturation -----------------------------------------------------------


def test_wire_rows_saturate_at_int32_and_the_engine_keeps_exact_values():
    state, _ = new_state()
    state.add("c", "a", "10.0.0.1", MAX, prompt_tokens=MAX)
    state.add("c", "b", "10.0.0.1", MAX, prompt_tokens=MAX)
    engine = state.engine("c", "10.0.0.1")
    assert (engine.prompt, engine.prefill_tokens, engine.queued_tokens) == (2 * MAX, 2 * MAX, 2 * MAX)
    wire = state.cluster_load("c")[0]
    assert wire["prompt_length"] == wire["prefill_tokens"] == wire["queued_tokens"] == MAX
    assert wire["queued_req_num"] == 2 and wire["prefill_req_num"] == 2
    assert wire["updated_time"] > MAX  # a timestamp (int64 in the gateway), never saturated
    state.delete_prompt("a")
    assert state.cluster_load("c")[0]["prompt_length"] == MAX  # exactly MAX now, not saturated
    assert engine.prompt == MAX


def test_a_saturated_queue_count_is_capped_too():
    state, _ = new_state()
    state.add("c", "a", "10.0.0.1", 1)
    state.engine("c", "10.0.0.1").queued = 2**31 + 5  # as a huge cluster would
    assert state.cluster_load("c")[0]["queued_req_num"] == MAX


# -- conditional add ------------------------------------------------------------


def test_a_conditional_add_on_an_unknown_engine_needs_zero():
    state, _ = new_state()
    with pytest.raises(Conflict) as refused:
        state.add("c", "a", "10.0.0.1", 5, if_updated_time=123)
    assert refused.value.data == {"ip": "10.0.0.1", "queued_req_num": 0, "prompt_length": 0, "updated_time": 0,
                                  "prefill_req_num": 0, "prefill_tokens": 0, "queued_tokens": 0}
    assert state.clusters == {} and state.request_state("a") is None
    assert state.add("c", "a", "10.0.0.1", 5, if_updated_time=0) is True


def test_a_conditional_add_succeeds_on_the_current_time_and_conflicts_on_a_stale_one():
    state, clock = new_state()
    state.add("c", "a", "10.0.0.1", 5)
    seen = row(state, "c", "10.0.0.1")["updated_time"]
    clock.advance(0.001)
    assert state.add("c", "b", "10.0.0.1", 7, if_updated_time=seen) is True
    current = row(state, "c", "10.0.0.1")
    assert current["updated_time"] != seen
    before = counters(state)
    with pytest.raises(Conflict) as refused:
        state.add("c", "x", "10.0.0.1", 9, if_updated_time=seen)
    assert refused.value.data == current
    assert "updated_time" in refused.value.reason and "if_updated_time" in refused.value.reason
    assert counters(state) == before and state.request_state("x") is None
    assert row(state, "c", "10.0.0.1") == current  # a refusal is no update


def test_two_changes_at_one_clock_reading_get_different_updated_times():
    # Without this a conditional add could not see a change made at the same
    # (coarse, or stepped-back) clock reading.
    state, clock = new_state()
    state.add("c", "a", "10.0.0.1", 5)
    first = row(state, "c", "10.0.0.1")["updated_time"]
    state.add("c", "b", "10.0.0.1", 5)
    second = row(state, "c", "10.0.0.1")["updated_time"]
    clock.advance(-1)  # a clock stepped back
    state.delete("b")
    assert first < second < row(state, "c", "10.0.0.1")["updated_time"]
    with pytest.raises(Conflict):
        state.add("c", "x", "10.0.0.1", 5, if_updated_time=first)


def test_a_retried_conditional_add_is_a_duplicate_not_a_conflict():
    state, _ = new_state()
    assert state.add("c", "a", "10.0.0.1", 5, if_updated_time=0) is True
    assert state.add("c", "a", "10.0.0.1", 5, if_updated_time=0) is False


# -- ip spellings ---------------------------------------------------------------

# Every form the API accepts, each with another spelling of the same address.
SPELLINGS = [
    ("10.0.0.1", "::ffff:10.0.0.1"),  # not the same: a mapped address is IPv6
    ("::ffff:10.0.0.1", "::ffff:a00:1"),
    ("::FFFF:10.0.0.1", "::ffff:10.0.0.1"),
    ("2001:DB8::1", "2001:db8::1"),
    ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
    ("::1", "0:0:0:0:0:0:0:1"),
    ("fe80::1", "FE80::0001"),
    ("127.0.0.1", "127.0.0.1"),
]


@pytest.mark.parametrize("first, other", SPELLINGS)
def test_the_load_row_carries_the_first_spelling_and_other_spellings_are_the_same_engine(first, other):
    state, _ = new_state()
    state.add("c", "a", first, 10)
    state.add("c", "b", other, 20)
    rows = state.cluster_load("c")
    same = state.engine("c", first) is state.engine("c", other)
    assert [r["ip"] for r in rows] == ([first] if same else [first, other])
    if same:
        assert rows[0]["queued_req_num"] == 2
        assert state.request_record("b")[1] == first
    assert state.engine_row("c", other)["ip"] == other  # an answer about one request: its own spelling


def test_mapped_and_plain_ipv4_are_two_engines():
    # ::ffff:10.0.0.1 is an IPv6 address (the engine is reached over IPv6);
    # keeping it apart from 10.0.0.1 is the safe reading.
    state, _ = new_state()
    state.add("c", "a", "10.0.0.1", 1)
    state.add("c", "b", "::ffff:10.0.0.1", 1)
    assert sorted(r["ip"] for r in state.cluster_load("c")) == ["10.0.0.1", "::ffff:10.0.0.1"]


@pytest.mark.parametrize("first, other", SPELLINGS)
def test_the_cache_answers_in_the_first_spelling_and_finds_any(first, other):
    clock = Clock()
    index = CacheIndex(clock)
    index.save("c", first, [1, 2, 3])
    index.save("c", other, [1, 2, 4])
    same = index.engine_count == 1
    if same:
        assert index.query("c", [1, 2, 3]) == [{"ip": first, "length": 3}]
        assert index.query("c", [1, 2, 4]) == [{"ip": first, "length": 3}]
        assert index.match_addresses("c", [1]) == {index._find("c", other).address: 1}
        assert index.forget_engine("c", other) == 4
        assert index.query("c", [1]) == []
    else:
        assert index.query("c", [1, 2, 4]) == [{"ip": other, "length": 3}, {"ip": first, "length": 2}]
        assert index.forget_engine("c", other) == 3
        assert index.query("c", [1]) == [{"ip": first, "length": 1}]


def test_a_bad_ip_is_refused_before_any_change():
    state, _ = new_state()
    with pytest.raises(InvalidInput, match="'ip'"):
        state.add("c", "a", "10.0.0.256", 1)
    with pytest.raises(InvalidInput, match="'ip'"):
        state.reset_engine("c", "fe80::1%eth0")
    assert state.clusters == {} and state.request_count == 0
    index = CacheIndex(Clock())
    with pytest.raises(InvalidInput, match="'ip'"):
        index.save("c", "not-an-ip", [1])
    assert index.block_count == 0


def test_an_engine_recreated_after_a_reset_takes_its_new_first_spelling():
    state, _ = new_state()
    state.add("c", "a", "2001:DB8::1", 1)
    state.reset_engine("c", "2001:db8::1")
    state.add("c", "b", "2001:db8:0::1", 1)
    assert [r["ip"] for r in state.cluster_load("c")] == ["2001:db8:0::1"]


# -- engine reset ---------------------------------------------------------------


def fill_engine(state, count, ip="10.0.0.1", cluster="c", prefix="r"):
    for i in range(count):
        state.add(cluster, f"{prefix}{i}", ip, 10, prompt_tokens=3)


def test_a_reset_releases_every_request_of_the_engine_and_only_those():
    state, _ = new_state()
    fill_engine(state, 5)
    state.delete_prompt("r0")
    fill_engine(state, 3, ip="10.0.0.2", prefix="other")
    reference, _ = new_state()
    fill_engine(reference, 3, ip="10.0.0.2", prefix="other")
    assert state.reset_engine("c", "10.0.0.1") == 5
    assert [r["ip"] for r in state.cluster_load("c")] == ["10.0.0.2"]  # it left GET
    assert state.request_count == 3
    c, ref = state.clusters["c"], reference.clusters["c"]
    assert (c.live, c.digest) == (ref.live, ref.digest)  # as if the five never existed
    for i in range(5):
        assert state.request_state(f"r{i}") == "deleted" and state.released(f"r{i}")
        assert state.request_record(f"r{i}") is None
    assert state.stats["reset_requests"] == 5 and state.stats["reset_engines"] == 1


def test_a_reset_does_no_work_per_request():
    state, _ = new_state()
    fill_engine(state, 10_000)
    entries = (len(state._requests), state.tombstone_count)
    assert state.reset_engine("c", "10.0.0.1") == 10_000
    # Nothing was walked: the requests are where they were, counted nowhere.
    assert (len(state._requests), state.tombstone_count) == entries
    assert state.request_count == 0 and state.clusters == {}


def test_late_and_replicated_events_of_reset_requests_change_nothing():
    state, clock = new_state()
    fill_engine(state, 4)
    state.reset_engine("c", "10.0.0.1")
    clock.advance(1)
    version = state._sequence
    assert state.delete_prompt("r0") is False
    assert state.delete("r1") is False
    assert state.add("c", "r2", "10.0.0.1", 10) is False
    assert state.apply_record("r3", "c", "10.0.0.1", 10, False, T0) is False
    assert state.apply_record("r1", "c", "10.0.0.1", 10, True, T0) is False
    assert state.add("c", "r0", "10.0.0.1", 10) is False  # again, now that it is a tombstone
    assert state.clusters == {} and state._sequence == version  # not even a row came back
    assert all(state.released(f"r{i}") for i in range(4))
    assert state.request_count == 0


def test_new_traffic_after_a_reset_starts_from_zero():
    state, _ = new_state()
    fill_engine(state, 4)
    state.reset_engine("c", "10.0.0.1")
    state.add("c", "fresh", "10.0.0.1", 7, prompt_tokens=2)
    assert counters(state) == {("c", "10.0.0.1"): (1, 7, 1, 2, 2)}
    state.delete("r0")  # a late delete of an old request does not touch the new engine
    assert counters(state) == {("c", "10.0.0.1"): (1, 7, 1, 2, 2)}
    assert state.clusters["c"].live == 1


def test_resetting_an_unknown_engine_is_zero_and_harmless():
    state, _ = new_state()
    assert state.reset_engine("nope", "10.0.0.1") == 0
    state.add("c", "a", "10.0.0.1", 1)
    assert state.reset_engine("c", "10.0.0.2") == 0
    assert counters(state) == {("c", "10.0.0.1"): (1, 1, 1, 0, 0)}


def test_a_snapshot_after_a_reset_carries_the_requests_as_deletes():
    state, _ = new_state()
    fill_engine(state, 3)
    state.add("c", "keep", "10.0.0.2", 1)
    state.reset_engine("c", "10.0.0.1")
    records = list(state.iter_requests())
    stones = {r: kind for r, kind, _ in state.iter_tombstones()}
    assert [r[0] for r in records] == ["keep"]
    assert stones == {"r0": TOMB_DELETED, "r1": TOMB_DELETED, "r2": TOMB_DELETED}
    assert {r: k for r, k, _ in state.iter_tombstones(full=True)} == dict.fromkeys(stones, TOMB_RELEASED)
    assert state.request_count == 1 and len(state._requests) == 1  # turned into tombstones on the way

    peer, _ = new_state()
    for record in records:
        peer.apply_record(*record)
    for request_id, kind, _ in state.iter_tombstones(full=True):
        peer.apply_tombstone(request_id, kind)
    # A late replicated add on the warm-started peer does not bring one back.
    assert peer.add("c", "r0", "10.0.0.1", 10) is False
    assert counters(peer) == {("c", "10.0.0.2"): (1, 1, 1, 0, 0)}
    assert peer.released("r0")


def test_an_older_peer_that_missed_the_reset_is_told_to_delete():
    # Anti-entropy compares request states: a reset request is 'deleted' here.
    state, _ = new_state()
    fill_engine(state, 1)
    peer, _ = new_state()
    fill_engine(peer, 1)
    state.reset_engine("c", "10.0.0.1")
    assert state.request_state("r0") == "deleted"
    assert peer.apply_tombstone("r0", TOMB_DELETED) is True
    assert peer.clusters["c"].live == state.clusters.get("c", peer.clusters["c"]).live == 0


def test_the_sweep_turns_reset_requests_into_tombstones_without_counting_them_as_expired():
    state, clock = new_state()
    fill_engine(state, 3)
    state.reset_engine("c", "10.0.0.1")
    clock.advance(EXPIRE + 1)
    state.expire_all()
    assert state.stats["expired_requests"] == 0
    assert len(state._requests) == 0 and state.tombstone_count == 3
    assert all(state.released(f"r{i}") for i in range(3))
    clock.advance(TTL + 1)
    state.expire_all()
    assert state.tombstone_count == 0


def test_reset_engine_drops_the_cache_and_counts_both():
    clock = Clock()
    clock.advance(T0)
    state = LoadState(clock)
    index = CacheIndex(clock)
    state.engine_removed_callbacks.append(index.engine_removed)  # as the node wires them
    fill_engine(state, 2, ip="::FFFF:10.0.0.1")
    index.save("c", "::ffff:a00:1", [1, 2, 3])
    index.save("c", "10.0.0.9", [1])
    assert reset_engine(state, index, "c", "::ffff:10.0.0.1") == (2, 3)
    assert index.query("c", [1, 2, 3]) == [{"ip": "10.0.0.9", "length": 1}]
    assert reset_engine(state, index, "c", "::ffff:10.0.0.1") == (0, 0)
    assert reset_engine(state, None, "c", "10.0.0.9") == (0, 0)


# -- leases ---------------------------------------------------------------------


def test_an_add_under_a_new_lease_starts_it_with_the_default_ttl():
    state, clock = new_state(lease_ttl=10.0)
    state.add("c", "a", "10.0.0.1", 1, lease="gw-1")
    clock.advance(2.5)
    assert state.leases() == [{"lease": "gw-1", "ttl_ms": 10_000, "expires_in_ms": 7500, "requests": 1}]
    assert state.lease_of("a") == "gw-1"
    assert state.request_record("a", full=True)[5:] == (0, "gw-1")


def test_a_lease_that_goes_a_ttl_without_renewal_releases_its_requests():
    state, clock = new_state()
    assert state.keepalive("gw-1", 3000) == {"lease": "gw-1", "ttl_ms": 3000, "requests": 0}
    state.add("c", "a", "10.0.0.1", 10, lease="gw-1")
    state.add("c", "b", "10.0.0.1", 20, lease="gw-1")
    state.add("c", "free", "10.0.0.1", 30)  # no lease: as today
    clock.advance(2)
    assert state.keepalive("gw-1", 3000)["requests"] == 2
    clock.advance(2.9)
    assert sum(drain(state.lease_steps())) == 0  # renewed 2.9 s ago: alive
    assert counters(state)[("c", "10.0.0.1")][0] == 3
    clock.advance(0.1)
    assert drain(state.lease_steps()) == [2]
    assert counters(state) == {("c", "10.0.0.1"): (1, 30, 1, 0, 0)}
    assert state.released("a") and state.released("b") and state.request_state("free") == "live"
    assert state.leases() == [] and state.stats["expired_leases"] == 1
    assert state.stats["lease_released_requests"] == 2
    assert state.add("c", "a", "10.0.0.1", 10, lease="gw-1") is False  # a late retry
    assert state.leases() == []  # ...which did not start the lease again


def test_a_keepalive_after_the_deadline_starts_a_new_lease_and_the_old_requests_go():
    state, clock = new_state()
    state.keepalive("gw", 1000)
    state.add("c", "a", "10.0.0.1", 1, lease="gw")
    clock.advance(1.5)  # no sweep ran meanwhile
    assert state.keepalive("gw", 1000)["requests"] == 0
    assert state.lease_of("a") is None and state.releasing == 1
    state.add("c", "b", "10.0.0.1", 1, lease="gw")
    drain(state.lease_steps())
    assert state.released("a") and state.lease_of("b") == "gw"


def test_a_shorter_renewal_is_honoured():
    state, clock = new_state()
    state.keepalive("gw", 300_000)
    state.add("c", "a", "10.0.0.1", 1, lease="gw")
    state.keepalive("gw", 1000)
    clock.advance(1)
    drain(state.lease_steps())
    assert state.released("a")


def test_keepalives_keep_one_heap_entry_per_lease():
    state, clock = new_state()
    for _ in range(1000):
        state.keepalive("gw", 10_000)
        clock.advance(0.01)
    assert len(state._lease_heap) == 1


def test_revoke_releases_at_once_and_a_big_lease_in_bounded_steps():
    state, _ = new_state()
    for i in range(2500):
        state.add("c", f"r{i}", "10.0.0.1", 1, lease="big")
    state.add("c", "small-1", "10.0.0.2", 1, lease="small")
    assert state.revoke_lease("small") == 1
    assert state.released("small-1")  # a small lease goes within the call
    assert state.revoke_lease("big", chunk=1000) == 2500
    assert state.request_count == 1500 and state.releasing == 1500
    steps = drain(state.lease_steps(chunk=600))
    assert steps == [600, 600, 300]
    assert state.request_count == 0 and state.releasing == 0
    assert state.stats["revoked_leases"] == 2
    assert state.revoke_lease("big") == 0  # not alive any more


def test_requests_deleted_or_reset_while_their_lease_is_released_are_not_counted_twice():
    state, _ = new_state()
    for i in range(10):
        state.add("c", f"r{i}", "10.0.0.1" if i < 5 else "10.0.0.2", 1, lease="gw")
    state.revoke_lease("gw", chunk=1)
    state.delete("r3")
    state.delete("r7")
    state.reset_engine("c", "10.0.0.1")
    state.delete_prompt("r8")
    drain(state.lease_steps(chunk=1))
    assert counters(state) == {("c", "10.0.0.2"): (0, 0, 0, 0, 0)}
    assert state.request_count == 0 and state.clusters["c"].live == 0 and state.clusters["c"].digest == 0


def test_a_delete_takes_the_request_out_of_its_lease():
    state, _ = new_state()
    state.add("c", "a", "10.0.0.1", 1, lease="gw")
    state.add("c", "b", "10.0.0.1", 1, lease="gw")
    state.delete("a")
    assert state.leases()[0]["requests"] == 1
    assert state.revoke_lease("gw") == 1


@pytest.mark.parametrize("bad, reason", [
    ("", "field 'lease' must be a string of 1 to 128 characters, got 0 characters"),
    # The length limit is the bounds' (--max-lease-length, 128 by default), worded like every length refusal.
    ("x" * 129, "field 'lease' must be at most 128 characters long, got 129"),
    (7, "field 'lease' must be a string of 1 to 128 characters, got number"),
    (True, "field 'lease' must be a string of 1 to 128 characters, got boolean"),
    ("\ud800", "field 'lease' must be valid Unicode text"),
])
def test_a_bad_lease_is_refused_everywhere_with_state_unchanged(bad, reason):
    state, _ = new_state()
    state.add("c", "a", "10.0.0.1", 1, lease="ok")
    before = (counters(state), state.leases(), state.request_count)
    for call in (lambda: state.add("c", "b", "10.0.0.1", 1, lease=bad), lambda: state.keepalive(bad),
                 lambda: state.revoke_lease(bad)):
        with pytest.raises(InvalidInput) as refused:
            call()
        assert refused.value.reason.startswith(reason)
    assert (counters(state), state.leases(), state.request_count) == before
    assert state.request_state("b") is None


def test_a_lease_name_of_128_characters_is_fine():
    state, _ = new_state()
    assert state.keepalive("é" * 128)["lease"] == "é" * 128


@pytest.mark.parametrize("ttl_ms, got", [(999, "999"), (300_001, "300001"), (True, "boolean"), (1.5, "number"),
                                          ("1000", "string")])
def test_a_ttl_out_of_range_is_refused(ttl_ms, got):
    state, _ = new_state()
    with pytest.raises(InvalidInput) as refused:
        state.keepalive("gw", ttl_ms)
    assert refused.value.reason == f"field 'ttl_ms' must be an integer in [1000, 300000], got {got}"
    assert state.leases() == []


def test_leases_travel_in_snapshots_with_their_remaining_time():
    state, clock = new_state()
    state.keepalive("gw", 20_000)
    state.add("c", "a", "10.0.0.1", 5, prompt_tokens=4, lease="gw")
    state.add("c", "b", "10.0.0.1", 5)
    clock.advance(5)
    peer, peer_clock = new_state(now=T0 + 5)
    for lease in state.iter_leases():
        assert peer.apply_lease(*lease) is True
    for record in state.iter_requests(full=True):
        peer.apply_record(*record)
    assert peer.leases() == state.leases()
    assert [r[1:] for r in peer.iter_requests(full=True)] == [r[1:] for r in state.iter_requests(full=True)]
    peer_clock.advance(15)
    drain(peer.lease_steps())
    assert peer.released("a") and peer.request_state("b") == "live"
    assert peer.apply_lease("gw", 20_000, 0) is False


# -- refresh --------------------------------------------------------------------


def test_refresh_restarts_the_expiry_clock_of_known_requests_only():
    state, clock = new_state()
    state.add("c", "long", "10.0.0.1", 1)
    state.add("c", "short", "10.0.0.1", 1)
    state.delete("gone")
    clock.advance(EXPIRE - 1)
    assert state.refresh(["long", "long", "unknown", "gone"]) == 1
    clock.advance(1)
    state.expire_all()
    assert state.request_state("long") == "live" and state.request_state("short") == "deleted"
    assert state.request_record("long")[4] == int(T0 + EXPIRE - 1)
    clock.advance(EXPIRE)
    state.expire_all()
    assert state.request_state("long") == "deleted"
    assert state.stats["refreshed_requests"] == 1


def test_an_engine_kept_busy_by_refreshed_requests_is_not_removed_as_idle():
    state, clock = new_state()
    state.add("c", "long", "10.0.0.1", 1)
    for _ in range(3):
        clock.advance(EXPIRE - 1)
        state.refresh(["long"])
        state.expire_all()
        assert counters(state) == {("c", "10.0.0.1"): (1, 1, 1, 0, 0)}
    state.delete("long")
    clock.advance(EXPIRE)
    state.expire_all()
    assert state.clusters == {}


def test_refresh_ignores_reset_requests_and_refuses_too_many():
    state, _ = new_state()
    state.add("c", "a", "10.0.0.1", 1)
    state.reset_engine("c", "10.0.0.1")
    assert state.refresh(["a"]) == 0
    with pytest.raises(InvalidInput) as refused:
        state.refresh([f"r{i}" for i in range(10_001)])
    assert refused.value.reason == "field 'request_ids' has 10001 items; at most 10000 are allowed"
    assert state.refresh([f"r{i}" for i in range(10_000)]) == 0


def test_digest_and_counts_survive_a_refresh():
    state, _ = new_state()
    state.add("c", "a", "10.0.0.1", 1)
    before = (state.clusters["c"].live, state.clusters["c"].digest, counters(state))
    state.refresh(["a"])
    assert (state.clusters["c"].live, state.clusters["c"].digest, counters(state)) == before
    assert state.clusters["c"].digest == request_fingerprint("a", False)
