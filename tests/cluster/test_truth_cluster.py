"""Issue 10 across a real cluster: three `twistd metacenter` processes on
127.0.0.2-4 finding each other through a DNS server on loopback, once with
the HTTP replication (batches) and once with the replication stream. An
engine reset and a lease's expiry on one node reach the other two; a lease
and the requests under it travel with the keepalives, and each node expires
the lease itself."""

import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task

from dns_server import DnsServer
from test_cluster import CONVERGENCE_DEADLINE, HOSTS, NAME, Cluster, shared_port
from test_stream_cluster import STREAM_ARGS, wait_streaming

MODES = {
    "http": ("--anti-entropy-interval", "1s", "--replication-listen", "none"),
    "stream": STREAM_ARGS,
}


@pytest_twisted.async_yield_fixture(scope="module", params=sorted(MODES))
async def cluster(request):
    dns = DnsServer.start()
    dns.set_records(NAME, HOSTS)
    running = Cluster(dns, shared_port(), extra=MODES[request.param])
    try:
        await defer.gatherResults([running.start(i) for i in range(len(HOSTS))], consumeErrors=True)
        if request.param == "stream":
            await wait_streaming(running, running.nodes, len(HOSTS) - 1)
        else:
            await running.wait_peers(len(HOSTS) - 1)
        yield running
    finally:
        await running.stop()
        await dns.stop()


async def ok(cluster, node, method, path, body=None):
    code, answer = await cluster.call(node, method, path, body)
    assert code == 200, (node.url, method, path, answer)
    return answer["data"]


async def wait_until(cluster, nodes, read, expected, what):
    """Polls ``read(node)`` on every node until each gives ``expected``."""
    deadline = time.monotonic() + CONVERGENCE_DEADLINE
    while True:
        got = [await read(node) for node in nodes]
        if all(g == expected for g in got):
            return
        assert time.monotonic() < deadline, f"{what}: want {expected!r}, got {got!r}"
        await task.deferLater(reactor, 0.1, lambda: None)


def engine_rows(cluster, name):
    async def read(node):
        rows = await ok(cluster, node, "GET", f"/v1/load/stats?cluster={name}")
        return sorted((e["ip"], e["queued_req_num"], e["prefill_req_num"], e["queued_tokens"]) for e in rows)
    return read


@pytest_twisted.ensureDeferred
async def test_an_engine_reset_on_one_node_reaches_the_other_two(cluster):
    name = f"reset-{id(cluster)}"
    writer, resetter, _ = cluster.nodes
    for i in range(4):
        await ok(cluster, writer, "POST", "/v1/load/stats",
                 {"cluster": name, "request_id": f"{name}-{i}", "ip": "2001:DB8::7" if i < 3 else "10.1.0.2",
                  "prompt_length": 10, "prompt_tokens": 5})
    await ok(cluster, writer, "POST", "/v1/cache/save", {"cluster": name, "ip": "2001:DB8::7", "prompt_hash": [1, 2]})
    # The spelling travels too: every node answers with the client's.
    await wait_until(cluster, cluster.nodes, engine_rows(cluster, name),
                     [("10.1.0.2", 1, 1, 5), ("2001:DB8::7", 3, 3, 15)], "the adds")
    data = await ok(cluster, resetter, "DELETE", "/v1/load/engine", {"cluster": name, "ip": "2001:db8::7"})
    assert data == {"released_requests": 3, "cache_blocks": 2}
    await wait_until(cluster, cluster.nodes, engine_rows(cluster, name), [("10.1.0.2", 1, 1, 5)], "the reset")

    async def cache(node):
        return (await ok(cluster, node, "POST", "/v1/cache/query", {"cluster": name, "prompt_hash": [1, 2]}))
    await wait_until(cluster, cluster.nodes, cache, {"locations": []}, "the reset's cache")
    # A late delete of a released request, on any node, changes nothing.
    await ok(cluster, cluster.nodes[2], "DELETE", "/v1/load/stats", {"request_id": f"{name}-0"})
    await ok(cluster, writer, "POST", "/v1/load/stats",
             {"cluster": name, "request_id": f"{name}-1", "ip": "2001:DB8::7", "prompt_length": 10})
    await task.deferLater(reactor, 0.5, lambda: None)
    await wait_until(cluster, cluster.nodes, engine_rows(cluster, name), [("10.1.0.2", 1, 1, 5)], "after late events")


@pytest_twisted.ensureDeferred
async def test_a_lease_expiry_on_one_node_reaches_the_other_two(cluster):
    name = f"lease-{id(cluster)}"
    lease = f"gw-{name}"
    gateway_node = cluster.nodes[0]
    data = await ok(cluster, gateway_node, "POST", "/v1/load/lease/keepalive", {"lease": lease, "ttl_ms": 2000})
    assert data == {"lease": lease, "ttl_ms": 2000, "requests": 0}
    for i in range(3):
        await ok(cluster, gateway_node, "POST", "/v1/load/stats",
                 {"cluster": name, "request_id": f"{name}-{i}", "ip": "10.2.0.1", "prompt_length": 10,
                  "lease": lease})
    await ok(cluster, gateway_node, "POST", "/v1/load/stats",
             {"cluster": name, "request_id": f"{name}-free", "ip": "10.2.0.2", "prompt_length": 10})
    await wait_until(cluster, cluster.nodes, engine_rows(cluster, name),
                     [("10.2.0.1", 3, 3, 0), ("10.2.0.2", 1, 1, 0)], "the adds")

    async def lease_requests(node):
        return [(x["lease"], x["ttl_ms"], x["requests"]) for x in await ok(cluster, node, "GET", "/v1/load/leases")
                if x["lease"] == lease]
    await wait_until(cluster, cluster.nodes, lease_requests, [(lease, 2000, 3)], "the lease")
    # The gateway goes quiet: its lease ends on every node, and so do its
    # requests (the engine itself stays, idle: only its gateway went away).
    await wait_until(cluster, cluster.nodes, engine_rows(cluster, name),
                     [("10.2.0.1", 0, 0, 0), ("10.2.0.2", 1, 1, 0)], "the expiry")
    await wait_until(cluster, cluster.nodes, lease_requests, [], "the lease's end")


@pytest_twisted.ensureDeferred
async def test_a_revoke_and_a_refresh_on_one_node_reach_the_other_two(cluster):
    name = f"revoke-{id(cluster)}"
    lease = f"gw-{name}"
    a, b, c = cluster.nodes
    await ok(cluster, a, "POST", "/v1/load/lease/keepalive", {"lease": lease, "ttl_ms": 60000})
    for i in range(2):
        await ok(cluster, a, "POST", "/v1/load/stats",
                 {"cluster": name, "request_id": f"{name}-{i}", "ip": "10.3.0.1", "lease": lease})
    await wait_until(cluster, cluster.nodes, engine_rows(cluster, name), [("10.3.0.1", 2, 2, 0)], "the adds")
    assert await ok(cluster, b, "POST", "/v1/load/refresh", {"request_ids": [f"{name}-0", "nope"]}) == \
        {"refreshed": 1}
    assert await ok(cluster, c, "DELETE", "/v1/load/lease", {"lease": lease}) == {"released_requests": 2}
    await wait_until(cluster, cluster.nodes, engine_rows(cluster, name), [("10.3.0.1", 0, 0, 0)], "the revoke")
