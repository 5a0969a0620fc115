"""Anti-entropy's pure parts (core/digests): bucket digests add up to the
cluster digest, differences are found per cluster and per bucket, and
reconciliation follows the table of the module docstring."""

from hypothesis import given, settings, strategies as st

from metacenter.core import digests as d
from metacenter.core.load import LoadState

NOW = 1_700_000_000


class Clock:
    def __init__(self, now=NOW):
        self.now = now

    def seconds(self):
        return self.now


def state_with(ids, prompt_deleted=()):
    state = LoadState(Clock(), tombstone_ttl=60.0)
    for rid in ids:
        state.add("m", rid, "10.0.0.1", 7)
    for rid in prompt_deleted:
        state.delete_prompt(rid)
    return state


@settings(max_examples=50, deadline=None)
@given(st.sets(st.text(min_size=1, max_size=8), max_size=60), st.data())
def test_bucket_digests_fold_into_the_cluster_digest(ids, data):
    prompt_deleted = data.draw(st.sets(st.sampled_from(sorted(ids)))) if ids else set()
    state = state_with(sorted(ids), prompt_deleted)
    found = d.BucketDigests(["m", "absent"])
    records = list(state.iter_requests())
    found.add(records[: len(records) // 2])
    found.add(records[len(records) // 2:])  # chunks add up
    live = sum(live for live, _ in found.result["m"].values())
    digest = 0
    for _, bucket_digest in found.result["m"].values():
        digest ^= bucket_digest
    assert found.result["absent"] == {}
    if ids:
        assert [live, format(digest, "016x")] == d.digests(state)["m"]
    for rid in ids:
        assert d.bucket_of(rid) in found.result["m"]


def test_differences_by_cluster_and_by_bucket():
    a, b = state_with(["r1", "r2", "r3"]), state_with(["r1", "r2"])
    assert d.differing_clusters(d.digests(a), d.digests(b)) == ["m"]
    assert d.differing_clusters(d.digests(a), {**d.digests(a), "gone": [0, "0" * 16]}) == []
    assert d.differing_clusters(d.digests(a), {}) == ["m"]
    mine, theirs = d.BucketDigests(["m"]), d.BucketDigests(["m"])
    mine.add(a.iter_requests())
    theirs.add(b.iter_requests())
    assert d.differing_buckets(d.encode_buckets(mine.result), d.encode_buckets(theirs.result)) == {
        "m": {d.bucket_of("r3")}}
    assert d.differing_buckets(d.encode_buckets(mine.result), d.encode_buckets(mine.result)) == {}


def test_reconcile_follows_the_table():
    ttl = 60.0
    horizon = d.repair_horizon(ttl)
    state = LoadState(Clock(), tombstone_ttl=ttl)
    state.add("m", "live", "10.0.0.1", 5)
    state.add("m", "live-pd", "10.0.0.1", 5)
    state.delete_prompt("live-pd")
    state.add("m", "deleted", "10.0.0.1", 5)
    state.delete("deleted")
    state.delete_prompt("pt")  # a prompt tombstone

    def record(rid, prompt_deleted=False, created_s=NOW):
        return (rid, "m", "10.0.0.2", 9, prompt_deleted, created_s)

    assert d.reconcile(state, record("live"), NOW) == d.SAME
    assert d.reconcile(state, record("live-pd"), NOW) == d.PEER_PROMPT
    assert d.reconcile(state, record("live-pd", True), NOW) == d.SAME
    assert d.reconcile(state, record("deleted"), NOW) == d.PEER_DELETE
    assert d.reconcile(state, record("pt"), NOW) == d.ADOPTED
    assert d.reconcile(state, record("young"), NOW) == d.ADOPTED
    assert d.reconcile(state, record("old", created_s=NOW - horizon - 1), NOW) == d.UNRESOLVED
    assert state.request_state("old") is None
    assert d.reconcile(state, record("live", True), NOW) == d.MERGED
    assert state.request_state("live") == "live-prompt-deleted"
    assert state.request_state("young") == "live"


def test_a_reconciliation_ledger_counts_both_sides():
    state = LoadState(Clock(), tombstone_ttl=60.0)
    state.add("m", "here-deleted", "10.0.0.1", 5)
    state.delete("here-deleted")
    state.add("m", "mine", "10.0.0.1", 5)
    ledger = d.Reconciliation(state)
    ledger.peer_record(("here-deleted", "m", "10.0.0.1", 5, False, NOW), NOW)
    ledger.peer_record(("new", "m", "10.0.0.1", 5, False, NOW), NOW)
    ledger.invalid_record()
    ledger.sent(1)
    ledger.peer_answer({"deleted": ["mine", 7, ""], "prompt_deleted": [], "adopted": 1, "unresolved": True})
    assert state.request_state("mine") == "deleted" and state.request_state("new") == "live"
    assert ledger.to_peer == [["here-deleted", 2]]
    outcome = ledger.outcome(["m"])
    assert outcome == {"result": "repaired", "clusters": ["m"], "listed": 2, "adopted": 1, "prompt_deleted": 0,
                       "deleted": 3, "sent_requests": 1, "sent_deletes": 1, "sent_prompt_deletes": 0,
                       "peer_adopted": 1, "unresolved": 0, "invalid": 1, "changed": True}
    for bad in ({}, {"deleted": "x", "prompt_deleted": []}, []):
        try:
            ledger.peer_answer(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")


def test_the_isolation_threshold_stays_inside_the_horizon():
    assert d.isolation_threshold(60.0, 10.0) == 22.5
    assert d.isolation_threshold(60.0, 20.0) == 5.0
    assert d.isolation_threshold(2.0, 10.0) == 1.0
