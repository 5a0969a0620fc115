"""Replication between two real nodes on loopback: lag, and the receiver's
CPU per replicated event, batched versus the reference's single events.

    .venv/bin/python -m bench.replication            # default sizes
    .venv/bin/python -m bench.replication --quick    # shorter
    .venv/bin/python -m bench.replication --json     # one JSON object on stdout

Two ``twistd metacenter`` processes from this tree: a sender S (``--peer R``)
and a receiver R (no peers, so all its work is receiving), replicating over
HTTP (``--replication-listen none``; the stream is measured by bench.cluster). Anti-entropy is
set to an hour so that it does not run during the measurement. This process
is the gateway (and, in one phase, a reference node); it runs on the other
core when the machine has two (bench.servers.Cores).

1. Lag under steady load: the gateway pattern (add, prompt delete, delete per
   request) at a fixed rate against S; meanwhile, probes: an add of a request
   of its own cluster to S, then R is polled until it shows it. Lag = time
   from S's answer to R showing the request, the staleness a gateway reading
   from R would see. Resolution: one poll round trip (reported).
2. Receiver CPU per event, batched: N events through S at a steady rate
   (S batches to R);
   R's CPU time (/proc/PID/stat) from before the first event to when S has
   every event acknowledged, divided by N.
3. Receiver CPU per event, single: the same N events sent straight to R as a
   reference node sends them (POST /v1/replica/event, Event-Type header, the
   request body with its timestamp; persistent connections, 16 in flight,
   as our sender's single mode).
4. For scale: R's CPU per client request, the same operations sent to R's
   load API (R has no peers, so no replication work is in it).

CPU figures are process CPU of the receiver, not wall time, so the harness's
own cost does not count; a shared, busy machine still perturbs them (cache,
frequency), so compare the two modes from the same run.
"""

import argparse
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # path form: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import servers  # noqa: E402

CLUSTERS = [f"bench-model-{i}" for i in range(4)]
ENGINES = [f"10.30.{i // 4}.{i % 4 + 1}" for i in range(16)]
IN_FLIGHT = 200  # requests between an add and its delete in the generated stream


# -- workload ------------------------------------------------------------------


def gateway_ops(prefix, requests, clusters=CLUSTERS):
    """(method, path, body) of the gateway pattern: add, then the prompt
    delete 100 requests later, then the delete another 100 later; the adds
    cycle through ``clusters``."""
    ops = []
    for step in range(requests + IN_FLIGHT):
        if step < requests:
            ops.append(("POST", "/v1/load/stats", {
                "cluster": clusters[step % len(clusters)], "request_id": f"{prefix}-{step}",
                "ip": ENGINES[(step * 7) % len(ENGINES)], "prompt_length": 500 + (step * 37) % 3500}))
        half = step - IN_FLIGHT // 2
        if 0 <= half < requests:
            ops.append(("DELETE", "/v1/load/prompt", {"request_id": f"{prefix}-{half}", "cluster": "", "ip": ""}))
        done = step - IN_FLIGHT
        if 0 <= done < requests:
            ops.append(("DELETE", "/v1/load/stats", {"request_id": f"{prefix}-{done}", "cluster": "", "ip": ""}))
    return ops


EVENT_TYPES = {"/v1/load/stats": {"POST": "load.stats.set", "DELETE": "load.stats.delete"},
               "/v1/load/prompt": {"DELETE": "load.prompt.delete"}}


def percentile(values, q):
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the measurement (runs inside a Twisted reactor) ------------------------------


def measure(quick, seconds, log, sender_args=(), pin=True):
    from twisted.internet import defer, reactor, task
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.http_headers import Headers

    from metacenter.bodyproducer import BytesProducer
    import treq

    cores = servers.Cores(pin=pin)
    cores.pin_self()
    requests = 3000 if quick else 10000
    # Operations per second offered to S in the lag phase: well below what
    # this process can send, so that its probes are not stuck behind them.
    rate = 600.0
    # The same steady rate for the three CPU phases, so that batch sizes (and
    # the receiver's idle time) depend on the protocol only.
    cpu_rate = 1200.0
    # Mutations per second of a node serving the gateway mix near its limit
    # (half of ~11k requests/s are mutations).
    peak_rate = 5000.0
    seconds = seconds or (4 if quick else 10)
    # HTTP replication (batches, single events): what this section compares;
    # the stream is bench.cluster's.
    quiet = ["--anti-entropy-interval", "1h", "--gc-interval", "1h", "--replication-listen", "none"]
    receiver = servers.Node(cores, *quiet)
    sender = None
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 64
    agent = Agent(reactor, pool=pool)

    def call(url, method, path, body=None, headers=None):
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        d = agent.request(method.encode(), (url + path).encode(), Headers(headers or {}),
                          BytesProducer(data) if data is not None else None)
        d.addCallback(lambda r: treq.content(r).addCallback(lambda content: (r.code, content)))
        return d

    async def paced(ops, send, rate=None, concurrency=32):
        """Send every op, at ``rate`` per second if given, at most
        ``concurrency`` at a time; every answer must be 200."""
        semaphore = defer.DeferredSemaphore(concurrency)
        start = reactor.seconds()
        pending = []
        failures = []

        def check(result):
            if result[0] != 200:
                failures.append(result)

        for i, op in enumerate(ops):
            if rate:
                delay = start + i / rate - reactor.seconds()
                if delay > 0.0005:
                    await task.deferLater(reactor, delay, lambda: None)
            await semaphore.acquire()
            d = send(op)
            d.addCallback(check)
            d.addBoth(lambda result: (semaphore.release(), result)[1])
            pending.append(d)
        await defer.gatherResults(pending, consumeErrors=True)
        if failures:
            raise RuntimeError(f"{len(failures)} operations refused, first: {failures[0]}")
        return reactor.seconds() - start

    async def peer_status():
        code, body = await call(sender.url, "GET", "/v1/node/status")
        return json.loads(body)["data"]["peers"][0]

    async def drained(expected_sent):
        """Until S has every event acknowledged by R."""
        while True:
            status = await peer_status()
            if status["sent"] >= expected_sent and status["queue_depth"] == 0 and status["lag_ms"] == 0:
                return status
            await task.deferLater(reactor, 0.01, lambda: None)

    async def wait_ready(node):
        while True:
            code, _ = await call(node.url, "GET", "/readyz")
            if code == 200:
                return
            await task.deferLater(reactor, 0.05, lambda: None)

    async def main():
        nonlocal sender
        results = {"cores": cores.describe(), "requests": requests}
        receiver.start()
        sender = servers.Node(cores, "--peer", f"{receiver.host}:{receiver.port}", *quiet, *sender_args).start()
        await wait_ready(sender)
        await wait_ready(receiver)

        # 1. lag under steady load, with probes.
        load = gateway_ops("lag", int(rate * seconds / 3))
        lags, polls, poll_times = [], [], []
        stop = []

        async def probes():
            k = 0
            while not stop:
                k += 1
                cluster = f"probe-{k}"
                body = {"cluster": cluster, "request_id": f"probe-{k}", "ip": "10.99.0.1", "prompt_length": 1}
                code, _ = await call(sender.url, "POST", "/v1/load/stats", body)
                acked = reactor.seconds()
                count = 0
                while True:
                    before = reactor.seconds()
                    code, content = await call(receiver.url, "GET", f"/v1/load/stats?cluster={cluster}")
                    poll_times.append(reactor.seconds() - before)
                    count += 1
                    if json.loads(content)["data"]:
                        break
                lags.append(reactor.seconds() - acked)
                polls.append(count)
                await task.deferLater(reactor, 0.02, lambda: None)

        log(f"replication: lag under {rate:,.0f} operations/s for {seconds} s")
        peer = f"{receiver.host}:{receiver.port}"
        code, metrics = await call(sender.url, "GET", "/metrics")
        lag_before = histogram(metrics.decode(), "metacenter_replication_lag_seconds", peer)
        probing = defer.ensureDeferred(probes())
        cpu_s0 = sender.cpu_seconds()
        elapsed = await paced(load, lambda op: call(sender.url, op[0], op[1], op[2]), rate=rate)
        stop.append(True)
        await probing
        status = await drained(len(load))
        code, metrics = await call(sender.url, "GET", "/metrics")
        lag_after = histogram(metrics.decode(), "metacenter_replication_lag_seconds", peer)
        acked = [(le, count - lag_before.get(le, 0)) for le, count in sorted(lag_after.items())]
        results["lag_acknowledged"] = {
            "events": acked[-1][1],
            "p50_ms": round(histogram_quantile(acked, 0.5) * 1000, 3),
            "p99_ms": round(histogram_quantile(acked, 0.99) * 1000, 3),
        }
        results["lag"] = {
            "offered_ops_per_s": rate, "achieved_ops_per_s": round(len(load) / elapsed, 1),
            "probes": len(lags),
            "p50_ms": round(percentile(lags, 0.5) * 1000, 3), "p99_ms": round(percentile(lags, 0.99) * 1000, 3),
            "max_ms": round(max(lags) * 1000, 3),
            "poll_round_trip_ms_median": round(statistics.median(poll_times) * 1000, 3),
            "probes_seen_at_first_poll": round(sum(1 for p in polls if p == 1) / len(polls), 3),
            "sender_cpu_util": round((sender.cpu_seconds() - cpu_s0) / elapsed, 3),
        }
        sent_so_far = status["sent"]

        # 2. receiver CPU per event, batched (through S): at the steady rate
        # of the other phases, and at a gateway-like peak, where batches grow.
        async def batched_phase(tag, rate, sent_so_far):
            ops = gateway_ops(tag, requests)
            log(f"replication: {len(ops):,} events through the sender, batched, at {rate:,.0f}/s")
            code, metrics = await call(sender.url, "GET", "/metrics")
            batches_before = batch_count(metrics.decode(), status["peer"])
            cpu0 = receiver.cpu_seconds()
            elapsed = await paced(ops, lambda op: call(sender.url, op[0], op[1], op[2]), rate=rate)
            done = await drained(sent_so_far + len(ops))
            cpu = receiver.cpu_seconds() - cpu0
            code, metrics = await call(sender.url, "GET", "/metrics")
            batches = batch_count(metrics.decode(), done["peer"]) - batches_before
            return done["sent"], {
                "events": len(ops), "receiver_cpu_s": round(cpu, 3),
                "receiver_cpu_us_per_event": round(cpu / len(ops) * 1e6, 2),
                "events_per_s": round(len(ops) / elapsed, 1),
                "mean_batch_events": round(len(ops) / batches, 1) if batches else None,
            }

        sent_so_far, results["batched"] = await batched_phase("batched", cpu_rate, sent_so_far)
        sent_so_far, results["batched_peak"] = await batched_phase("peak", peak_rate, sent_so_far)

        # 3. the same events as a reference node sends them, straight to R.
        ops = gateway_ops("single", requests)
        log(f"replication: {len(ops):,} single events to the receiver, as a reference node sends them")
        now_ns = time.time_ns()

        def single(op):
            body = dict(op[2], timestamp=now_ns)
            headers = {"Event-Type": [EVENT_TYPES[op[1]][op[0]]], "Content-Type": ["application/json"],
                       "TraceId": ["bench"]}
            return call(receiver.url, "POST", "/v1/replica/event", body, headers)

        cpu0 = receiver.cpu_seconds()
        elapsed = await paced(ops, single, rate=cpu_rate, concurrency=16)
        single_cpu = receiver.cpu_seconds() - cpu0
        results["single"] = {
            "events": len(ops), "receiver_cpu_s": round(single_cpu, 3),
            "receiver_cpu_us_per_event": round(single_cpu / len(ops) * 1e6, 2),
            "events_per_s": round(len(ops) / elapsed, 1),
        }

        # 4. for scale: the same operations as client requests to R.
        ops = gateway_ops("client", requests)
        log(f"replication: {len(ops):,} client requests to the receiver, for scale")
        cpu0 = receiver.cpu_seconds()
        elapsed = await paced(ops, lambda op: call(receiver.url, op[0], op[1], op[2]), rate=cpu_rate,
                              concurrency=16)
        client_cpu = receiver.cpu_seconds() - cpu0
        results["client_request"] = {
            "requests": len(ops), "receiver_cpu_us_per_request": round(client_cpu / len(ops) * 1e6, 2),
            "requests_per_s": round(len(ops) / elapsed, 1),
        }
        per_event = {"batched": results["batched"]["receiver_cpu_us_per_event"],
                     "batched_peak": results["batched_peak"]["receiver_cpu_us_per_event"],
                     "single": results["single"]["receiver_cpu_us_per_event"]}
        results["receiver_cpu_us_per_event"] = per_event
        client = results["client_request"]["receiver_cpu_us_per_request"]
        results["receiver_cpu_ratio"] = round(per_event["batched"] / client, 3) if client else None
        lag, acked = results["lag"], results["lag_acknowledged"]
        results["summary"] = (
            f"lag at {lag['achieved_ops_per_s']:,.0f} ops/s: until acknowledged p50 {acked['p50_ms']:.2f} ms, "
            f"p99 {acked['p99_ms']:.2f} ms; until visible on the receiver p50 {lag['p50_ms']:.2f} ms, "
            f"p99 {lag['p99_ms']:.2f} ms (poll round trip {lag['poll_round_trip_ms_median']:.2f} ms); "
            f"receiver CPU per event: "
            f"batched {per_event['batched']:.1f} µs (mean batch {results['batched']['mean_batch_events']}), "
            f"batched at {results['batched_peak']['events_per_s']:,.0f} events/s {per_event['batched_peak']:.1f} µs "
            f"(mean batch {results['batched_peak']['mean_batch_events']}), "
            f"single {per_event['single']:.1f} µs; a client request {client:.1f} µs")
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
        if sender is not None:
            sender.stop()
        receiver.stop()
    if "error" in outcome:
        raise RuntimeError(outcome["error"])
    return outcome


def histogram(metrics_text, name, peer):
    """{upper bound: cumulative count} of one peer's histogram."""
    buckets = {}
    for line in metrics_text.splitlines():
        if line.startswith(name + "_bucket{") and f'peer="{peer}"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return buckets


def histogram_quantile(cumulative, q):
    """Quantile of sorted (upper bound, cumulative count) pairs, linear
    within a bucket, as Prometheus' histogram_quantile."""
    total = cumulative[-1][1]
    if not total:
        return 0.0
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in cumulative:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * ((rank - below) / (count - below) if count > below else 0)
        lower, below = upper, count
    return lower


def batch_count(metrics_text, peer):
    """Requests S sent to ``peer``: the count of its batch size histogram."""
    prefix = f'metacenter_replication_batch_size_events_count{{peer="{peer}"}}'
    for line in metrics_text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return None


def run(quick=True, seconds=None, cores=None, log=print):
    """For ``python -m bench``: in a child process (a reactor runs once)."""
    return servers.run_child("bench.replication", quick, seconds, cores, log, timeout=900)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.replication", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer events, shorter lag phase")
    parser.add_argument("--seconds", type=int, help="length of the lag phase (default 10, --quick 4)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the nodes and this process to cores")
    parser.add_argument("--batch-interval", help="the sender's --replica-batch-interval (default: its default)")
    parser.add_argument("--batch-size", help="the sender's --replica-batch-size (default: its default)")
    opts = parser.parse_args(argv)
    log = (lambda text: print(text, file=sys.stderr)) if opts.json else print
    sender_args = []
    if opts.batch_interval:
        sender_args += ["--replica-batch-interval", opts.batch_interval]
    if opts.batch_size:
        sender_args += ["--replica-batch-size", opts.batch_size]
    results = measure(opts.quick, opts.seconds, log, sender_args, pin=not opts.no_pin)
    results["sender_args"] = sender_args
    if opts.json:
        print(json.dumps(results))
    else:
        print(json.dumps(results, indent=2))
        print(results["summary"])


if __name__ == "__main__":
    main()
