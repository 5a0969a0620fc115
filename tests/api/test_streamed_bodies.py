"""Big bodies (``/metrics``, ``/v1/load/overview``, ``/v1/node/status``) are
written in the pieces they were built in, never joined (``endpoint.Pieces``):
over a real socket on loopback, read slowly so that the connection's
back-pressure pauses the writer, they are byte-identical to the joined body
(the envelope around it, as ``envelope.ok_body_raw`` writes it), valid JSON
(or valid exposition format), with their Content-Length; a client that goes
away in the middle of one leaves the node serving."""

import json
import socket
import time

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock

from metacenter.api import endpoint, envelope
from metacenter.api.endpoint import JOIN_AT_MOST, Pieces
from metacenter.api.server import MetacenterAPI
from metacenter.api.site import MetacenterSite
from metacenter.runtime.node import build_node
from metacenter.runtime.turns import chunk_per_turn

CLUSTERS = 6000
TRACE = "11111111-2222-4333-8444-555555555555"


def _fetch(port, path, slow=True, stop_after=None):
    """(status line, headers, body) of one GET on a fresh connection, read in
    small slices with pauses (the node's buffer fills: it must pause)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: node\r\nTraceId: {TRACE}\r\nConnection: close\r\n\r\n".encode())
        chunks, received = [], 0
        while True:
            chunk = s.recv(16384)
            if not chunk:
                break
            chunks.append(chunk)
            received += len(chunk)
            if stop_after is not None and received >= stop_after:
                return None  # closes the connection in the middle of the body
            if slow and len(chunks) % 16 == 0:
                time.sleep(0.005)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    if headers.get("transfer-encoding") == "chunked":  # Klein answers small bodies so
        out = []
        while True:
            size, _, body = body.partition(b"\r\n")
            if not int(size, 16):
                break
            out.append(body[:int(size, 16)])
            body = body[int(size, 16) + 2:]
        body = b"".join(out)
    return status, headers, body


class _Node:
    def __init__(self, through_klein):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.node = build_node(self.clock, cooperate=chunk_per_turn(reactor).cooperate)
        for c in range(CLUSTERS):
            self.node.state.add(f"model-{c}", f"r-{c}", f"10.0.{c // 256}.{c % 256}", 100 + c, None, 7)
        self.api = MetacenterAPI(self.node, self.node.metrics)
        resource = self.api.app.resource() if through_klein else self.api.resource()
        self.site = MetacenterSite(resource, max_body=65536, reactor=reactor, metrics=self.node.metrics)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")

    def fetch(self, path, **kwargs):
        return threads.deferToThread(_fetch, self.port.getHost().port, path, **kwargs)

    def joined(self, render):
        """The body a render builds, joined (what the node wrote before)."""
        return defer.maybeDeferred(render.get).addCallback(lambda pieces: b"".join(pieces.pieces))


@pytest.fixture(params=["routed", "klein"])
def node(request):
    n = _Node(through_klein=request.param == "klein")
    yield n
    n.port.stopListening()


@pytest.fixture
def pauses(monkeypatch):
    """How often the writer of pieces was paused by the connection."""
    count = [0]
    original = endpoint._PiecesWriter.pauseProducing

    def pause(self):
        count[0] += 1
        return original(self)

    monkeypatch.setattr(endpoint._PiecesWriter, "pauseProducing", pause)
    return count


@pytest_twisted.inlineCallbacks
def test_the_overview_and_status_are_byte_identical_to_the_joined_envelope(node, pauses):
    for path, render in (("/v1/load/overview", node.api.views.overview), ("/v1/node/status", node.api.views.status)):
        data = yield node.joined(render)
        status, headers, body = yield node.fetch(path)
        assert status.startswith("HTTP/1.1 200")
        assert len(data) > JOIN_AT_MOST  # so it went out in pieces
        assert "transfer-encoding" not in headers and int(headers["content-length"]) == len(body)
        assert body == envelope.ok_body_raw(data, TRACE)
        answer = json.loads(body)
        assert answer["status"] == "OK" and answer["trace_id"] == TRACE
    assert len(answer["data"]["digest"]) == CLUSTERS  # the status, read last: every cluster
    assert pauses[0] > 0  # the transport's buffer filled: the writer waited for it to drain


@pytest_twisted.inlineCallbacks
def test_the_metrics_are_the_joined_body_in_the_exposition_format(node, pauses):
    expected = yield node.joined(node.api.views.metrics)
    status, headers, body = yield node.fetch("/metrics")
    assert status.startswith("HTTP/1.1 200") and headers["content-type"].startswith("text/plain")
    assert int(headers["content-length"]) == len(body) > JOIN_AT_MOST
    # The registry's own series (process, HTTP counts) move between two
    # scrapes; the per-cluster and per-engine ones, built from the state, do not.
    start = b"# HELP model_engine_count"
    assert body[body.index(start):] == expected[expected.index(start):]
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    assert len(families["queued_num"].samples) == CLUSTERS
    assert "metacenter_reactor_lag_seconds" in families and "process_resident_memory_bytes" in families
    assert pauses[0] > 0


@pytest_twisted.inlineCallbacks
def test_a_client_gone_in_the_middle_of_a_body_leaves_the_node_serving(node):
    gone = yield node.fetch("/metrics", slow=False, stop_after=200_000)
    assert gone is None
    status, _, body = yield node.fetch("/v1/load/stats?cluster=model-1", slow=False)
    assert status.startswith("HTTP/1.1 200") and json.loads(body)["data"][0]["queued_req_num"] == 1
    status, _, body = yield node.fetch("/v1/load/overview", slow=False)
    assert status.startswith("HTTP/1.1 200") and len(json.loads(body)["data"]["clusters"]) == CLUSTERS


def test_small_pieces_are_joined_and_written_at_once():
    class Request:
        headers = {}

        def setHeader(self, name, value):
            self.headers[name] = value

    request = Request()
    assert endpoint._write_pieces(request, [b"a", b"bc", b""]) == b"abc"
    assert request.headers == {b"Content-Length": b"3"}
    assert Pieces([b"x"]).content_type is None
