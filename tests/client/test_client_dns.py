"""Nodes from DNS: a real DNS server on loopback (tests/dns_server.py) naming
the real nodes; refreshes driven by a task.Clock; a failed lookup keeps the
last nodes."""

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.task import Clock

from conftest import HOSTS, TIMEOUT
from dns_server import dns_server  # noqa: F401  (a fixture)
from metacenter.client import AsyncClient, Client, DnsNodes, NodeUnavailable

NAME = "metacenter-headless.client.test"


def lookups(server):
    return sum(1 for name, _ in server.queries if name == NAME)


@pytest_twisted.ensureDeferred
async def test_async_client_follows_the_name_and_keeps_the_last_nodes_when_lookups_fail(healthy, dns_server):
    dns_server.set_records(NAME, HOSTS[:2])
    clock = Clock()
    client = AsyncClient(DnsNodes(NAME, healthy.port, interval=5, server=dns_server.address), reactor,
                         clock=clock, timeout=TIMEOUT)
    try:
        assert client.nodes == []
        assert await client.load("dns-a") == []  # the first call waits for the first lookup
        assert client.nodes == [f"http://{h}:{healthy.port}" for h in HOSTS[:2]]

        dns_server.set_records(NAME, list(reversed(HOSTS)))
        asked = lookups(dns_server)
        await client.load("dns-a")
        assert lookups(dns_server) == asked  # not due yet
        clock.advance(5)
        await client.load("dns-a")  # due: looked up in the background, the call uses the last nodes
        await client.refresh_nodes()  # joins that lookup
        # One lookup (A and AAAA); on a loaded machine the resolver may resend a slow UDP query.
        assert lookups(dns_server) >= asked + 2
        assert client.nodes == [f"http://{h}:{healthy.port}" for h in sorted(HOSTS)]

        dns_server.remove(NAME)  # NXDOMAIN
        clock.advance(5)
        await client.load("dns-a")
        await client.refresh_nodes()
        assert lookups(dns_server) > asked
        assert client.nodes == [f"http://{h}:{healthy.port}" for h in sorted(HOSTS)]
        await client.add_request("dns-a", "dns-r1", "10.9.9.1")
        assert client.placement("dns-r1") in client.nodes
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_blocking_client_from_dns_in_a_thread(healthy, dns_server):
    dns_server.set_records(NAME, HOSTS)
    client = Client(DnsNodes(NAME, healthy.port, server=dns_server.address), timeout=TIMEOUT)
    try:
        # The DNS server answers from this reactor: the blocking client runs in a thread.
        await threads.deferToThread(client.add_request, "dns-b", "dns-b-r1", "10.9.9.2", 40)
        assert client.nodes == [f"http://{h}:{healthy.port}" for h in HOSTS]
        rows = await threads.deferToThread(client.load, "dns-b")
        assert [(r["ip"], r["queued_req_num"], r["prompt_length"]) for r in rows] == [("10.9.9.2", 1, 40)]
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_name_that_never_resolved_gives_node_unavailable_saying_why(dns_server):
    dns_server.set_records(NAME, [])  # the name exists, without records
    client = AsyncClient(DnsNodes(NAME, 8080, server=dns_server.address), reactor, timeout=TIMEOUT)
    try:
        with pytest.raises(NodeUnavailable, match="no A or AAAA records"):
            await client.load("dns-c")
    finally:
        await client.close()
    blocking = Client(DnsNodes("missing." + NAME, 8080, server=dns_server.address), timeout=TIMEOUT)
    with pytest.raises(NodeUnavailable, match="does not exist"):
        await threads.deferToThread(blocking.load, "dns-c")


@pytest.mark.parametrize("args, kwargs, says", [
    (("", 80), {}, "name"),
    (("x", 0), {}, "port"),
    (("x", True), {}, "port"),
    (("x", 80), {"interval": 0}, "interval"),
    (("x", 80), {"scheme": "ftp"}, "scheme"),
])
def test_bad_dns_settings_are_refused(args, kwargs, says):
    with pytest.raises(ValueError, match=says):
        DnsNodes(*args, **kwargs)
