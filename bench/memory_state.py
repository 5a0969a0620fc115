"""Memory and pause cost of the load table (metacenter.state.LoadState).

    .venv/bin/python -m bench.memory_state                      # 100k and 1M requests
    .venv/bin/python -m bench.memory_state --requests 250000    # one size (repeatable)
    .venv/bin/python bench/memory_state.py --json               # path form, JSON out

For each size, in a fresh forked process (so one size's freed memory does not
flatter the next):

- bytes per in-flight request: tracemalloc and VmRSS delta after adding N
  requests the way the gateway sends them (UUID4 string ids, 50 engines in 5
  clusters, prompt lengths of hundreds to thousands of bytes, sender
  timestamps a few ms old, a third of the prompts already deleted). The
  request id string is included: the table keeps it.
- bytes per tombstone: N deletes of unknown ids (delete-before-add; a delete
  after an add leaves the same entry).
- gc.collect(): the objects the table adds to the collector's work (exact),
  and the time of a full collection with the table filled vs empty.
- expiry: every request made due at once, the longest single ``expire()``
  step and the whole sweep, then the same for the tombstones it left.

Times are CPU time of the measuring thread (time.thread_time), so other
processes on a shared machine do not inflate them; they are for orientation
and nothing is asserted. Also run by ``python -m bench`` (section
memory_state). Linux only (reads /proc/self/statm).
"""

import argparse
import concurrent.futures
import gc
import json
import multiprocessing
import os
import random
import sys
import time
import tracemalloc
import uuid

if __package__ in (None, ""):  # path form: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock  # noqa: E402

from metacenter.core.load import EXPIRE_CHUNK, LoadState  # noqa: E402

DEFAULT_SIZES = (100_000, 1_000_000)
TARGET_RSS_PER_REQUEST = 350
ENGINES = [(f"model-{c}", f"10.0.{c}.{i}") for c in range(5) for i in range(10)]
START = 1_700_000_000.0
FILL_SECONDS = 600.0  # the requests arrive over ten minutes, inside request_expire


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def gateway_requests(count, seed):
    """(request_id, cluster, ip, prompt_length, prompt_deleted) as a gateway
    would produce them; ids are fresh str objects, as the JSON decoder makes."""
    rng = random.Random(seed)
    for _ in range(count):
        cluster, ip = rng.choice(ENGINES)
        prompt = min(int(rng.lognormvariate(7.0, 0.8)), 2**31 - 1)  # median ~1,100 bytes
        yield str(uuid.UUID(int=rng.getrandbits(128), version=4)), cluster, ip, prompt, rng.random() < 1 / 3


def fill(state, clock, count, seed=1):
    """Add ``count`` requests; returns the longest single add in ms (a dict
    resize of the whole table happens inside one add)."""
    step = FILL_SECONDS / count
    rng = random.Random(seed + 1)
    longest = 0.0
    for request_id, cluster, ip, prompt, prompt_deleted in gateway_requests(count, seed):
        clock.advance(step)
        # Stamped by the sender a few ms ago (replication and queueing delay).
        timestamp_ns = int((clock.seconds() - rng.random() * 0.005) * 1e9)
        started = time.thread_time()
        state.add(cluster, request_id, ip, prompt, timestamp_ns)
        longest = max(longest, time.thread_time() - started)
        if prompt_deleted:
            state.delete_prompt(request_id)
    return longest * 1e3


def new_state():
    clock = Clock()
    clock.advance(START)
    return LoadState(clock, request_expire=660.0, tombstone_ttl=60.0), clock


def gc_collect_ms(repeat=15):
    """The fastest of a few full collections (the others lost caches to other
    processes, they did not do more work)."""
    times = []
    for _ in range(repeat):
        started = time.thread_time()
        gc.collect()
        times.append((time.thread_time() - started) * 1e3)
    return min(times)


def timed_steps(generator):
    """(longest step ms, whole sweep ms, steps) of an expire() generator."""
    longest, total, steps = 0.0, 0.0, 0
    while True:
        started = time.thread_time()
        try:
            next(generator)
        except StopIteration:
            total += time.thread_time() - started
            break
        elapsed = time.thread_time() - started
        longest, total, steps = max(longest, elapsed), total + elapsed, steps + 1
    return longest * 1e3, total * 1e3, steps


def measure_rss(count, chunk):
    """RSS, gc and expiry at one size, without tracemalloc (it doubles memory
    and slows every allocation)."""
    gc.collect()
    state, clock = new_state()
    gc_empty_ms = gc_collect_ms()
    tracked_before = len(gc.get_objects())
    before = rss_bytes()
    longest_add_ms = fill(state, clock, count)
    gc.collect()
    after = rss_bytes()
    result = {
        "requests": state.request_count,
        "gc_tracked_added": len(gc.get_objects()) - tracked_before,
        "longest_add_ms": longest_add_ms,
        "rss_per_request": (after - before) / count,
        "rss_mib": after / 2**20,
        "gc_empty_ms": gc_empty_ms,
        "gc_filled_ms": gc_collect_ms(),
        "requests_dict_gc_tracked": any(map(gc.is_tracked, state._requests.shards)),
        "stragglers": len(state._stragglers),
    }
    clock.advance(660.0 + 1)  # every request due at once: the worst sweep
    result["expire_longest_ms"], result["expire_total_ms"], result["expire_steps"] = timed_steps(
        state.expire(chunk))
    result["tombstones_after_expiry"] = state.tombstone_count
    clock.advance(60.0 + 1)
    result["tomb_expire_longest_ms"], result["tomb_expire_total_ms"], _ = timed_steps(state.expire(chunk))

    del state
    gc.collect()
    state, clock = new_state()
    before = rss_bytes()
    for request_id, *_ in gateway_requests(count, seed=2):
        state.delete(request_id)
    result["rss_per_tombstone"] = (rss_bytes() - before) / count
    return result


def measure_traced(count):
    tracemalloc.start()
    state, clock = new_state()
    before, _ = tracemalloc.get_traced_memory()
    fill(state, clock, count)
    per_request = (tracemalloc.get_traced_memory()[0] - before) / count
    del state
    state, clock = new_state()
    before, _ = tracemalloc.get_traced_memory()
    for request_id, *_ in gateway_requests(count, seed=2):
        state.delete(request_id)
    per_tombstone = (tracemalloc.get_traced_memory()[0] - before) / count
    tracemalloc.stop()
    return {"traced_per_request": per_request, "traced_per_tombstone": per_tombstone}


def measure(count, chunk=EXPIRE_CHUNK):
    """Both measurements, each in its own fresh process."""
    fork = multiprocessing.get_context("fork")
    result = {"size": count, "chunk": chunk}
    for fn, args in ((measure_rss, (count, chunk)), (measure_traced, (count,))):
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=fork) as pool:
            result.update(pool.submit(fn, *args).result())
    return result


def table(results):
    rows = [
        ("in-flight requests", lambda r: f"{r['requests']:,}"),
        ("RSS bytes / request", lambda r: f"{r['rss_per_request']:.0f}"),
        ("traced bytes / request", lambda r: f"{r['traced_per_request']:.0f}"),
        ("RSS bytes / tombstone", lambda r: f"{r['rss_per_tombstone']:.0f}"),
        ("traced bytes / tombstone", lambda r: f"{r['traced_per_tombstone']:.0f}"),
        ("process RSS MiB (filled)", lambda r: f"{r['rss_mib']:.0f}"),
        ("gc.collect() CPU ms empty / filled", lambda r: f"{r['gc_empty_ms']:.1f} / {r['gc_filled_ms']:.1f}"),
        ("objects added to the gc's work", lambda r: f"{r['gc_tracked_added']:,}"),
        ("request dicts tracked by gc", lambda r: str(r["requests_dict_gc_tracked"])),
        ("stragglers in the heap", lambda r: f"{r['stragglers']:,}"),
        ("add: longest single call CPU ms", lambda r: f"{r['longest_add_ms']:.1f}"),
        ("expire: longest step CPU ms", lambda r: f"{r['expire_longest_ms']:.1f}"),
        ("expire: whole sweep CPU ms (steps)", lambda r: f"{r['expire_total_ms']:.0f} ({r['expire_steps']})"),
        ("tombstone expire: longest step CPU ms", lambda r: f"{r['tomb_expire_longest_ms']:.1f}"),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{'':{width}}  " + "  ".join(f"{r['size']:>12,}" for r in results)]
    for label, cell in rows:
        lines.append(f"{label:{width}}  " + "  ".join(f"{cell(r):>12}" for r in results))
    chunk = results[0]["chunk"]
    lines.append(f"(expire chunk {chunk}; target: under {TARGET_RSS_PER_REQUEST} RSS bytes per request)")
    return "\n".join(lines)


def summary(results):
    parts = []
    for r in results:
        parts.append(
            f"{r['size']:,} requests: {r['rss_per_request']:.0f} B/request RSS "
            f"({r['traced_per_request']:.0f} traced), {r['rss_per_tombstone']:.0f} B/tombstone, "
            f"gc.collect {r['gc_filled_ms']:.1f} ms (empty {r['gc_empty_ms']:.1f}), "
            f"longest expire step {r['expire_longest_ms']:.1f} ms (chunk {r['chunk']})")
    return "; ".join(parts) + "."


def run(quick=False, log=print):
    """The hook of ``python -m bench``."""
    sizes = (100_000,) if quick else DEFAULT_SIZES
    results = []
    for size in sizes:
        log(f"memory_state: {size:,} requests")
        results.append(measure(size))
    return {"results": results, "summary": summary(results)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, action="append", metavar="N",
                        help=f"in-flight requests (repeatable; default {' and '.join(map(str, DEFAULT_SIZES))})")
    parser.add_argument("--chunk", type=int, default=EXPIRE_CHUNK, help="entries per expire() step")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    results = [measure(n, args.chunk) for n in (args.requests or DEFAULT_SIZES)]
    print(json.dumps(results, indent=2) if args.json else table(results))


if __name__ == "__main__":
    main()
