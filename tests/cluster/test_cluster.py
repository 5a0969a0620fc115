"""A cluster of real `twistd metacenter` processes on 127.0.0.2-4 (one port),
finding each other through a DNS server on loopback, signing replication
with a cluster secret.

These nodes run without the replication stream (``--replication-listen
none``): they test the HTTP replication (batches, queues, drops, repairs)
that mixed clusters and rolling upgrades rely on. test_stream_cluster.py
runs the stream.

The DNS server runs in this test's reactor, so nothing here blocks it: HTTP
goes through treq, and node processes are started from a thread.

The expected loads come from a model of the wire semantics written here (a
request counts unless deleted; its prompt unless prompt-deleted), not from
metacenter.state.
"""

import json
import os
import random
import signal
import time

import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet import defer, reactor, task, threads
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from dns_server import DnsServer
from metacenter.cluster import auth
from metacenter.core.hashing import prompt_hashes
from metacenter.bodyproducer import BytesProducer
import nodeproc
from nodeproc import NodeProcess
from reference_node import ReferenceNode

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
NAME = "metacenter-headless.test"
SECRET = "cluster-test-secret"
ANTI_ENTROPY_INTERVAL = 1.0
QUEUE_SIZE = 300  # per peer; small, so a paused node makes its peers drop events
CONVERGENCE_DEADLINE = 30.0


def shared_port():
    return nodeproc.shared_port(HOSTS)


# -- the expected state ------------------------------------------------------------


class Truth:
    """What every node must report: built from the operations the nodes accepted."""

    def __init__(self):
        self.adds = {}  # request_id -> (cluster, ip, prompt_length)
        self.prompt_deleted = set()
        self.deleted = set()

    def record(self, op):
        method, path, body = op
        if method == "POST":
            self.adds[body["request_id"]] = (body["cluster"], body["ip"], body["prompt_length"])
        elif path == "/v1/load/prompt":
            self.prompt_deleted.add(body["request_id"])
        else:
            self.deleted.add(body["request_id"])

    def load(self, cluster, keep_idle=True):
        engines = {}
        for request_id, (c, ip, prompt_length) in self.adds.items():
            if c != cluster:
                continue
            engine = engines.setdefault(ip, [0, 0])
            if request_id in self.deleted:
                continue
            engine[0] += 1
            if request_id not in self.prompt_deleted:
                engine[1] += prompt_length
        return {ip: tuple(v) for ip, v in engines.items() if keep_idle or v != [0, 0]}

    @property
    def live(self):
        return len(set(self.adds) - self.deleted)


def make_ops(rng, prefix, count, clusters):
    """Gateway-like operations in random order: some requests finish, some
    only finish prefill, some stay in flight; a delete may come first."""
    ops = []
    for i in range(count):
        request_id = f"{prefix}-{i}"
        cluster = rng.choice(clusters)
        add = {"cluster": cluster, "request_id": request_id, "ip": f"10.20.{rng.randrange(3)}.{rng.randrange(1, 4)}",
               "prompt_length": rng.randrange(1, 4000)}
        ops.append(("POST", "/v1/load/stats", add))
        if rng.random() < 0.7:
            ops.append(("DELETE", "/v1/load/prompt", {"request_id": request_id, "cluster": "", "ip": ""}))
        if rng.random() < 0.5:
            ops.append(("DELETE", "/v1/load/stats", {"request_id": request_id, "cluster": "", "ip": ""}))
    rng.shuffle(ops)
    return ops


# -- a cluster -------------------------------------------------------------------------


class Cluster:
    def __init__(self, dns, port, extra=("--anti-entropy-interval", f"{ANTI_ENTROPY_INTERVAL}s",
                                         "--replica-queue-size", str(QUEUE_SIZE), "--replication-listen", "none")):
        self.dns = dns
        self.port = port
        self.extra = tuple(extra)
        self.nodes = [self.make_node(host) for host in HOSTS]
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 64
        self.pool = pool
        # A bare Agent: treq's wrapping agents would make this process, not
        # the nodes, the bottleneck of a few thousand requests.
        self.agent = Agent(reactor, pool=pool, connectTimeout=2)

    def make_node(self, host):
        return NodeProcess(
            host, self.port, "--peers-dns", NAME, "--dns-server", self.dns.address, "--dns-interval", "0.5s",
            "--peer-port", str(self.port), "--advertise", host, "--cluster-secret", SECRET, *self.extra)

    def start(self, index):
        """Start node ``index`` from a thread (the reactor keeps answering
        DNS); fires when it reports ready."""
        return threads.deferToThread(self.nodes[index].start, True, 30.0)

    def restart(self, index):
        self.nodes[index] = self.make_node(HOSTS[index])
        return self.start(index)

    @defer.inlineCallbacks
    def call(self, node, method, path, body=None, raw=None, headers=None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        d = self.agent.request(method.encode(), (node.url + path).encode(), Headers(headers or {}),
                               BytesProducer(data) if data is not None else None)
        response = yield d.addTimeout(10, reactor)
        content = yield treq.content(response)
        try:
            return response.code, json.loads(content)
        except ValueError:
            return response.code, content

    @defer.inlineCallbacks
    def run_ops(self, ops, nodes, rng, truth, concurrency=40):
        """Send every operation to a random node of ``nodes``; each must be accepted."""
        semaphore = defer.DeferredSemaphore(concurrency)
        failures = []

        @defer.inlineCallbacks
        def send(op, node):
            code, answer = yield self.call(node, op[0], op[1], op[2])
            if code == 200:
                truth.record(op)
            else:
                failures.append((node.url, op, code, answer))

        yield defer.gatherResults([semaphore.run(send, op, rng.choice(nodes)) for op in ops], consumeErrors=True)
        assert not failures, failures[:5]

    @defer.inlineCallbacks
    def loads(self, node, clusters):
        result = {}
        for cluster in clusters:
            code, answer = yield self.call(node, "GET", f"/v1/load/stats?cluster={cluster}")
            assert code == 200, answer
            result[cluster] = {e["ip"]: (e["queued_req_num"], e["prompt_length"]) for e in answer["data"] or []}
        return result

    @defer.inlineCallbacks
    def status(self, node):
        code, answer = yield self.call(node, "GET", "/v1/node/status")
        assert code == 200
        return answer["data"]

    @defer.inlineCallbacks
    def wait_converged(self, nodes, clusters, truth, keep_idle=True):
        """Poll until every node reports the truth for every cluster."""
        expected = {c: truth.load(c, keep_idle) for c in clusters}
        deadline = time.monotonic() + CONVERGENCE_DEADLINE
        while True:
            views = []
            for node in nodes:
                view = yield self.loads(node, clusters)
                if not keep_idle:
                    view = {c: {ip: v for ip, v in engines.items() if v != (0, 0)} for c, engines in view.items()}
                views.append(view)
            if all(view == expected for view in views):
                return
            if time.monotonic() > deadline:
                for node, view in zip(nodes, views):
                    if view != expected:
                        status = yield self.status(node)
                        raise AssertionError(f"{node.url} did not converge:\n got {view}\n want {expected}\n"
                                             f"status {status}\nlog tail:\n{node.log()[-4000:]}")
            yield task.deferLater(reactor, 0.2, lambda: None)

    @defer.inlineCallbacks
    def wait_peers(self, count):
        deadline = time.monotonic() + CONVERGENCE_DEADLINE
        while True:
            statuses = []
            for node in self.nodes:
                statuses.append((yield self.status(node)))
            if all(len(s["peers"]) == count for s in statuses):
                return statuses
            assert time.monotonic() < deadline, statuses
            yield task.deferLater(reactor, 0.1, lambda: None)

    def stop(self):
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                os.kill(node.process.pid, signal.SIGCONT)
                node.stop(timeout=10)
        return self.pool.closeCachedConnections()


@pytest_twisted.async_yield_fixture(scope="module")
async def cluster():
    dns = DnsServer.start()
    dns.set_records(NAME, HOSTS)
    running = Cluster(dns, shared_port())
    try:
        await defer.gatherResults([running.start(i) for i in range(len(HOSTS))], consumeErrors=True)
        await running.wait_peers(len(HOSTS) - 1)
        yield running
    finally:
        await running.stop()
        await dns.stop()


# -- tests -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_mixed_operations_on_every_node_converge_to_the_truth(cluster):
    rng = random.Random(11)
    clusters = ["llama-70b", "mistral-7b", "qwen-32b"]
    truth = Truth()
    ops = make_ops(rng, "mixed", 1400, clusters)
    assert len(ops) > 2500
    started = time.monotonic()
    await cluster.run_ops(ops, cluster.nodes, rng, truth)
    sent = time.monotonic()
    await cluster.wait_converged(cluster.nodes, clusters, truth)
    print(f"{len(ops)} operations sent in {sent - started:.2f} s, converged {time.monotonic() - sent:.2f} s later")
    statuses = [await cluster.status(node) for node in cluster.nodes]
    assert len({json.dumps(s["digest"], sort_keys=True) for s in statuses}) == 1
    for status in statuses:
        assert {p["mode"] for p in status["peers"]} == {"batch"}
        assert all(p["failed"] == 0 and p["dropped"] == 0 for p in status["peers"]), status["peers"]


@pytest_twisted.ensureDeferred
async def test_a_cache_save_on_one_node_is_found_by_a_query_on_the_others(cluster):
    text = bytes((13 * i) % 256 for i in range(3000))
    hashes = prompt_hashes(text)
    writer, *readers = cluster.nodes
    code, answer = await cluster.call(writer, "POST", "/v1/cache/save",
                                      {"cluster": "kv-cluster", "prompt_hash": hashes, "ip": "10.9.0.1"})
    assert code == 200, answer
    query = {"cluster": "kv-cluster", "prompt_hash": hashes[:4] + [12345], "topk": 10}
    deadline = time.monotonic() + CONVERGENCE_DEADLINE
    for reader in readers:
        while True:
            code, answer = await cluster.call(reader, "POST", "/v1/cache/query", query)
            assert code == 200, answer
            if answer["data"]["locations"]:
                break
            assert time.monotonic() < deadline, f"{reader.url} never saw the save"
            await task.deferLater(reactor, 0.05, lambda: None)
        assert answer["data"] == {"locations": [{"ip": "10.9.0.1", "length": 4}]}


@pytest_twisted.ensureDeferred
async def test_unsigned_badly_signed_and_replayed_peer_requests_are_refused_by_a_real_node(cluster):
    node = cluster.nodes[0]
    before = await cluster.loads(node, ["intruded"])
    body = json.dumps({"cluster": "intruded", "request_id": "x", "ip": "10.66.0.1", "prompt_length": 5}).encode()
    path = "/v1/replica/event"
    now = time.time()
    for signature in ({}, auth.sign("not-the-secret", "POST", path, body, now),
                      auth.sign(SECRET, "POST", path, body, now - auth.DEFAULT_WINDOW - 5)):
        headers = {"Event-Type": ["load.stats.set"], **{k: [v] for k, v in signature.items()}}
        code, answer = await cluster.call(node, "POST", path, raw=body, headers=headers)
        assert code == 401 and answer["error"]["code"] == 40101001
    assert await cluster.loads(node, ["intruded"]) == before == {"intruded": {}}
    headers = {"Event-Type": ["load.stats.set"], **{k: [v] for k, v in auth.sign(SECRET, "POST", path, body,
                                                                                     time.time()).items()}}
    code, _ = await cluster.call(node, "POST", path, raw=body, headers=headers)
    assert code == 200


@pytest_twisted.ensureDeferred
async def test_killing_a_node_under_load_and_restarting_it(cluster):
    rng = random.Random(12)
    clusters = ["restart-a", "restart-b"]
    truth = Truth()
    survivors = cluster.nodes[:2]
    # Requests that live through the whole test: the restarted node can only
    # know them from its warm start (no event about them is sent later).
    await cluster.run_ops([op for op in make_ops(rng, "early", 300, clusters) if op[0] == "POST"],
                          cluster.nodes, rng, truth)
    await cluster.wait_converged(cluster.nodes, clusters, truth)
    early = truth.live

    load = make_ops(rng, "under-load", 1500, clusters)
    chunks = [load[i:i + 150] for i in range(0, len(load), 150)]
    # Replication is asynchronous: what the killed node accepted in its last
    # milliseconds and had not sent yet dies with it. So it takes no writes
    # in the moments before the kill; the others do, all along.
    await cluster.run_ops(chunks[0], cluster.nodes, rng, truth)
    await cluster.wait_converged(cluster.nodes, clusters, truth)
    under_load = cluster.run_ops([op for chunk in chunks[1:5] for op in chunk], survivors, rng, truth,
                                 concurrency=8)
    await task.deferLater(reactor, 0.2, lambda: None)
    cluster.nodes[2].kill()
    await under_load  # every one of them accepted
    await cluster.wait_converged(survivors, clusters, truth)

    restarting = cluster.restart(2)
    for chunk in chunks[5:]:
        await cluster.run_ops(chunk, survivors, rng, truth)
    await restarting
    restarted = cluster.nodes[2]
    status = await cluster.status(restarted)
    assert status["ready"] is True
    # Ready means warm: it already holds the long-lived requests it could
    # only have learned from a peer's snapshot.
    assert status["requests"] >= early
    assert "warm start from 127.0.0." in restarted.log()
    await cluster.wait_converged(cluster.nodes, clusters, truth)
    await cluster.wait_peers(len(HOSTS) - 1)


@pytest_twisted.ensureDeferred
async def test_a_paused_node_is_repaired_by_anti_entropy(cluster):
    rng = random.Random(13)
    clusters = ["paused-a", "paused-b"]
    truth = Truth()
    paused = cluster.nodes[1]
    others = [cluster.nodes[0], cluster.nodes[2]]
    await cluster.run_ops(make_ops(rng, "before-pause", 200, clusters), cluster.nodes, rng, truth)
    # What the paused node accepted but had not sent yet would be missing on
    # the others until it resumes: let it send everything first.
    await cluster.wait_converged(cluster.nodes, clusters, truth)
    os.kill(paused.process.pid, signal.SIGSTOP)
    try:
        # More events than the peers' queues for it hold: most are dropped.
        await cluster.run_ops(make_ops(rng, "while-paused", 1000, clusters), others, rng, truth)
        await cluster.wait_converged(others, clusters, truth)
    finally:
        os.kill(paused.process.pid, signal.SIGCONT)
    dropped = 0
    for node in others:
        for peer in (await cluster.status(node))["peers"]:
            if peer["peer"].startswith(paused.host + ":"):
                dropped += peer["dropped"]
    assert dropped > 0
    # A dropped add whose request was deleted leaves no trace anywhere but an
    # engine at 0/0 on the nodes that saw it: compare the live state.
    await cluster.wait_converged(cluster.nodes, clusters, truth, keep_idle=False)
    digests = [(await cluster.status(node))["digest"] for node in cluster.nodes]
    assert all({c: d[c] for c in clusters if c in d} == {c: digests[0][c] for c in clusters if c in digests[0]}
               for d in digests)
    repaired = 0
    for node in cluster.nodes:
        code, text = await cluster.call(node, "GET", "/metrics")
        for line in text.decode().splitlines():
            if line.startswith("metacenter_antientropy_repairs_total"):
                repaired += float(line.rsplit(" ", 1)[1])
    assert repaired > 0


@pytest.fixture
def reference():
    node = ReferenceNode()
    node.listen()
    yield node
    node.stop()


@pytest_twisted.ensureDeferred
async def test_a_mixed_cluster_with_a_reference_node_converges(reference):
    """Our node next to a reference node: single events both ways."""
    host, port = "127.0.0.1", reference.port.getHost().port
    ours = NodeProcess("127.0.0.1", None, "--peer", f"{host}:{port}", "--replica-probe-interval", "1s")
    await threads.deferToThread(ours.start, True, 30.0)
    reference.peers = [(ours.host, ours.port)]
    pool = HTTPConnectionPool(reactor, persistent=True)
    http = HTTPClient(Agent(reactor, pool=pool))
    try:
        rng = random.Random(14)
        truth = Truth()
        ops = make_ops(rng, "mixed-ref", 200, ["ref-model"])
        adds = [op for op in ops if op[0] == "POST"]
        deletes = [op for op in ops if op[0] != "POST"]

        async def send(op):
            if rng.random() < 0.5:
                event_type = {"POST": "load.stats.set", "/v1/load/prompt": "load.prompt.delete",
                              "/v1/load/stats": "load.stats.delete"}[op[0] if op[0] == "POST" else op[1]]
                results = await reference.write(event_type, op[2])
                assert results == [True]
            else:
                response = await http.request(op[0], ours.url + op[1], data=json.dumps(op[2]).encode())
                await response.content()
                assert response.code == 200
            truth.record(op)

        for op in adds:
            await send(op)
        # The reference has no tombstones: a delete must not overtake its add.
        deadline = time.monotonic() + CONVERGENCE_DEADLINE
        while len(reference.requests) < len(adds):
            assert time.monotonic() < deadline, len(reference.requests)
            await task.deferLater(reactor, 0.05, lambda: None)
        for op in deletes:
            await send(op)
        expected = truth.load("ref-model")
        deadline = time.monotonic() + CONVERGENCE_DEADLINE
        while True:
            response = await http.get(ours.url + "/v1/load/stats?cluster=ref-model")
            ours_view = {e["ip"]: (e["queued_req_num"], e["prompt_length"])
                         for e in json.loads(await response.content())["data"]}
            if ours_view == expected and reference.load("ref-model") == expected:
                break
            assert time.monotonic() < deadline, (ours_view, reference.load("ref-model"), expected)
            await task.deferLater(reactor, 0.1, lambda: None)
        response = await http.get(ours.url + "/v1/node/status")
        peers = json.loads(await response.content())["data"]["peers"]
        assert peers[0]["mode"] == "single" and peers[0]["failed"] == 0
        singles = [r for r in reference.received if r[0] == "/v1/replica/event"]
        assert singles and all(r[2]["content-type"] == "application/json" and r[2]["traceid"]
                               and "timestamp" in json.loads(r[3]) for r in singles)
        # Probes for the batch endpoint, once per probe interval at most.
        assert any(r[0] == "/v1/replica/batch" for r in reference.received)
    finally:
        await pool.closeCachedConnections()
        ours.stop()


def test_the_kubernetes_manifests_use_real_settings_and_probes():
    yaml = pytest.importorskip("yaml")
    from metacenter.runtime.config import SETTINGS

    base = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "deploy", "kubernetes")
    docs = {}
    for name in os.listdir(base):
        if name.endswith(".yaml") and name != "kustomization.yaml":
            with open(os.path.join(base, name)) as f:
                for doc in yaml.safe_load_all(f):
                    docs[(doc["kind"], doc["metadata"]["name"])] = doc
    known_env = {env for s in SETTINGS for env in s.env}
    pod = docs[("Deployment", "metacenter")]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert set(env) <= known_env, set(env) - known_env
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    secret_ref = env["METACENTER_CLUSTER_SECRET"]["valueFrom"]["secretKeyRef"]
    assert secret_ref["key"] in docs[("Secret", secret_ref["name"])]["stringData"]
    peers = docs[("Service", env["META_DATA_CENTER_SVC_DISC_HOST"]["value"])]["spec"]
    assert peers["clusterIP"] == "None" and peers["publishNotReadyAddresses"] is True
    assert int(env["REPLICA_CLIENT_TARGET_PORT"]["value"]) == container["ports"][0]["containerPort"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    assert container["resources"]["requests"] and container["resources"]["limits"]
