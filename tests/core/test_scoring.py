"""The gateway's score (docs/cache.md), on hand-worked examples and
properties that follow from the formula."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metacenter.core.scoring import score_engines


def load(ip, queued, prompt):
    return {"ip": ip, "queued_req_num": queued, "prompt_length": prompt, "updated_time": 1}


def by_ip(rows):
    return {row["ip"]: row for row in rows}


def test_hand_worked_example():
    # min queued 2, max 12: spread 10, w_req = ceil(10/5) = 2;
    # prefill scale max(1024, 2048) = 2048.
    engines = [load("10.0.0.1", 2, 0), load("10.0.0.2", 5, 2048), load("10.0.0.3", 12, 512)]
    rows = score_engines(engines, {"10.0.0.2": 4, "10.0.0.3": 2}, 4)
    assert [row["ip"] for row in rows] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    a, b, c = rows
    assert a == {"ip": "10.0.0.1", "queued_req_num": 2, "prompt_length": 0, "cache_length": 0,
                 "cache_ratio": 0.0, "request_load": 0.0, "prefill_load": 0.0, "score": 0.0}
    # 2*1 - 2*0.3 - 3*1
    assert (b["cache_ratio"], b["request_load"], b["prefill_load"]) == (1.0, 0.3, 1.0)
    assert b["score"] == pytest.approx(-1.6)
    # 2*0.5 - 2*1 - 3*0.25
    assert (c["cache_ratio"], c["request_load"], c["prefill_load"]) == (0.5, 1.0, 0.25)
    assert c["score"] == pytest.approx(-1.75)


def test_floors_of_the_spread_and_of_the_prefill_scale():
    # Equal queues: spread max(2, 0) = 2, w_req 1, no request load.
    # Small prompts: scale max(1024, 300) = 1024.
    engines = [load("10.0.0.1", 1, 100), load("10.0.0.2", 1, 300)]
    rows = by_ip(score_engines(engines, {"10.0.0.1": 1, "10.0.0.2": 2}, 2))
    assert rows["10.0.0.1"]["score"] == 2 * 0.5 - 3 * 100 / 1024 == 0.70703125
    assert rows["10.0.0.2"]["score"] == 2 * 1.0 - 3 * 300 / 1024 == 1.12109375
    assert rows["10.0.0.1"]["request_load"] == rows["10.0.0.2"]["request_load"] == 0.0


@pytest.mark.parametrize("busiest, weight", [(2, 1), (5, 1), (6, 2), (10, 2), (11, 3), (100, 20)])
def test_request_weight_is_the_ceiling_of_a_fifth_of_the_spread(busiest, weight):
    rows = by_ip(score_engines([load("10.0.0.1", 0, 0), load("10.0.0.2", busiest, 0)], {}, 1))
    # The busiest engine has request_load 1, so its score is -w_req.
    assert rows["10.0.0.2"]["request_load"] == 1.0
    assert rows["10.0.0.2"]["score"] == -weight


def test_filter_scores_exactly_the_given_engines():
    engines = [load("10.0.0.1", 0, 0), load("10.0.0.2", 50, 0), load("10.0.0.3", 4, 0)]
    rows = score_engines(engines, {"10.0.0.9": 1}, 1, ips=["10.0.0.3", "10.0.0.9", "10.0.0.3"])
    # Normalised over 10.0.0.3 (4 queued) and 10.0.0.9 (unknown: idle).
    assert [row["ip"] for row in rows] == ["10.0.0.9", "10.0.0.3"]
    assert rows[0]["score"] == 2.0
    assert rows[1]["request_load"] == 1.0
    assert rows[1]["score"] == -1.0


def test_without_a_filter_engines_known_only_to_the_cache_are_scored_as_idle():
    rows = by_ip(score_engines([load("10.0.0.1", 3, 0)], {"10.0.0.2": 1}, 1))
    assert rows["10.0.0.2"]["queued_req_num"] == 0
    assert rows["10.0.0.2"]["cache_ratio"] == 1.0


def test_equal_scores_are_ordered_by_ip():
    engines = [load(ip, 0, 0) for ip in ["10.0.0.9", "10.0.0.10", "10.0.0.1"]]
    assert [row["ip"] for row in score_engines(engines, {}, 3)] == ["10.0.0.1", "10.0.0.10", "10.0.0.9"]


def test_no_prompt_hashes_means_no_cache_ratio():
    rows = score_engines([load("10.0.0.1", 0, 0)], {}, 0)
    assert rows[0]["cache_ratio"] == 0.0


def test_no_engines_no_rows():
    assert score_engines([], {}, 5) == []
    assert score_engines([load("10.0.0.1", 0, 0)], {}, 5, ips=[]) == []


engine_loads = st.lists(
    st.tuples(st.integers(0, 50), st.integers(0, 5000), st.integers(0, 8)),
    min_size=1, max_size=12,
)


def build(loads):
    engines = [load(f"10.0.0.{i}", q, p) for i, (q, p, _) in enumerate(loads)]
    lengths = {f"10.0.0.{i}": n for i, (_, _, n) in enumerate(loads) if n}
    return engines, lengths


@settings(max_examples=200, deadline=None)
@given(engine_loads, st.integers(0, 30))
def test_a_common_queue_offset_changes_nothing(loads, offset):
    engines, lengths = build(loads)
    shifted = [{**e, "queued_req_num": e["queued_req_num"] + offset} for e in engines]
    plain = score_engines(engines, lengths, 8)
    moved = score_engines(shifted, lengths, 8)
    assert [(r["ip"], r["score"]) for r in plain] == [(r["ip"], r["score"]) for r in moved]


@settings(max_examples=200, deadline=None)
@given(engine_loads)
def test_ranked_best_first_and_bounded(loads):
    engines, lengths = build(loads)
    rows = score_engines(engines, lengths, 8)
    assert len(rows) == len(engines)
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    for r in rows:
        assert 0.0 <= r["cache_ratio"] <= 1.0
        assert 0.0 <= r["request_load"] <= 1.0
        assert 0.0 <= r["prefill_load"] <= 1.0


@settings(max_examples=200, deadline=None)
@given(engine_loads, st.data())
def test_more_cache_never_ranks_an_engine_lower(loads, data):
    engines, lengths = build(loads)
    ip = data.draw(st.sampled_from([e["ip"] for e in engines]))
    more = {**lengths, ip: min(8, lengths.get(ip, 0) + data.draw(st.integers(1, 8)))}
    before = [r["ip"] for r in score_engines(engines, lengths, 8)].index(ip)
    after = [r["ip"] for r in score_engines(engines, more, 8)].index(ip)
    assert after <= before
