"""LoadResponseCache: GET /v1/load/stats bodies kept by (identity, version)
outside the core, rebuilt from per-engine fragments, bounded by the live
engines and clusters."""

import json

from twisted.internet.task import Clock

from metacenter.api.response_cache import LoadResponseCache
from metacenter.core import load
from metacenter.core.load import LoadState


def fresh():
    clock = Clock()
    clock.advance(1_700_000_000)
    state = LoadState(clock, request_expire=60, tombstone_ttl=10)
    return clock, state, LoadResponseCache(state)


def read(state, cache, name):
    return json.loads(cache.body(state.clusters[name]))


def test_a_body_follows_every_change_and_serialises_only_changed_engines(monkeypatch):
    clock, state, cache = fresh()
    for i in range(3):
        state.add("m", f"r{i}", f"10.0.0.{i}", 100)
    calls = []
    original = load.Engine.as_dict
    monkeypatch.setattr(load.Engine, "as_dict", lambda engine: calls.append(engine.ip) or original(engine))
    first = cache.body(state.clusters["m"])
    assert [e["queued_req_num"] for e in json.loads(first)] == [1, 1, 1]
    assert sorted(calls) == ["10.0.0.0", "10.0.0.1", "10.0.0.2"]
    calls.clear()
    assert cache.body(state.clusters["m"]) is first  # nothing changed: the same bytes
    assert calls == []
    state.delete_prompt("r1")
    assert [(e["ip"], e["prompt_length"]) for e in read(state, cache, "m")] == [
        ("10.0.0.0", 100), ("10.0.0.1", 0), ("10.0.0.2", 100)]
    assert calls == ["10.0.0.1"]


def test_entries_go_with_their_engines_and_clusters():
    clock, state, cache = fresh()
    state.add("a", "r1", "10.0.0.1")
    state.add("a", "r2", "10.0.0.2")
    state.add("b", "r3", "10.0.0.3")
    read(state, cache, "a")
    read(state, cache, "b")
    assert len(cache) == 3 + 2  # engines + clusters
    state.delete("r3")
    clock.advance(30)
    state.add("a", "r4", "10.0.0.1")  # keeps 10.0.0.1 alive
    clock.advance(31)
    state.expire_all()
    assert sorted(state.clusters) == ["a"] and list(state.clusters["a"].engines) == ["10.0.0.1"]
    assert len(cache) == 2  # 10.0.0.1 and cluster a: 10.0.0.2, 10.0.0.3 and b went with the engines
    assert [e["ip"] for e in read(state, cache, "a")] == ["10.0.0.1"]
    assert len(cache) == 2


def test_a_cluster_that_goes_and_comes_back_is_never_served_stale():
    clock, state, cache = fresh()
    state.add("m", "r1", "10.0.0.1", 7)
    assert read(state, cache, "m")[0]["prompt_length"] == 7
    clock.advance(61)
    state.expire_all()
    assert "m" not in state.clusters and len(cache) == 0
    state.add("m", "r2", "10.0.0.1", 9)
    assert read(state, cache, "m") == [{"ip": "10.0.0.1", "queued_req_num": 1, "prompt_length": 9,
                                        "updated_time": (1_700_000_000 + 61) * 10**9, "prefill_req_num": 1,
                                        "prefill_tokens": 0, "queued_tokens": 0}]
