"""Pick-and-book in the pure core: the best engine by the gateway's score,
ties at random, booked in the same step, retries safe."""

import random
from collections import Counter

import pytest
from twisted.internet.task import Clock

from metacenter.core.cache import CacheIndex
from metacenter.core.errors import Conflict, InvalidInput, NotFound
from metacenter.core.load import LoadState
from metacenter.core.picking import pick

T0 = 1_700_000_000.0
IPS = [f"10.0.0.{i}" for i in range(1, 11)]


def setup():
    clock = Clock()
    clock.advance(T0)
    return LoadState(clock), CacheIndex(clock), clock


@pytest.mark.parametrize("seed", range(5))
def test_fifty_picks_over_ten_idle_engines_book_five_each_and_never_twice(seed):
    load, cache, _ = setup()
    rng = random.Random(seed)
    answers = {}
    for i in range(50):
        answers[f"r{i}"] = pick(load, cache, "c", f"r{i}", rng, ips=IPS)
        # A retry of any earlier pick (a gateway that timed out) books nothing.
        retried = f"r{rng.randrange(i + 1)}"
        again = pick(load, cache, "c", retried, rng, ips=IPS)
        assert again["ip"] == answers[retried]["ip"] and again["booked"] is False
    assert all(a["booked"] for a in answers.values())
    per_engine = Counter(a["ip"] for a in answers.values())
    assert set(per_engine) == set(IPS)
    assert all(4 <= n <= 6 for n in per_engine.values())
    assert load.request_count == 50
    assert {e["ip"]: e["queued_req_num"] for e in load.cluster_load("c")} == per_engine


def test_ties_are_broken_at_random():
    firsts = set()
    for seed in range(40):
        load, cache, _ = setup()
        firsts.add(pick(load, cache, "c", "r", random.Random(seed), ips=IPS)["ip"])
    assert len(firsts) > 3  # not always the first ip


def test_the_least_loaded_engine_wins_and_the_answer_reports_it_after_booking():
    load, cache, _ = setup()
    for i in range(3):
        load.add("c", f"busy{i}", "10.0.0.1", 0)
    load.add("c", "one", "10.0.0.2", 0)
    answer = pick(load, cache, "c", "new", random.Random(1))
    assert answer["ip"] == "10.0.0.2" and answer["queued_req_num"] == 2 and answer["booked"] is True
    assert answer["cache_length"] == 0
    assert load.engine_of("new").ip == "10.0.0.2"


def test_the_cache_match_counts_as_in_the_gateway_formula():
    load, cache, _ = setup()
    load.add("c", "x", "10.0.0.1", 0)  # 10.0.0.1 has one request but holds the prompt's cache
    cache.save("c", "10.0.0.1", [7, 8, 9])
    load.add("c", "y", "10.0.0.2", 0)
    answer = pick(load, cache, "c", "new", random.Random(1), prompt_hash=[7, 8, 9, 10])
    assert (answer["ip"], answer["cache_length"]) == ("10.0.0.1", 3)
    assert answer["score"] == pytest.approx(2 * 3 / 4)


def test_an_engine_known_only_to_the_cache_is_a_candidate():
    load, cache, _ = setup()
    cache.save("c", "2001:DB8::7", [1, 2])
    answer = pick(load, cache, "c", "r", random.Random(1), prompt_hash=[1, 2])
    assert answer["ip"] == "2001:DB8::7" and load.cluster_load("c")[0]["ip"] == "2001:DB8::7"


def test_no_candidate_is_not_found_and_says_to_pass_ips():
    load, cache, _ = setup()
    with pytest.raises(NotFound) as refused:
        pick(load, cache, "empty", "r", random.Random(1))
    assert "'ips'" in refused.value.reason
    with pytest.raises(NotFound):
        pick(load, cache, "empty", "r", random.Random(1), ips=[])
    assert load.clusters == {} and load.request_state("r") is None


def test_picking_a_finished_request_is_a_conflict():
    load, cache, _ = setup()
    pick(load, cache, "c", "r", random.Random(1), ips=IPS)
    load.delete("r")
    with pytest.raises(Conflict, match="already finished"):
        pick(load, cache, "c", "r", random.Random(1), ips=IPS)
    pick(load, cache, "c", "s", random.Random(1), ips=["10.0.0.1"])
    load.reset_engine("c", "10.0.0.1")
    with pytest.raises(Conflict, match="already finished"):
        pick(load, cache, "c", "s", random.Random(1), ips=IPS)


def test_a_prompt_delete_seen_first_is_consumed_by_the_booking():
    load, cache, _ = setup()
    load.delete_prompt("r")
    answer = pick(load, cache, "c", "r", random.Random(1), ips=["10.0.0.1"], prompt_length=100, prompt_tokens=9)
    assert answer["booked"]
    assert load.cluster_load("c")[0]["prompt_length"] == 0 and load.cluster_load("c")[0]["queued_tokens"] == 9


def test_the_booking_carries_lengths_tokens_and_lease():
    load, cache, _ = setup()
    pick(load, cache, "c", "r", random.Random(1), ips=["10.0.0.1"], prompt_length=100, prompt_tokens=9,
         lease="gw-1")
    assert load.request_record("r", full=True) == ("c", "10.0.0.1", 100, False, int(T0), 9, "gw-1")
    assert load.leases()[0]["requests"] == 1


@pytest.mark.parametrize("ips, reason", [
    ("10.0.0.1", "field 'ips' must be an array of IP addresses, got string"),
    (["10.0.0.1", 5], "field 'ips' item 1 must be an IPv4 or IPv6 address, got number"),
    (["10.0.0.1", "nope"], "field 'ips' item 1 must be an IPv4 or IPv6 address, got 'nope'"),
    (["10.0.0.1"] * 10_001, "field 'ips' has 10001 items; at most 10000 are allowed"),
])
def test_bad_ips_are_refused_naming_the_item(ips, reason):
    load, cache, _ = setup()
    with pytest.raises(InvalidInput) as refused:
        pick(load, cache, "c", "r", random.Random(1), ips=ips)
    assert refused.value.reason == reason
    assert load.clusters == {}


def test_a_bad_lease_or_length_refuses_the_pick_with_state_unchanged():
    load, cache, _ = setup()
    for kwargs in ({"lease": ""}, {"prompt_length": -1}, {"prompt_tokens": 2**31}):
        with pytest.raises(InvalidInput):
            pick(load, cache, "c", "r", random.Random(1), ips=IPS, **kwargs)
    assert load.clusters == {} and load.request_state("r") is None and load.leases() == []


@pytest.mark.parametrize("given, known", [("::FFFF:10.0.0.1", "::ffff:a00:1"), ("2001:DB8::1", "2001:db8::1"),
                                          ("10.0.0.1", "10.0.0.1")])
def test_the_pick_answers_in_the_spelling_the_gateway_sent(given, known):
    load, cache, _ = setup()
    load.add("c", "old", known, 0)
    answer = pick(load, cache, "c", "r", random.Random(1), ips=[given])
    assert answer["ip"] == given and answer["queued_req_num"] == 2  # the same engine
    assert pick(load, cache, "c", "r", random.Random(1), ips=[given])["ip"] == given
    # Without ips, the load table's first spelling.
    assert pick(load, cache, "c", "s", random.Random(1))["ip"] == known
