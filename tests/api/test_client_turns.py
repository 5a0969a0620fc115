"""The client routes whose work grows with the body (``POST /v1/load/refresh``,
``/v1/cache/save``, ``/v1/cache/query``) work in steps, one per reactor
turn, while other gateways are served in between (issue 11); their answers
and resulting state are what one go gives (a second node fed the same body
with an unbounded step budget), a small body is answered in the turn it
arrived, and a bad body is the one-go 400 with nothing changed.

A node's Site on a ``task.Clock`` over ``StringTransport``s, its cooperator
driven one turn at a time (``harness.Turns``), each step's budget 0 (the
smallest step the job allows, whatever the machine's speed).
"""

import json

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from harness import Turns, http_responses, served_in_between as harness_served_in_between
from metacenter.api import bodies
from metacenter.api.envelope import ApiError
from metacenter.api.server import MetacenterAPI
from metacenter.api.site import MetacenterSite
from metacenter.core.errors import InvalidInput
from metacenter.core.events import EVENT_CACHE_SAVE, EVENT_REFRESH
from metacenter.runtime.node import build_node
from metacenter.runtime.turns import _one_step

EPOCH = 1_700_000_000
UNBOUNDED = float("inf")


class Node:
    """A node served over StringTransports; its big jobs run one step per
    ``turns.run()``; ``events`` are what it replicates."""

    def __init__(self, budget=0.0, engine_blocks=None):
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.node = build_node(self.clock, cache_engine_blocks=engine_blocks)
        self.turns = Turns()
        self.node.cooperate = task.Cooperator(scheduler=self.turns.schedule,
                                              terminationPredicateFactory=_one_step).cooperate
        self.api = MetacenterAPI(self.node, self.node.metrics)
        self.api.step_budget = budget
        self.site = MetacenterSite(self.api.resource(), max_body=4 * 1024 * 1024, reactor=self.clock,
                                   metrics=self.node.metrics)
        self.events = []
        self.node.event_listeners.append(lambda event_type, event, trace_id: self.events.append((event_type, event)))

    def connect(self):
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        channel.makeConnection(transport)
        return channel, transport

    def send(self, path, obj=None, raw=None):
        channel, transport = self.connect()
        body = raw if raw is not None else json.dumps(obj).encode()
        channel.dataReceived(request("POST", path, body))
        return transport

    def finish(self):
        turns = 0
        while self.turns.run():
            turns += 1
        return turns

    def state(self):
        """The requests and the KV-cache index, the gateways' cluster ``live`` aside."""
        state = self.node.state
        return (sorted(r for r in state.iter_requests() if r[1] != "live"),
                list(self.node.cache.iter_snapshot()), dict(self.node.cache.evictions))


def request(method, path, body):
    head = f"{method} {path} HTTP/1.1\r\nHost: node\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def answered(transport):
    found = http_responses(transport.value())
    return (found[0][0], json.loads(found[0][2])) if found else None


def served_in_between(node, transport):
    """Turns the cooperator until ``transport`` is answered, a gateway's add
    answered before every turn (``harness.served_in_between``). -> turns."""
    return harness_served_in_between(node, transport, answered, request)



def at_once(node, transport):
    """The answer, given in the turn the request arrived, nothing left to run."""
    found = answered(transport)
    assert found is not None
    assert not node.turns.run()
    return found


def data(found):
    status, answer = found
    assert status == 200, answer
    return answer["data"]


def pair(engine_blocks=None):
    """(stepped node, one-go node)."""
    return Node(0.0, engine_blocks), Node(UNBOUNDED, engine_blocks)


def with_requests(nodes, count):
    for node in nodes:
        for i in range(count):
            node.node.state.add("m", f"r{i}", f"10.0.0.{i % 7 + 1}", 5)
        node.clock.advance(30)


# -- refresh ---------------------------------------------------------------------------


def test_a_big_refresh_is_applied_over_turns_with_the_one_go_answer_and_state():
    stepped, one_go = pair()
    with_requests((stepped, one_go), 3000)
    # Repeats count once, unknown ids are ignored.
    ids = [f"r{i}" for i in range(0, 3000, 2)] + ["nobody", "r0", "r2"] + [f"r{i}" for i in range(1, 2000, 2)]
    transport = stepped.send("/v1/load/refresh", {"request_ids": ids})
    turns = served_in_between(stepped, transport)
    expected = at_once(one_go, one_go.send("/v1/load/refresh", {"request_ids": ids}))
    assert turns > 10
    assert data(answered(transport)) == data(expected) == {"refreshed": 2500}
    assert stepped.state() == one_go.state()
    # Every step is its own refresh event; together the distinct ids, in order.
    refreshes = [event for event_type, event in stepped.events if event_type == EVENT_REFRESH]
    assert len(refreshes) > 1
    assert [i for event in refreshes for i in event.request_ids] == list(dict.fromkeys(ids))
    assert [e for e in one_go.events if e[0] == EVENT_REFRESH] == [(EVENT_REFRESH, (tuple(ids),))]


def test_a_small_refresh_is_answered_in_the_turn_it_arrived():
    node = Node(0.0)
    with_requests((node,), 10)
    found = at_once(node, node.send("/v1/load/refresh", {"request_ids": ["r1", "r2", "r1", "x", "r3"]}))
    assert data(found) == {"refreshed": 3}
    assert node.events == [(EVENT_REFRESH, (("r1", "r2", "r1", "x", "r3"),))]


def refresh_reason(obj):
    try:
        bodies.refresh(obj)
    except InvalidInput as e:
        return e.reason
    raise AssertionError("valid")


@pytest.mark.parametrize("bad", [7, "", True, None, "x" * 2000], ids=["int", "empty", "true", "null", "too long"])
def test_a_bad_id_deep_in_a_big_refresh_is_the_one_go_400_and_nothing_is_refreshed(bad):
    node = Node(0.0)
    with_requests((node,), 3000)
    before = node.state()
    ids = [f"r{i}" for i in range(3000)]
    ids[2345] = bad
    transport = node.send("/v1/load/refresh", {"request_ids": ids})
    turns = node.finish()
    status, answer = answered(transport)
    assert status == 400 and answer["error"]["reason"] == refresh_reason({"request_ids": ids})
    assert "2345" in answer["error"]["reason"] or bad == "x" * 2000
    assert node.state() == before and node.events == []
    assert turns > 1  # found in steps


@pytest.mark.parametrize("obj", [{}, {"request_ids": "r1"}, {"request_ids": ["r"] * 10001}])
def test_a_refresh_refused_whole_is_the_one_go_400(obj):
    node = Node(0.0)
    transport = node.send("/v1/load/refresh", obj)
    node.finish()
    status, answer = answered(transport)
    assert status == 400 and answer["error"]["reason"] == refresh_reason(obj)
    assert node.events == []


# -- cache save --------------------------------------------------------------------------


@pytest.mark.parametrize("engine_blocks", [None, 4000])
def test_a_big_save_is_applied_over_turns_into_exactly_the_one_go_index(engine_blocks):
    stepped, one_go = pair(engine_blocks)
    hashes = list(range(10**12, 10**12 + 6000))
    for node in (stepped, one_go):
        # Blocks already held (some re-touched by the big save), another engine sharing a prefix.
        node.node.cache.save("m", "10.0.0.1", list(range(10**12 + 5000, 10**12 + 7000)) + [5, 6, 7])
        node.node.cache.save("m", "10.0.0.2", hashes[:3000])
        node.clock.advance(10)
    body = {"cluster": "m", "ip": "10.0.0.1", "prompt_hash": hashes + hashes[:100]}  # a repeat too
    transport = stepped.send("/v1/cache/save", body)
    turns = served_in_between(stepped, transport)
    expected = at_once(one_go, one_go.send("/v1/cache/save", body))
    assert turns > 10
    assert data(answered(transport)) is None and data(expected) is None
    assert stepped.state() == one_go.state()
    assert stepped.node.cache.block_count == one_go.node.cache.block_count
    # The whole save is replicated once.
    saves = [e for e in stepped.events if e[0] == EVENT_CACHE_SAVE]
    assert saves == [e for e in one_go.events if e[0] == EVENT_CACHE_SAVE]
    assert len(saves) == 1 and list(saves[0][1][1]) == body["prompt_hash"]


def test_a_save_whose_engine_is_reset_meanwhile_starts_over_as_if_after_the_reset():
    stepped, one_go = pair()
    hashes = list(range(1, 5001))
    body = {"cluster": "m", "ip": "10.0.0.1", "prompt_hash": hashes}
    for node in (stepped, one_go):
        node.node.cache.save("m", "10.0.0.1", [9, 8])
    transport = stepped.send("/v1/cache/save", body)
    assert answered(transport) is None and stepped.turns.run()
    reset = stepped.connect()
    reset[0].dataReceived(request("DELETE", "/v1/load/engine", b'{"cluster": "m", "ip": "10.0.0.1"}'))
    assert answered(reset[1])[0] == 200
    stepped.finish()
    assert data(answered(transport)) is None
    # The order the peers get them in: the reset, then the save.
    one_go.node.cache.forget_engine("m", "10.0.0.1")
    at_once(one_go, one_go.send("/v1/cache/save", body))
    assert stepped.node.cache.engine_block_count("m", "10.0.0.1") == 5000
    assert stepped.state()[1] == one_go.state()[1]


def test_a_small_save_is_answered_in_the_turn_it_arrived():
    node = Node(0.0)
    assert data(at_once(node, node.send("/v1/cache/save", {"cluster": "m", "ip": "10.0.0.1",
                                                           "prompt_hash": list(range(1, 40))}))) is None
    assert node.node.cache.engine_block_count("m", "10.0.0.1") == 39


def save_reason(obj):
    try:
        bodies.parse_cache_save(obj)
    except InvalidInput as e:
        return e.reason
    raise AssertionError("valid")


@pytest.mark.parametrize("damage", ["negative", "true", "float", "string", "too big", "no ip", "bad ip",
                                    "no cluster", "empty", "not an array", "too many"])
def test_a_bad_big_save_is_the_one_go_400_and_the_index_is_unchanged(damage):
    node = Node(0.0)
    node.node.cache.save("m", "10.0.0.1", [1, 2, 3])
    before = node.state()
    hashes = list(range(10, 5010))
    obj = {"cluster": "m", "ip": "10.0.0.1", "prompt_hash": hashes}
    bad = {"negative": -1, "true": True, "float": 1.5, "string": "12", "too big": 2**64}
    if damage in bad:
        hashes[4321] = bad[damage]
    elif damage == "no ip":
        del obj["ip"]
    elif damage == "bad ip":
        obj["ip"] = "10.0.0.300"
    elif damage == "no cluster":
        del obj["cluster"]
    elif damage == "empty":
        obj["prompt_hash"] = []
    elif damage == "not an array":
        obj["prompt_hash"] = {"a": 1}
    elif damage == "too many":
        obj["prompt_hash"] = [1] * 100001
    transport = node.send("/v1/cache/save", obj)
    node.finish()
    status, answer = answered(transport)
    assert status == 400 and answer["error"]["reason"] == save_reason(obj)
    if damage in bad:
        assert "item 4321" in answer["error"]["reason"]
    assert node.state() == before and node.events == []


@pytest.mark.parametrize("damage", ["truncated", "trailing comma", "garbage after", "too many digits", "array"])
def test_a_malformed_big_body_is_the_one_go_400(damage):
    text = json.dumps({"cluster": "m", "ip": "10.0.0.1", "prompt_hash": list(range(10, 5010))})
    raw = {
        "truncated": text[:-40],
        "trailing comma": text[:-2] + ",]}",
        "garbage after": text + " x",
        "too many digits": text[:-2] + "," + "9" * 4400 + "]}",
        "array": "[" + text + "]",
    }[damage].encode()
    for path in ("/v1/cache/save", "/v1/cache/query", "/v1/load/refresh"):
        node = Node(0.0)
        transport = node.send(path, raw=raw)
        node.finish()
        status, answer = answered(transport)
        with pytest.raises(ApiError) as refused:
            bodies.parse_json_object(raw)
        assert status == 400 and answer["error"]["reason"] == refused.value.reason
        assert node.events == [] and not list(node.node.cache.iter_snapshot())


# -- cache query ---------------------------------------------------------------------------


def test_a_big_query_is_walked_over_turns_with_the_one_go_answer():
    stepped, one_go = pair()
    hashes = list(range(10**15, 10**15 + 9000))
    for node in (stepped, one_go):
        for k, ip in enumerate(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]):
            node.node.cache.save("m", ip, hashes[:2000 * (k + 1)])
        node.node.cache.save("m", "10.0.0.5", hashes[1:])  # not the first block: no match
    body = {"cluster": "m", "prompt_hash": hashes, "topk": 3}
    transport = stepped.send("/v1/cache/query", body)
    turns = served_in_between(stepped, transport)
    expected = at_once(one_go, one_go.send("/v1/cache/query", body))
    assert turns > 10
    assert data(answered(transport)) == data(expected) == {"locations": [
        {"ip": "10.0.0.4", "length": 8000}, {"ip": "10.0.0.3", "length": 6000}, {"ip": "10.0.0.2", "length": 4000}]}
    assert stepped.node.cache.queries == one_go.node.cache.queries == 1


def test_an_engine_reset_during_a_query_walk_is_no_error():
    node = Node(0.0)
    hashes = list(range(1, 6001))
    node.node.cache.save("m", "10.0.0.1", hashes[:1000])
    node.node.cache.save("m", "10.0.0.2", hashes)
    transport = node.send("/v1/cache/query", {"cluster": "m", "prompt_hash": hashes})
    assert answered(transport) is None and node.turns.run()
    node.node.cache.forget_engine("m", "10.0.0.2")
    node.finish()
    assert data(answered(transport)) == {"locations": [{"ip": "10.0.0.1", "length": 1000}]}


def test_a_small_query_is_answered_in_the_turn_it_arrived():
    node = Node(0.0)
    node.node.cache.save("m", "10.0.0.1", [1, 2, 3])
    found = at_once(node, node.send("/v1/cache/query", {"cluster": "m", "prompt_hash": [1, 2, 3, 4]}))
    assert data(found) == {"locations": [{"ip": "10.0.0.1", "length": 3}]}


def query_reason(obj):
    try:
        bodies.parse_cache_query(obj)
    except InvalidInput as e:
        return e.reason
    raise AssertionError("valid")


@pytest.mark.parametrize("damage", ["bad hash", "topk 0", "topk true", "no cluster"])
def test_a_bad_big_query_is_the_one_go_400_and_counts_no_query(damage):
    node = Node(0.0)
    hashes = list(range(10, 5010))
    node.node.cache.save("m", "10.0.0.1", hashes)
    obj = {"cluster": "m", "prompt_hash": hashes}
    if damage == "bad hash":
        hashes = hashes[:]
        hashes[3000] = -5
        obj["prompt_hash"] = hashes
    elif damage == "no cluster":
        del obj["cluster"]
    else:
        obj["topk"] = 0 if damage == "topk 0" else True
    transport = node.send("/v1/cache/query", obj)
    node.finish()
    status, answer = answered(transport)
    assert status == 400 and answer["error"]["reason"] == query_reason(obj)
    assert node.node.cache.queries == 0


# -- route score ----------------------------------------------------------------------------


def raw_data(transport):
    """The answer's bytes, its trace id aside."""
    status, _, body = http_responses(transport.value())[0]
    assert status == 200
    return body.rsplit(b',"trace_id"', 1)[0]


def score_nodes(ips):
    nodes = pair()
    for node in nodes:
        for k, ip in enumerate(ips[:40]):
            for r in range(k % 5):
                node.node.state.add("m", f"q{k}-{r}", ip, 100 * k)
        node.node.cache.save("m", ips[7], list(range(1, 11)))
        node.node.cache.save("m", ips[9], list(range(1, 6)))
    return nodes


def test_a_big_score_is_worked_over_turns_with_the_one_go_bytes():
    ips = [f"10.1.{i // 256}.{i % 256}" for i in range(3000)] + ["10.1.0.7"]  # a repeat counts once
    stepped, one_go = score_nodes(ips)
    body = {"cluster": "m", "prompt_hash": list(range(1, 11)), "ips": ips}
    transport = stepped.send("/v1/route/score", body)
    turns = served_in_between(stepped, transport)
    expected = one_go.send("/v1/route/score", body)
    at_once(one_go, expected)
    assert turns > 10
    assert raw_data(transport) == raw_data(expected)
    rows = data(answered(transport))
    assert len(rows) == 3000 and rows[0]["ip"] == "10.1.0.7" and rows[0]["cache_length"] == 10


def test_a_small_score_is_answered_in_the_turn_it_arrived():
    ips = [f"10.1.0.{i}" for i in range(1, 13)]
    node, one_go = score_nodes(ips)
    body = {"cluster": "m", "prompt_hash": [1, 2, 3], "ips": ips}
    rows = data(at_once(node, node.send("/v1/route/score", body)))
    assert rows == data(at_once(one_go, one_go.send("/v1/route/score", body)))
    assert rows[0]["ip"] == "10.1.0.8" and len(rows) == 12


def score_reason(obj):
    try:
        bodies.parse_route_score(obj)
    except InvalidInput as e:
        return e.reason
    raise AssertionError("valid")


@pytest.mark.parametrize("damage", ["int ip", "bad ip", "long ip", "too many", "not an array", "bad hash"])
def test_a_bad_big_score_is_the_one_go_400(damage):
    ips = [f"10.1.{i // 256}.{i % 256}" for i in range(3000)]
    node = score_nodes(ips)[0]
    obj = {"cluster": "m", "prompt_hash": list(range(1, 11)), "ips": ips}
    if damage == "int ip":
        ips[2500] = 10
    elif damage == "bad ip":
        ips[2500] = "10.1.300.1"
    elif damage == "long ip":
        ips[2500] = "1" * 5000
    elif damage == "too many":
        obj["ips"] = ips * 4
    elif damage == "not an array":
        obj["ips"] = "10.0.0.1"
    else:
        obj["prompt_hash"] = [1, -2]
    transport = node.send("/v1/route/score", obj)
    node.finish()
    status, answer = answered(transport)
    assert status == 400 and answer["error"]["reason"] == score_reason(obj)
