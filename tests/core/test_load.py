"""The pure load table: every transition, expiry on a fake clock, replica
convergence and snapshot merging. Property tests compare it with a model that
only knows the wire's rule: a request's effect depends on the *set* of events
seen for it."""

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from metacenter.core.load import TOMB_DELETED, TOMB_PROMPT, LoadState

T0 = 1_700_000_000.0
EXPIRE = 660.0
TTL = 60.0


def new_state(now=T0, request_expire=EXPIRE, tombstone_ttl=TTL):
    clock = Clock()
    clock.advance(now)
    return LoadState(clock, request_expire=request_expire, tombstone_ttl=tombstone_ttl), clock


def counters(state):
    """{(cluster, ip): (queued, prompt)} of every engine."""
    return {
        (name, e.ip): (e.queued, e.prompt)
        for name, cluster in state.clusters.items()
        for e in cluster.engines.values()
    }


def replica_view(state):
    """Everything two replicas must agree on (not the local times)."""
    return (
        counters(state),
        {name: (c.live, c.digest) for name, c in state.clusters.items()},
        {r[0]: r[1:5] for r in state.iter_requests()},
        {t[0]: t[1] for t in state.iter_tombstones()},
    )


def apply(state, event, request):
    request_id, cluster, ip, prompt = request
    if event == "add":
        return state.add(cluster, request_id, ip, prompt)
    if event == "prompt":
        return state.delete_prompt(request_id)
    return state.delete(request_id)


# -- one request, every order ------------------------------------------------

REQ = ("r1", "llama", "10.0.0.1", 300)

# What the set of events seen for one request leaves behind (docs/architecture.md, the load table).
BY_EVENT_SET = {
    frozenset({"add"}): ("live", (1, 300)),
    frozenset({"prompt"}): ("prompt-tombstone", None),
    frozenset({"delete"}): ("deleted", None),
    frozenset({"add", "prompt"}): ("live-prompt-deleted", (1, 0)),
    frozenset({"add", "delete"}): ("deleted", (0, 0)),
    frozenset({"prompt", "delete"}): ("deleted", None),
    frozenset({"add", "prompt", "delete"}): ("deleted", (0, 0)),
}

ORDERS = [
    order
    for size in (1, 2, 3)
    for subset in itertools.combinations(("add", "prompt", "delete"), size)
    for order in itertools.permutations(subset)
]


@pytest.mark.parametrize("order", ORDERS, ids="-".join)
@pytest.mark.parametrize("repeat", [1, 2, 3], ids=["once", "twice", "thrice"])
def test_any_order_and_repetition_gives_the_state_of_the_event_set(order, repeat):
    state, _ = new_state()
    events = [e for e in order for _ in range(repeat)]  # duplicates back to back
    events += list(order) * (repeat - 1)  # and duplicates after everything else
    for event in events:
        apply(state, event, REQ)
    expected_state, expected_counters = BY_EVENT_SET[frozenset(order)]
    assert state.request_state("r1") == expected_state
    if expected_counters is None:
        assert counters(state) == {}
        assert state.clusters == {}
    else:
        assert counters(state) == {("llama", "10.0.0.1"): expected_counters}
        live = 1 if expected_state.startswith("live") else 0
        assert state.clusters["llama"].live == live
        assert (state.clusters["llama"].digest != 0) == bool(live)


def test_return_values_say_whether_counters_changed():
    state, _ = new_state()
    assert state.add("llama", "r1", "10.0.0.1", 300) is True
    assert state.add("llama", "r1", "10.0.0.1", 300) is False  # duplicate
    assert state.delete_prompt("r1") is True
    assert state.delete_prompt("r1") is False  # must not subtract twice
    assert state.delete("r1") is True
    assert state.delete("r1") is False
    assert state.add("llama", "r1", "10.0.0.1", 300) is False  # late add
    assert state.delete_prompt("r1") is False
    assert counters(state) == {("llama", "10.0.0.1"): (0, 0)}


def test_prompt_delete_before_add_is_applied_when_the_add_arrives():
    state, _ = new_state()
    assert state.delete_prompt("r1") is False
    assert state.request_state("r1") == "prompt-tombstone"
    assert state.add("llama", "r1", "10.0.0.1", 300) is True
    assert counters(state) == {("llama", "10.0.0.1"): (1, 0)}
    assert state.tombstone_count == 0  # the tombstone was used up
    assert state.delete("r1") is True
    assert counters(state) == {("llama", "10.0.0.1"): (0, 0)}


def test_delete_of_a_prompt_deleted_request_removes_only_what_is_left():
    state, _ = new_state()
    state.add("c", "a", "10.0.0.1", 100)
    state.add("c", "b", "10.0.0.1", 40)
    state.delete_prompt("a")
    assert counters(state) == {("c", "10.0.0.1"): (2, 40)}
    state.delete("a")
    assert counters(state) == {("c", "10.0.0.1"): (1, 40)}
    state.delete("b")
    assert counters(state) == {("c", "10.0.0.1"): (0, 0)}


def test_duplicate_add_with_other_fields_keeps_the_first():
    state, _ = new_state()
    state.add("c", "a", "10.0.0.1", 100)
    assert state.add("c", "a", "10.0.0.2", 999) is False
    assert counters(state) == {("c", "10.0.0.1"): (1, 100)}
    assert state.request_record("a") == ("c", "10.0.0.1", 100, False, int(T0))


@pytest.mark.parametrize("prompt_length", [-1, 2**31, 2**40])
def test_prompt_length_outside_the_wire_range_is_refused(prompt_length):
    state, _ = new_state()
    with pytest.raises(ValueError):
        state.add("c", "a", "10.0.0.1", prompt_length)
    assert state.request_count == 0 and counters(state) == {}


def test_prompt_length_limits_are_stored_exactly():
    state, _ = new_state()
    state.add("c", "a", "10.0.0.1", 2**31 - 1)
    state.add("c", "b", "10.0.0.1", 0)
    assert counters(state) == {("c", "10.0.0.1"): (2, 2**31 - 1)}
    assert state.request_record("a")[2] == 2**31 - 1
    state.delete_prompt("a")
    assert counters(state) == {("c", "10.0.0.1"): (2, 0)}


# -- engines, clusters, the query ---------------------------------------------


def test_engines_and_clusters_are_created_on_first_use():
    state, _ = new_state()
    state.add("llama", "a", "10.0.0.1", 10)
    state.add("llama", "b", "10.0.0.2", 20)
    state.add("qwen", "c", "10.0.0.1", 30)  # same ip, other cluster: other engine
    assert counters(state) == {
        ("llama", "10.0.0.1"): (1, 10),
        ("llama", "10.0.0.2"): (1, 20),
        ("qwen", "10.0.0.1"): (1, 30),
    }
    assert state.engine_count == 3
    assert sorted(state.clusters) == ["llama", "qwen"]


def test_cluster_load_has_the_wire_shape_and_nanosecond_times():
    state, clock = new_state()
    state.add("llama", "a", "10.0.0.1", 10)
    clock.advance(1.5)
    state.add("llama", "b", "10.0.0.2", 20)
    clock.advance(2.25)
    state.delete_prompt("a")
    load = sorted(state.cluster_load("llama"), key=lambda e: e["ip"])
    assert load == [
        {"ip": "10.0.0.1", "queued_req_num": 1, "prompt_length": 0,
         "updated_time": int((T0 + 3.75) * 1e9),
         "prefill_req_num": 0, "prefill_tokens": 0, "queued_tokens": 0},
        {"ip": "10.0.0.2", "queued_req_num": 1, "prompt_length": 20,
         "updated_time": int((T0 + 1.5) * 1e9),
         "prefill_req_num": 1, "prefill_tokens": 0, "queued_tokens": 0},
    ]
    assert all(type(v) is int for e in load for k, v in e.items() if k != "ip")
    assert state.cluster_load("unknown") == []


def test_version_changes_on_every_change_and_only_then():
    state, clock = new_state()
    seen = []

    def version_changed():
        version = state.clusters["c"].version
        changed = version not in seen
        seen.append(version)
        return changed

    state.add("c", "a", "10.0.0.1", 10)
    assert version_changed()
    state.add("c", "b", "10.0.0.2", 10)  # a new engine
    assert version_changed()
    state.add("c", "a", "10.0.0.1", 10)  # duplicate: nothing changes
    assert not version_changed()
    state.delete_prompt("a")
    assert version_changed()
    state.delete_prompt("a")
    assert not version_changed()
    state.delete("a")
    assert version_changed()
    state.add("c", "a", "10.0.0.1", 10)  # late add: the engine's updated_time moves
    assert version_changed()
    state.delete("unknown")  # a tombstone only, no engine changes
    assert not version_changed()
    clock.advance(EXPIRE / 2)
    state.add("c", "x", "10.0.0.2", 1)
    assert version_changed()
    clock.advance(EXPIRE / 2 + 1)
    state.expire_all()  # engine 10.0.0.1 idle: removed, cluster stays
    assert counters(state) == {("c", "10.0.0.2"): (1, 1)}
    assert version_changed()


def test_versions_are_never_reused_by_a_recreated_cluster():
    state, clock = new_state()
    state.add("c", "a", "10.0.0.1", 10)
    old = state.clusters["c"].version
    clock.advance(EXPIRE + 1)
    state.expire_all()
    assert "c" not in state.clusters
    state.add("c", "b", "10.0.0.1", 10)
    assert state.clusters["c"].version > old


def test_digest_tracks_the_live_set_not_the_history():
    state, _ = new_state()
    state.add("c", "a", "10.0.0.1", 10)
    only_a = state.clusters["c"].digest
    state.add("c", "b", "10.0.0.1", 10)
    assert state.clusters["c"].digest not in (0, only_a)
    state.delete("b")
    assert state.clusters["c"].digest == only_a
    state.delete_prompt("a")
    assert state.clusters["c"].digest != only_a  # prompt state is replicated state
    state.delete("a")
    assert (state.clusters["c"].live, state.clusters["c"].digest) == (0, 0)


# -- expiry ---------------------------------------------------------------------


def test_a_request_expires_after_request_expire_as_if_deleted():
    state, clock = new_state()
    state.add("c", "a", "10.0.0.1", 100)
    clock.advance(1)
    state.add("c", "b", "10.0.0.1", 50)
    clock.advance(EXPIRE - 1.5)  # a is 659.5 s old
    state.expire_all()
    assert state.request_count == 2
    clock.advance(0.5)
    state.expire_all()
    assert state.request_state("a") == "deleted" and state.request_state("b") == "live"
    assert counters(state) == {("c", "10.0.0.1"): (1, 50)}
    assert state.stats["expired_requests"] == 1
    assert state.add("c", "a", "10.0.0.1", 100) is False  # late add of an expired one
    assert state.delete("a") is False
    assert counters(state) == {("c", "10.0.0.1"): (1, 50)}
    clock.advance(1)
    state.expire_all()  # b expires; the late add of a kept the engine
    assert counters(state) == {("c", "10.0.0.1"): (0, 0)}
    assert state.clusters["c"].live == 0 and state.clusters["c"].digest == 0
    clock.advance(EXPIRE)
    state.expire_all()
    assert state.engine_count == 0 and state.clusters == {}


def test_tombstones_last_tombstone_ttl():
    state, clock = new_state()
    state.delete("d")
    state.delete_prompt("p")
    clock.advance(TTL - 1)
    state.expire_all()
    assert state.request_state("d") == "deleted"
    assert state.request_state("p") == "prompt-tombstone"
    clock.advance(1)
    state.expire_all()
    assert state.tombstone_count == 0 and state.request_state("d") is None
    assert state.stats["expired_tombstones"] == 2
    # Past the bound the add counts: the reordering window is tombstone_ttl.
    assert state.add("c", "d", "10.0.0.1", 5) is True


def test_a_repeated_delete_renews_its_tombstone():
    state, clock = new_state()
    state.delete("d")
    clock.advance(TTL / 2)
    state.delete("d")
    clock.advance(TTL / 2 + 1)
    state.expire_all()
    assert state.request_state("d") == "deleted"
    clock.advance(TTL / 2)
    state.expire_all()
    assert state.request_state("d") is None


def test_idle_engines_and_clusters_are_removed_and_observers_told():
    state, clock = new_state()
    removed = []
    state.engine_removed_callbacks.append(lambda engine: removed.append((engine.cluster, engine.ip)))
    state.add("c", "a", "10.0.0.1", 1)
    state.add("c", "b", "10.0.0.2", 1)
    state.add("solo", "s", "10.0.0.9", 1)
    state.delete("a")
    state.delete("s")
    clock.advance(EXPIRE - 10)
    state.delete("b")  # keeps 10.0.0.2 busy
    clock.advance(10)
    state.expire_all()
    assert sorted(removed) == [("c", "10.0.0.1"), ("solo", "10.0.0.9")]
    assert counters(state) == {("c", "10.0.0.2"): (0, 0)}
    assert sorted(state.clusters) == ["c"]
    assert state.stats["expired_engines"] == 2
    clock.advance(EXPIRE)
    state.expire_all()
    assert removed[-1] == ("c", "10.0.0.2") and state.clusters == {} and state.engine_count == 0


def test_an_engine_whose_requests_all_expire_goes_in_the_same_sweep():
    """Expiry is not an update from a gateway: an engine that died with
    requests in flight leaves with them, not request_expire later."""
    state, clock = new_state()
    removed = []
    state.engine_removed_callbacks.append(removed.append)
    state.add("c", "a", "10.0.0.1", 1)
    state.add("c", "b", "10.0.0.2", 1)
    clock.advance(EXPIRE - 1)
    state.delete_prompt("b")  # 10.0.0.2 is alive
    clock.advance(1)
    state.expire_all()
    assert [(e.ip, e.queued, e.prompt) for e in removed] == [("10.0.0.1", 0, 0)]
    assert state.request_state("a") == state.request_state("b") == "deleted"
    assert counters(state) == {("c", "10.0.0.2"): (0, 0)}
    assert state.clusters["c"].live == 0


def test_sender_timestamp_sets_the_birth_when_plausible():
    state, clock = new_state()
    state.add("c", "old", "10.0.0.1", 1, timestamp_ns=int((T0 - 100) * 1e9))
    state.add("c", "future", "10.0.0.1", 1, timestamp_ns=int((T0 + 3600) * 1e9))
    state.add("c", "ancient", "10.0.0.1", 1, timestamp_ns=int((T0 - 10 * EXPIRE) * 1e9))
    state.add("c", "none", "10.0.0.1", 1)
    assert state.request_record("old")[4] == int(T0 - 100)
    # A sender's clock far off is not trusted: the request is new.
    assert state.request_record("future")[4] == int(T0)
    assert state.request_record("ancient")[4] == int(T0)
    clock.advance(EXPIRE - 100)
    state.expire_all()
    assert {r[0] for r in state.iter_requests()} == {"future", "ancient", "none"}


def test_straggler_inserted_behind_newer_requests_still_expires_on_time():
    state, clock = new_state()
    state.add("c", "new", "10.0.0.1", 1)
    clock.advance(300)
    # Enough of them that a younger request stands in front of every straggler.
    newer = {f"newer-{i}" for i in range(200)}
    for request_id in newer:
        state.add("c", request_id, "10.0.0.1", 1)
    # Snapshot records older than the newest in the table, inserted last.
    stragglers = {f"straggler-{i}" for i in range(50)}
    for request_id in stragglers:
        state.apply_record(request_id, "c", "10.0.0.2", 7, False, T0 - 200)
    state.apply_record("straggler2", "c", "10.0.0.2", 7, True, T0 + 100)
    clock.advance(EXPIRE - 500)  # the stragglers are 660 s old, the others younger
    state.expire_all()
    assert {r[0] for r in state.iter_requests()} == {"new", "straggler2"} | newer
    assert {state.request_state(r) for r in stragglers} == {"deleted"}
    assert counters(state)[("c", "10.0.0.2")] == (1, 0)
    clock.advance(300)  # new is 760 s old, straggler2 660 s, newer 460 s
    state.expire_all()
    assert {r[0] for r in state.iter_requests()} == newer


def test_a_snapshot_record_older_than_the_expiry_goes_at_the_next_sweep():
    state, clock = new_state()
    state.apply_record("old", "c", "10.0.0.1", 7, False, T0 - EXPIRE - 30)
    assert state.request_state("old") == "live"
    state.expire_all()
    assert state.request_state("old") == "deleted"
    assert counters(state) == {("c", "10.0.0.1"): (0, 0)}


def test_each_expire_step_does_at_most_chunk_removals():
    state, clock = new_state()
    for i in range(25):
        state.add("c", f"r{i}", f"10.0.0.{i % 7}", 1)  # more engines than a chunk
        state.apply_record(f"s{i}", "c", "10.0.1.1", 1, False, T0 - 1 - i)  # stragglers
        state.delete(f"d{i}")
    clock.advance(EXPIRE + TTL + 1)
    steps = list(state.expire(chunk=4))
    assert all(0 <= n <= 4 for n in steps)
    assert sum(steps) == 50 + 25 + 8  # requests, tombstones, engines
    assert state.request_count == 0 and state.engine_count == 0 and state.clusters == {}
    assert state.stats["expired_requests"] == 50
    # The 25 deletes are forgotten; the 50 expired requests are remembered as deleted.
    assert state.tombstone_count == 50
    assert {kind for _, kind, _ in state.iter_tombstones()} == {TOMB_DELETED}


def test_mutations_between_expire_steps_are_kept():
    """The shell runs the generator over several reactor turns."""
    state, clock = new_state()
    for i in range(20):
        state.add("c", f"r{i}", "10.0.0.1", 1)
    clock.advance(EXPIRE)
    sweep = state.expire(chunk=5)
    next(sweep)
    state.add("c", "fresh", "10.0.0.1", 3)
    state.delete("r19")
    for _ in sweep:
        pass
    assert {r[0] for r in state.iter_requests()} == {"fresh"}
    assert counters(state) == {("c", "10.0.0.1"): (1, 3)}


# -- snapshots ------------------------------------------------------------------


def busy_state():
    state, clock = new_state()
    rng = random.Random(7)
    for i in range(300):
        clock.advance(rng.random())
        request = (f"req-{i}", rng.choice(["c1", "c2"]), f"10.0.0.{rng.randrange(5)}", rng.randrange(5000))
        for event in rng.sample(["add", "prompt", "delete"], rng.randrange(1, 4)):
            apply(state, event, request)
    return state, clock


def merge(source, target):
    changed = False
    for record in source.iter_requests():
        changed = target.apply_record(*record) or changed
    for request_id, kind, _created in source.iter_tombstones():
        changed = target.apply_tombstone(request_id, kind) or changed
    return changed


def test_snapshot_merged_into_an_empty_state_gives_the_same_replica_view():
    source, clock = busy_state()
    target = LoadState(clock, request_expire=EXPIRE, tombstone_ttl=TTL)
    assert merge(source, target) is True
    live_engines = {k: v for k, v in counters(source).items() if v != (0, 0)}
    assert counters(target) == live_engines
    for name, cluster in target.clusters.items():
        assert (cluster.live, cluster.digest) == (source.clusters[name].live, source.clusters[name].digest)
    assert replica_view(target)[2:] == replica_view(source)[2:]
    before = replica_view(target)
    assert merge(source, target) is False  # merging twice changes nothing
    assert replica_view(target) == before


def test_snapshot_records_keep_their_birth_time():
    source, clock = busy_state()
    target = LoadState(clock, request_expire=EXPIRE, tombstone_ttl=TTL)
    merge(source, target)
    assert {r[0]: r[5] for r in target.iter_requests()} == {r[0]: r[5] for r in source.iter_requests()}


def test_tombstone_kinds_round_trip():
    state, _ = new_state()
    state.delete("d")
    state.delete_prompt("p")
    assert {(r, k) for r, k, _ in state.iter_tombstones()} == {("d", TOMB_DELETED), ("p", TOMB_PROMPT)}


def test_snapshot_iterators_tolerate_changes_between_items():
    state, _ = new_state()
    for i in range(40):
        state.add("c", f"r{i}", "10.0.0.1", 1)
        state.delete(f"d{i}")
    records = state.iter_requests()
    next(records)
    for i in range(40):
        state.delete(f"r{i}")  # all the others go while the snapshot is read
    assert list(records) == []
    seen = []
    for request_id, _, _ in state.iter_tombstones():
        seen.append(request_id)
        state.delete_prompt(f"new-{request_id}")  # new tombstones while reading
    # Every tombstone there from the start, once; one added meanwhile may be
    # met or not (the ids are copied a shard at a time).
    assert len(seen) == len(set(seen))
    old = [r for r in seen if not r.startswith("new-")]
    assert sorted(old) == sorted([f"d{i}" for i in range(40)] + [f"r{i}" for i in range(40)])
    assert state.tombstone_count == 80 + len(seen)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 400), st.lists(st.tuples(st.sampled_from(["add", "delete", "prompt"]), st.integers(0, 600)),
                                     max_size=300), st.randoms(use_true_random=False))
def test_a_walk_meets_every_request_alive_throughout_once_whatever_changes_meanwhile(start, changes, rng):
    """The walk copies one shard's ids at a time: a request alive from its
    start to its end is met exactly once, with its values when met; one
    added meanwhile at most once; one deleted before it was met, never."""
    state, _ = new_state()
    for i in range(start):
        state.add(f"c{i % 3}", f"r{i}", f"10.0.0.{i % 4}", i)
    ever = {f"r{i}" for i in range(start)}
    touched, deleted = set(), set()
    met = []
    walk = state.iter_requests()
    changes = iter(changes)
    for record in walk:
        assert state.request_record(record[0]) == record[1:]  # read when met
        assert record[0] not in deleted  # a delete is final: never met after it
        met.append(record[0])
        for kind, n in itertools.islice(changes, rng.randrange(0, 4)):
            rid = f"r{n}"
            touched.add(rid)
            if kind == "add":
                state.add(f"c{n % 3}", rid, "10.0.0.9", 1)
                ever.add(rid)
            elif kind == "delete":
                state.delete(rid)
                deleted.add(rid)
            else:
                state.delete_prompt(rid)
    assert len(met) == len(set(met))
    assert set(met) <= ever
    alive_throughout = {f"r{i}" for i in range(start)} - touched
    assert alive_throughout <= set(met)
    for rid in set(met) & touched:
        assert rid in ever


# -- properties -------------------------------------------------------------------

ENGINES = [(c, ip) for c in ("c1", "c2") for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3")]


@st.composite
def workloads(draw, always_complete=False):
    """Requests and a shuffled list of their events, each kind 0-2 times
    (1-2 times for add and delete when every request completes)."""
    count = draw(st.integers(1, 25))
    requests = []
    events = []
    for i in range(count):
        cluster, ip = draw(st.sampled_from(ENGINES))
        request = (f"{i:08x}-uuid", cluster, ip, draw(st.integers(0, 2**31 - 1)))
        requests.append(request)
        low = 1 if always_complete else 0
        events += [("add", i)] * draw(st.integers(low, 2))
        events += [("prompt", i)] * draw(st.integers(0, 2))
        events += [("delete", i)] * draw(st.integers(low, 2))
    events = draw(st.permutations(events))
    return requests, events


def model_counters(requests, events):
    seen = {}
    for event, i in events:
        seen.setdefault(i, set()).add(event)
    expected = {}
    for i, kinds in seen.items():
        _, cluster, ip, prompt = requests[i]
        if "add" not in kinds:
            continue
        queued, total = expected.get((cluster, ip), (0, 0))
        if "delete" not in kinds:
            queued += 1
            total += 0 if "prompt" in kinds else prompt
        expected[(cluster, ip)] = (queued, total)
    return expected


@settings(max_examples=300, deadline=None)
@given(workloads())
def test_any_interleaving_matches_the_model_and_never_goes_negative(workload):
    requests, events = workload
    state, _ = new_state()
    for event, i in events:
        apply(state, event, requests[i])
        assert all(q >= 0 and p >= 0 for q, p in counters(state).values())
    assert counters(state) == model_counters(requests, events)
    assert sum(c.live for c in state.clusters.values()) == state.request_count


@settings(max_examples=200, deadline=None)
@given(workloads(always_complete=True))
def test_everything_added_and_deleted_leaves_every_engine_at_zero(workload):
    requests, events = workload
    state, _ = new_state()
    for event, i in events:
        apply(state, event, requests[i])
    assert counters(state) and set(counters(state).values()) == {(0, 0)}
    assert state.request_count == 0
    assert all((c.live, c.digest) == (0, 0) for c in state.clusters.values())


@settings(max_examples=200, deadline=None)
@given(workloads(), st.randoms(use_true_random=False))
def test_replicas_fed_the_same_events_in_other_orders_agree(workload, rng):
    requests, events = workload
    reordered = list(events)
    rng.shuffle(reordered)
    reordered += rng.sample(events, len(events) // 3)  # replays, as from a retrying sender
    one, _ = new_state()
    other, _ = new_state()
    for event, i in events:
        apply(one, event, requests[i])
    for event, i in reordered:
        apply(other, event, requests[i])
    assert replica_view(one) == replica_view(other)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "prompt", "delete", "snapshot-record"]),
            st.integers(0, 40),
            st.floats(0, 200),
            st.integers(-900, 0),
        ),
        max_size=80,
    ),
    st.integers(1, 6),
    st.floats(0, 2000),
)
def test_a_chunked_sweep_equals_a_full_sweep(operations, chunk, sweep_after):
    def build():
        state, clock = new_state()
        for event, n, delay, age in operations:
            clock.advance(delay)
            request_id = f"r{n}"
            cluster, ip = ENGINES[n % len(ENGINES)]
            if event == "add":
                state.add(cluster, request_id, ip, n, timestamp_ns=int((clock.seconds() + age) * 1e9))
            elif event == "snapshot-record":
                state.apply_record(request_id, cluster, ip, n, n % 2 == 0, clock.seconds() + age)
            elif event == "prompt":
                state.delete_prompt(request_id)
            else:
                state.delete(request_id)
            assert all(q >= 0 and p >= 0 for q, p in counters(state).values())
        clock.advance(sweep_after)
        return state

    full = build()
    full.expire_all()
    chunked = build()
    steps = list(chunked.expire(chunk=chunk))
    assert all(n <= chunk for n in steps)
    assert replica_view(chunked) == replica_view(full)
    assert chunked.stats == full.stats
    assert all(q >= 0 and p >= 0 for q, p in counters(full).values())
    assert sum(c.live for c in full.clusters.values()) == full.request_count
    # Nothing due is left behind.
    assert list(full.expire(chunk=chunk)) == []


def test_sharded_dict_size_follows_every_mutation_path():
    """The request and tombstone counts are kept, not summed over the shards
    (the request limit reads them on every add): after adds, deletes, prompt
    deletes, an engine reset, a walk that releases and a sweep that expires,
    each count equals what the shards hold."""
    clock = Clock()
    clock.advance(1_000_000)
    state = LoadState(clock)

    def check():
        for table in (state._requests, state._tombstones):
            assert len(table) == sum(map(len, table.shards))

    for i in range(3000):
        state.add(f"c{i % 7}", f"r{i}", f"10.0.0.{i % 5}", 10)
    check()
    for i in range(0, 3000, 3):
        state.delete(f"r{i}")
    for i in range(1, 3000, 3):
        state.delete_prompt(f"r{i}")
    state.delete_prompt("never-added")
    check()
    state.reset_engine("c1", "10.0.0.1")
    for _ in state.iter_requests(released=[]):
        pass
    check()
    clock.advance(state.request_expire + 1)
    state.expire_all()
    check()
    clock.advance(state.tombstone_ttl + state.request_expire + 1)
    state.expire_all()
    check()
    assert state.request_count == 0
