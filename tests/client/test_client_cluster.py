"""Both clients against a real 3-node cluster (127.0.0.2-4): which node takes
a cluster's calls (checked against an independent FNV-32a and the nodes' own
request counters), deletes following their add, failover when a node dies,
the circuit breaker on a task.Clock, errors carrying the envelope's code."""

import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock

from conftest import TIMEOUT
from metacenter.client import AsyncClient, Client, MetacenterError, NodeUnavailable

CLUSTERS = [f"model-{i}" for i in range(24)] + ["llama3-70b", "mistral-7b", "日本語"]


def reference_fnv32a(data: bytes) -> int:
    """FNV-1a 32-bit from the spec: offset 2166136261, prime 16777619, xor then multiply, 32 bits."""
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) % 2**32
    return h


def expected_owner(cluster_nodes, cluster):
    """Index (in cluster_nodes.nodes) of the node a gateway sends ``cluster`` to."""
    keys = sorted(f"{node.host}:{node.port}" for node in cluster_nodes.nodes)
    owner = keys[reference_fnv32a(cluster.encode("utf-8")) % len(keys)]
    return [f"{node.host}:{node.port}" for node in cluster_nodes.nodes].index(owner)


def next_owner(cluster_nodes, cluster):
    """The node after the owner in the sorted ring: where failover goes."""
    keys = sorted(f"{node.host}:{node.port}" for node in cluster_nodes.nodes)
    start = reference_fnv32a(cluster.encode("utf-8")) % len(keys)
    return [f"{node.host}:{node.port}" for node in cluster_nodes.nodes].index(keys[(start + 1) % len(keys)])


def wait_replicated(cluster_nodes, index, cluster, queued, deadline=30.0):
    """Blocks until node ``index`` counts ``queued`` requests in ``cluster``:
    replication is asynchronous, and what a node had not sent yet dies with it."""
    started = time.monotonic()
    while True:
        status, _, answer = cluster_nodes.nodes[index].call("GET", f"/v1/load/stats?cluster={cluster}")
        if status == 200 and sum(row["queued_req_num"] for row in answer["data"]) == queued:
            return
        assert time.monotonic() - started < deadline, answer
        time.sleep(0.02)


def served(cluster_nodes, method, url):
    return [cluster_nodes.requests_served(i, method, url) for i in range(len(cluster_nodes.nodes))]


def test_every_call_about_a_cluster_goes_to_its_fnv32a_node(healthy):
    owners = {cluster: expected_owner(healthy, cluster) for cluster in CLUSTERS}
    assert set(owners.values()) == {0, 1, 2}, "the names must spread over every node to mean anything"
    with Client(healthy.urls, timeout=TIMEOUT) as client:
        for cluster, owner in owners.items():
            assert client.node_for(cluster) == healthy.urls[owner]
            before = served(healthy, "POST", "/v1/load/stats")
            for i in range(3):
                client.add_request(cluster, f"choice-{cluster}-{i}", "10.1.0.1", prompt_length=100)
            after = served(healthy, "POST", "/v1/load/stats")
            assert [a - b for a, b in zip(after, before)] == [3 if i == owner else 0 for i in range(3)], cluster
            assert client.placement(f"choice-{cluster}-0") == healthy.urls[owner]


@pytest_twisted.ensureDeferred
async def test_the_async_client_chooses_the_same_nodes(healthy):
    client = AsyncClient(healthy.urls, reactor, timeout=TIMEOUT)
    try:
        for cluster in CLUSTERS[:9]:
            owner = expected_owner(healthy, cluster)
            before = await threads.deferToThread(served, healthy, "GET", "/v1/load/stats")
            rows = await client.load(cluster)
            assert isinstance(rows, list)
            after = await threads.deferToThread(served, healthy, "GET", "/v1/load/stats")
            assert [a - b for a, b in zip(after, before)] == [1 if i == owner else 0 for i in range(3)], cluster
    finally:
        await client.close()


def test_deletes_go_to_the_node_that_took_the_add(healthy):
    # A cluster whose node is not the one a delete without a cluster would go to.
    empty_owner = expected_owner(healthy, "")
    cluster = next(c for c in CLUSTERS if expected_owner(healthy, c) != empty_owner)
    owner = expected_owner(healthy, cluster)
    with Client(healthy.urls, timeout=TIMEOUT) as client:
        client.add_request(cluster, "follow-1", "10.2.0.1", prompt_length=700)
        before = served(healthy, "DELETE", "/v1/load/prompt") + served(healthy, "DELETE", "/v1/load/stats")
        client.delete_prompt("follow-1")
        client.delete_request("follow-1")
        after = served(healthy, "DELETE", "/v1/load/prompt") + served(healthy, "DELETE", "/v1/load/stats")
        expected = [1 if i % 3 == owner else 0 for i in range(6)]
        assert [a - b for a, b in zip(after, before)] == expected
        assert client.placement("follow-1") is None
        # Unknown to this client: routed by the cluster given ("" without one).
        before = served(healthy, "DELETE", "/v1/load/stats")
        client.delete_request("never-added")
        after = served(healthy, "DELETE", "/v1/load/stats")
        assert [a - b for a, b in zip(after, before)] == [1 if i == empty_owner else 0 for i in range(3)]


def test_failover_when_the_clusters_node_is_killed(healthy):
    cluster = "failover-blocking"
    owner, successor = expected_owner(healthy, cluster), next_owner(healthy, cluster)
    with Client(healthy.urls, timeout=TIMEOUT) as client:
        client.add_request(cluster, "before-kill", "10.3.0.1", prompt_length=10)  # a kept-alive connection too
        wait_replicated(healthy, successor, cluster, 1)
        healthy.kill(owner)
        client.add_request(cluster, "after-kill", "10.3.0.1", prompt_length=20)
        assert client.placement("after-kill") == healthy.urls[successor]
        rows = client.load(cluster)
        assert [(r["ip"], r["queued_req_num"]) for r in rows] == [("10.3.0.1", 2)]
        client.delete_request("after-kill")
        assert client.load(cluster)[0]["queued_req_num"] == 1
        status, _, answer = healthy.nodes[successor].call("GET", f"/v1/load/stats?cluster={cluster}")
        assert status == 200 and answer["data"][0]["queued_req_num"] == 1


@pytest_twisted.ensureDeferred
async def test_async_failover_when_the_clusters_node_is_killed(healthy):
    cluster = "failover-async"
    owner, successor = expected_owner(healthy, cluster), next_owner(healthy, cluster)
    client = AsyncClient(healthy.urls, reactor, timeout=TIMEOUT)
    try:
        await client.add_request(cluster, "async-before-kill", "10.4.0.1")
        await threads.deferToThread(wait_replicated, healthy, successor, cluster, 1)
        healthy.kill(owner)
        await client.add_request(cluster, "async-after-kill", "10.4.0.1", prompt_length=5)
        assert client.placement("async-after-kill") == healthy.urls[successor]
        rows = await client.load(cluster)
        assert [(r["ip"], r["queued_req_num"], r["prompt_length"]) for r in rows] == [("10.4.0.1", 2, 5)]
    finally:
        await client.close()


def test_every_node_down_raises_node_unavailable_listing_each_attempt(healthy):
    with Client(healthy.urls, timeout=TIMEOUT) as client:
        for index in range(3):
            healthy.kill(index)
        with pytest.raises(NodeUnavailable) as caught:
            client.load("anything")
    keys = sorted(f"{node.host}:{node.port}" for node in healthy.nodes)
    start = reference_fnv32a(b"anything") % 3
    assert [url for url, _ in caught.value.attempts] == ["http://" + key for key in keys[start:] + keys[:start]]
    assert {what for _, what in caught.value.attempts} == {"connection refused"}
    assert isinstance(caught.value, MetacenterError) and caught.value.status is None


def test_the_breaker_on_a_task_clock_against_real_nodes(healthy):
    cluster = "breaker-blocking"
    owner = expected_owner(healthy, cluster)
    owner_url = healthy.urls[owner]
    others = [i for i in range(3) if i != owner]
    others_before = sum(healthy.requests_served(i, "GET", "/v1/load/stats") for i in others)
    clock = Clock()
    with Client(healthy.urls, timeout=TIMEOUT, clock=clock, failure_threshold=3, breaker_cooldown=30) as client:
        healthy.kill(owner)
        for _ in range(3):  # each call fails on the owner, then succeeds on the next node
            assert client.load(cluster) == []
        assert client.breakers()[owner_url] == "open"
        assert client.node_for(cluster) != owner_url  # the ring is over the other two now

        clock.advance(30)  # half-open: one trial, on the dead node: open again, and the call still answers
        assert client.node_for(cluster) == owner_url
        assert client.load(cluster) == []
        assert client.breakers()[owner_url] == "open"

        healthy.restart(owner)
        for _ in range(5):  # open: the live node is not asked at all
            client.load(cluster)
        assert healthy.requests_served(owner, "GET", "/v1/load/stats") == 0
        clock.advance(29.9)
        client.load(cluster)
        assert healthy.requests_served(owner, "GET", "/v1/load/stats") == 0

        clock.advance(0.1)  # the trial reaches the restarted node, which closes the breaker
        client.load(cluster)
        assert healthy.requests_served(owner, "GET", "/v1/load/stats") == 1
        assert client.breakers()[owner_url] == "closed"
        client.load(cluster)
        assert healthy.requests_served(owner, "GET", "/v1/load/stats") == 2
        # 3 failovers, the failed trial's failover, 5 + 1 while open: all answered by the others.
        assert sum(healthy.requests_served(i, "GET", "/v1/load/stats") for i in others) - others_before == 10


@pytest_twisted.ensureDeferred
async def test_the_async_breaker_on_a_task_clock(healthy):
    cluster = "breaker-async"
    owner = expected_owner(healthy, cluster)
    owner_url = healthy.urls[owner]
    clock = Clock()
    client = AsyncClient(healthy.urls, reactor, timeout=TIMEOUT, clock=clock, failure_threshold=2,
                         breaker_cooldown=10)
    try:
        healthy.kill(owner)
        for _ in range(2):
            await client.add_request(cluster, "breaker-async", "10.5.0.1")
        assert client.breakers()[owner_url] == "open"
        await threads.deferToThread(healthy.restart, owner)
        await client.load(cluster)
        assert client.breakers()[owner_url] == "open"
        clock.advance(10)
        await client.load(cluster)
        assert client.breakers()[owner_url] == "closed"
        assert await threads.deferToThread(healthy.requests_served, owner, "GET", "/v1/load/stats") == 1
    finally:
        await client.close()


def test_a_refusal_carries_the_envelope_and_is_not_a_node_failure(healthy):
    cluster = "refusals"
    owner = expected_owner(healthy, cluster)
    with Client(healthy.urls, timeout=TIMEOUT, failure_threshold=3) as client:
        before = served(healthy, "POST", "/v1/load/stats")
        for i in range(5):
            with pytest.raises(MetacenterError) as caught:
                client.add_request(cluster, f"refused-{i}", "10.6.0.1", prompt_length=True)
            error = caught.value
            assert not isinstance(error, NodeUnavailable)
            assert (error.status, error.code, error.message) == (400, 40001400, "Invalid input parameters")
            assert "prompt_length" in error.reason and "boolean" in error.reason
            assert error.node == healthy.urls[owner] and len(error.trace_id) == 36
            assert "40001400" in str(error) and "prompt_length" in str(error)
        after = served(healthy, "POST", "/v1/load/stats")
        # Refused by the node it went to, not retried elsewhere, no breaker opened.
        assert [a - b for a, b in zip(after, before)] == [5 if i == owner else 0 for i in range(3)]
        assert set(client.breakers().values()) == {"closed"}
        assert client.load(cluster) == []


@pytest_twisted.ensureDeferred
async def test_an_async_refusal_carries_the_envelope(healthy):
    client = AsyncClient(healthy.urls, reactor, timeout=TIMEOUT)
    try:
        with pytest.raises(MetacenterError) as caught:
            await client.load("")
        assert (caught.value.status, caught.value.code) == (400, 40001400)
        assert "cluster" in caught.value.reason
    finally:
        await client.close()


@pytest.fixture
def black_hole():
    """A node address that accepts connections and never answers."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def clusters_owned_by(client, url, count=1):
    names = (f"owned-{i}" for i in range(10_000))
    return [name for name in names if client.node_for(name) == url][:count]


def test_a_node_that_never_answers_times_out_and_the_call_fails_over(healthy, black_hole):
    with Client([black_hole, healthy.urls[0]], timeout=0.3) as client:
        [cluster] = clusters_owned_by(client, black_hole)
        client.add_request(cluster, "timeout-r1", "10.10.0.1", prompt_length=9)
        assert client.placement("timeout-r1") == healthy.urls[0]
    with Client([black_hole], timeout=0.3) as client:
        with pytest.raises(NodeUnavailable) as caught:
            client.load("x")
        assert caught.value.attempts == [(black_hole, "timeout")]


@pytest_twisted.ensureDeferred
async def test_async_timeout_fails_over_and_a_cancelled_call_blames_no_node(healthy, black_hole):
    client = AsyncClient([black_hole, healthy.urls[0]], reactor, timeout=0.3, failure_threshold=1)
    try:
        [cluster] = clusters_owned_by(client, black_hole)
        await client.add_request(cluster, "async-timeout-r1", "10.10.0.2")
        assert client.placement("async-timeout-r1") == healthy.urls[0]
        assert client.breakers()[black_hole] == "open"  # threshold 1: the timeout opened it
    finally:
        await client.close()
    client = AsyncClient([black_hole], reactor, timeout=0.3)
    try:
        with pytest.raises(NodeUnavailable) as caught:
            await client.load("x")
        assert caught.value.attempts == [(black_hole, "timeout")]
    finally:
        await client.close()
    client = AsyncClient([black_hole], reactor, timeout=30, failure_threshold=1)
    try:
        call = client.load("x")
        await task_later(0.2)
        call.cancel()
        with pytest.raises(defer.CancelledError):
            await call
        assert client.breakers() == {black_hole: "closed"}
    finally:
        await client.close()


def task_later(seconds):
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


@pytest.fixture
def bare_http():
    """Real HTTP servers that are not metacenter nodes (a proxy in front of a
    dead node, a reference node's bare 404): ``bare_http(status)`` -> URL of
    a server answering every request with ``status`` and an HTML body."""
    from twisted.web import resource, server

    class Bare(resource.Resource):
        isLeaf = True

        def __init__(self, status):
            super().__init__()
            self.status = status

        def render(self, request):
            request.setResponseCode(self.status)
            return b"<html>not a metacenter node</html>"

    ports = []

    def start(status):
        ports.append(reactor.listenTCP(0, server.Site(Bare(status)), interface="127.0.0.1"))
        return f"http://127.0.0.1:{ports[-1].getHost().port}"

    yield start
    for port in ports:
        port.stopListening()


@pytest_twisted.ensureDeferred
async def test_answers_without_an_envelope(healthy, bare_http):
    proxy, bare_404 = bare_http(502), bare_http(404)
    client = AsyncClient([proxy, healthy.urls[0]], reactor, timeout=TIMEOUT, failure_threshold=1)
    try:
        # A bare 5xx is a node failure: the call goes on to the next node, the breaker counts it.
        [cluster] = clusters_owned_by(client, proxy)
        await client.add_request(cluster, "bare-r1", "10.11.0.1")
        assert client.placement("bare-r1") == healthy.urls[0]
        assert client.breakers()[proxy] == "open"
    finally:
        await client.close()
    client = AsyncClient([bare_404, healthy.urls[0]], reactor, timeout=TIMEOUT)
    try:
        # A bare 404 (how a reference node answers an unknown route) is a refusal: raised, no failover.
        [cluster] = clusters_owned_by(client, bare_404)
        with pytest.raises(MetacenterError) as caught:
            await client.load(cluster)
        assert (caught.value.status, caught.value.code, caught.value.node) == (404, None, bare_404)
        assert "without a metacenter envelope" in caught.value.reason
    finally:
        await client.close()
    client = Client([proxy], timeout=TIMEOUT)
    try:
        with pytest.raises(NodeUnavailable) as caught:
            await threads.deferToThread(client.load, "x")
        assert caught.value.attempts == [(proxy, "HTTP 502")] and caught.value.status == 502
    finally:
        client.close()
