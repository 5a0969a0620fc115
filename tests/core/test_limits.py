"""The pure bounds: count limits on a ``LoadState`` (task.Clock) and field
lengths, including the lease's (issue 10) and snapshot records'."""

import pytest
from twisted.internet.task import Clock

from metacenter.cluster.snapshot import parse_record, parse_tombstone
from metacenter.core import fields
from metacenter.core.errors import InvalidInput
from metacenter.core.limits import CountLimits, LimitReached
from metacenter.core.load import LoadState


@pytest.fixture
def state():
    clock = Clock()
    clock.advance(1_700_000_000)
    return LoadState(clock)


@pytest.fixture
def lengths():
    """Restores the process's lengths after a test that sets its own."""
    yield fields.set_max_lengths
    fields.set_max_lengths()


def test_only_what_an_add_would_create_counts(state):
    limits = CountLimits(max_clusters=1, max_engines_per_cluster=1, max_engines=1, max_requests=1)
    assert limits.exceeded(state, "c", "r1", "10.0.0.1") is None
    state.add("c", "r1", "10.0.0.1")
    assert limits.exceeded(state, "c", "r1", "10.0.0.1") is None  # a duplicate
    assert limits.exceeded(state, "c", "r2", "10.0.0.1").limit == "requests"
    state.delete("r1")
    assert limits.exceeded(state, "c", "r1", "10.0.0.1") is None  # finished: creates no request
    assert limits.exceeded(state, "c", "r2", "10.0.0.2").limit == "engines_per_cluster"
    assert limits.exceeded(state, "d", "r2", "10.0.0.1").limit == "clusters"


def test_a_prompt_tombstone_becomes_a_request_so_it_counts(state):
    limits = CountLimits(max_requests=1)
    state.add("c", "r1", "10.0.0.1")
    state.delete_prompt("early")
    assert limits.exceeded(state, "c", "early", "10.0.0.1").limit == "requests"


def test_engines_over_all_clusters(state):
    limits = CountLimits(max_engines=2)
    state.add("a", "r1", "10.0.0.1")
    state.add("b", "r2", "10.0.0.1")
    reached = limits.exceeded(state, "c", "r3", "10.0.0.1")
    assert reached.limit == "engines" and "--max-engines" in reached.reason
    with pytest.raises(LimitReached):
        limits.check_add(state, "a", "r3", "10.0.0.2")
    limits.check_add(state, "a", "r3", "10.0.0.1")  # a known engine


def test_leases_a_renewal_is_always_admitted(state):
    limits = CountLimits(max_leases=2)
    state.keepalive("gw-1", 10_000)
    assert limits.lease_exceeded(state, "gw-2") is None
    state.keepalive("gw-2", 10_000)
    assert limits.lease_exceeded(state, "gw-2") is None  # a renewal
    refused = limits.lease_exceeded(state, "gw-3")
    assert refused.limit == "leases" and "--max-leases" in refused.reason
    assert limits.exceeded(state, "a", "r1", "10.0.0.1", lease="gw-3").limit == "leases"  # an add that would start one
    assert limits.exceeded(state, "a", "r1", "10.0.0.1", lease="gw-1") is None


@pytest.mark.parametrize("value", [0, -1, True, 1.5, None])
def test_a_limit_must_be_a_positive_integer(value):
    with pytest.raises(ValueError):
        CountLimits(max_clusters=value)


def test_the_lease_length_is_128_by_default():
    assert fields.required_string({"lease": "g" * 128}, "lease") == "g" * 128
    with pytest.raises(fields.FieldTooLong) as refused:
        fields.required_string({"lease": "g" * 129}, "lease")
    assert refused.value.reason == "field 'lease' must be at most 128 characters long, got 129"


def test_lengths_are_set_for_the_process_and_reported(lengths):
    seen = []
    lengths({"request_id": 4}, on_too_long=seen.append)
    assert fields.required_string({"request_id": "abcd"}, "request_id") == "abcd"
    with pytest.raises(InvalidInput):
        fields.required_string({"request_id": "abcde"}, "request_id")
    assert [(e.field, e.maximum, e.length) for e in seen] == [("request_id", 4, 5)]
    assert fields.max_length("cluster") == 256  # not named: the default


@pytest.mark.parametrize("bad", [{"nope": 3}, {"cluster": 0}, {"cluster": True}])
def test_a_length_setting_must_name_a_field_and_be_positive(lengths, bad):
    with pytest.raises(ValueError):
        lengths(bad)


def test_snapshot_records_and_tombstones_are_checked_against_the_same_lengths():
    assert parse_record(["r" * 256, "c", "10.0.0.1", 1, 0, None])[0] == "r" * 256
    with pytest.raises(InvalidInput, match="field 'request_id' must be at most 256"):
        parse_record(["r" * 257, "c", "10.0.0.1", 1, 0, None])
    with pytest.raises(InvalidInput, match="field 'cluster' must be at most 256"):
        parse_record(["r", "c" * 257, "10.0.0.1", 1, 0, None])
    with pytest.raises(InvalidInput, match="field 'request_id' must be at most 256"):
        parse_tombstone(["t" * 257, 2])


def test_the_replication_streams_fast_path_refuses_what_the_checks_refuse():
    # It skips the body parser for plain ASCII events; lengths still hold.
    from metacenter.cluster.stream import EVENT_TYPES
    from metacenter.core.events import EVENT_ADD, EVENT_DELETE

    add, delete = EVENT_TYPES[EVENT_ADD], EVENT_TYPES[EVENT_DELETE]
    assert add.decode([EVENT_ADD, "c" * 256, "r", "10.0.0.1", 1, None]).cluster == "c" * 256
    for entry, field in (([EVENT_ADD, "c" * 257, "r", "10.0.0.1", 1, None], "cluster"),
                         ([EVENT_ADD, "c", "r" * 257, "10.0.0.1", 1, None], "request_id"),
                         ([EVENT_ADD, "c", "r", "1" * 65, 1, None], "ip")):
        with pytest.raises(InvalidInput, match=f"field '{field}' must be at most"):
            add.decode(entry)
    with pytest.raises(InvalidInput, match="field 'request_id' must be at most 256"):
        delete.decode([EVENT_DELETE, "r" * 257, None])
