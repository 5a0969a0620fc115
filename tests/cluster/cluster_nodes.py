"""Whole nodes in the test process, for the cluster tests: a node's state,
its API resource, and the ways to connect nodes (real loopback sockets, or
treq's StubTreq on a task.Clock, as Tahoe-LAFS's test_storage_http.py does).
"""

from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet import defer, reactor, task
from twisted.python.failure import Failure
from twisted.web import resource

from metacenter.api.server import MetacenterAPI
from metacenter.api.site import MetacenterSite
from metacenter.cluster.auth import PeerAuthenticator
from metacenter.cluster.discovery import PeerDiscovery, format_peer
from metacenter.cluster.replication import PeerClient, make_http_client
from metacenter.core.events import EVENT_ADD, EVENT_DELETE, EVENT_PROMPT_DELETE, ORIGIN_CLIENT, LoadAdd, LoadDelete
from metacenter.runtime.node import build_node
from metacenter.runtime.turns import chunk_per_turn

EPOCH = 1_700_000_000.0


class LocalNode:
    """A whole node in this process (state, node, API), optionally listening
    on loopback. ``clock`` drives the state; the network uses the reactor.
    With ``turns=True`` big jobs run a chunk per turn of ``clock`` (as in a
    process), so a test on a task.Clock drives them."""

    def __init__(self, clock=None, secret="", tombstone_ttl=60.0, max_body=65536, turns=False):
        self.clock = clock if clock is not None else reactor
        self.node = build_node(self.clock, tombstone_ttl=tombstone_ttl, advertise="127.0.0.1",
                               cooperate=chunk_per_turn(self.clock).cooperate if turns else None)
        self.state, self.metrics = self.node.state, self.node.metrics
        self.api = MetacenterAPI(self.node, self.metrics)
        if not turns:
            # No turns to run them in: the peer routes finish in the request's
            # own turn (tests/api/test_peer_turns.py covers their steps).
            self.api.step_budget = float("inf")
        if secret:
            self.api.peer_auth = PeerAuthenticator(secret, self.clock)
        self.max_body = max_body
        self.port = None
        self.peer = None
        self.forwarded = []
        self.node.event_listeners.append(lambda *event: self.forwarded.append(event))

    def listen(self):
        site = MetacenterSite(self.api.resource(), max_body=self.max_body)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.peer = ("127.0.0.1", self.port.getHost().port)
        return self

    def stub(self):
        return StubTreq(self.api.resource())

    def add(self, request_id, cluster="llama", ip="10.0.0.1", prompt_length=100, timestamp=None):
        self.node.apply(EVENT_ADD, LoadAdd((cluster, request_id, ip, prompt_length, timestamp)), None, ORIGIN_CLIENT)

    def delete(self, request_id):
        self.node.apply(EVENT_DELETE, LoadDelete((request_id, None)), None, ORIGIN_CLIENT)

    def delete_prompt(self, request_id):
        self.node.apply(EVENT_PROMPT_DELETE, LoadDelete((request_id, None)), None, ORIGIN_CLIENT)

    def view(self):
        """Every cluster's engines as comparable tuples."""
        return {name: sorted((e.ip, e.queued, e.prompt) for e in c.engines.values())
                for name, c in self.state.clusters.items() if c.engines}

    def digest(self):
        return {name: (c.live, c.digest) for name, c in self.state.clusters.items()}

    def close(self):
        return self.port.stopListening() if self.port is not None else defer.succeed(None)


def clocked():
    clock = task.Clock()
    clock.advance(EPOCH)
    return clock


def real_client(secret="", timeout=5.0):
    http, pool = make_http_client(reactor, dial_timeout=0.5)
    return PeerClient(http, reactor, PeerAuthenticator(secret) if secret else None, timeout, pool)


class StubNetwork:
    """Peers' API resources behind treq's StubTreq, by (host, port): a
    treq-like client for ``PeerClient`` whose requests reach the resource of
    their URL's peer in memory. ``flush()`` moves the bytes of every open
    exchange (needed once a response is asynchronous: a scan over reactor
    turns, a streamed snapshot)."""

    def __init__(self, peers):
        self._stubs = {format_peer(peer): StubTreq(res) for peer, res in peers.items()}

    def request(self, method, url, **kwargs):
        return self._stubs[url.split("/")[2]].request(method, url, **kwargs)

    def flush(self):
        for stub in self._stubs.values():
            stub.flush()


def stub_client(clock, peers, timeout=1.0):
    """A PeerClient on ``clock`` whose requests go to ``peers`` ({(host,
    port): resource}) through a StubNetwork."""
    return PeerClient(StubNetwork(peers), clock, None, timeout)


def settle(clock, client, d, step=0.0, turns=100000):
    """Runs reactor turns of ``clock`` (advancing it ``step`` seconds each)
    and moves the network's bytes until ``d`` fires; returns its result
    (raises its failure)."""
    results = []
    d.addBoth(results.append)
    network = client._http
    for _ in range(turns):
        if results:
            break
        clock.advance(step)
        network.flush()
    else:
        raise AssertionError(f"not settled after {turns} turns")
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


class FlakyPeer(resource.Resource):
    """A peer node's API behind a switch: while ``down``, every request gets
    503 (as from a node that is shutting down)."""

    isLeaf = True

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.down = False
        self.requests = 0

    def render(self, request):
        self.requests += 1
        if self.down:
            request.setResponseCode(503)
            return b"unavailable"
        return self.inner.render(request)


class SilentPeer(resource.Resource):
    """A peer that accepts requests and never answers (a paused process)."""

    isLeaf = True

    def render(self, request):
        from twisted.web.server import NOT_DONE_YET

        return NOT_DONE_YET


def fill(node, count, rng, cluster_count=3):
    """A mixed state: live requests, prompt-deleted ones, deleted ones."""
    for i in range(count):
        rid = f"req-{i}"
        node.add(rid, cluster=f"model-{i % cluster_count}", ip=f"10.0.{i % 7}.{i % 5}",
                 prompt_length=rng.randrange(0, 5000))
        roll = rng.random()
        if roll < 0.3:
            node.delete(rid)
        elif roll < 0.6:
            node.delete_prompt(rid)
    for i in range(count // 10):
        node.delete(f"never-added-{i}")  # deletes before their add
        node.delete_prompt(f"prompt-first-{i}")


def static_discovery(*peers):
    discovery = PeerDiscovery(static_peers=peers, registry=CollectorRegistry())
    discovery.startService()
    return discovery
