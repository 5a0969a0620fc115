"""The replication stream between real `twistd metacenter` processes on
127.0.0.2-4, found through a DNS server on loopback, with a cluster secret.

Anti-entropy is set far beyond the length of these tests (and tombstones
live long enough for that), so what converges here converged through the
stream and the warm start alone; the stream's own counters (on
``/v1/node/status`` and ``/metrics``) tell resumes from repairs.

Helpers (the truth model, operations, the cluster) are test_cluster's.
"""

import json
import os
import random
import signal
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads

from dns_server import DnsServer
from metacenter.client import AsyncClient, MetacenterError
from nodeproc import NodeProcess
from reference_node import ReferenceNode
from test_cluster import CONVERGENCE_DEADLINE, HOSTS, NAME, Cluster, Truth, make_ops, shared_port

# No anti-entropy round during a test: convergence is the stream's work.
STREAM_ARGS = ("--anti-entropy-interval", "600s", "--tombstone-ttl", "3600s")


def stream_peers(status):
    return {p["peer"].rsplit(":", 1)[0]: p for p in status["peers"]}


async def metric(cluster, node, name):
    """The sum of a series' samples on ``node``'s /metrics."""
    code, text = await cluster.call(node, "GET", "/metrics")
    assert code == 200
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def wait_streaming(cluster, nodes, count):
    """Until each node streams to ``count`` peers, connected."""
    deadline = time.monotonic() + CONVERGENCE_DEADLINE
    while True:
        statuses = [await cluster.status(node) for node in nodes]
        if all(len(s["peers"]) == count and all(p["mode"] == "stream" and p["connected"] for p in s["peers"])
               for s in statuses):
            return statuses
        assert time.monotonic() < deadline, json.dumps([s["peers"] for s in statuses])
        await task.deferLater(reactor, 0.1, lambda: None)


async def wait_acknowledged(cluster, nodes):
    """Until every node's peers acknowledged everything (receivers hold
    acknowledgements back for up to their ack delay); the statuses."""
    deadline = time.monotonic() + CONVERGENCE_DEADLINE
    while True:
        statuses = [await cluster.status(node) for node in nodes]
        if all(p.get("lag_events") == 0 for s in statuses for p in s["peers"]):
            return statuses
        assert time.monotonic() < deadline, json.dumps([s["peers"] for s in statuses])
        await task.deferLater(reactor, 0.05, lambda: None)


async def run_as_gateways(ops, nodes, truth, concurrency=40):
    """Send every operation through ``metacenter.client.AsyncClient`` over
    ``nodes``, as the gateways do: a cluster's adds go to the node of
    fnv32a(cluster), a request's deletes follow its add there (a delete that
    comes before its add goes by the key ""). Each must be accepted by the
    first node it went to: one failed attempt opens that node's breaker,
    which ends the test (no failover hides a refusal). Returns
    {node URL: adds it took}."""
    client = AsyncClient([node.url for node in nodes], reactor, timeout=10.0, failure_threshold=1,
                         breaker_cooldown=3600.0)
    semaphore = defer.DeferredSemaphore(concurrency)
    failures, placed = [], {}

    async def send(op):
        method, path, body = op
        try:
            if method == "POST":
                await client.add_request(body["cluster"], body["request_id"], body["ip"], body["prompt_length"])
                url = client.placement(body["request_id"])
                placed[url] = placed.get(url, 0) + 1
            elif path == "/v1/load/prompt":
                await client.delete_prompt(body["request_id"])
            else:
                await client.delete_request(body["request_id"])
        except MetacenterError as e:
            failures.append((op, e))
            return
        truth.record(op)

    try:
        await defer.gatherResults([semaphore.run(lambda op: defer.ensureDeferred(send(op)), op) for op in ops],
                                  consumeErrors=True)
    finally:
        await client.close()
    assert not failures, failures[:5]
    assert set(client.breakers().values()) == {"closed"}, client.breakers()
    return placed


@pytest_twisted.async_yield_fixture(scope="module")
async def streams():
    dns = DnsServer.start()
    dns.set_records(NAME, HOSTS)
    running = Cluster(dns, shared_port(), extra=STREAM_ARGS)
    try:
        await defer.gatherResults([running.start(i) for i in range(len(HOSTS))], consumeErrors=True)
        await wait_streaming(running, running.nodes, len(HOSTS) - 1)
        yield running
    finally:
        await running.stop()
        await dns.stop()


@pytest_twisted.ensureDeferred
async def test_three_nodes_converge_over_the_stream_after_thousands_of_mixed_operations(streams):
    rng = random.Random(21)
    # Four model clusters: by the gateways' node choice they put adds on
    # each of the three nodes (asserted below).
    clusters = ["s-llama", "s-mistral", "s-qwen", "s-baichuan"]
    truth = Truth()
    ops = make_ops(rng, "stream-mixed", 2000, clusters)
    assert len(ops) > 3500
    async def totals():
        return [sum([await metric(streams, node, name) for node in streams.nodes])
                for name in ("metacenter_stream_received_events_total", "metacenter_stream_events_sent_total",
                             "metacenter_stream_frames_sent_total", "metacenter_replication_events_sent_total",
                             "metacenter_stream_received_frames_total", "metacenter_stream_apply_lag_seconds_count")]

    received_before, sent_before, frames_before, acked_before, applied_before, lags_before = await totals()
    placed = await run_as_gateways(ops, streams.nodes, truth)
    assert len(placed) == len(streams.nodes) and min(placed.values()) > 0, placed
    await streams.wait_converged(streams.nodes, clusters, truth)
    statuses = await wait_acknowledged(streams, streams.nodes)
    assert len({json.dumps({c: s["digest"][c] for c in clusters}, sort_keys=True) for s in statuses}) == 1
    for node, status in zip(streams.nodes, statuses):
        for peer in status["peers"]:
            assert peer["mode"] == "stream" and peer["connected"], peer
            assert peer["repairs"] == 0 and peer["rejected"] == 0 and peer["lag_events"] == 0, peer
        assert await metric(streams, node, "metacenter_stream_received_gaps_total") == 0
        assert await metric(streams, node, "metacenter_stream_received_rejected_events_total") == 0
    received, sent, frames, acked, applied, lags = await totals()
    # Each operation was accepted by one node and streamed to the two others,
    # once: no HTTP batch, no resend. The replication series that dashboards
    # read count the stream's acknowledged events.
    assert received - received_before == sent - sent_before == acked - acked_before == 2 * len(ops)
    assert 0 < frames - frames_before <= sent - sent_before
    # Every frame applied was timed (stream version 2 between these nodes).
    assert lags - lags_before == applied - applied_before == frames - frames_before
    assert all(p["version"] == 2 for s in statuses for p in s["peers"])


@pytest_twisted.ensureDeferred
async def test_a_sigstopped_peer_resumes_from_its_offset_without_a_repair(streams):
    rng = random.Random(22)
    clusters = ["stopped-a", "stopped-b"]
    truth = Truth()
    paused = streams.nodes[1]
    others = [streams.nodes[0], streams.nodes[2]]
    await streams.run_ops(make_ops(rng, "before-stop", 200, clusters), streams.nodes, rng, truth)
    await streams.wait_converged(streams.nodes, clusters, truth)
    before = {node.host: stream_peers(await streams.status(node))[paused.host] for node in others}
    os.kill(paused.process.pid, signal.SIGSTOP)
    try:
        await streams.run_ops(make_ops(rng, "while-stopped", 800, clusters), others, rng, truth)
        await streams.wait_converged(others, clusters, truth)
        # Longer than the senders' acknowledgement timeout (10 s): they drop
        # the silent connection and dial again, and again, while it sleeps.
        await task.deferLater(reactor, 12.0, lambda: None)
        lagging = [stream_peers(await streams.status(node))[paused.host] for node in others]
        assert all(p["lag_events"] > 0 for p in lagging), lagging
    finally:
        os.kill(paused.process.pid, signal.SIGCONT)
    await streams.wait_converged(streams.nodes, clusters, truth)
    deadline = time.monotonic() + CONVERGENCE_DEADLINE
    while True:
        after = {node.host: stream_peers(await streams.status(node))[paused.host] for node in others}
        if all(p["connected"] and p["lag_events"] == 0 for p in after.values()):
            break
        assert time.monotonic() < deadline, after
        await task.deferLater(reactor, 0.1, lambda: None)
    for host, peer in after.items():
        assert peer["reconnects"] > before[host]["reconnects"], (before[host], peer)
        assert peer["resumes"] > before[host]["resumes"], (before[host], peer)
        assert peer["repairs"] == before[host]["repairs"] == 0, peer
    assert await metric(streams, paused, "metacenter_stream_received_gaps_total") == 0
    assert "resync" not in paused.log()


@pytest_twisted.ensureDeferred
async def test_a_killed_peer_warm_starts_and_streams_from_its_snapshot_offset(streams):
    rng = random.Random(23)
    clusters = ["killed-a", "killed-b"]
    truth = Truth()
    survivors = streams.nodes[:2]
    # Requests that live through the whole test: the restarted node can only
    # learn them from its warm start.
    await streams.run_ops([op for op in make_ops(rng, "early", 300, clusters) if op[0] == "POST"],
                          streams.nodes, rng, truth)
    await streams.wait_converged(streams.nodes, clusters, truth)
    early = truth.live
    victim = streams.nodes[2]
    before = {node.host: stream_peers(await streams.status(node))[victim.host] for node in survivors}
    victim.kill()
    load = make_ops(rng, "killed-load", 1500, clusters)
    chunks = [load[i:i + 150] for i in range(0, len(load), 150)]
    await streams.run_ops([op for chunk in chunks[:5] for op in chunk], survivors, rng, truth)
    restarting = streams.restart(2)
    for chunk in chunks[5:]:
        await streams.run_ops(chunk, survivors, rng, truth)
    await restarting
    restarted = streams.nodes[2]
    status = await streams.status(restarted)
    assert status["ready"] is True and status["requests"] >= early
    assert "warm start from 127.0.0." in restarted.log()
    # Exact counters everywhere: nothing lost, nothing counted twice.
    await streams.wait_converged(streams.nodes, clusters, truth)
    await wait_streaming(streams, streams.nodes, len(HOSTS) - 1)
    served_by = restarted.log().split("warm start from ", 1)[1].split(":", 1)[0]
    after = {node.host: stream_peers(await streams.status(node))[restarted.host] for node in survivors}
    # The peer that served the snapshot resumed its stream at the snapshot's
    # offset; the other did not know the new process: a fresh start from
    # what the killed one had acknowledged.
    assert after[served_by]["resumes"] > before[served_by]["resumes"], (before, after)
    other = next(host for host in after if host != served_by)
    assert after[other]["fresh_starts"] > before[other]["fresh_starts"], (before, after)
    assert all(p["repairs"] == 0 for p in after.values()), after
    resumed_at = [line for line in next(n.log() for n in survivors if n.host == served_by).splitlines()
                  if f"({restarted.host}) resumed at offset" in line]
    assert resumed_at and int(resumed_at[-1].rsplit(" ", 1)[1]) > 0, resumed_at
    assert await metric(streams, restarted, "metacenter_stream_received_gaps_total") == 0


@pytest.fixture
def reference():
    node = ReferenceNode()
    node.listen("127.0.0.5")
    yield node
    node.stop()


@pytest_twisted.ensureDeferred
async def test_a_mixed_cluster_of_stream_nodes_a_previous_version_and_a_reference_node_converges(reference):
    """Two stream nodes, a stand-in for the previous version (no stream
    listener: HTTP batches only) and the reference stand-in (single events)."""
    dns = DnsServer.start()
    dns.set_records(NAME, HOSTS)
    reference_peer = f"127.0.0.5:{reference.port.getHost().port}"
    mixed = Cluster(dns, shared_port())

    def node(host, *args):
        # No cluster secret: the reference signs nothing.
        return NodeProcess(host, mixed.port, "--peers-dns", NAME, "--dns-server", dns.address, "--dns-interval",
                           "0.5s", "--peer-port", str(mixed.port), "--advertise", host, *STREAM_ARGS, "--peer",
                           reference_peer, "--replica-probe-interval", "1s", *args)

    mixed.nodes = [node(HOSTS[0]), node(HOSTS[1]), node(HOSTS[2], "--replication-listen", "none")]
    try:
        await defer.gatherResults([mixed.start(i) for i in range(len(HOSTS))], consumeErrors=True)
        await mixed.wait_peers(len(HOSTS))
        reference.peers = [(n.host, n.port) for n in mixed.nodes]
        rng = random.Random(24)
        truth = Truth()
        clusters = ["mixed-model"]
        ops = make_ops(rng, "mixed-version", 400, clusters)
        adds = [op for op in ops if op[0] == "POST"]
        deletes = [op for op in ops if op[0] != "POST"]
        event_types = {"POST": "load.stats.set", "/v1/load/prompt": "load.prompt.delete",
                       "/v1/load/stats": "load.stats.delete"}

        async def through_reference(batch):
            # The reference writes one event at a time, as its gateways do.
            for op in batch:
                assert await reference.write(event_types[op[0] if op[0] == "POST" else op[1]], op[2]) == [True] * 3
                truth.record(op)

        for batch in (adds, deletes):
            via_reference = [op for op in batch if rng.random() < 0.2]
            ours = [op for op in batch if op not in via_reference]
            await defer.gatherResults([mixed.run_ops(ours, mixed.nodes, rng, truth),
                                       defer.ensureDeferred(through_reference(via_reference))])
            if batch is adds:
                # Deletes only once every add is everywhere: the reference
                # would let a delete overtake its add.
                deadline = time.monotonic() + CONVERGENCE_DEADLINE
                while len(reference.requests) < len(adds):
                    assert time.monotonic() < deadline, len(reference.requests)
                    await task.deferLater(reactor, 0.05, lambda: None)
                await mixed.wait_converged(mixed.nodes, clusters, truth)
        await mixed.wait_converged(mixed.nodes, clusters, truth)
        expected = truth.load(clusters[0])
        deadline = time.monotonic() + CONVERGENCE_DEADLINE
        while reference.load(clusters[0]) != expected:
            assert time.monotonic() < deadline, (reference.load(clusters[0]), expected)
            await task.deferLater(reactor, 0.05, lambda: None)
        modes = []
        for n in mixed.nodes:
            peers = stream_peers(await mixed.status(n))
            modes.append({host: p["mode"] for host, p in peers.items()})
        stream_a, stream_b, previous = HOSTS
        assert modes[0] == {stream_b: "stream", previous: "batch", "127.0.0.5": "single"}, modes
        assert modes[1] == {stream_a: "stream", previous: "batch", "127.0.0.5": "single"}, modes
        assert modes[2] == {stream_a: "batch", stream_b: "batch", "127.0.0.5": "single"}, modes
        status = await mixed.status(mixed.nodes[2])
        assert "stream" not in status
        # The two stream nodes did stream to each other; the previous version has no receiver.
        for n in mixed.nodes[:2]:
            assert await metric(mixed, n, "metacenter_stream_received_events_total") > 0
        assert await metric(mixed, mixed.nodes[2], "metacenter_stream_received_events_total") == 0
    finally:
        await mixed.stop()
        await dns.stop()


@pytest_twisted.ensureDeferred
async def test_a_rolling_upgrade_and_rollback_switch_a_peer_between_http_and_the_stream():
    """A peer restarted with the stream gets it at the next probe; restarted
    without it again (a rollback), its streaming peer goes back to HTTP,
    taking along what the peer had not acknowledged."""
    dns = DnsServer.start()
    pair = Cluster(dns, None)
    a_port, b_port = shared_port(), shared_port()
    host_a, host_b = HOSTS[0], HOSTS[1]

    def node(host, port, peer, *args):
        return NodeProcess(host, port, "--peer", peer, "--advertise", host, "--cluster-secret", "rolling",
                           "--replica-probe-interval", "1s", *STREAM_ARGS, *args)

    def node_b(*args):
        return node(host_b, b_port, f"{host_a}:{a_port}", *args)

    pair.nodes = [node(host_a, a_port, f"{host_b}:{b_port}"), node_b("--replication-listen", "none")]
    rng = random.Random(25)
    truth = Truth()
    clusters = ["rolling"]

    async def mode_of_b():
        return stream_peers(await pair.status(pair.nodes[0]))[host_b]["mode"]

    async def wait_mode(mode):
        deadline = time.monotonic() + CONVERGENCE_DEADLINE
        while (current := await mode_of_b()) != mode:
            assert time.monotonic() < deadline, current
            await task.deferLater(reactor, 0.1, lambda: None)

    async def restart_b(*args):
        await threads.deferToThread(pair.nodes[1].stop)
        pair.nodes[1] = node_b(*args)
        await pair.start(1)

    try:
        await defer.gatherResults([pair.start(0), pair.start(1)], consumeErrors=True)
        await pair.run_ops(make_ops(rng, "old", 300, clusters), pair.nodes, rng, truth)
        await pair.wait_converged(pair.nodes, clusters, truth)
        assert await mode_of_b() == "batch"

        # The upgrade: B now has a stream; A finds it at its next probe.
        await restart_b()
        await wait_mode("stream")
        await pair.run_ops(make_ops(rng, "upgraded", 300, clusters), pair.nodes, rng, truth)
        await pair.wait_converged(pair.nodes, clusters, truth)
        assert all(p["mode"] == "stream" for p in (await pair.status(pair.nodes[1]))["peers"])

        # The rollback: B without a stream again, and writes to A meanwhile.
        await threads.deferToThread(pair.nodes[1].stop)
        await pair.run_ops(make_ops(rng, "while-down", 200, clusters), pair.nodes[:1], rng, truth)
        pair.nodes[1] = node_b("--replication-listen", "none")
        await pair.start(1)
        await wait_mode("batch")
        await pair.run_ops(make_ops(rng, "rolled-back", 300, clusters), pair.nodes, rng, truth)
        await pair.wait_converged(pair.nodes, clusters, truth)
        assert await metric(pair, pair.nodes[0], "metacenter_stream_http_fallbacks_total") == 1
        assert "back to HTTP replication with the" in pair.nodes[0].log()
    finally:
        await pair.stop()
        await dns.stop()


@pytest_twisted.ensureDeferred
async def test_a_peer_whose_stream_cannot_be_reached_gets_http_replication():
    """A dials a port where nothing listens (``--replication-port``, as with
    a firewall in between): B's status says its stream is open, so after
    repeated failures A replicates to B over HTTP; B streams to A."""
    dns = DnsServer.start()
    pair = Cluster(dns, None)
    a_port, b_port = shared_port(), shared_port()
    host_a, host_b = HOSTS[0], HOSTS[1]
    closed = shared_port()
    pair.nodes = [
        NodeProcess(host_a, a_port, "--peer", f"{host_b}:{b_port}", "--advertise", host_a, *STREAM_ARGS,
                    "--replication-port", str(closed)),
        NodeProcess(host_b, b_port, "--peer", f"{host_a}:{a_port}", "--advertise", host_b, *STREAM_ARGS),
    ]
    rng = random.Random(26)
    truth = Truth()
    clusters = ["unreachable"]
    try:
        await defer.gatherResults([pair.start(0), pair.start(1)], consumeErrors=True)
        deadline = time.monotonic() + CONVERGENCE_DEADLINE
        while stream_peers(await pair.status(pair.nodes[0]))[host_b]["mode"] != "batch" or \
                await metric(pair, pair.nodes[0], "metacenter_stream_http_fallbacks_total") < 1:
            assert time.monotonic() < deadline, await pair.status(pair.nodes[0])
            await task.deferLater(reactor, 0.1, lambda: None)
        await pair.run_ops(make_ops(rng, "unreachable", 300, clusters), pair.nodes, rng, truth)
        await pair.wait_converged(pair.nodes, clusters, truth)
        assert stream_peers(await pair.status(pair.nodes[1]))[host_a]["mode"] == "stream"
        assert "its replication stream does not work from here" in pair.nodes[0].log()
    finally:
        await pair.stop()
        await dns.stop()
