"""The gateway's engine score (docs/cache.md), as a pure function.

    score = 2*cache_ratio - w_req*request_load - 3*prefill_load

    cache_ratio  = cache match length / len(prompt_hash)
    request_load = (queued - min queued) / max(2, max queued - min queued)
    w_req        = ceil(max(2, max queued - min queued) / 5)
    prefill_load = prompt_length / max(1024, max prompt_length)

minimum and maximum taken over the engines being scored. The gateway then
picks at random among the best 5 %; this module only ranks.
"""

import heapq
import math

from metacenter.core.steps import never, to_end

# Engines scored between two calls of a stepped score's ``spent()`` (~1 µs
# each): a gateway's few dozen candidates never look at the clock.
ROWS_PER_CHECK = 8
# Rows sorted in one go (~0.1 ms); more are sorted in runs of ``RUN_ROWS``
# and merged over steps (10,000 took ~7 ms in one sort).
SORT_IN_ONE_GO = 256
RUN_ROWS = 32


def score_engines(engines_load: list[dict], cache_lengths: dict[str, int], hash_count: int,
                  ips: list[str] | None = None) -> list[dict]:
    """Rank a cluster's engines for one prompt, best first.

    ``engines_load``: dicts with ``ip``, ``queued_req_num`` and
    ``prompt_length`` (``LoadState.cluster_load``). ``cache_lengths``:
    {ip: leading hashes held} (``CacheIndex.match_lengths``). ``hash_count``:
    len(prompt_hash). ``ips``: if given, exactly these engines are scored
    (an engine without load data counts as idle), else every engine that has
    load data or a cache match.

    Returns dicts with the inputs (``queued_req_num``, ``prompt_length``,
    ``cache_length``), the terms (``cache_ratio``, ``request_load``,
    ``prefill_load``) and ``score``; equal scores are ordered by ip.
    """
    return to_end(score_engines_steps(engines_load, cache_lengths, hash_count, ips, never))


def score_engines_steps(engines_load, cache_lengths, hash_count, ips, spent):
    """``score_engines`` as a generator that yields (None) after an engine
    when ``spent()`` is true (thousands of ``ips`` scored over several
    reactor turns, ``api.cache``) and returns the ranked list."""
    load_by_ip = {e["ip"]: e for e in engines_load}
    if ips is None:
        candidates = list(load_by_ip)
        candidates += [ip for ip in cache_lengths if ip not in load_by_ip]
    else:
        candidates = list(dict.fromkeys(ips))
    if not candidates:
        return []

    rows = []
    for ip in candidates:
        load = load_by_ip.get(ip)
        queued = load["queued_req_num"] if load else 0
        prompt = load["prompt_length"] if load else 0
        rows.append((ip, queued, prompt, cache_lengths.get(ip, 0)))
        if not len(rows) % ROWS_PER_CHECK and spent():
            yield

    min_queued = min(r[1] for r in rows)
    spread = max(2, max(r[1] for r in rows) - min_queued)
    request_weight = math.ceil(spread / 5)
    prefill_scale = max(1024, max(r[2] for r in rows))

    scored = []
    for ip, queued, prompt, length in rows:
        cache_ratio = length / hash_count if hash_count else 0.0
        request_load = (queued - min_queued) / spread
        prefill_load = prompt / prefill_scale
        scored.append({
            "ip": ip,
            "queued_req_num": queued,
            "prompt_length": prompt,
            "cache_length": length,
            "cache_ratio": cache_ratio,
            "request_load": request_load,
            "prefill_load": prefill_load,
            "score": 2 * cache_ratio - request_weight * request_load - 3 * prefill_load,
        })
        if not len(scored) % ROWS_PER_CHECK and spent():
            yield
    if len(scored) <= SORT_IN_ONE_GO:
        scored.sort(key=_best_first)
        return scored
    # Thousands of rows: sorted runs, then merged a row per ``spent()``; the
    # keys are distinct (the candidates are), so the order is the sort's.
    runs = []
    for start in range(0, len(scored), RUN_ROWS):
        runs.append(sorted((_best_first(row), row) for row in scored[start:start + RUN_ROWS]))
        if spent():
            yield
    ranked = []
    for _, row in heapq.merge(*runs, key=_first):
        ranked.append(row)
        if spent():
            yield
    return ranked


def _best_first(row):
    return -row["score"], row["ip"]


def _first(pair):
    return pair[0]
