"""Clusters of 1, 3 and 5 real nodes replicating over the stream, all on one
shared core: CPU per client mutation, replication lag, saturation.

    .venv/bin/python -m bench.cluster            # default sizes
    .venv/bin/python -m bench.cluster --quick    # shorter runs
    .venv/bin/python -m bench.cluster --json     # one JSON object on stdout

Every node is a ``twistd metacenter`` process from this tree on 127.0.0.1,
with every other node as a static peer and a cluster secret; all of them are
pinned to the same core (taskset), so the sum of their CPU is what one core
pays for the cluster. This process is the gateway fleet (30 persistent
connections) and runs on the other core.

1. Paced: the gateway pattern (add, prompt delete, delete per request) at
   ``RATE`` mutations/s, spread evenly over the nodes, for ``seconds``. CPU
   per client mutation = the nodes' CPU time (/proc) from the first mutation
   until every stream has acknowledged everything, over the mutations. The
   3-node and 5-node figures are divided by the 1-node one. Replication lag:
   the ``metacenter_stream_ack_lag_seconds`` histograms of every node (per
   acknowledgement, the age of the oldest entry it acknowledged), p50/p99.
2. Saturation (3 nodes): as fast as the connections allow for ``seconds``;
   mutations/s accepted, then every node is checked to hold exactly the
   expected load of every engine.
3. In process (no network): the receiver's CPU per event in frames of 16 and
   64 (decode, validate, ``Node.apply_frame``) and the sender's per event for
   4 peers (append, one frame per peer written to a transport).

CPU figures are process CPU, not wall time; a shared, busy machine perturbs
them (cache, frequency, steal), so compare figures from the same run.
"""

import argparse
import json
import os
import subprocess
import sys
import time

if __package__ in (None, ""):  # path form: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import servers  # noqa: E402
from bench.replication import CLUSTERS, ENGINES, gateway_ops, histogram_quantile  # noqa: E402

RATE = 850.0  # client mutations per second, the paced load
CONNECTIONS = 30
SECRET = "bench-cluster-secret"
LAG_METRIC = "metacenter_stream_ack_lag_seconds"


def mutations_for(seconds, rate):
    """gateway_ops makes 3 mutations per request."""
    return max(30, int(rate * seconds / 3))


def expected_loads(ops):
    """{cluster: {ip: (queued, prompt)}} after ``ops`` (engines at 0/0 kept)."""
    adds, prompt_deleted, deleted = {}, set(), set()
    for method, path, body in ops:
        if method == "POST":
            adds[body["request_id"]] = (body["cluster"], body["ip"], body["prompt_length"])
        elif path == "/v1/load/prompt":
            prompt_deleted.add(body["request_id"])
        else:
            deleted.add(body["request_id"])
    loads = {}
    for request_id, (cluster, ip, prompt) in adds.items():
        engine = loads.setdefault(cluster, {}).setdefault(ip, [0, 0])
        if request_id in deleted:
            continue
        engine[0] += 1
        if request_id not in prompt_deleted:
            engine[1] += prompt
    return {c: {ip: tuple(v) for ip, v in engines.items()} for c, engines in loads.items()}


def lag_buckets(metrics_text):
    """{upper bound: cumulative count} of the ack-lag histogram, summed over peers."""
    buckets = {}
    for line in metrics_text.splitlines():
        if line.startswith(LAG_METRIC + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


def micro(log, events=60_000):
    """In-process costs of the stream's per-event paths (no network)."""
    from prometheus_client import CollectorRegistry
    from twisted.internet import task
    from twisted.internet.testing import StringTransport

    from metacenter.cluster.stream import decode_entries
    from metacenter.core.events import EVENT_ADD, EVENT_DELETE, EVENT_PROMPT_DELETE, LoadAdd, LoadDelete
    from metacenter.core.replog import ReplicationLog
    from metacenter.runtime.node import build_node

    clock = task.Clock()
    clock.advance(time.time())
    now_ns = int(clock.seconds() * 1e9)
    typed = []
    for i in range(events // 3):
        rid = f"{i:08x}-bench-request-id-0123456789abcdef"
        typed.append((EVENT_ADD, LoadAdd((CLUSTERS[i % 4], rid, ENGINES[i % 16], 500 + i % 3000, now_ns))))
        typed.append((EVENT_PROMPT_DELETE, LoadDelete((rid, now_ns))))
        typed.append((EVENT_DELETE, LoadDelete((rid, now_ns))))
    out = {}

    def cpu():
        return time.process_time()

    for size in (16, 64):
        log_ = ReplicationLog(clock, capacity=len(typed) + 1)
        for event_type, event in typed:
            log_.append(event_type, event)
        payloads = [(log_.frame(s, min(s + size, log_.end)), min(size, log_.end - s))
                    for s in range(0, log_.end, size)]
        node = build_node(clock, registry=CollectorRegistry())
        started = cpu()
        for payload, count in payloads:
            decoded, rejected, _ = decode_entries(payload, count)
            node.apply_frame(decoded)
        out[f"receiver_us_per_event_frames_of_{size}"] = round((cpu() - started) / len(typed) * 1e6, 2)

    peers = 4
    for size in (1, 16):
        log_ = ReplicationLog(clock, capacity=len(typed) + 1)
        transports = [StringTransport() for _ in range(peers)]
        cursors = [log_.cursor(f"p{i}") for i in range(peers)]
        started = cpu()
        for k in range(0, len(typed), size):
            for event_type, event in typed[k:k + size]:
                log_.append(event_type, event)
            for cursor, transport in zip(cursors, transports):
                span = cursor.next_frame(4, 4096, 2**20)
                payload = log_.frame(*span)
                transport.writeSequence((b"\0\0\0\0", b"F" + b"\0" * 12, payload))
                cursor.ack(span[1])
            if k % 4096 == 0:
                for transport in transports:
                    transport.clear()
        out[f"sender_us_per_event_{peers}_peers_frames_of_{size}"] = round((cpu() - started) / len(typed) * 1e6, 2)
    log(f"cluster: in process: {out}")
    return out


def measure(quick, seconds, log, pin=True, sizes=(1, 3, 5)):
    from twisted.internet import defer, reactor, task
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.http_headers import Headers

    from metacenter.cluster.replication import BytesProducer
    import treq

    cores = servers.Cores(pin=pin)
    cores.pin_self()
    seconds = seconds or (6 if quick else 15)
    quiet = ["--anti-entropy-interval", "1h", "--gc-interval", "1h", "--cluster-secret", SECRET]
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = CONNECTIONS
    agent = Agent(reactor, pool=pool)
    running = []

    def call(url, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        d = agent.request(method.encode(), (url + path).encode(), Headers({}),
                          BytesProducer(data) if data is not None else None)
        d.addCallback(lambda r: treq.content(r).addCallback(lambda content: (r.code, content)))
        return d

    async def status(node):
        code, body = await call(node.url, "GET", "/v1/node/status")
        return json.loads(body)["data"]

    async def start_cluster(n):
        ports = [servers.free_port() for _ in range(n)]
        nodes = []
        for i, port in enumerate(ports):
            peers = [a for j, p in enumerate(ports) if j != i for a in ("--peer", f"127.0.0.1:{p}")]
            nodes.append(servers.Node(cores, *quiet, *peers, port=port))
        running.extend(nodes)
        for node in nodes:
            node.start()
        deadline = time.monotonic() + 60
        while True:
            statuses = [await status(node) for node in nodes]
            if all(s["ready"] and len(s["peers"]) == n - 1 and all(p["mode"] == "stream" and p["connected"]
                                                                   for p in s["peers"]) for s in statuses):
                return nodes
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} nodes not streaming to each other after 60 s: {statuses}")
            await task.deferLater(reactor, 0.1, lambda: None)

    def stop_cluster(nodes):
        for node in nodes:
            node.stop()
            running.remove(node)

    async def drained(nodes):
        while True:
            statuses = [await status(node) for node in nodes]
            if all(p["lag_events"] == 0 for s in statuses for p in s["peers"]):
                return
            await task.deferLater(reactor, 0.005, lambda: None)

    async def send_all(ops, nodes, rate=None):
        """Ops round-robin over the nodes, at ``rate``/s if given, at most
        CONNECTIONS in flight; every answer must be 200. Returns seconds."""
        semaphore = defer.DeferredSemaphore(CONNECTIONS)
        failures, pending = [], []
        start = reactor.seconds()
        for i, op in enumerate(ops):
            if rate:
                delay = start + i / rate - reactor.seconds()
                if delay > 0.0005:
                    await task.deferLater(reactor, delay, lambda: None)
            await semaphore.acquire()
            d = call(nodes[i % len(nodes)].url, *op)
            d.addCallback(lambda result: failures.append(result) if result[0] != 200 else None)
            d.addBoth(lambda result: (semaphore.release(), result)[1])
            pending.append(d)
        await defer.gatherResults(pending, consumeErrors=True)
        if failures:
            raise RuntimeError(f"{len(failures)} mutations refused, first: {failures[0]}")
        return reactor.seconds() - start

    async def lag_histogram(nodes):
        total = {}
        for node in nodes:
            code, text = await call(node.url, "GET", "/metrics")
            for bound, count in lag_buckets(text.decode()).items():
                total[bound] = total.get(bound, 0.0) + count
        return total

    async def paced(n):
        nodes = await start_cluster(n)
        try:
            # Warm-up: connections, code paths, the first allocations.
            await send_all(gateway_ops(f"warm{n}", 300), nodes, rate=RATE)
            await drained(nodes)
            ops = gateway_ops(f"paced{n}", mutations_for(seconds, RATE))
            lag0 = await lag_histogram(nodes)
            cpu0 = sum(node.cpu_seconds() for node in nodes)
            elapsed = await send_all(ops, nodes, rate=RATE)
            await drained(nodes)
            cpu = sum(node.cpu_seconds() for node in nodes) - cpu0
            lag1 = await lag_histogram(nodes)
            statuses = [await status(node) for node in nodes]
        finally:
            stop_cluster(nodes)
        frames = sum(p["frames_sent"] for s in statuses for p in s["peers"])
        events = sum(p["events_sent"] for s in statuses for p in s["peers"])
        result = {"nodes": n, "mutations": len(ops), "mutations_per_s": round(len(ops) / elapsed, 1),
                  "cpu_s": round(cpu, 3), "cpu_us_per_mutation": round(cpu / len(ops) * 1e6, 1),
                  "core_utilisation": round(cpu / elapsed, 3),
                  "mean_frame_events": round(events / frames, 1) if frames else None,
                  "repairs": sum(p["repairs"] for s in statuses for p in s["peers"])}
        if n > 1:
            delta = sorted((bound, count - lag0.get(bound, 0.0)) for bound, count in lag1.items())
            result["lag_p50_ms"] = round(histogram_quantile(delta, 0.5) * 1000, 3)
            result["lag_p99_ms"] = round(histogram_quantile(delta, 0.99) * 1000, 3)
            result["acks"] = int(delta[-1][1]) if delta else 0
        log(f"cluster: {n} node(s) at {result['mutations_per_s']:,.0f} mutations/s: "
            f"{result['cpu_us_per_mutation']:.0f} µs CPU per mutation, core {result['core_utilisation']:.0%}"
            + (f", lag p50 {result['lag_p50_ms']:.2f} ms p99 {result['lag_p99_ms']:.2f} ms, mean frame "
               f"{result['mean_frame_events']} events" if n > 1 else ""))
        return result

    async def saturation(n=3):
        nodes = await start_cluster(n)
        try:
            ops = gateway_ops("saturate", mutations_for(seconds, 6000))
            cpu0 = sum(node.cpu_seconds() for node in nodes)
            harness0 = time.process_time()
            elapsed = await send_all(ops, nodes)
            harness = time.process_time() - harness0
            await drained(nodes)
            cpu = sum(node.cpu_seconds() for node in nodes) - cpu0
            expected = expected_loads(ops)
            exact = []
            for node in nodes:
                view = {}
                for cluster in expected:
                    code, body = await call(node.url, "GET", f"/v1/load/stats?cluster={cluster}")
                    view[cluster] = {e["ip"]: (e["queued_req_num"], e["prompt_length"])
                                     for e in json.loads(body)["data"] or []}
                exact.append(view == expected)
        finally:
            stop_cluster(nodes)
        result = {"nodes": n, "mutations": len(ops), "mutations_per_s": round(len(ops) / elapsed, 1),
                  "cpu_us_per_mutation": round(cpu / len(ops) * 1e6, 1),
                  "core_utilisation": round(cpu / elapsed, 3), "every_node_exact": all(exact),
                  "load_generator_cpu_util": round(harness / elapsed, 3)}
        log(f"cluster: saturation, {n} nodes: {result['mutations_per_s']:,.0f} mutations/s, core "
            f"{result['core_utilisation']:.0%}, load generator {result['load_generator_cpu_util']:.0%}, "
            f"every node exact: {result['every_node_exact']}")
        return result

    async def main():
        results = {"cores": cores.describe(), "rate": RATE, "connections": CONNECTIONS, "seconds": seconds}
        runs = {}
        for n in sizes:
            runs[n] = await paced(n)
        results["paced"] = [runs[n] for n in sizes]
        one = runs[sizes[0]]["cpu_us_per_mutation"]
        results["ratios"] = {f"{n}_vs_1": round(runs[n]["cpu_us_per_mutation"] / one, 2) for n in sizes[1:]}
        results["saturation"] = await saturation(3)
        return results

    outcome = {}

    def run():
        d = defer.ensureDeferred(main())
        d.addCallback(outcome.update)
        d.addErrback(lambda f: outcome.update(error=f.getTraceback()))
        d.addBoth(lambda _: pool.closeCachedConnections())
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    try:
        reactor.run()
    finally:
        for node in list(running):
            node.stop()
    if "error" in outcome:
        raise RuntimeError(outcome["error"])
    outcome["in_process"] = micro(log)
    outcome["model"] = model(outcome["paced"], outcome["in_process"])
    outcome["summary"] = summary(outcome)
    return outcome


def model(paced, in_process):
    """The cost model of docs/scaling.md fitted to the paced runs: CPU per
    client mutation C(N) = c_node + (N - 1) * c_peer, where c_node is the
    1-node figure and c_peer (per replicated event and peer, sender and
    receiver together, frames and wake-ups included at the frame sizes of
    the run) comes from the smallest cluster above one node. Larger
    measured clusters are then predictions checked against measurements.
    Predicted: C(N) / C(1), and the saturation rate on one shared core
    (1 / C(N)) and with a core per node (N / C(N)), in mutations/s."""
    runs = {p["nodes"]: p for p in paced}
    one = runs[min(runs)]["cpu_us_per_mutation"]
    fitted = sorted(n for n in runs if n > 1)
    if not fitted:
        return None
    first = fitted[0]
    c_peer = (runs[first]["cpu_us_per_mutation"] - one) / (first - 1)

    def cost(n):
        return one + (n - 1) * c_peer

    out = {"c_node_us": round(one, 1), "c_peer_us": round(c_peer, 1), "fitted_on": [min(runs), first],
           "in_process_us": {"receiver_per_event": in_process["receiver_us_per_event_frames_of_16"],
                             "sender_per_event_4_peers": in_process["sender_us_per_event_4_peers_frames_of_16"]},
           "predictions": []}
    for n in sorted(set(fitted) | {3, 5, 9, 17}):
        row = {"nodes": n, "ratio": round(cost(n) / one, 2),
               "saturation_shared_core_per_s": round(1e6 / cost(n)),
               "saturation_core_per_node_per_s": round(n * 1e6 / cost(n))}
        if n in runs:
            row["measured_ratio"] = round(runs[n]["cpu_us_per_mutation"] / one, 2)
        out["predictions"].append(row)
    return out


def summary(r):
    paced = {p["nodes"]: p for p in r["paced"]}
    parts = [f"CPU per mutation: 1 node {paced[1]['cpu_us_per_mutation']:.0f} µs"]
    for n in sorted(paced)[1:]:
        parts.append(f"{n} nodes {r['ratios'][f'{n}_vs_1']:.2f}x (lag p99 {paced[n]['lag_p99_ms']:.1f} ms)")
    s = r["saturation"]
    parts.append(f"saturation 3 nodes {s['mutations_per_s']:,.0f} mutations/s "
                 f"({'exact' if s['every_node_exact'] else 'NOT exact'})")
    m = r["in_process"]
    parts.append(f"receiver {m['receiver_us_per_event_frames_of_16']:.1f} µs/event (frames of 16), sender "
                 f"{m['sender_us_per_event_4_peers_frames_of_16']:.1f} µs/event for 4 peers")
    fit = r.get("model")
    if fit:
        parts.append(f"model C(N) = {fit['c_node_us']:.0f} + (N - 1) × {fit['c_peer_us']:.0f} µs, predicting "
                     + ", ".join(f"{p['nodes']} nodes {p['ratio']:.2f}x"
                                 + (f" (measured {p['measured_ratio']:.2f}x)" if "measured_ratio" in p else "")
                                 + f" and {p['saturation_shared_core_per_s']:,} mutations/s on one core"
                                 for p in fit["predictions"]))
    return "; ".join(parts)


def run(quick=True, seconds=None, cores=None, log=print):
    """For ``python -m bench``: in a child process (a reactor runs once)."""
    cmd = [sys.executable, "-m", "bench.cluster", "--json"] + (["--quick"] if quick else [])
    if cores is not None and not cores.pinned:
        cmd.append("--no-pin")
    if seconds:
        cmd += ["--seconds", str(seconds)]
    env = dict(os.environ, PYTHONPATH=servers.REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=servers.REPO, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.cluster exited with {proc.returncode}: {proc.stderr[-3000:]}")
    for line in proc.stderr.splitlines():
        log(line)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--seconds", type=int, help="length of each run (default 15, --quick 6)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the nodes and this process to cores")
    parser.add_argument("--sizes", default="1,3,5", help="cluster sizes of the paced runs (first: the baseline)")
    opts = parser.parse_args(argv)
    log = (lambda text: print(text, file=sys.stderr)) if opts.json else print
    sizes = tuple(int(s) for s in opts.sizes.split(","))
    results = measure(opts.quick, opts.seconds, log, pin=not opts.no_pin, sizes=sizes)
    if opts.json:
        print(json.dumps(results))
    else:
        print(json.dumps(results, indent=2))
        print(results["summary"])


if __name__ == "__main__":
    main()
