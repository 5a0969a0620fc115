"""Reactor pauses of a real node whatever its state holds (``stall`` section
of ``python -m bench``; also ``python -m bench.stall [--quick] [--json]``).

For each state, a fresh ``twistd metacenter`` node (on the server core) is
filled over HTTP through ``POST /v1/replica/batch`` (10,000 events a
request), then, for ``seconds``, on the other core and in processes of their
own:

- a probe client: ``GET /v1/load/stats`` of a one-engine cluster every 10 ms
  on one keep-alive connection, its latency from when each was due;
- a Prometheus-like scraper: ``GET /metrics`` every second;
- a console: ``GET /v1/load/overview``, ``/readyz``, ``/v1/node/status`` and
  ``/v1/cache/stats`` every second;

and the node's own ``metacenter_reactor_lag_seconds`` histogram (probe tick
every 10 ms here) is read before and after: the worst lag is the upper bound
of the highest bucket that got an observation; the number of full
collections of the cyclic GC meanwhile is read too. The sweep runs every 2 s,
and the long-lived objects are frozen out of the collector's walks every 5 s
(``--gc-freeze-interval``, runtime/gcpolicy.py), so the filled state is
frozen within 5 s of the fill.
After the main phase, the same probe runs while a peer-like client takes a
snapshot (``GET /v1/replica/snapshot``) and a digest (``/v1/replica/digest``)
once a second: those endpoints belong to the cluster layer and are measured
apart.

States: empty; 20,000 clusters x 1 engine; 1 cluster x 5,000 engines;
1,000,000 in-flight requests (50 engines). Target: no reactor pause above
5 ms, and the probe's p99 the same as on the empty node.
"""

import argparse
import http.client
import json
import multiprocessing
import os
import sys
import time

if __package__ in (None, ""):  # path form: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import servers  # noqa: E402

BATCH = 10_000
PROBE_INTERVAL = 0.01
POLL_INTERVAL = 1.0
TARGET_PAUSE_S = 0.005
NODE_ARGS = ("--max-body", "4MiB", "--gc-interval", "2s", "--reactor-lag-interval", "10ms", "--gc-freeze-interval", "5s")

STATES = (
    ("empty", "empty node", 0, 0, 0),
    ("clusters", "20,000 clusters x 1 engine", 20_000, 1, 20_000),
    ("engines", "1 cluster x 5,000 engines", 1, 5_000, 5_000),
    ("inflight", "1,000,000 in-flight requests (1 cluster, 50 engines)", 1, 50, 1_000_000),
)


# -- filling -------------------------------------------------------------------


def _ip(index):
    return f"10.{100 + index // 65536}.{(index // 256) % 256}.{index % 256}"


def fill(host, port, clusters, engines, requests, log):
    """``requests`` adds spread over ``clusters`` x ``engines`` (every engine
    gets at least one), in batches over one connection."""
    if not requests:
        return 0.0
    started = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=120)
    sent = 0
    while sent < requests:
        events = []
        for i in range(sent, min(requests, sent + BATCH)):
            c = i % clusters
            e = (i // clusters) % engines
            events.append({"type": "load.stats.set",
                           "body": {"cluster": f"model-{c}", "request_id": f"fill-{i}", "ip": _ip(e),
                                    "prompt_length": 100 + i % 900}})
        body = json.dumps({"events": events}).encode()
        conn.request("POST", "/v1/replica/batch", body, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        data = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"fill batch answered {answer.status}: {data[:300]!r}")
        sent += len(events)
        if sent % 200_000 == 0:
            log(f"    {sent:,} of {requests:,} added")
    conn.close()
    return time.perf_counter() - started


# -- clients (each in a process of its own) --------------------------------------


def _probe(host, port, seconds, out):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("POST", "/v1/load/stats", json.dumps(
        {"cluster": "probe", "request_id": "probe-1", "ip": "10.0.0.1"}).encode())
    conn.getresponse().read()
    latencies, errors = [], 0
    start = time.perf_counter()
    due = start
    while due - start < seconds:
        now = time.perf_counter()
        if now < due:
            time.sleep(due - now)
        try:
            conn.request("GET", "/v1/load/stats?cluster=probe")
            answer = conn.getresponse()
            answer.read()
            if answer.status != 200:
                errors += 1
        except (OSError, http.client.HTTPException):
            errors += 1
            conn = http.client.HTTPConnection(host, port, timeout=10)
        latencies.append(time.perf_counter() - due)  # from when it was due: a stall delays the next ones too
        due += PROBE_INTERVAL
        if time.perf_counter() > due + 1.0:  # hopelessly behind: skip ahead, counted as late by the last one
            due = time.perf_counter()
    out.put(("probe", {"latencies": latencies, "errors": errors}))


def _poller(host, port, seconds, paths, name, out):
    # The pollers share the load generator's core with the probe; reading a
    # multi-MB body is CPU-bound there, and at equal priority the scheduler
    # can hold the probe back for a few ms behind it: a client-side delay the
    # probe would charge to the node. A lower priority keeps the probe a
    # measure of the node.
    os.nice(10)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    times, sizes, errors = [], [], 0
    start = time.perf_counter()
    due = start
    while due - start < seconds:
        now = time.perf_counter()
        if now < due:
            time.sleep(due - now)
        for path in paths:
            t0 = time.perf_counter()
            try:
                conn.request("GET", path)
                answer = conn.getresponse()
                data = answer.read()
                if answer.status not in (200, 404):
                    errors += 1
                sizes.append(len(data))
            except (OSError, http.client.HTTPException):
                errors += 1
                conn = http.client.HTTPConnection(host, port, timeout=30)
            times.append(time.perf_counter() - t0)
        due += POLL_INTERVAL
    out.put((name, {"seconds": times, "bytes": sizes, "errors": errors}))


def run_clients(host, port, seconds, pollers):
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_probe, args=(host, port, seconds, out))]
    for name, paths in pollers:
        procs.append(ctx.Process(target=_poller, args=(host, port, seconds, paths, name, out)))
    for p in procs:  # on the load generator's core: the affinity is inherited
        p.start()
    results = dict(out.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join(30)
    return results


# -- the node's histogram ----------------------------------------------------------


def lag_histogram(host, port):
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    buckets, count, total, full_gcs = {}, 0, 0.0, 0
    for line in text.splitlines():
        if line.startswith('python_gc_collections_total{generation="2"}'):
            full_gcs = float(line.rsplit(" ", 1)[1])
        if line.startswith("metacenter_reactor_lag_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("metacenter_reactor_lag_seconds_count"):
            count = float(line.rsplit(" ", 1)[1])
        elif line.startswith("metacenter_reactor_lag_seconds_sum"):
            total = float(line.rsplit(" ", 1)[1])
    return buckets, count, total, full_gcs


def lag_between(before, after):
    """Ticks, the worst lag (upper bound of the highest bucket reached), ticks above 5 ms."""
    b0, c0, _, gc0 = before
    b1, c1, _, gc1 = after
    ticks = int(c1 - c0)
    # Cumulative buckets: the first bound that holds every tick of the window.
    reached = [bound for bound in sorted(b1) if b1[bound] - b0.get(bound, 0) >= ticks]
    worst = reached[0] if reached and ticks else None
    above = ticks - int(b1.get(TARGET_PAUSE_S, 0) - b0.get(TARGET_PAUSE_S, 0))
    # Full collections of the cyclic GC walk every tracked object: a pause
    # that grows with the state, counted here to tell it from the rest.
    return {"ticks": ticks, "worst_le_s": worst, "ticks_above_5ms": above, "full_gc_collections": int(gc1 - gc0)}


def _pcts(values):
    if not values:
        return {}
    ordered = sorted(values)

    def pct(p):
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {"p50_ms": pct(0.5) * 1e3, "p99_ms": pct(0.99) * 1e3, "max_ms": ordered[-1] * 1e3,
            "count": len(ordered)}


# -- one state -----------------------------------------------------------------------


def measure_state(key, label, clusters, engines, requests, seconds, cores, log, node_factory):
    log(f"stall: {label}")
    node = node_factory(cores, *NODE_ARGS).start()
    try:
        fill_s = fill(node.host, node.port, clusters, engines, requests, log)
        status = node.status() or {}
        time.sleep(2.0)  # the fill's last turns pass, and the node's growth check (1 s) freezes the new state
        before = lag_histogram(node.host, node.port)
        cpu0 = node.cpu_seconds()
        steal0 = servers.steal_seconds(cores.server)
        clients = run_clients(node.host, node.port, seconds,
                              [("scraper", ["/metrics"]),
                               ("console", ["/v1/load/overview", "/readyz", "/v1/node/status", "/v1/cache/stats"])])
        cpu = node.cpu_seconds() - cpu0
        steal1 = servers.steal_seconds(cores.server)
        after = lag_histogram(node.host, node.port)
        peer_seconds = max(5, seconds // 3)
        peer = run_clients(node.host, node.port, peer_seconds,
                           [("peer", ["/v1/replica/digest", "/v1/replica/snapshot"])])
        after_peer = lag_histogram(node.host, node.port)
        steal2 = servers.steal_seconds(cores.server)
    finally:
        node.stop()
    probe = clients["probe"]
    result = {
        "state": label,
        "fill_seconds": round(fill_s, 1),
        "node": {k: status.get(k) for k in ("requests", "engines", "clusters")},
        "seconds": seconds,
        "reactor_lag": lag_between(before, after),
        "probe": {**_pcts(probe["latencies"]), "errors": probe["errors"]},
        "scrape": {**_pcts(clients["scraper"]["seconds"]), "bytes": max(clients["scraper"]["bytes"] or [0]),
                   "errors": clients["scraper"]["errors"]},
        "console_poll": {**_pcts(clients["console"]["seconds"]),
                         "bytes": sum(sorted(clients["console"]["bytes"])[-4:]),
                         "errors": clients["console"]["errors"]},
        "node_cpu_util": cpu / seconds,
        # The hypervisor's pauses of the node's core: a lag it explains is the host's, not the node's.
        "host_steal_ms": round((steal1 - steal0) * 1e3),
        "peer_polls": {"seconds": peer_seconds, "reactor_lag": lag_between(after, after_peer),
                       "host_steal_ms": round((steal2 - steal1) * 1e3),
                       "probe": _pcts(peer["probe"]["latencies"]),
                       "poll": {**_pcts(peer["peer"]["seconds"]), "errors": peer["peer"]["errors"]}},
    }
    # A poll answered with an error is cheap and would flatter the figures.
    failed = {name: n for name, n in (("probe", probe["errors"]), ("scraper", clients["scraper"]["errors"]),
                                      ("console", clients["console"]["errors"]),
                                      ("peer probe", peer["probe"]["errors"]), ("peer", peer["peer"]["errors"]))
              if n}
    if failed:
        raise RuntimeError(f"{label}: requests failed during the measurement: {failed}")
    lag = result["reactor_lag"]
    log(f"  worst reactor lag <= {lag['worst_le_s'] * 1e3 if lag['worst_le_s'] else 0:g} ms "
        f"({lag['ticks_above_5ms']} of {lag['ticks']} ticks above 5 ms, {lag['full_gc_collections']} full GC "
        f"collections); probe p50 "
        f"{result['probe'].get('p50_ms', 0):.2f} ms, p99 {result['probe'].get('p99_ms', 0):.2f} ms, "
        f"max {result['probe'].get('max_ms', 0):.1f} ms; scrape {result['scrape'].get('p50_ms', 0):.0f} ms "
        f"({result['scrape']['bytes']:,} bytes); node core {result['node_cpu_util']:.0%} busy, host steal "
        f"{result['host_steal_ms']} ms")
    pl = result["peer_polls"]["reactor_lag"]
    log(f"  with a peer's digest + snapshot each second: worst lag <= "
        f"{pl['worst_le_s'] * 1e3 if pl['worst_le_s'] else 0:g} ms ({pl['ticks_above_5ms']} of {pl['ticks']} "
        f"ticks above 5 ms, {pl['full_gc_collections']} full GC collections), probe p99 "
        f"{result['peer_polls']['probe'].get('p99_ms', 0):.2f} ms, peer poll p50 "
        f"{result['peer_polls']['poll'].get('p50_ms', 0):.0f} ms")
    return result


def run(quick=False, cores=None, log=print, node_factory=None, states=None):
    if cores is None:
        cores = servers.Cores()
        cores.pin_self()
    node_factory = node_factory or servers.Node
    phase = 10 if quick else 20
    out = {"method": __doc__.split("\n\n", 1)[1].strip(), "target": "no reactor pause above 5 ms; probe p99 as on "
           "the empty node", "states": {}}
    for key, label, clusters, engines, requests in STATES:
        if states and key not in states:
            continue
        out["states"][key] = measure_state(key, label, clusters, engines, requests, phase, cores, log, node_factory)
    empty = out["states"]["empty"]["probe"].get("p99_ms")
    worst = [s["reactor_lag"]["worst_le_s"] or 0 for s in out["states"].values()]
    p99s = {k: s["probe"].get("p99_ms") for k, s in out["states"].items()}
    out["worst_lag_le_ms"] = max(worst) * 1e3
    out["probe_p99_ms"] = p99s
    out["summary"] = (f"worst reactor lag <= {max(worst) * 1e3:g} ms over all states (target 5 ms); probe p99 "
                      + ", ".join(f"{k} {v:.2f} ms" for k, v in p99s.items() if v is not None)
                      + (f" (target: as on the empty node, {empty:.2f} ms)" if empty is not None else ""))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.stall", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10 s phases instead of 20 s")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--only", action="append", choices=[s[0] for s in STATES], help="one state (repeatable)")
    opts = p.parse_args(argv)
    states = {"empty", *opts.only} if opts.only else None
    result = run(quick=opts.quick, log=lambda m: print(m, file=sys.stderr, flush=True), states=states)
    if opts.json:
        print(json.dumps(result, indent=2))
    else:
        print(result["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
