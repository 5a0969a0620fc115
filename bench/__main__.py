"""``make bench`` / ``python -m bench``: the reproducible benchmark of a
metacenter node (docs/performance.md).

Starts a real ``twistd metacenter`` node from this tree and a bare
``twisted.web`` server (bench.ceiling) on one core, drives them with wrk
(or bench.http_load) from the other, and writes docs/bench-results.json and
the table in docs/performance.md.

    python -m bench                       # everything, a few minutes
    python -m bench --quick               # shorter runs, 20k requests for RSS
    python -m bench --only gateway --only rss
    python -m bench --profile             # also cProfile the node under the gateway mix
"""

import argparse
import datetime
import importlib
import importlib.util
import inspect
import itertools
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

from bench import http_load, report, servers, workload, wrk

SECTIONS = ("gateway", "endpoints", "cache", "halfrate", "rss", "replication", "memory_state", "cache_index",
            "stall", "loadgen_check", "cluster")
# Sections that other modules of bench/ provide (see run_plugin).
PLUGINS = ("replication", "memory_state", "cache_index", "stall", "cluster")

CLUSTER = "bench"
ENGINES = 50
CACHE_CLUSTER = "benchcache"
CACHE_ENGINES = 100
CACHE_DOCS = 100
CACHE_DOCS_PER_ENGINE = 10
CACHE_HASHES = 1000
CACHE_SAVE_PREFIX = 500
CACHE_SAVE_TAIL = 500

DOCS = os.path.join(servers.REPO, "docs")
RESULTS_JSON = os.path.join(DOCS, "bench-results.json")
PERFORMANCE_MD = os.path.join(DOCS, "performance.md")


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Harness:
    def __init__(self, opts):
        self.opts = opts
        if opts.nice and os.geteuid() != 0:
            raise SystemExit("--nice needs root (it raises priorities)")
        self.cores = servers.Cores(pin=not opts.no_pin, nice=opts.nice)
        self.cores.pin_self()
        self.wrk = None if opts.driver == "python" else wrk.find_or_install(self.log, install=not opts.no_install)
        self.driver = "wrk" if self.wrk else "python"
        self.node = None
        self.ceiling = None
        self.sections = {}
        self.salt = random.getrandbits(14)
        self.tmp = tempfile.mkdtemp(prefix="metacenter-bench-")

    def log(self, message):
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    # -- servers ---------------------------------------------------------------

    def main_servers(self):
        if self.node is None:
            self.log(f"starting a node and the ceiling ({self.cores.describe()})")
            self.node = servers.Node(self.cores).start()
            self.ceiling = servers.Ceiling(self.cores).start()
            register_engines(self.node, CLUSTER, ENGINES)
            self.log("warming up both servers")
            self.measure(self.ceiling, "gateway", 1)
            self.measure(self.node, "gateway", 1)
        return self.node, self.ceiling

    def stop(self):
        for s in (self.node, self.ceiling):
            if s is not None:
                s.stop()
        self.node = self.ceiling = None

    # -- one measurement -------------------------------------------------------

    def measure(self, server, mode, seconds, connections=None, nonce=None, extra=(), driver=None,
                per_thread=None, lines=None, cluster=CLUSTER, engines=ENGINES):
        """One closed-loop run of ``mode`` against ``server``; adds the
        server's CPU time over the run."""
        connections = connections or self.opts.connections
        nonce = nonce or workload.new_nonce()
        driver = driver or self.driver
        cpu0 = server.cpu_seconds()
        wall0 = time.perf_counter()
        if driver == "wrk":
            out = wrk.run(self.wrk, server.url, mode, [cluster, nonce, engines, *extra], connections, seconds,
                          cores=self.cores)
        else:
            reqs = workload.Requests(server.host, server.port)
            tail = int(extra[1]) if mode == "cache_save" else 0
            streams = workload.streams(reqs, mode, connections, cluster, nonce, engines, per_thread=per_thread,
                                       lines=lines, tail=tail, salt=self.salt)
            out = http_load.run_closed(server.host, server.port, streams, duration=seconds)
            bad = sum(v for k, v in out["statuses"].items() if not k.startswith("2"))
            out["non_2xx_or_errors"] = bad
        cpu = server.cpu_seconds() - cpu0
        wall = time.perf_counter() - wall0
        out.update(mode=mode, server=server.name, driver=driver, connections=connections, nonce=nonce,
                   server_cpu_s=cpu, server_cpu_util=cpu / wall if wall else 0.0,
                   server_cpu_us_per_request=cpu / out["requests"] * 1e6 if out["requests"] else None)
        if out["non_2xx_or_errors"]:
            self.log(f"  WARNING: {out['non_2xx_or_errors']} errors or non-2xx answers in {mode} on {server.name}")
        return out

    def pair(self, mode, seconds, rounds, **kwargs):
        """``rounds`` alternations ceiling, node with the same requests; the
        ratio compares them within the run."""
        node, ceiling = self.main_servers()
        runs = {"ceiling": [], "node": []}
        for r in range(rounds):
            runs["ceiling"].append(self.measure(ceiling, mode, seconds, **{k: v for k, v in kwargs.items()
                                                                          if k != "nonce"}))
            runs["node"].append(self.measure(node, mode, seconds, **kwargs))
            n, c = runs["node"][-1], runs["ceiling"][-1]
            self.log(f"  {mode} round {r + 1}/{rounds}: node {n['rate']:,.0f} req/s "
                     f"({n['server_cpu_us_per_request'] or 0:,.0f} µs CPU/req, core {n['server_cpu_util']:.0%} busy), "
                     f"ceiling {c['rate']:,.0f} req/s ({c['server_cpu_us_per_request'] or 0:,.0f} µs CPU/req, "
                     f"core {c['server_cpu_util']:.0%} busy), node p99 {n['latency_us']['p99'] / 1000:.2f} ms")
        out = {side: combine(v) for side, v in runs.items()}
        out["ratio"] = out["node"]["rate"] / out["ceiling"]["rate"] if out["ceiling"]["rate"] else None
        cn, cc = out["node"]["server_cpu_us_per_request"], out["ceiling"]["server_cpu_us_per_request"]
        out["cpu_ratio"] = cc / cn if cn and cc else None
        out["round_ratios"] = [n["rate"] / c["rate"] if c["rate"] else None
                               for n, c in zip(runs["node"], runs["ceiling"])]
        out["rounds"] = runs
        return out

    # -- sections --------------------------------------------------------------

    def section_gateway(self):
        self.log("gateway mix: ceiling and node alternately")
        out = self.pair("gateway", self.opts.seconds, self.opts.rounds)
        out["node_after"] = self.node.status()
        return out

    def section_endpoints(self):
        self.log("endpoints, one at a time: add, prompt delete, delete (of the added ids), query")
        seconds = self.opts.seconds
        nonce = workload.new_nonce()
        out = {"add": self.pair("add", seconds, 1, nonce=nonce)}
        # Deletes are faster than adds: top the ids up (unmeasured, the same
        # id sequence per connection) so that every delete of the next runs
        # finds a request, as in production.
        per_thread = list(out["add"]["rounds"]["node"][0]["per_thread"])
        extra = [n + n // 2 + 100 for n in per_thread]
        self.log(f"  adding {sum(extra):,} more requests (unmeasured) for the delete runs")
        reqs = workload.Requests(self.node.host, self.node.port)
        streams = [itertools.islice(reqs.add_stream(CLUSTER, nonce, tid, ENGINES, start=n), x)
                   for tid, (n, x) in enumerate(zip(per_thread, extra))]
        fill = http_load.run_closed(self.node.host, self.node.port, streams, total=sum(extra))
        if fill["statuses"] != {"200": sum(extra)}:
            raise RuntimeError(f"top-up adds answered {fill['statuses']}")
        per_thread = [n + x for n, x in zip(per_thread, extra)]
        counts = ",".join(map(str, per_thread))
        for mode in ("prompt", "delete"):
            out[mode] = self.pair(mode, seconds, 1, nonce=nonce, extra=[counts], per_thread=per_thread)
            run = out[mode]["rounds"]["node"][0]
            repeats = sum(max(0, done - ids) for done, ids in zip(run.get("per_thread") or [], per_thread))
            out[mode]["ids_added"] = sum(per_thread)
            out[mode]["repeats"] = repeats
            out[mode]["note"] = (f"{sum(per_thread):,} ids added; "
                                 + ("every delete was the first for its id" if not repeats else
                                    f"{repeats:,} of {run['requests']:,} deletes repeated an id"))
            self.log(f"  {out[mode]['note']}")
        out["query"] = self.pair("query", seconds, 1)
        out["node_after"] = self.node.status()
        return out

    def section_cache(self):
        node, _ = self.main_servers()
        code, body = node.call("POST", "/v1/cache/query", {"cluster": "probe", "prompt_hash": [1], "topk": 1})
        if code in (404, 405):
            self.log(f"cache: the node answers {code} to POST /v1/cache/query: skipped")
            return {"skipped": f"the node answers {code} to POST /v1/cache/query (cache API not in this tree yet)"}
        if code != 200:
            raise RuntimeError(f"cache probe: {code} {body}")
        rng = random.Random(20240601)
        docs = [[rng.getrandbits(64) for _ in range(CACHE_HASHES)] for _ in range(CACHE_DOCS)]
        ips = [workload.engine_ip(e) for e in range(CACHE_ENGINES)]
        held = [(ips[e], (e + 10 * j) % CACHE_DOCS) for e in range(CACHE_ENGINES) for j in
                range(CACHE_DOCS_PER_ENGINE)]
        self.log(f"cache: filling {len(held) * CACHE_HASHES:,} blocks ({CACHE_ENGINES} engines x "
                 f"{CACHE_DOCS_PER_ENGINE} prompts of {CACHE_HASHES} hashes, each prompt on 10 engines)")
        reqs = workload.Requests(node.host, node.port)
        saves = [reqs.cache_save(CACHE_CLUSTER, ip, docs[d]) for ip, d in held]
        streams = [iter(saves[i::4]) for i in range(4)]
        cpu0 = node.cpu_seconds()
        fill = http_load.run_closed(node.host, node.port, streams, total=len(saves))
        fill_cpu = node.cpu_seconds() - cpu0
        if fill["statuses"] != {"200": len(saves)}:
            raise RuntimeError(f"cache fill answered {fill['statuses']}")
        code, body = node.call("POST", "/v1/cache/query", {"cluster": CACHE_CLUSTER, "prompt_hash": docs[0],
                                                           "topk": 10})
        locations = (body.get("data") or {}).get("locations") if code == 200 else None
        if not locations or len(locations) != 10 or any(x["length"] != CACHE_HASHES for x in locations):
            raise RuntimeError(f"cache fill check: expected 10 engines holding all {CACHE_HASHES} hashes, "
                               f"got {code} {str(body)[:300]}")
        out = {"fill": {"blocks": len(held) * CACHE_HASHES, "distinct_hashes": CACHE_DOCS * CACHE_HASHES,
                        "engines": CACHE_ENGINES, "saves": len(saves), "seconds": fill["seconds"],
                        "server_cpu_us_per_save": fill_cpu / len(saves) * 1e6}}
        query_file = os.path.join(self.tmp, "cache_query.txt")
        with open(query_file, "w") as f:
            for d in range(CACHE_DOCS):
                f.write(workload.cache_query_body(CACHE_CLUSTER, docs[d], 10) + "\n")
        with open(query_file) as f:
            query_lines = f.read().splitlines()
        save_file = os.path.join(self.tmp, "cache_save.txt")
        save_lines = [f"{ip}\t{','.join(map(str, docs[d][:CACHE_SAVE_PREFIX]))}" for ip, d in held]
        with open(save_file, "w") as f:
            f.write("\n".join(save_lines) + "\n")
        seconds = self.opts.seconds
        self.log("cache query alone on one connection (latency)")
        out["query_latency"] = self.measure(node, "cache_query", seconds, connections=1, extra=[query_file],
                                            lines=query_lines, cluster=CACHE_CLUSTER)
        self.log(f"  p50 {out['query_latency']['latency_us']['p50'] / 1000:.2f} ms, "
                 f"p99 {out['query_latency']['latency_us']['p99'] / 1000:.2f} ms")
        self.log("cache query: ceiling and node")
        out["query"] = self.pair("cache_query", seconds, 1, extra=[query_file], lines=query_lines,
                                 cluster=CACHE_CLUSTER)
        self.log("cache save: ceiling and node")
        out["save"] = self.pair("cache_save", seconds, 1, extra=[save_file, CACHE_SAVE_TAIL, self.salt],
                                lines=save_lines, cluster=CACHE_CLUSTER)
        return out

    def section_halfrate(self):
        node, _ = self.main_servers()
        g = self.sections.get("gateway")
        if g and not g.get("skipped") and g.get("node", {}).get("rate"):
            max_rate = g["node"]["rate"]
            source = "the gateway section of this run"
        else:
            self.log("half rate: measuring the maximum rate of the gateway mix first")
            max_rate = self.measure(node, "gateway", max(2, self.opts.seconds // 2))["rate"]
            source = "a short closed-loop run just before"
        rate = max_rate / 2
        seconds = self.opts.seconds * 2
        out = {"max_rate": max_rate, "max_rate_from": source,
               "method": "bench.http_load.run_paced: open loop, sequences of six requests start at fixed "
                         "intervals, steps 5 ms apart and each after the previous answer, 64 connections; "
                         "latency from the moment a request was due; the ceiling gets the same schedule "
                         "first, as the floor of what the machine and the load generator add"}
        for server in (self.ceiling, node):
            self.log(f"gateway mix paced at {rate:,.0f} req/s (half of {max_rate:,.0f}) for {seconds} s "
                     f"on the {server.name}")
            r = self.paced(server, rate, seconds)
            out[server.name] = r
            self.log(f"  achieved {r['rate']:,.0f} req/s, p50 {r['latency_us']['p50'] / 1000:.2f} ms, "
                     f"p99 {r['latency_us']['p99'] / 1000:.2f} ms from when due; from when sent p50 "
                     f"{r['service_latency_us']['p50'] / 1000:.2f} ms, p99 "
                     f"{r['service_latency_us']['p99'] / 1000:.2f} ms; send lag p50 "
                     f"{r['send_lag_us']['p50'] / 1000:.2f} ms, p99 {r['send_lag_us']['p99'] / 1000:.2f} ms; "
                     f"server core {r['server_cpu_util']:.0%} busy ({r['server_cpu_us_per_request'] or 0:,.0f} "
                     f"µs/req), load generator core {r['client_cpu_util']:.0%}; statuses {r['statuses']}")
        # The node's figures at top level (the table and the targets read them).
        out.update({k: v for k, v in out["node"].items() if k not in out})
        return out

    def paced(self, server, rate, seconds):
        reqs = workload.Requests(server.host, server.port)
        nonce = workload.new_nonce()
        cpu0 = server.cpu_seconds()
        wall0 = time.perf_counter()
        r = http_load.run_paced(server.host, server.port,
                                lambda i: reqs.gateway_sequence(CLUSTER, nonce, 0, i, ENGINES),
                                rate=rate, duration=seconds, step_gap=0.005, connections=64)
        cpu = server.cpu_seconds() - cpu0
        wall = time.perf_counter() - wall0
        r.update(server_cpu_s=cpu, server_cpu_util=cpu / wall if wall else 0.0,
                 server_cpu_us_per_request=cpu / r["requests"] * 1e6 if r["requests"] else None,
                 client_cpu_util=r["client_cpu_s"] / r["seconds"] if r["seconds"] else 0.0)
        return r

    def section_rss(self):
        count = self.opts.rss_requests
        self.log(f"RSS: a fresh node, {count:,} adds over HTTP")
        node = servers.Node(self.cores, "--gc-interval", "3600s").start()
        try:
            register_engines(node, CLUSTER, ENGINES)
            reqs = workload.Requests(node.host, node.port)
            warm = workload.new_nonce()
            # Warm the HTTP path (buffers, caches) with complete routed requests.
            http_load.run_closed(node.host, node.port,
                                 workload.streams(reqs, "gateway", 16, CLUSTER, warm, ENGINES), total=6000)
            before_status = node.status()
            time.sleep(0.5)
            rss0 = median_rss(node)
            nonce = workload.new_nonce()
            run = http_load.run_closed(node.host, node.port,
                                       workload.streams(reqs, "add", 16, CLUSTER, nonce, ENGINES), total=count)
            if run["statuses"] != {"200": count}:
                raise RuntimeError(f"RSS adds answered {run['statuses']}")
            time.sleep(0.5)
            rss1 = median_rss(node)
            status = node.status()
        finally:
            node.stop()
        added = status["requests"] - before_status["requests"]
        if added != count:
            raise RuntimeError(f"the node holds {added} new requests, expected {count}")
        out = {"requests": count, "rss_before": rss0, "rss_after": rss1,
               "bytes_per_request": (rss1 - rss0) / count, "add_rate": run["rate"],
               "node_before": before_status, "node_after": status,
               "method": "VmRSS of the node (median of 3 reads) before and after adding the requests over "
                         "HTTP, ids of 36 characters, 50 engines; warmed with 6,000 gateway-mix requests first"}
        self.log(f"  {out['bytes_per_request']:,.0f} bytes per in-flight request")
        return out

    def section_loadgen_check(self):
        if not self.wrk:
            return {"skipped": "wrk unavailable: nothing to compare bench.http_load with"}
        _, ceiling = self.main_servers()
        seconds = self.opts.seconds
        self.log("load generator check: wrk, then bench.http_load, on the ceiling (gateway mix)")
        w = self.measure(ceiling, "gateway", seconds, driver="wrk")
        p = self.measure(ceiling, "gateway", seconds, driver="python")
        ratio = p["rate"] / w["rate"] if w["rate"] else 0
        # A closed-loop generator whose own core is far from busy is waiting
        # for the server: the server is the bottleneck (the rate ratio is
        # also shown, but on a shared machine it moves with other load).
        fine = p["client_cpu_util"] < 0.7
        verdict = (f"ours used {p['client_cpu_util']:.0%} of its core (the server "
                   f"{p['server_cpu_util']:.0%} of its own) and reached {ratio:.0%} of wrk's rate: "
                   + ("not the bottleneck" if fine else "it may be the bottleneck, prefer wrk"))
        self.log(f"  {verdict}")
        return {"wrk": slim(w), "python": slim(p), "ratio": ratio, "verdict": verdict}

    def run_plugin(self, name):
        """bench/<name>.py, written separately. Either it exposes
        ``run(**kwargs) -> dict`` (JSON-serialisable; a ``summary`` string is
        shown in the table), called here with those of these keyword
        arguments it accepts: quick, seconds, cores (servers.Cores), log,
        node_factory (servers.Node), workdir; or it is a command line
        ``python -m bench.<name> --json`` printing one JSON object, run in a
        child process on the server core."""
        if importlib.util.find_spec(f"bench.{name}") is None:
            self.log(f"{name}: bench/{name}.py does not exist yet: not measured")
            return {"skipped": f"bench/{name}.py not present in this tree (hook: bench.__main__.run_plugin)"}
        module = importlib.import_module(f"bench.{name}")
        fn = getattr(module, "run", None)
        if fn is not None:
            quick = self.opts.quick or not self.opts.thorough
            offered = {"quick": quick, "seconds": self.opts.seconds, "cores": self.cores, "log": self.log,
                       "node_factory": servers.Node, "workdir": self.tmp}
            params = inspect.signature(fn).parameters
            if any(p.kind == p.VAR_KEYWORD for p in params.values()):
                kwargs = offered
            else:
                kwargs = {k: v for k, v in offered.items() if k in params}
            self.log(f"{name}: running bench.{name}.run()")
            result = fn(**kwargs)
            result = result if isinstance(result, dict) else {"result": result}
        elif hasattr(module, "main"):
            cmd = [*self.cores.server_prefix(), sys.executable, "-m", f"bench.{name}", "--json"]
            self.log(f"{name}: running {' '.join(cmd[-3:])} on the server core")
            env = dict(os.environ, PYTHONPATH=servers.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=servers.REPO, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr[-2000:]}")
            result = parse_json_output(proc.stdout)
        else:
            return {"skipped": f"bench/{name}.py has neither run() nor main()"}
        result.setdefault("summary", summarize_plugin(name, result))
        self.log(f"  {result['summary']}")
        return result

    # -- profile ---------------------------------------------------------------

    def profile(self):
        path = os.path.join(self.tmp, "node.prof")
        self.log(f"profile: a node under cProfile, gateway mix for {self.opts.seconds} s")
        node = servers.Node(self.cores, profile_to=path).start()
        try:
            register_engines(node, CLUSTER, ENGINES)
            r = self.measure(node, "gateway", self.opts.seconds)
        finally:
            node.stop(timeout=30)
        import pstats

        self.log(f"  {r['rate']:,.0f} req/s under the profiler; top functions by own time "
                 f"({path}, read with python -m pstats):")
        stats = pstats.Stats(path)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumtime").print_stats(25)

    # -- all -------------------------------------------------------------------

    def run(self, selected):
        failures = {}
        for name in selected:
            started = time.monotonic()
            try:
                if name in PLUGINS:
                    result = self.run_plugin(name)
                else:
                    result = getattr(self, f"section_{name}")()
            except Exception as e:  # one broken section must not lose the others
                traceback.print_exc()
                failures[name] = f"{type(e).__name__}: {e}"
                result = {"skipped": f"failed: {type(e).__name__}: {str(e)[:300]}"}
            result["measured_at"] = now_iso()
            result["section_seconds"] = round(time.monotonic() - started, 1)
            self.sections[name] = result
        if self.opts.profile:
            self.profile()
        return failures


def register_engines(node, cluster, count):
    """Engines exist once a request names them: add one request per engine,
    then delete it, so every engine is registered and idle."""
    for i in range(count):
        rid = f"register-{cluster}-{i}"
        code, body = node.call("POST", "/v1/load/stats",
                               {"cluster": cluster, "request_id": rid, "ip": workload.engine_ip(i),
                                "prompt_length": 0})
        if code != 200:
            raise RuntimeError(f"registering engines: {code} {body}")
        node.call("DELETE", "/v1/load/stats", {"request_id": rid})
    code, body = node.call("GET", f"/v1/load/stats?cluster={cluster}")
    if code != 200 or len(body["data"]) != count:
        raise RuntimeError(f"expected {count} engines in {cluster}, got {code} {str(body)[:200]}")


def median_rss(server, reads=3):
    values = []
    for _ in range(reads):
        values.append(server.rss_bytes())
        time.sleep(0.2)
    return statistics.median(values)


def combine(runs):
    """Rounds of one side into one figure: rates from summed requests and
    time; each latency percentile is the median of the rounds' (all rounds'
    values stay in ``rounds``)."""
    requests = sum(r["requests"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    cpu = sum(r["server_cpu_s"] for r in runs)
    client_cpu = sum(r["client_cpu_s"] for r in runs)
    keys = runs[0]["latency_us"].keys()
    return {
        "requests": requests,
        "seconds": seconds,
        "rate": requests / seconds if seconds else 0.0,
        "server_cpu_util": cpu / seconds if seconds else 0.0,
        "server_cpu_us_per_request": cpu / requests * 1e6 if requests else None,
        "client_cpu_util": client_cpu / seconds if seconds else 0.0,
        "latency_us": {k: statistics.median(r["latency_us"][k] for r in runs if r["latency_us"][k] is not None)
                       for k in keys if any(r["latency_us"][k] is not None for r in runs)},
        "errors": sum(r["non_2xx_or_errors"] for r in runs),
    }


def parse_json_output(text):
    """The first JSON object printed on its own line(s) in ``text``."""
    decoder = json.JSONDecoder()
    for i, line in enumerate(text.splitlines(keepends=True)):
        if line.lstrip().startswith("{"):
            rest = "".join(text.splitlines(keepends=True)[i:])
            return decoder.raw_decode(rest.lstrip())[0]
    raise RuntimeError(f"no JSON object in the output: {text[-500:]}")


def summarize_plugin(name, r):
    """One line for the table from a plugin's result."""
    try:
        if name == "cache_index":
            q, m = r["query_full_match"], r["query_miss"]
            return (f"in process, {r['stored_blocks']:,} blocks on {r['engines']} engines: query of a fully "
                    f"held prompt median {q['median_us']:,.0f} µs "
                    f"(p99 {q['p99_us']:,.0f}), miss {m['median_us']:,.0f} µs, save (refresh) "
                    f"{r['save_refresh']['median_us']:,.0f} µs; {r['traced_bytes_per_block']:,.0f} bytes per block "
                    f"(traced), gc.collect() {r['gc_collect_ms_full']:,.1f} ms with the index")
    except (KeyError, TypeError):
        pass
    scalars = [f"{k} {v:,.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
               if isinstance(v, (int, float, str)) and not isinstance(v, bool)][:8]
    return "; ".join(scalars) or "see bench-results.json"


def slim(run):
    return {k: run[k] for k in ("rate", "requests", "seconds", "client_cpu_util", "server_cpu_util",
                                "server_cpu_us_per_request", "latency_us", "driver")}


# -- environment, targets ------------------------------------------------------


def git(*args):
    try:
        return subprocess.run(["git", *args], cwd=servers.REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine(harness):
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for module in ("twisted", "klein"):
        try:
            versions[module] = importlib.import_module(module).__version__
        except Exception:  # noqa: BLE001 - a version string is optional
            versions[module] = None
    dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "metacenter", "twisted").splitlines()]
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "twisted": versions["twisted"], "klein": versions["klein"], "wrk": wrk.version(harness.wrk),
            "commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(dirty), "uncommitted": dirty}


def targets(sections):
    out = []

    def add(target, measured, ok):
        out.append({"target": target, "measured": measured,
                    "verdict": "not measured" if ok is None else ("met" if ok else "not met")})

    g = sections.get("gateway")
    if g and not g.get("skipped"):
        stretch = " (stretch met)" if g["cpu_ratio"] >= 0.8 else ""
        add("gateway mix ≥ 0.6 of the bare twisted.web ceiling (stretch 0.8)",
            f"{g['cpu_ratio']:.2f} by CPU per request{stretch}; {g['ratio']:.2f} by req/s",
            g["cpu_ratio"] >= 0.6)
    else:
        add("gateway mix ≥ 0.6 of the bare twisted.web ceiling (stretch 0.8)", "-", None)
    h = sections.get("halfrate")
    if h and not h.get("skipped"):
        p99 = h["latency_us"]["p99"]
        floor = (f" (the ceiling on the same schedule: {h['ceiling']['latency_us']['p99'] / 1000:.2f} ms)"
                 if h.get("ceiling") else "")
        add("p99 < 5 ms at half the maximum rate", f"{p99 / 1000:.2f} ms at {h['rate']:,.0f} req/s{floor}",
            p99 < 5000)
    else:
        add("p99 < 5 ms at half the maximum rate", "-", None)
    r = sections.get("rss")
    if r and not r.get("skipped"):
        add("RSS ≤ 350 bytes per in-flight request at 100k",
            f"{r['bytes_per_request']:,.0f} bytes at {r['requests']:,}", r["bytes_per_request"] <= 350)
    else:
        add("RSS ≤ 350 bytes per in-flight request at 100k", "-", None)
    rep = sections.get("replication")
    name = "replication CPU per event on the receiver ≤ 1/10 of a client request's"
    if rep and not rep.get("skipped"):
        ratio, measured = replication_ratio(rep, sections)
        add(name, measured, None if ratio is None else ratio <= 0.1)
    else:
        add(name, rep["skipped"] if rep else "-", None)
    c = sections.get("cache")
    if c and not c.get("skipped") and c.get("query_latency"):
        lat = c["query_latency"]["latency_us"]
        add("cache query (1,000 hashes, 100 engines, 1M blocks) < 1 ms over HTTP",
            f"p50 {lat['p50'] / 1000:.2f} ms, p99 {lat['p99'] / 1000:.2f} ms", lat["p50"] < 1000)
    else:
        add("cache query (1,000 hashes, 100 engines, 1M blocks) < 1 ms over HTTP",
            c["skipped"] if c and c.get("skipped") else "-", None)
    st = sections.get("stall")
    pause, probe = "no reactor pause above 5 ms, whatever the state holds", "probe p99 as on an empty node"
    if st and not st.get("skipped") and st.get("states"):
        states = st["states"]
        worst = {k: (v["reactor_lag"]["worst_le_s"] or 0) * 1e3 for k, v in states.items()}
        steal = {k: v.get("host_steal_ms") for k, v in states.items()}
        # A pause no longer than the time the hypervisor took the core away in
        # the same phase is not charged to the node; the text says so.
        host = {k for k, w in worst.items() if w > 5 and steal[k] is not None and steal[k] >= w}
        add(pause, "worst lag ≤ " + ", ".join(
            f"{k} {w:g} ms" + (f" (host steal {steal[k]} ms in that phase)" if k in host else "")
            for k, w in worst.items()) + " (bucket bounds of metacenter_reactor_lag_seconds)",
            all(w <= 5 or k in host for k, w in worst.items()))
        p99 = {k: v["probe"].get("p99_ms") for k, v in states.items()}
        empty = p99.get("empty")
        add(probe, ", ".join(f"{k} {v:.2f} ms" for k, v in p99.items() if v is not None),
            None if empty is None else all(v is not None and v <= max(empty * 1.5, empty + 1) for v in p99.values()))
    else:
        add(pause, st["skipped"] if st else "-", None)
        add(probe, "-", None)
    return out


def replication_ratio(rep, sections):
    """(ratio, text): the replication section's ``receiver_cpu_ratio``, or
    its ``receiver_cpu_us_per_event`` (a number, or {"batched": x,
    "single": y}) over the node's CPU per add request in this run's
    endpoints section (else per gateway-mix request)."""
    if rep.get("receiver_cpu_ratio") is not None:
        text = (f"{rep['receiver_cpu_ratio']:.3f} of a client request's CPU at "
                f"{rep['batched']['events_per_s']:,.0f} events/s (mean batch {rep['batched']['mean_batch_events']})")
        peak = rep.get("batched_peak")
        client = rep.get("client_request", {}).get("receiver_cpu_us_per_request")
        if peak and client:
            text += (f"; {peak['receiver_cpu_us_per_event'] / client:.3f} at {peak['events_per_s']:,.0f} events/s "
                     f"(mean batch {peak['mean_batch_events']})")
        # Judged at the steady rate (small batches): the stricter of the two.
        return rep["receiver_cpu_ratio"], text
    per_event = rep.get("receiver_cpu_us_per_event")
    e, g = sections.get("endpoints"), sections.get("gateway")
    if e and not e.get("skipped") and e.get("add"):
        client, what = e["add"]["node"]["server_cpu_us_per_request"], "an add request"
    elif g and not g.get("skipped"):
        client, what = g["node"]["server_cpu_us_per_request"], "a gateway-mix request"
    else:
        client = None
    if per_event is None or not client:
        return None, rep.get("summary", "-")
    values = per_event if isinstance(per_event, dict) else {"per event": per_event}
    best = min(values.values())
    text = ", ".join(f"{k} {v:,.1f} µs" for k, v in values.items())
    return best / client, f"{text} vs {client:,.0f} µs for {what}: {best / client:.3f}"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 s runs, one round, 20k requests for RSS")
    p.add_argument("--only", action="append", choices=SECTIONS, metavar="NAME",
                   help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    p.add_argument("--seconds", type=int, help="seconds per run (default 5, --quick 2)")
    p.add_argument("--rounds", type=int, help="ceiling/node alternations of the gateway mix (default 3, --quick 1)")
    p.add_argument("--connections", type=int, default=16, help="concurrent connections (default 16)")
    p.add_argument("--rss-requests", type=int, help="requests added for the RSS figure (default 100000)")
    p.add_argument("--driver", choices=("wrk", "python"), default="wrk",
                   help="load generator (python = bench.http_load; wrk falls back to it if missing)")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install wrk")
    p.add_argument("--no-pin", action="store_true", help="do not pin server and load generator to cores")
    p.add_argument("--nice", type=int, default=10 if os.geteuid() == 0 else 0, metavar="N",
                   help="raise the priority of the servers and the load generator by N, in sessions of their "
                        "own (needs root; default 10 as root, else 0; --nice 0 to share the machine fairly)")
    p.add_argument("--thorough", action="store_true",
                   help="let the plugin sections (memory_state, cache_index, replication) run their full sizes")
    p.add_argument("--profile", action="store_true", help="also cProfile a node under the gateway mix")
    p.add_argument("--no-write", action="store_true", help="do not write docs/bench-results.json and the table")
    p.add_argument("--out", default=RESULTS_JSON, help="result file (default docs/bench-results.json)")
    p.add_argument("--markdown", default=PERFORMANCE_MD, help="file whose table is updated")
    opts = p.parse_args(argv)
    opts.seconds = opts.seconds or (2 if opts.quick else 5)
    opts.rounds = opts.rounds or (1 if opts.quick else 3)
    opts.rss_requests = opts.rss_requests or (20_000 if opts.quick else 100_000)
    return opts


SESSION_ENV = "METACENTER_BENCH_SESSION"


def in_own_session(argv):
    """Run the harness again in a session of its own: with scheduler
    autogroups (one per session) its raised priority then applies to the
    benchmark's processes only, not to the rest of the caller's session."""
    env = dict(os.environ, **{SESSION_ENV: "1"})
    child = subprocess.Popen([sys.executable, "-m", "bench", *argv], env=env, start_new_session=True,
                             cwd=servers.REPO)
    forwarded = {}

    def forward(signum, frame):
        child.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        forwarded[sig] = signal.signal(sig, forward)
    try:
        return child.wait()
    finally:
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    if opts.nice and not os.environ.get(SESSION_ENV):
        return in_own_session(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stop the servers first
    selected = [s for s in SECTIONS if not opts.only or s in opts.only]
    if opts.quick and not opts.only:
        selected = [s for s in selected if s != "loadgen_check"]
    harness = Harness(opts)
    started = time.monotonic()
    load_start = loadavg()
    harness.log(f"sections: {', '.join(selected)}; load generator: {harness.driver}; {harness.cores.describe()}")
    try:
        failures = harness.run(selected)
    finally:
        harness.stop()
        if not opts.profile:  # the profile stays for python -m pstats
            shutil.rmtree(harness.tmp, ignore_errors=True)
    sections = harness.sections
    # --only keeps the other sections of the previous result file.
    previous = {}
    if opts.only and not opts.no_write and os.path.exists(opts.out):
        with open(opts.out) as f:
            previous = json.load(f).get("sections", {})
    merged = {name: sections.get(name, previous.get(name)) for name in SECTIONS
              if name in sections or name in previous}
    m = machine(harness)
    m["loadavg_start"], m["loadavg_end"] = load_start, loadavg()
    results = {
        "schema": 1,
        "generated": now_iso(),
        "machine": m,
        "settings": {"driver": harness.driver, "connections": opts.connections, "seconds": opts.seconds,
                     "rounds": opts.rounds, "quick": opts.quick, "pinning": harness.cores.describe(),
                     "engines": ENGINES, "rss_requests": opts.rss_requests,
                     "command": "make bench" if not argv else "python -m bench " + " ".join(argv),
                     "total_seconds": round(time.monotonic() - started, 1)},
        "sections": merged,
    }
    results["targets"] = targets(merged)
    print()
    print(report.header(results))
    print()
    print(report.table(results))
    if not opts.no_write:
        os.makedirs(os.path.dirname(opts.out), exist_ok=True)
        report.write_json(opts.out, results)
        report.update_markdown(opts.markdown, results)
        harness.log(f"wrote {os.path.relpath(opts.out, servers.REPO)} and the table in "
                    f"{os.path.relpath(opts.markdown, servers.REPO)}")
    if failures:
        harness.log(f"sections that failed: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
