"""An in-process node for API tests: the real Klein resource driven through
treq's StubTreq, with the state on a task.Clock."""

import json

import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor, task
from twisted.internet.base import DelayedCall
from twisted.internet.task import Clock

from metacenter.api.server import MetacenterAPI
from metacenter.runtime.node import build_node


class Harness:
    def __init__(self, request_expire=660.0, through_klein=False, engine_blocks=16384):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.node = build_node(self.clock, request_expire=request_expire, cache_engine_blocks=engine_blocks)
        self.state, self.metrics, self.cache = self.node.state, self.node.metrics, self.node.cache
        self.api = MetacenterAPI(self.node, self.metrics)
        # The node serves through RoutingResource (Klein's table, dispatched
        # directly); the same tests run through Klein's own resource to prove
        # the two behave identically.
        self.treq = StubTreq(self.api.app.resource() if through_klein else self.api.resource())
        self.events = []
        self.node.event_listeners.append(lambda *event: self.events.append(event))

    @pytest_twisted.inlineCallbacks
    def call(self, method, path, body=None, raw=None, headers=None):
        """(response, body bytes). A body built over several reactor turns
        (api/views.py: /metrics, the overview, the status) is answered
        later: StubTreq is flushed every turn until the answer is in."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        d = self.treq.request(method, "http://node" + path, data=data, headers=headers or {})
        d.addCallback(lambda response: response.content().addCallback(lambda content: (response, content)))
        done = []
        d.addBoth(lambda result: done.append(result) or result)
        while not done:
            yield task.deferLater(reactor, 0, self.treq.flush)
        return (yield d)

    def call_json(self, method, path, body=None, raw=None, headers=None):
        d = self.call(method, path, body, raw, headers)
        d.addCallback(lambda rc: (rc[0], json.loads(rc[1])))
        return d

    def snapshot(self):
        """Everything a rejected request must leave untouched."""
        return (
            {name: self.state.cluster_load(name) for name in self.state.clusters},
            self.state.request_count,
            self.state.tombstone_count,
            len(self.events),
            list(self.cache.iter_snapshot()),
            self.cache.queries,
        )


class Turns:
    """The reactor turns in which a node's cooperator runs the steps of big
    jobs, taken one at a time by ``run()`` (``task.Clock.advance`` would
    also run every step scheduled meanwhile). Use ``schedule`` as a
    ``task.Cooperator``'s scheduler."""

    def __init__(self):
        self._pending = []

    def schedule(self, work):
        call = DelayedCall(0, work, (), {}, lambda c: self._pending.remove(c), lambda c: None, seconds=lambda: 0)
        self._pending.append(call)
        return call

    def run(self):
        """One turn: the steps scheduled before it; False if there were none."""
        calls, self._pending = self._pending, []
        for call in calls:
            call.called = 1
            call.func()
        return bool(calls)


def http_responses(raw):
    """The complete HTTP/1.1 responses in the bytes ``raw`` (a
    ``StringTransport``'s value): [(status, headers dict with lower-case
    names, body)], the body de-chunked; an incomplete last one is left out."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            break
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
        status = int(status_line.split()[1])
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                if not size_line:
                    return out  # incomplete
                size = int(size_line, 16)
                if size == 0:
                    rest = rest[2:]
                    break
                body, rest = body + rest[:size], rest[size + 2:]
        else:
            length = int(headers.get("content-length", 0))
            if len(rest) < length:
                return out
            body, rest = rest[:length], rest[length:]
        out.append((status, headers, body))
        raw = rest
    return out


def served_in_between(node, transport, answered, request):
    """Turns ``node``'s cooperator (``node.turns``, a ``Turns``) until
    ``transport`` is answered (``answered(transport)`` not None); before
    every turn a gateway's add (``request(method, path, body)`` -> bytes)
    is sent on a connection of its own (``node.connect()``) and must be
    answered at once. -> how many turns it took."""
    gateway, gateway_transport = node.connect()
    assert answered(transport) is None  # not done in the turn it arrived
    turns = 0
    while answered(transport) is None:
        gateway.dataReceived(request("POST", "/v1/load/stats", json.dumps(
            {"cluster": "live", "request_id": f"gateway-{turns}", "ip": "10.0.0.9"}).encode()))
        assert len(http_responses(gateway_transport.value())) == turns + 1
        assert node.turns.run()
        turns += 1
    assert all(status == 200 for status, _, _ in http_responses(gateway_transport.value()))
    return turns
