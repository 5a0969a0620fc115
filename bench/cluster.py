"""Clusters of 1, 3 and 5 real nodes replicating over the stream, all on one
shared core: CPU per client mutation, replication lag, saturation.

    .venv/bin/python -m bench.cluster            # default sizes
    .venv/bin/python -m bench.cluster --quick    # shorter runs
    .venv/bin/python -m bench.cluster --json     # one JSON object on stdout

Every node is a ``twistd metacenter`` process from this tree on 127.0.0.1,
with every other node as a static peer and a cluster secret; all of them are
pinned to the same core (taskset), so the sum of their CPU is what one core
pays for the cluster. This process is the gateway fleet and runs on the
other core: one ``metacenter.client.AsyncClient`` per cluster under test, at
most 30 calls in flight, each cluster's calls on its node as a gateway
places them (``WORKLOAD_CLUSTERS``).

1. Paced: the gateway pattern (add, prompt delete, delete per request) at
   ``RATE`` mutations/s, spread over the nodes by cluster, for ``seconds``. CPU
   per client mutation = the nodes' CPU time (/proc) from the first mutation
   until every stream has acknowledged everything, over the mutations. The
   3-node and 5-node figures are divided by the 1-node one. Replication lag:
   the ``metacenter_stream_apply_lag_seconds`` histograms of every node (per
   frame applied, from its oldest entry's append on the sender to its
   application), p50/p99; beside it the acknowledgement lag
   (``metacenter_stream_ack_lag_seconds``, which includes the receivers'
   ack delay). Frames, events and acknowledgements count the measured run
   only (the streams' status counters before and after it).
2. Saturation (3 nodes): as fast as the nodes answer, driven by
   ``bench.http_load.run_sequences`` (plain sockets and epoll: 23–42 µs of
   its core per mutation where the nodes take 220–410, so it is not the
   limit; the run reports both cores' use). Each gateway request's add,
   prompt delete and delete go to the node ``metacenter.client`` chooses
   for its cluster (``AsyncClient.node_for``), each step only once the one
   before was answered; ``SATURATION_CONNECTIONS`` connections in all,
   spread over the nodes by their share of the requests. Every answer must
   be HTTP 200 with an OK envelope (else the run fails); one request in ten
   stays in flight after its add and one in ten after its prompt delete, so
   the final loads are not all zero. Reported: mutations/s, the nodes' core
   use and CPU per mutation, the generator's core use; then every node is
   checked to hold exactly the expected load of every engine.
3. In process (no network): the receiver's CPU per event in frames of 16 and
   64 (decode, validate, ``Node.apply_frame``) and the sender's per event for
   4 peers (append, one frame per peer written to a transport).

The client costs the load generator about twice the CPU per call of a bare
twisted.web Agent request (treq's URL parsing, cookie and redirect
wrappers; see docs/client.md): on a busy machine whose generator cannot
keep ``RATE``, the paced runs report the rate they reached. The nodes' CPU
per mutation, what the runs compare, does not depend on the client.

CPU figures are process CPU, not wall time; a shared, busy machine perturbs
them (cache, frequency, steal), so compare figures from the same run.
"""

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):  # path form: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import http_load, servers, workload  # noqa: E402
from bench.replication import CLUSTERS, ENGINES, gateway_ops, histogram_quantile  # noqa: E402

RATE = 850.0  # client mutations per second, the paced load
CONNECTIONS = 30
# Mutations of the saturation run per second of --seconds: more than 3 nodes
# on one core take, so the run lasts longer than that.
SATURATION_RATE = 6000
SATURATION_CONNECTIONS = 48  # in all, over the nodes in proportion to their requests
SECRET = "bench-cluster-secret"
# Replication lag where it happens: per frame applied, from its oldest
# event's append on the sender to its application on the receiver (all the
# nodes here share one clock). The acknowledgement lag (the sender's view)
# also includes the receivers' ack delay; it is reported beside it.
LAG_METRIC = "metacenter_stream_apply_lag_seconds"
ACK_LAG_METRIC = "metacenter_stream_ack_lag_seconds"
# The load goes through metacenter.client.AsyncClient, as a Python gateway
# sends it: every call about a cluster goes to the node at fnv32a(cluster) % N
# of the sorted node list, and a request's deletes follow its add. So the
# workload's clusters decide how the writes spread over the nodes: 48 of
# them put 14/16/18 clusters on the 3 nodes and 9/9/9/10/11 on the 5 (at
# most 1.15x the even share; the adds cycle through the clusters, so the
# mutations split the same way; each run reports ``node_add_shares``).
WORKLOAD_CLUSTERS = [f"bench-model-{i}" for i in range(48)]
# Seconds per call. Not the gateway's 0.1 s: a call that timed out would be
# retried on the next node (counted twice, and its node's breaker charged)
# while the bench measures the nodes' cost; a healthy run fails no call.
CALL_TIMEOUT = 30.0


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


def saturation_requests(prefix, mutations, clusters):
    """[(cluster, [op, ...])]: one entry per gateway request, its steps in
    causal order, about ``mutations`` ops in all. A request is its add, prompt
    delete and delete, but one in ten ends after its add and one in ten after
    its prompt delete (still in flight when the run ends), so the final loads
    are not all zero and a lost or doubled event on a node shows in the exact
    check. Ops are gateway_ops's (method, path, body), with its bodies."""
    out = []
    step = 0
    total = 0
    while total < mutations:
        rid = f"{prefix}-{step}"
        cluster = clusters[step % len(clusters)]
        request = [("POST", "/v1/load/stats", {
            "cluster": cluster, "request_id": rid, "ip": ENGINES[(step * 7) % len(ENGINES)],
            "prompt_length": 500 + (step * 37) % 3500})]
        if step % 10 != 3:
            request.append(("DELETE", "/v1/load/prompt", {"request_id": rid, "cluster": "", "ip": ""}))
            if step % 10 != 7:
                request.append(("DELETE", "/v1/load/stats", {"request_id": rid, "cluster": "", "ip": ""}))
        out.append((cluster, request))
        total += len(request)
        step += 1
    return out


def raw_op(wire, op):
    """HTTP/1.1 bytes of one op for ``wire`` (a workload.Requests): an add as
    JSON, a delete with no Content-Type, as the Go gateway sends it."""
    method, path, body = op
    data = json.dumps(body, separators=(",", ":")).encode()
    return wire.raw(method, path, data, content_type=b"application/json" if method == "POST" else None)


def envelope_ok(status, body):
    """None when an answer is HTTP 200 with an OK envelope, else what it was."""
    if status == 200:
        try:
            if json.loads(body).get("status") == "OK":
                return None
        except (ValueError, AttributeError):
            pass
    return f"HTTP {status}: {body[:300]!r}"


def lag_buckets(metrics_text, metric=LAG_METRIC):
    """{upper bound: cumulative count} of a lag histogram (``LAG_METRIC``
    by default), summed over its series."""
    buckets = {}
    for line in metrics_text.splitlines():
        if line.startswith(metric + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


def micro(log, events=60_000):
    """In-process costs of the stream's per-event paths (no network)."""
    from prometheus_client import CollectorRegistry
    from twisted.internet import task
    from twisted.internet.testing import StringTransport

    from metacenter.cluster.stream import WINDOW, decode_entries
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
                span = cursor.next_frame(WINDOW, 4096, 2**20)  # the stream's default window
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

    from metacenter.client import AsyncClient

    cores = servers.Cores(pin=pin)
    cores.pin_self()
    seconds = seconds or (6 if quick else 15)
    quiet = ["--anti-entropy-interval", "1h", "--gc-interval", "1h", "--cluster-secret", SECRET]
    running = []
    clients = []

    async def status(client, node):
        return await client.status(node=node.url)

    async def start_cluster(n):
        ports = [servers.free_port() for _ in range(n)]
        nodes = []
        for i, port in enumerate(ports):
            peers = [a for j, p in enumerate(ports) if j != i for a in ("--peer", f"127.0.0.1:{p}")]
            nodes.append(servers.Node(cores, *quiet, *peers, port=port))
        running.extend(nodes)
        for node in nodes:
            node.start()
        # The gateway fleet: one client over the cluster's nodes, CONNECTIONS
        # kept-alive connections per node (a cluster's calls all go to one
        # node, which may then carry all 30 in flight).
        # One failed attempt opens its node's breaker for the rest of the
        # run, so send_all sees any call that failed over (a failover would
        # move writes to another node and spoil the figures).
        client = AsyncClient([node.url for node in nodes], reactor, timeout=CALL_TIMEOUT,
                             persistent_per_node=CONNECTIONS, failure_threshold=1, breaker_cooldown=3600.0)
        clients.append(client)
        deadline = time.monotonic() + 60
        while True:
            statuses = [await status(client, node) for node in nodes]
            if all(s["ready"] and len(s["peers"]) == n - 1 and all(p["mode"] == "stream" and p["connected"]
                                                                   for p in s["peers"]) for s in statuses):
                return nodes, client
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} nodes not streaming to each other after 60 s: {statuses}")
            await task.deferLater(reactor, 0.1, lambda: None)

    async def stop_cluster(nodes, client):
        await client.close()
        clients.remove(client)
        for node in nodes:
            node.stop()
            running.remove(node)

    async def drained(client, nodes):
        while True:
            statuses = [await status(client, node) for node in nodes]
            if all(p["lag_events"] == 0 for s in statuses for p in s["peers"]):
                return
            await task.deferLater(reactor, 0.005, lambda: None)

    def send(client, op):
        """One gateway call through the client: an add goes to its cluster's
        node, its deletes follow it there (the client remembers the node)."""
        method, path, body = op
        if method == "POST":
            return client.add_request(body["cluster"], body["request_id"], body["ip"], body["prompt_length"])
        if path == "/v1/load/prompt":
            return client.delete_prompt(body["request_id"])
        return client.delete_request(body["request_id"])

    async def send_all(ops, client, rate=None):
        """Ops through the client, at ``rate``/s if given, at most
        CONNECTIONS in flight; every call must succeed and every node's
        breaker stay closed (no call failed over). Returns seconds."""
        semaphore = defer.DeferredSemaphore(CONNECTIONS)
        failures, pending = [], []
        start = reactor.seconds()
        for i, op in enumerate(ops):
            if rate:
                delay = start + i / rate - reactor.seconds()
                if delay > 0.0005:
                    await task.deferLater(reactor, delay, lambda: None)
            await semaphore.acquire()
            d = send(client, op)
            d.addErrback(lambda failure, op=op: failures.append((op, failure.value)))
            d.addBoth(lambda result: (semaphore.release(), result)[1])
            pending.append(d)
        await defer.gatherResults(pending, consumeErrors=True)
        if failures:
            op, error = failures[0]
            raise RuntimeError(f"{len(failures)} mutations failed, first: {op[0]} {op[1]} {op[2]}: {error!r}")
        opened = {url: state for url, state in client.breakers().items() if state != "closed"}
        if opened:
            raise RuntimeError(f"circuit breakers not closed after the run: {opened}")
        return reactor.seconds() - start

    def shares(client, ops):
        """Fraction of the mutations each node took (ring order): a cluster's
        calls all go to the node of fnv32a(cluster) % N."""
        counts = {}
        for method, path, body in ops:
            if method == "POST":
                url = client.node_for(body["cluster"])
                counts[url] = counts.get(url, 0) + 1
        total = sum(counts.values())
        return [round(counts.get(url, 0) / total, 3) for url in client.nodes]

    async def lag_histogram(client, nodes, metric=LAG_METRIC):
        total = {}
        for node in nodes:
            text = await client.metrics(node=node.url)
            for bound, count in lag_buckets(text, metric).items():
                total[bound] = total.get(bound, 0.0) + count
        return total

    def stream_totals(statuses):
        """Frames and events sent, acknowledgements received, over every peer of every node."""
        peers = [p for s in statuses for p in s["peers"]]
        return {key: sum(p.get(key, 0) for p in peers) for key in ("frames_sent", "events_sent", "acks")}

    def quantiles(before, after):
        delta = sorted((bound, count - before.get(bound, 0.0)) for bound, count in after.items())
        if not delta or not delta[-1][1]:
            return None, None, 0
        return (round(histogram_quantile(delta, 0.5) * 1000, 3), round(histogram_quantile(delta, 0.99) * 1000, 3),
                int(delta[-1][1]))

    async def paced(n):
        nodes, client = await start_cluster(n)
        try:
            # Warm-up: connections, code paths, the first allocations.
            await send_all(gateway_ops(f"warm{n}", 300, WORKLOAD_CLUSTERS), client, rate=RATE)
            await drained(client, nodes)
            ops = gateway_ops(f"paced{n}", mutations_for(seconds, RATE), WORKLOAD_CLUSTERS)
            lag0 = await lag_histogram(client, nodes)
            ack_lag0 = await lag_histogram(client, nodes, ACK_LAG_METRIC)
            totals0 = stream_totals([await status(client, node) for node in nodes])
            cpu0 = sum(node.cpu_seconds() for node in nodes)
            elapsed = await send_all(ops, client, rate=RATE)
            await drained(client, nodes)
            cpu = sum(node.cpu_seconds() for node in nodes) - cpu0
            lag1 = await lag_histogram(client, nodes)
            ack_lag1 = await lag_histogram(client, nodes, ACK_LAG_METRIC)
            statuses = [await status(client, node) for node in nodes]
            node_shares = shares(client, ops)
        finally:
            await stop_cluster(nodes, client)
        totals = stream_totals(statuses)
        frames = totals["frames_sent"] - totals0["frames_sent"]
        events = totals["events_sent"] - totals0["events_sent"]
        result = {"nodes": n, "mutations": len(ops), "mutations_per_s": round(len(ops) / elapsed, 1),
                  "cpu_s": round(cpu, 3), "cpu_us_per_mutation": round(cpu / len(ops) * 1e6, 1),
                  "core_utilisation": round(cpu / elapsed, 3),
                  "mean_frame_events": round(events / frames, 1) if frames else None,
                  "repairs": sum(p["repairs"] for s in statuses for p in s["peers"]),
                  "node_add_shares": node_shares}
        if n > 1:
            # Apply lag per frame (LAG_METRIC); the ack lag per acknowledgement.
            result["lag_p50_ms"], result["lag_p99_ms"], result["lag_frames"] = quantiles(lag0, lag1)
            result["ack_lag_p50_ms"], result["ack_lag_p99_ms"], _ = quantiles(ack_lag0, ack_lag1)
            result["frames"] = frames
            result["acks"] = totals["acks"] - totals0["acks"]
            result["acks_per_frame"] = round(result["acks"] / frames, 3) if frames else None
        log(f"cluster: {n} node(s) at {result['mutations_per_s']:,.0f} mutations/s: "
            f"{result['cpu_us_per_mutation']:.0f} µs CPU per mutation, core {result['core_utilisation']:.0%}"
            + (f", lag p50 {result['lag_p50_ms']:.2f} ms p99 {result['lag_p99_ms']:.2f} ms, mean frame "
               f"{result['mean_frame_events']} events, {result['acks_per_frame']} acks per frame" if n > 1 else ""))
        return result

    async def saturation(n=3):
        nodes, client = await start_cluster(n)
        try:
            requests = saturation_requests("saturate", int(SATURATION_RATE * seconds), WORKLOAD_CLUSTERS)
            ops = [op for _, request in requests for op in request]
            # Each request's steps go to the node the client would choose for
            # its cluster (client.node_for: fnv32a(cluster) % N of the ring).
            by_url = {node.url: [] for node in nodes}
            for cluster, request in requests:
                by_url[client.node_for(cluster)].append(request)
            targets = []
            built0 = time.process_time()  # the requests' bytes are made before the run: counted apart
            for node in nodes:
                mine = by_url[node.url]
                # Connections in proportion to the node's share, so the nodes
                # run out of work together (each takes one core's turns anyway).
                connections = max(1, round(SATURATION_CONNECTIONS * len(mine) / len(requests)))
                wire = workload.Requests(node.host, node.port)
                targets.append((node.host, node.port, connections, [[raw_op(wire, op) for op in request]
                                                                      for request in mine]))
            built = time.process_time() - built0
            cpu0 = sum(node.cpu_seconds() for node in nodes)
            # Blocks this reactor for the run: nothing else runs in it meanwhile.
            load = http_load.run_sequences(targets, envelope_ok)
            blast = sum(node.cpu_seconds() for node in nodes) - cpu0
            if load["requests"] != len(ops):
                raise RuntimeError(f"{load['requests']} answers for {len(ops)} mutations")
            await drained(client, nodes)
            cpu = sum(node.cpu_seconds() for node in nodes) - cpu0
            expected = expected_loads(ops)
            exact = []
            for node in nodes:
                # Each node's own view (the overview: every cluster, engines
                # as in GET /v1/load/stats), not the client's node for a cluster.
                overview = await client.overview(node=node.url)
                view = {c["cluster"]: {e["ip"]: (e["queued_req_num"], e["prompt_length"]) for e in c["engines"]}
                        for c in overview["clusters"] if c["cluster"] in expected}
                exact.append(view == expected)
            node_shares = shares(client, ops)
        finally:
            await stop_cluster(nodes, client)
        elapsed = load["seconds"]
        result = {"nodes": n, "mutations": len(ops), "requests": len(requests),
                  "mutations_per_s": round(len(ops) / elapsed, 1),
                  "cpu_us_per_mutation": round(cpu / len(ops) * 1e6, 1),
                  "core_utilisation": round(blast / elapsed, 3),
                  # What the rate would be with the whole core (a shared
                  # machine lends the nodes only part of it): mutations per
                  # second of the nodes' CPU during the run.
                  "mutations_per_core_second": round(len(ops) / blast) if blast else None,
                  "every_node_exact": all(exact),
                  "connections": [t[2] for t in targets],
                  "latency_us": {k: round(load["latency_us"][k]) for k in ("p50", "p99", "max")},
                  "load_generator": "bench.http_load.run_sequences",
                  "load_generator_cpu_util": round(load["client_cpu_util"], 3),
                  "load_generator_cpu_us_per_mutation": round(load["client_cpu_s"] / len(ops) * 1e6, 1),
                  "load_generator_build_us_per_mutation": round(built / len(ops) * 1e6, 1),
                  "node_add_shares": node_shares}
        log(f"cluster: saturation, {n} nodes: {result['mutations_per_s']:,.0f} mutations/s over "
            f"{sum(result['connections'])} connections, nodes' core {result['core_utilisation']:.0%} "
            f"({result['cpu_us_per_mutation']:.0f} µs per mutation, {result['mutations_per_core_second']:,} per "
            f"core-second), load generator "
            f"{result['load_generator_cpu_util']:.0%} of its core ({result['load_generator_cpu_us_per_mutation']:.0f} "
            f"µs per mutation), every node exact: {result['every_node_exact']}")
        return result

    async def main():
        results = {"cores": cores.describe(), "rate": RATE, "connections": CONNECTIONS, "seconds": seconds}
        runs = {}
        for n in sizes:
            runs[n] = await paced(n)
        if sizes:
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
        d.addBoth(lambda _: defer.gatherResults([client.close() for client in clients]))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    try:
        reactor.run()
    finally:
        for node in list(running):
            node.stop()
    if "error" in outcome:
        raise RuntimeError(outcome["error"])
    if not sizes:  # --only-saturation
        outcome["summary"] = saturation_summary(outcome["saturation"])
        return outcome
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
    parts.append(saturation_summary(r["saturation"]))
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


def saturation_summary(s):
    return (f"saturation 3 nodes {s['mutations_per_s']:,.0f} mutations/s "
            f"({'exact' if s['every_node_exact'] else 'NOT exact'})")


def run(quick=True, seconds=None, cores=None, log=print):
    """For ``python -m bench``: in a child process (a reactor runs once)."""
    return servers.run_child("bench.cluster", quick, seconds, cores, log, timeout=1800)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--seconds", type=int, help="length of each run (default 15, --quick 6)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the nodes and this process to cores")
    parser.add_argument("--sizes", default="1,3,5", help="cluster sizes of the paced runs (first: the baseline)")
    parser.add_argument("--only-saturation", action="store_true", help="only the 3-node saturation run")
    opts = parser.parse_args(argv)
    log = (lambda text: print(text, file=sys.stderr)) if opts.json else print
    sizes = () if opts.only_saturation else tuple(int(s) for s in opts.sizes.split(","))
    results = measure(opts.quick, opts.seconds, log, pin=not opts.no_pin, sizes=sizes)
    if opts.json:
        print(json.dumps(results))
    else:
        print(json.dumps(results, indent=2))
        print(results["summary"])


if __name__ == "__main__":
    main()
