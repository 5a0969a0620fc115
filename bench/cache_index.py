"""In-process cost of the KV-cache prefix index: query and save latency, bytes
per stored block (tracemalloc and RSS), and gc.collect() time at scale.

    .venv/bin/python -m bench.cache_index [--engines 100] [--blocks 1000000] [--json]

The workload: every engine holds prompts of ``--prompt`` hashes, the first
tenth of each one of 20 shared system prefixes (no two alike on one engine),
the rest its own, until the cluster stores ``--blocks`` (engine, block) pairs. Numbers are wall-clock on
this machine, for orientation; nothing here is asserted.
"""

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
import tracemalloc

from metacenter.core.cache import CacheIndex
from metacenter.core.hashing import prompt_hashes


class FixedClock:
    def __init__(self, now):
        self.now = now

    def seconds(self):
        return self.now


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(engines, blocks, prompt_length, seed=1):
    """Fill one cluster; returns the index and a few of its prompts."""
    rng = random.Random(seed)
    per_engine_prompts = max(1, blocks // (engines * prompt_length))
    shared = max(1, prompt_length // 10)
    systems = [[rng.getrandbits(64) for _ in range(shared)] for _ in range(20)]
    index = CacheIndex(FixedClock(1_700_000_000.0), engine_blocks=per_engine_prompts * prompt_length,
                       max_blocks=blocks * 2)
    kept = []
    for e in range(engines):
        ip = f"10.{e // 65536}.{e // 256 % 256}.{e % 256}"
        for p in range(per_engine_prompts):
            system = systems[(e + p) % len(systems)]  # distinct within an engine
            hashes = system + [rng.getrandbits(64) for _ in range(prompt_length - shared)]
            index.save("bench", ip, hashes)
            if p == 0 and e % 10 == 0:
                kept.append((ip, system, hashes))
    # Other clusters' blocks must not change a query's cost: add some.
    for c in range(10):
        index.save(f"other-{c}", "10.9.9.9", [rng.getrandbits(64) for _ in range(1000)])
    return index, kept, rng


def timed(fn, repeat):
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    samples.sort()
    return {"median_us": statistics.median(samples) * 1e6,
            "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6}


def gc_collect_ms():
    """The fastest of a few full collections: a busy machine only adds."""
    samples = []
    for _ in range(7):
        start = time.perf_counter()
        gc.collect()
        samples.append((time.perf_counter() - start) * 1e3)
    return min(samples)


def measure(engines, blocks, prompt_length, repeat):
    gc_empty_ms = gc_collect_ms()
    objects_before = len(gc.get_objects())

    rss_before = rss_bytes()
    start = time.perf_counter()
    index, kept, rng = build(engines, blocks, prompt_length)
    build_s = time.perf_counter() - start
    gc.collect()
    rss_after = rss_bytes()
    stored = index.block_count  # all clusters: what the RSS grew by
    kept_hashes = sum(len(h) for _, _, h in kept) + sum(len(s) for _, s, _ in kept)

    gc_full_ms = gc_collect_ms()
    objects_after = len(gc.get_objects())

    ip, system, full = kept[len(kept) // 2]
    partial = system + [rng.getrandbits(64) for _ in range(prompt_length - len(system))]
    miss = [rng.getrandbits(64) for _ in range(prompt_length)]
    results = {
        "engines": index.engines_by_cluster()["bench"],
        "stored_blocks": index.blocks_by_cluster()["bench"],
        "all_clusters_blocks": stored,
        "distinct_blocks": index.distinct_blocks_by_cluster()["bench"],
        "build_s": build_s,
        "query_full_match": timed(lambda: index.query("bench", full, 10), repeat),
        "query_shared_prefix": timed(lambda: index.query("bench", partial, 10), repeat),
        "query_miss": timed(lambda: index.query("bench", miss, 10), repeat),
        "save_refresh": timed(lambda: index.save("bench", ip, full), repeat),
        "rss_bytes_per_block": (rss_after - rss_before) / stored,
        "approx_bytes_per_block": index.approx_bytes() / stored,
        "gc_collect_ms_empty": gc_empty_ms,
        "gc_collect_ms_full": gc_full_ms,
        "gc_objects_added": objects_after - objects_before,
        "query_full_match_best": index.query("bench", full, 10)[0],
        "query_shared_prefix_locations": len(index.query("bench", partial, 1000)),
    }
    del index, kept
    gc.collect()

    # tracemalloc slows allocation down: a second build, only for bytes.
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    index, kept, _ = build(engines, blocks, prompt_length)
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # The prompts kept for querying are not the index's.
    kept_bytes = kept_hashes * 8 + len(kept) * 200
    results["traced_bytes_per_block"] = (current - base - kept_bytes) / index.block_count

    prompt = bytes(rng.getrandbits(8) for _ in range(prompt_length * 512))
    results["prompt_hashes"] = {"bytes": len(prompt), **timed(lambda: prompt_hashes(prompt), 5)}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=100)
    parser.add_argument("--blocks", type=int, default=1_000_000, help="stored (engine, block) pairs")
    parser.add_argument("--prompt", type=int, default=1000, help="hashes per prompt and per query")
    parser.add_argument("--repeat", type=int, default=500, help="timed repetitions of each operation")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    results = measure(args.engines, args.blocks, args.prompt, args.repeat)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return results
    print(f"cluster of {results['engines']} engines, {results['stored_blocks']:,} stored blocks "
          f"({results['distinct_blocks']:,} distinct; {results['all_clusters_blocks']:,} in all clusters), "
          f"built in {results['build_s']:.1f} s")
    for name in ("query_full_match", "query_shared_prefix", "query_miss", "save_refresh"):
        r = results[name]
        print(f"  {name:22s} median {r['median_us']:8.1f} us   p99 {r['p99_us']:8.1f} us")
    print(f"  bytes per stored block: traced {results['traced_bytes_per_block']:.0f}, "
          f"RSS {results['rss_bytes_per_block']:.0f}, approx_bytes() {results['approx_bytes_per_block']:.0f}")
    print(f"  gc.collect() (best of 7): {results['gc_collect_ms_empty']:.1f} ms before, "
          f"{results['gc_collect_ms_full']:.1f} ms with the index "
          f"({results['gc_objects_added']} tracked objects added)")
    ph = results["prompt_hashes"]
    print(f"  prompt_hashes of {ph['bytes']:,} bytes: median {ph['median_us'] / 1000:.1f} ms")
    return results


if __name__ == "__main__":
    main()
