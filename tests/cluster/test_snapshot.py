"""The peer routes that walk the whole state (``GET /v1/replica/snapshot``,
``GET /v1/replica/digest``) in bounded steps, in process: the node's Site
over ``StringTransport``s with its cooperator's turns taken one at a time,
so a test sees what is served between two steps of a walk. And a snapshot
taken while the state changes, merged and then replayed from the log
position in its header, gives exact counts.
"""

import json
import random

from prometheus_client import CollectorRegistry
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from cluster_nodes import LocalNode, clocked, fill
from harness import Turns, http_responses
from metacenter.api.server import MetacenterAPI
from metacenter.api.site import MetacenterSite
from metacenter.api.views import DigestRender
from metacenter.cluster.snapshot import CHUNK, SnapshotMerger, _encode, record_entry, record_line, state_chunks, \
    tombstone_line
from metacenter.cluster.stream import decode_entries
from metacenter.core.digests import digests
from metacenter.core.events import EVENT_ADD, EVENT_DELETE, EVENT_PROMPT_DELETE, ORIGIN_PEER, LoadAdd, LoadDelete
from metacenter.core.replog import ReplicationLog
from metacenter.runtime.node import build_node
from metacenter.runtime.turns import _one_step


class Server:
    def __init__(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.node = build_node(self.clock)
        self.turns = Turns()
        self.node.cooperate = task.Cooperator(scheduler=self.turns.schedule,
                                              terminationPredicateFactory=_one_step).cooperate
        self.api = MetacenterAPI(self.node, self.node.metrics)
        self.site = MetacenterSite(self.api.resource(), max_body=65536, reactor=self.clock,
                                   metrics=self.node.metrics)

    def connect(self):
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        channel.makeConnection(transport)
        return channel, transport


def request(method, path, body=None):
    lines = [f"{method} {path} HTTP/1.1", "Host: node"]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def responses(raw):
    """Complete HTTP responses in ``raw``: [(status, body)]."""
    return [(status, body) for status, _, body in http_responses(raw)]



def served_between_steps(server, path):
    """Sends ``GET path`` and, before each turn of the node's cooperator
    until it is answered, a gateway's add on another connection. Returns
    (the answer's body, turns taken); asserts each add was answered before
    the next turn."""
    poll, poll_transport = server.connect()
    gateway, gateway_transport = server.connect()
    poll.dataReceived(request("GET", path))
    turns = 0
    while not responses(poll_transport.value()):
        gateway.dataReceived(request("POST", "/v1/load/stats", json.dumps(
            {"cluster": "live", "request_id": f"g{turns}", "ip": "10.0.0.9"}).encode()))
        assert len(responses(gateway_transport.value())) == turns + 1  # answered between two steps
        assert server.turns.run()
        turns += 1
    (status, body), = responses(poll_transport.value())
    assert status == 200
    return body, turns


def test_a_snapshot_of_many_requests_is_streamed_while_other_requests_are_served():
    server = Server()
    count = 40 * CHUNK
    for i in range(count):
        server.node.state.add(f"m{i % 7}", f"r{i}", f"10.0.0.{i % 50}", 10)
    body, turns = served_between_steps(server, "/v1/replica/snapshot")
    assert turns >= count // CHUNK  # a chunk per turn, never the whole walk in one
    lines = body.splitlines()
    end = json.loads(lines[-1])
    assert end["end"] is True
    records = [json.loads(line) for line in lines if line.startswith(b'["r"')]
    # Every request there when the snapshot started is in it, once; the
    # gateway's adds made meanwhile may or may not be.
    ids = [r[1] for r in records]
    assert len(ids) == len(set(ids)) == end["requests"]
    assert {f"r{i}" for i in range(count)} <= set(ids) <= {f"r{i}" for i in range(count)} | {
        f"g{t}" for t in range(turns)}


def test_a_digest_of_many_clusters_is_built_while_other_requests_are_served():
    server = Server()
    for i in range(20_000):
        server.node.state.add(f"model-{i}", f"r{i}", "10.0.0.1", 1)
    expected = digests(server.node.state)
    body, turns = served_between_steps(server, "/v1/replica/digest")
    assert turns > 1
    data = json.loads(body)["data"]
    assert data["time"] == 1_700_000_000 * 10**9
    # The clusters there when the poll arrived, as they were (the gateway's
    # adds went to another cluster), and the gateway's own cluster if the
    # walk reached it.
    clusters = data["clusters"]
    live = clusters.pop("live", None)
    assert clusters == expected
    assert live is None or live[0] >= 1


def test_the_digest_is_the_same_bytes_as_one_json_encoding_of_the_digests():
    """The wire format (docs/compatibility.md): compact JSON, clusters in the
    state's order, names in any characters."""
    clock = clocked()
    node = build_node(clock, registry=CollectorRegistry())
    names = ["plain", 'quote"and\\slash', "ünïcödé-模型", "tab\tnewline\n", "emoji-\U0001F600"]
    for i, name in enumerate(names * 3):
        node.state.add(name, f"r{i}", f"10.0.0.{i}", 5)
    node.state.delete("r0")
    for budget in (1.0, 0):  # one step, and the smallest slices
        pending = []
        view = DigestRender(node, lambda steps: pending.append(steps) or task.cooperate(iter(())), budget=budget)
        result = view.get()
        if pending:
            for _ in pending.pop():
                pass
            result = view._result
        assert b"".join(result.pieces) == _encode({"time": int(clock.seconds() * 1e9),
                                         "clusters": digests(node.state)}).encode("utf-8")


def test_polls_arriving_during_a_digest_build_share_it():
    server = Server()
    for i in range(5000):
        server.node.state.add(f"model-{i}", f"r{i}", "10.0.0.1", 1)
    first, first_transport = server.connect()
    second, second_transport = server.connect()
    first.dataReceived(request("GET", "/v1/replica/digest"))
    second.dataReceived(request("GET", "/v1/replica/digest"))
    while server.turns.run():
        pass
    assert server.api.views.digest.builds == 1
    (_, a), = responses(first_transport.value())
    (_, b), = responses(second_transport.value())
    assert json.loads(a)["data"] == json.loads(b)["data"]


def test_snapshot_lines_are_the_encoders_own():
    rng = random.Random(3)
    alphabet = ['"', "\\", "\n", "\x00", "\x7f", "é", "模", "\U0001F600", "a", "/", "\u2028"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 8)))
        record = (text, text[::-1] or "c", "10.0.0.1", rng.randrange(2**31), rng.random() < 0.5,
                  rng.choice([None, rng.randrange(2**40)]))
        assert record_line(record) == _encode(record_entry(record)) + "\n"
        full = record[:5] + (rng.randrange(2**40), rng.randrange(2**31), rng.choice([None, text]))
        assert record_line(full) == _encode(record_entry(full)) + "\n"
        assert tombstone_line(text, 2, 17) == _encode(["t", text, 2, 17]) + "\n"


def _random_change(source, rng, step):
    """A client's change on ``source``: a new add, a delete or a prompt delete
    of a request it holds (or held), an add of a deleted one."""
    roll = rng.random()
    held = f"req-{rng.randrange(3000)}"
    if roll < 0.35:
        source.add(f"new-{step}-{rng.randrange(10**6)}", cluster=f"model-{rng.randrange(3)}",
                   ip=f"10.0.{rng.randrange(7)}.{rng.randrange(5)}", prompt_length=rng.randrange(5000))
    elif roll < 0.6:
        source.delete(held)
    elif roll < 0.8:
        source.delete_prompt(held)
    elif roll < 0.9:
        source.add(held, cluster="model-1", ip="10.0.1.1", prompt_length=7)  # deleted or live: no change
    else:
        source.delete_prompt(f"prompt-first-{step}")


def test_a_snapshot_taken_while_the_state_changes_then_replayed_from_its_position_gives_exact_counts():
    for seed in range(4):
        rng = random.Random(seed)
        clock = clocked()
        source = LocalNode(clock)
        log = ReplicationLog(clock)
        source.node.log_position = log.position
        # The replication log gets every client change, as in a process.
        source.node.event_listeners.append(lambda event_type, event, trace_id: log.append(event_type, event))
        fill(source, 3000, rng)
        newcomer = build_node(clock, registry=CollectorRegistry())
        merger = SnapshotMerger(newcomer)
        for step, chunk in enumerate(state_chunks(source.node)):
            for line in chunk.splitlines():
                merger.line(line)
            for _ in range(rng.randrange(0, 30)):  # between two chunks: the gateways go on
                _random_change(source, rng, step)
        assert merger.complete and merger.invalid == 0
        log_id, offset = merger.position
        assert log_id == log.log_id
        # What was appended from the header's offset on is replayed (the
        # stream resumes there): some of it is already in the snapshot.
        assert log.end > offset  # changes were made during the walk
        events, rejected, first = decode_entries(log.frame(offset, log.end), log.end - offset)
        assert rejected == 0, first
        newcomer.apply_frame(events)
        state, expected = newcomer.state, source.state
        assert state.request_count == expected.request_count
        assert {n: (c.live, c.digest) for n, c in state.clusters.items() if c.live} == \
            {n: (c.live, c.digest) for n, c in expected.clusters.items() if c.live}
        view = {name: sorted((e.ip, e.queued, e.prompt, e.prefill) for e in c.engines.values())
                for name, c in state.clusters.items()}
        assert view == {name: sorted((e.ip, e.queued, e.prompt, e.prefill) for e in c.engines.values())
                        for name, c in expected.clusters.items()}
        for request_id, *_ in expected.iter_requests():
            assert state.request_state(request_id) == expected.request_state(request_id)


def test_a_snapshot_of_a_reset_engine_releases_its_requests_a_chunk_at_a_time():
    clock = clocked()
    node = build_node(clock, registry=CollectorRegistry())
    for i in range(5 * CHUNK):
        node.apply(EVENT_ADD, LoadAdd(("m", f"r{i}", "10.0.0.1", 100, None)), None, ORIGIN_PEER)
    node.apply(EVENT_ADD, LoadAdd(("m", "other", "10.0.0.2", 100, None)), None, ORIGIN_PEER)
    node.state.reset_engine("m", "10.0.0.1")
    chunks = list(state_chunks(node))
    released = [chunk.count(b'["t",') for chunk in chunks]
    assert sum(released) == 5 * CHUNK
    assert max(released) <= CHUNK  # each release is counted in its chunk's work
    node.apply(EVENT_DELETE, LoadDelete(("other", None)), None, ORIGIN_PEER)
    node.apply(EVENT_PROMPT_DELETE, LoadDelete(("r1", None)), None, ORIGIN_PEER)
    assert node.state.request_count == 0
