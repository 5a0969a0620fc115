"""The KV-cache prefix index: save/query semantics, bounds, expiry, engine
removal, snapshots, and the request bodies of /v1/cache/*."""

import gc
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from metacenter.core.cache import (
    DEFAULT_ENGINE_BLOCKS,
    DEFAULT_MAX_BLOCKS,
    DEFAULT_TTL,
    CacheIndex,
)
from metacenter.core.fields import UINT64_MAX as HASH_MAX
from metacenter.core.load import LoadState

START = 1_700_000_000.0


def new_clock():
    clock = Clock()
    clock.advance(START)
    return clock


def new_index(clock=None, **kwargs):
    return CacheIndex(clock or new_clock(), **kwargs)


# -- save and query ----------------------------------------------------------


def test_length_is_the_number_of_leading_hashes_held():
    index = new_index()
    index.save("m", "10.0.0.1", [11, 12, 13, 14])
    assert index.query("m", [11, 12, 13, 14], 10) == [{"ip": "10.0.0.1", "length": 4}]
    assert index.query("m", [11, 12, 99, 14], 10) == [{"ip": "10.0.0.1", "length": 2}]
    assert index.query("m", [11, 12, 13, 14, 15, 16], 10) == [{"ip": "10.0.0.1", "length": 4}]
    assert index.query("m", [99, 12, 13], 10) == []


def test_shared_prefixes_and_divergent_suffixes_over_several_engines():
    index = new_index()
    system = [1, 2, 3]
    index.save("m", "10.0.0.1", system + [10, 11])
    index.save("m", "10.0.0.2", system + [20, 21, 22])
    index.save("m", "10.0.0.3", system[:2])
    index.save("m", "10.0.0.4", [50, 51])
    assert index.query("m", system + [20, 21, 22, 23], 10) == [
        {"ip": "10.0.0.2", "length": 6},
        {"ip": "10.0.0.1", "length": 3},
        {"ip": "10.0.0.3", "length": 2},
    ]
    assert index.query("m", system + [10, 11], 10) == [
        {"ip": "10.0.0.1", "length": 5},
        {"ip": "10.0.0.2", "length": 3},
        {"ip": "10.0.0.3", "length": 2},
    ]


def test_an_engine_holding_later_hashes_but_not_the_first_has_no_match():
    index = new_index()
    index.save("m", "10.0.0.1", [2, 3])
    assert index.query("m", [1, 2, 3], 10) == []


def test_two_saved_prompts_of_one_engine_combine_into_its_prefix():
    index = new_index()
    index.save("m", "10.0.0.1", [1, 2])
    index.save("m", "10.0.0.1", [1, 2, 3])
    assert index.query("m", [1, 2, 3, 4], 10) == [{"ip": "10.0.0.1", "length": 3}]


def test_topk_cuts_after_ranking_and_ties_go_by_ip():
    index = new_index()
    for ip in ["10.0.0.9", "10.0.0.10", "10.0.0.2", "::1"]:
        index.save("m", ip, [7, 8])
    index.save("m", "10.0.0.5", [7])
    ranked = index.query("m", [7, 8], 10)
    assert ranked == [
        {"ip": "10.0.0.10", "length": 2},
        {"ip": "10.0.0.2", "length": 2},
        {"ip": "10.0.0.9", "length": 2},
        {"ip": "::1", "length": 2},
        {"ip": "10.0.0.5", "length": 1},
    ]
    assert index.query("m", [7, 8], 2) == ranked[:2]
    assert index.query("m", [7, 8], 1) == ranked[:1]


def test_the_order_of_saves_does_not_change_the_ranking():
    first, second = new_index(), new_index()
    saves = [("10.0.0.3", [1, 2]), ("10.0.0.1", [1, 2]), ("10.0.0.2", [1])]
    for ip, hashes in saves:
        first.save("m", ip, hashes)
    for ip, hashes in reversed(saves):
        second.save("m", ip, hashes)
    assert first.query("m", [1, 2], 10) == second.query("m", [1, 2], 10)


def test_clusters_are_separate_and_unknown_ones_answer_nothing():
    index = new_index()
    index.save("a", "10.0.0.1", [1, 2])
    index.save("b", "10.0.0.2", [1])
    assert index.query("a", [1, 2], 10) == [{"ip": "10.0.0.1", "length": 2}]
    assert index.query("b", [1, 2], 10) == [{"ip": "10.0.0.2", "length": 1}]
    assert index.query("nobody", [1, 2], 10) == []


def test_empty_query_matches_nothing():
    index = new_index()
    index.save("m", "10.0.0.1", [1])
    assert index.query("m", [], 10) == []


def test_the_full_unsigned_range_is_stored():
    index = new_index()
    hashes = [0, 2**63, HASH_MAX]
    index.save("m", "10.0.0.1", hashes)
    assert index.query("m", hashes, 10) == [{"ip": "10.0.0.1", "length": 3}]
    assert index.query("m", [0, 2**63, HASH_MAX - 1], 10) == [{"ip": "10.0.0.1", "length": 2}]


def test_saving_again_is_idempotent():
    index = new_index()
    assert index.save("m", "10.0.0.1", [1, 2, 3]) == 3
    assert index.save("m", "10.0.0.1", [1, 2, 3]) == 0
    assert index.block_count == 3
    assert index.blocks_by_cluster() == {"m": 3}
    assert index.distinct_blocks_by_cluster() == {"m": 3}


def test_query_metrics():
    index = new_index()
    index.save("m", "10.0.0.1", [1, 2, 3, 4])
    index.save("m", "10.0.0.2", [1])
    index.query("m", [1, 2, 9, 9], 10)  # best match 2 of 4
    index.query("m", [1, 2, 3, 4], 10)  # 4 of 4
    index.query("m", [5], 10)  # no location
    index.query("other", [1], 10)  # unknown cluster
    assert index.queries == 4
    assert index.queries_with_location == 2
    assert index.matched_fraction_sum == pytest.approx(1.5)
    assert index.engine_count == 2
    assert index.engines_by_cluster() == {"m": 2}
    assert index.blocks_by_cluster() == {"m": 5}
    assert index.distinct_blocks_by_cluster() == {"m": 4}


def test_match_lengths_is_not_counted_as_a_query():
    index = new_index()
    index.save("m", "10.0.0.1", [1, 2])
    assert index.match_lengths("m", [1, 2, 3]) == {"10.0.0.1": 2}
    assert index.queries == 0


# -- capacity, global cap and TTL -----------------------------------------------


def test_capacity_evicts_least_recently_used_and_prompt_tails_first():
    index = new_index(engine_blocks=4)
    index.save("m", "10.0.0.1", [1, 2, 3])
    index.save("m", "10.0.0.1", [7, 8])
    # Five blocks for four places: the oldest prompt's tail (3) goes.
    assert index.engine_block_count("m", "10.0.0.1") == 4
    assert index.query("m", [1, 2, 3], 10) == [{"ip": "10.0.0.1", "length": 2}]
    assert index.query("m", [7, 8], 10) == [{"ip": "10.0.0.1", "length": 2}]
    assert index.evictions["capacity"] == 1


def test_a_save_refreshes_its_blocks():
    index = new_index(engine_blocks=4)
    index.save("m", "10.0.0.1", [1, 2])
    index.save("m", "10.0.0.1", [5, 6])
    index.save("m", "10.0.0.1", [1, 2])  # now [5, 6] is the least recently used
    index.save("m", "10.0.0.1", [9])
    assert index.query("m", [1, 2], 10) == [{"ip": "10.0.0.1", "length": 2}]
    assert index.query("m", [5, 6], 10) == [{"ip": "10.0.0.1", "length": 1}]


def test_a_save_longer_than_the_capacity_keeps_its_head():
    index = new_index(engine_blocks=3)
    index.save("m", "10.0.0.1", [100, 101])
    index.save("m", "10.0.0.1", [1, 2, 3, 4, 5])
    assert index.engine_block_count("m", "10.0.0.1") == 3
    assert index.query("m", [1, 2, 3, 4, 5], 10) == [{"ip": "10.0.0.1", "length": 3}]
    assert index.query("m", [100], 10) == []


def test_many_refreshes_then_evictions_stay_exact():
    # The same block refreshed many times leaves many dead ticks behind; the
    # eviction cursor must skip them and still evict in LRU order.
    index = new_index(engine_blocks=2)
    index.save("m", "10.0.0.1", [1])
    for _ in range(1000):
        index.save("m", "10.0.0.1", [2])
    index.save("m", "10.0.0.1", [3])
    assert index.match_lengths("m", [1]) == {}
    assert index.match_lengths("m", [2]) == {"10.0.0.1": 1}
    assert index.match_lengths("m", [3]) == {"10.0.0.1": 1}


def test_evicting_one_engines_block_keeps_the_others_copy():
    index = new_index(engine_blocks=1)
    index.save("m", "10.0.0.1", [1])
    index.save("m", "10.0.0.2", [1])
    index.save("m", "10.0.0.1", [2])
    assert index.match_lengths("m", [1]) == {"10.0.0.2": 1}
    assert index.match_lengths("m", [2]) == {"10.0.0.1": 1}


def test_global_cap_takes_from_the_least_recently_saved_engine():
    index = new_index(max_blocks=5)
    index.save("a", "10.0.0.1", [1, 2, 3])
    index.save("b", "10.0.0.2", [4, 5])
    index.save("a", "10.0.0.3", [6, 7])
    # 7 blocks for 5 places: 10.0.0.1 saved least recently loses its two
    # least recently used blocks, the tail of its prompt.
    assert index.block_count == 5
    assert index.match_lengths("a", [1, 2, 3]) == {"10.0.0.1": 1}
    assert index.evictions["global"] == 2
    index.save("b", "10.0.0.2", [8, 9])
    # Two more: 10.0.0.1's last block, then 10.0.0.3 (now the least
    # recently saved) loses its tail.
    assert index.block_count == 5
    assert index.engine_block_count("a", "10.0.0.1") == 0
    assert index.match_lengths("a", [6, 7]) == {"10.0.0.3": 1}
    assert index.engine_count == 2


def test_idle_blocks_expire_after_the_ttl():
    clock = new_clock()
    index = new_index(clock, ttl=640.0)  # marks every 10 s
    index.save("m", "10.0.0.1", [1, 2])
    clock.advance(300)
    index.save("m", "10.0.0.1", [1, 2, 3])  # refreshes 1 and 2
    index.save("m", "10.0.0.2", [9])
    clock.advance(400)  # 700 s after the first save, 400 after the second
    index.expire_all()
    assert index.match_lengths("m", [1, 2, 3]) == {"10.0.0.1": 3}
    clock.advance(260)  # 660 s after the second save
    index.expire_all()
    assert index.match_lengths("m", [1, 2, 3]) == {}
    assert index.match_lengths("m", [9]) == {}
    assert index.engine_count == 0
    assert index.block_count == 0
    assert index.evictions["ttl"] == 4


def test_ttl_expires_the_old_part_of_an_engine_only():
    clock = new_clock()
    index = new_index(clock, ttl=64.0)  # marks every second
    index.save("m", "10.0.0.1", [1, 2])
    clock.advance(50)
    index.save("m", "10.0.0.1", [5, 6])
    clock.advance(20)
    index.expire_all()
    assert index.match_lengths("m", [1]) == {}
    assert index.match_lengths("m", [5, 6]) == {"10.0.0.1": 2}
    assert index.evictions["ttl"] == 2


def test_blocks_are_kept_before_the_ttl_is_over():
    clock = new_clock()
    index = new_index(clock, ttl=64.0)
    index.save("m", "10.0.0.1", [1, 2])
    clock.advance(63.5)
    index.expire_all()
    assert index.match_lengths("m", [1, 2]) == {"10.0.0.1": 2}


def test_expiry_runs_in_chunks():
    clock = new_clock()
    index = new_index(clock, ttl=64.0)
    index.save("m", "10.0.0.1", list(range(100)))
    clock.advance(1)
    index.save("m", "10.0.0.1", [1000])  # keeps the engine alive
    clock.advance(64.5)
    index.save("m", "10.0.0.1", [2000])
    steps = list(index.expire(chunk=30))
    assert steps == [30, 30, 30, 10]
    assert index.engine_block_count("m", "10.0.0.1") == 2


def test_a_save_during_a_paused_sweep_survives():
    clock = new_clock()
    index = new_index(clock, ttl=64.0)
    index.save("m", "10.0.0.1", list(range(100)))
    clock.advance(1)
    index.save("m", "10.0.0.1", [1000])
    clock.advance(64.5)
    sweep = index.expire(chunk=10)
    next(sweep)
    index.save("m", "10.0.0.1", [50, 51])  # refreshed while the sweep pauses
    list(sweep)
    assert index.match_lengths("m", [50, 51]) == {"10.0.0.1": 2}
    # 99..90 went in the first step; 50 and 51 were refreshed in time.
    assert index.engine_block_count("m", "10.0.0.1") == 3  # 50, 51, 1000
    assert index.evictions["ttl"] == 98


# -- engine removal --------------------------------------------------------------


def test_forgetting_an_engine_leaves_the_others():
    index = new_index()
    index.save("m", "10.0.0.1", [1, 2, 3])
    index.save("m", "10.0.0.2", [1, 2])
    assert index.forget_engine("m", "10.0.0.1") == 3
    assert index.forget_engine("m", "10.0.0.1") == 0
    assert index.query("m", [1, 2, 3], 10) == [{"ip": "10.0.0.2", "length": 2}]
    assert index.distinct_blocks_by_cluster() == {"m": 2}
    assert index.evictions["engine"] == 3
    # Its slot is reused by a new engine without inheriting anything.
    index.save("m", "10.0.0.7", [4])
    assert index.match_lengths("m", [1, 2, 3]) == {"10.0.0.2": 2}
    assert index.match_lengths("m", [4]) == {"10.0.0.7": 1}


def test_the_last_engine_of_a_cluster_takes_the_cluster_with_it():
    index = new_index()
    index.save("m", "10.0.0.1", [1, 2])
    index.forget_engine("m", "10.0.0.1")
    assert index.blocks_by_cluster() == {}
    assert index.block_count == 0


def test_an_engine_expiring_from_the_load_table_drops_its_cache():
    clock = new_clock()
    load = LoadState(clock, request_expire=10.0, tombstone_ttl=5.0)
    index = new_index(clock)
    load.engine_removed_callbacks.append(index.engine_removed)
    load.add("m", "r1", "10.0.0.1", 100)
    load.add("m", "r2", "10.0.0.2", 100)
    index.save("m", "10.0.0.1", [1, 2])
    index.save("m", "10.0.0.2", [1])
    load.delete("r1")
    clock.advance(6)
    load.delete("r2")  # keeps 10.0.0.2 in the load table a little longer
    clock.advance(5)
    load.expire_all()
    assert index.query("m", [1, 2], 10) == [{"ip": "10.0.0.2", "length": 1}]


# -- replication ---------------------------------------------------------------


def test_a_snapshot_rebuilds_the_same_index():
    source = new_index(engine_blocks=4)
    source.save("a", "10.0.0.1", [1, 2, 3])
    source.save("a", "10.0.0.2", [1, 9])
    source.save("b", "10.0.0.1", [5])
    source.save("a", "10.0.0.1", [1, 7])
    copy = new_index(engine_blocks=4)
    for cluster, ip, hashes in source.iter_snapshot():
        copy.apply_snapshot(cluster, ip, hashes)
    assert list(copy.iter_snapshot()) == list(source.iter_snapshot())
    # Same LRU order: the same next save evicts the same block on both.
    for index in (source, copy):
        index.save("a", "10.0.0.1", [8, 8])
    assert list(copy.iter_snapshot()) == list(source.iter_snapshot())
    assert copy.query("a", [1, 2, 3], 10) == source.query("a", [1, 2, 3], 10)


def test_applying_a_snapshot_puts_the_peers_blocks_behind_local_ones():
    index = new_index(engine_blocks=3)
    index.save("m", "10.0.0.1", [1])
    assert index.apply_snapshot("m", "10.0.0.1", [4, 5, 1, 6]) == 2  # 5 and 6 fit
    assert list(index.iter_snapshot()) == [("m", "10.0.0.1", [5, 6, 1])]
    index.save("m", "10.0.0.1", [7])
    assert list(index.iter_snapshot()) == [("m", "10.0.0.1", [6, 1, 7])]
    assert index.apply_snapshot("m", "10.0.0.1", [1, 7]) == 0  # idempotent


def test_a_snapshot_entry_expires_with_the_ttl():
    clock = new_clock()
    index = new_index(clock, ttl=64.0)
    index.apply_snapshot("m", "10.0.0.1", [1, 2])
    clock.advance(66)
    index.expire_all()
    assert index.block_count == 0


# -- memory --------------------------------------------------------------------


def test_the_index_holds_no_gc_tracked_containers_per_block():
    index = new_index()
    for engine in range(3):
        index.save("m", f"10.0.0.{engine}", [engine * 1000 + i for i in range(500)] + [HASH_MAX])
    before = len(gc.get_objects())
    index.save("m", "10.0.0.9", [5000 + i for i in range(2000)])
    # One engine record and its two deques; nothing per block.
    assert len(gc.get_objects()) - before < 20
    cluster = index._clusters["m"]
    assert not gc.is_tracked(cluster.owners)
    for engine in cluster.engines.values():
        assert not gc.is_tracked(engine.tick_of)
        assert not gc.is_tracked(engine.hash_at)


def test_approx_bytes_grows_with_blocks():
    index = new_index()
    empty = index.approx_bytes()
    index.save("m", "10.0.0.1", list(range(2**62, 2**62 + 10000)))
    per_block = (index.approx_bytes() - empty) / 10000
    assert 100 < per_block < 400


def test_the_settings_defaults_are_the_index_defaults():
    from metacenter.runtime.config import SETTINGS_BY_NAME

    assert SETTINGS_BY_NAME["cache-engine-blocks"].default == DEFAULT_ENGINE_BLOCKS
    assert SETTINGS_BY_NAME["cache-ttl"].default == DEFAULT_TTL
    assert SETTINGS_BY_NAME["cache-max-blocks"].default == DEFAULT_MAX_BLOCKS


def test_constructor_rejects_nonsense_bounds():
    for kwargs in ({"engine_blocks": 0}, {"ttl": 0}, {"max_blocks": 0}):
        with pytest.raises(ValueError):
            new_index(**kwargs)


# -- property: the index equals a brute-force model --------------------------------


class ModelIndex:
    """The specification, written as plainly as possible: per engine an
    LRU-ordered dict; a save refreshes its hashes from last to first; over
    capacity the least recently used go; over the global cap the least
    recently saved engine gives up its least recently used blocks."""

    def __init__(self, engine_blocks, max_blocks):
        self.engine_blocks = engine_blocks
        self.max_blocks = max_blocks
        self.engines = OrderedDict()  # (cluster, ip) -> OrderedDict of hashes

    def save(self, cluster, ip, hashes):
        if not hashes:
            return
        lru = self.engines.setdefault((cluster, ip), OrderedDict())
        self.engines.move_to_end((cluster, ip))
        for h in reversed(hashes):
            lru[h] = None
            lru.move_to_end(h)
        while len(lru) > self.engine_blocks:
            lru.popitem(last=False)
        while sum(len(v) for v in self.engines.values()) > self.max_blocks:
            key, oldest = next(iter(self.engines.items()))
            oldest.popitem(last=False)
            if not oldest:
                del self.engines[key]

    def forget(self, cluster, ip):
        self.engines.pop((cluster, ip), None)

    def query(self, cluster, hashes, topk):
        found = []
        for (c, ip), held in self.engines.items():
            if c != cluster:
                continue
            length = 0
            while length < len(hashes) and hashes[length] in held:
                length += 1
            if length:
                found.append((ip, length))
        found.sort(key=lambda item: (-item[1], item[0]))
        return [{"ip": ip, "length": length} for ip, length in found[:topk]]

    def block_count(self):
        return sum(len(v) for v in self.engines.values())


HASH_POOL = [0, 1, 2, 3, 4, 5, 6, 7, 2**63, HASH_MAX - 1, HASH_MAX]
hash_lists = st.lists(st.sampled_from(HASH_POOL), max_size=7)
clusters = st.sampled_from(["a", "b"])
ips = st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3", "::1", "10.0.0.10"])
operations = st.lists(
    st.one_of(
        st.tuples(st.just("save"), clusters, ips, hash_lists),
        st.tuples(st.just("query"), clusters, hash_lists, st.integers(1, 6)),
        st.tuples(st.just("forget"), clusters, ips),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(operations, st.integers(1, 8), st.integers(1, 30))
def test_index_equals_the_brute_force_model(ops, engine_blocks, max_blocks):
    index = new_index(engine_blocks=engine_blocks, max_blocks=max_blocks)
    model = ModelIndex(engine_blocks, max_blocks)
    for op in ops:
        if op[0] == "save":
            index.save(*op[1:])
            model.save(*op[1:])
        elif op[0] == "forget":
            index.forget_engine(*op[1:])
            model.forget(*op[1:])
        else:
            assert index.query(*op[1:]) == model.query(*op[1:])
        assert index.block_count == model.block_count()
    assert index.engine_count == len(model.engines)
    assert [(c, ip, hashes) for c, ip, hashes in index.iter_snapshot()] == \
        [(c, ip, list(held)) for (c, ip), held in model.engines.items()]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(clusters, ips, hash_lists), max_size=25), st.randoms(use_true_random=False),
       st.lists(st.tuples(clusters, hash_lists), max_size=10))
def test_replicas_agree_whatever_the_order_of_saves(saves, random, queries):
    # Without eviction pressure, what is held depends only on the set of
    # saves, so replicas that got them in any order, or twice, answer alike.
    first, second = new_index(), new_index()
    for save in saves:
        first.save(*save)
    shuffled = saves * 2
    random.shuffle(shuffled)
    for save in shuffled:
        second.save(*save)
    for cluster, hashes in queries:
        assert first.query(cluster, hashes, 10) == second.query(cluster, hashes, 10)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(clusters, ips, hash_lists), max_size=25), st.integers(1, 5),
       st.lists(st.tuples(clusters, hash_lists), max_size=10))
def test_a_snapshot_answers_like_its_source(saves, engine_blocks, queries):
    source = new_index(engine_blocks=engine_blocks)
    for save in saves:
        source.save(*save)
    copy = new_index(engine_blocks=engine_blocks)
    for cluster, ip, hashes in source.iter_snapshot():
        copy.apply_snapshot(cluster, ip, hashes)
    assert list(copy.iter_snapshot()) == list(source.iter_snapshot())
    for cluster, hashes in queries:
        assert copy.query(cluster, hashes, 10) == source.query(cluster, hashes, 10)
