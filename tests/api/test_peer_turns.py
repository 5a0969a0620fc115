"""The peer routes that read big bodies (``POST /v1/replica/batch``,
``/repair``, ``/buckets``) work in steps, one per reactor turn, while other
requests are served in between; their answers are what the one-turn
versions answered, and a bad body is still a 400 (with ``json.loads``'s own
reason) before anything is applied.

A node's Site on a ``task.Clock`` over ``StringTransport``s, its cooperator
driven one turn at a time (``harness.Turns``), each step's budget 0 (the
smallest step the job allows, whatever the machine's speed).
"""

import json
import random

import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from harness import Turns, http_responses, served_in_between as harness_served_in_between
from metacenter import jsonsteps
from metacenter.jsonsteps import CHECK_EVERY
from metacenter.api import bodies, envelope
from metacenter.api.envelope import ApiError
from metacenter.api.server import MetacenterAPI
from metacenter.api.site import MetacenterSite
from metacenter.cluster.antientropy import SCAN_CHUNK, encode_buckets, reconcile
from metacenter.cluster.snapshot import parse_record, parse_tombstone
from metacenter.core.digests import BucketDigests
from metacenter.core.errors import InvalidInput
from metacenter.core.events import EVENT_CACHE_SAVE, ORIGIN_PEER
from metacenter.runtime.node import build_node
from metacenter.runtime.turns import _one_step

EPOCH = 1_700_000_000
TRACE = "peer-trace"


class Node:
    """A node served over StringTransports; its big jobs run one step per
    ``turns.run()``."""

    def __init__(self, budget=0.0, max_body=4 * 1024 * 1024):
        self.clock = Clock()
        self.clock.advance(EPOCH)
        self.node = build_node(self.clock)
        self.turns = Turns()
        self.node.cooperate = task.Cooperator(scheduler=self.turns.schedule,
                                              terminationPredicateFactory=_one_step).cooperate
        self.api = MetacenterAPI(self.node, self.node.metrics)
        self.api.step_budget = budget
        self.site = MetacenterSite(self.api.resource(), max_body=max_body, reactor=self.clock,
                                   metrics=self.node.metrics)
        # Every event a peer's body applies, in order (listeners hear only client events).
        self.applied = []
        apply, save_cache = self.node.apply, self.node.save_cache

        def recorded_apply(event_type, event, trace_id=None, origin=None):
            self.applied.append((event_type, event, trace_id))
            return apply(event_type, event, trace_id, origin)

        def recorded_save(event, trace_id=None, origin=None):
            self.applied.append((EVENT_CACHE_SAVE, event, trace_id))
            return save_cache(event, trace_id, origin)

        self.node.apply, self.node.save_cache = recorded_apply, recorded_save

    def connect(self):
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        channel.makeConnection(transport)
        return channel, transport

    def send(self, path, body, method="POST"):
        channel, transport = self.connect()
        channel.dataReceived(request(method, path, body))
        return transport

    def finish(self):
        turns = 0
        while self.turns.run():
            turns += 1
        return turns

    def state(self, but="live"):
        """Everything a peer's body may change, the gateways' cluster ``but`` aside."""
        state = self.node.state
        # updated_time aside: its nanoseconds also count the node's other events (the gateways').
        return ({name: [{k: v for k, v in engine.items() if k != "updated_time"} for engine in state.cluster_load(name)]
                 for name in state.clusters if name != but},
                sorted(r for r in state.iter_requests() if r[1] != but),
                sorted(t for t in state.iter_tombstones() if not t[0].startswith("gateway-")),
                list(self.node.cache.iter_snapshot()))


def request(method, path, body):
    head = f"{method} {path} HTTP/1.1\r\nHost: node\r\nTraceId: {TRACE}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def responses(raw):
    """Complete HTTP responses in ``raw``: [(status, body)]."""
    return [(status, body) for status, _, body in http_responses(raw)]



def answered(transport):
    found = responses(transport.value())
    return (found[0][0], json.loads(found[0][1])) if found else None


def served_in_between(node, transport):
    """Turns the cooperator until ``transport`` is answered, a gateway's add
    answered before every turn (``harness.served_in_between``). -> (turns,
    the answer)."""
    return harness_served_in_between(node, transport, answered, request), answered(transport)



# -- the one-turn versions, as they were (the oracles) ----------------------------------


def batch_in_one_go(node, events, trace_id):
    applied = unchanged = 0
    rejected = []
    for index, item in enumerate(events):
        try:
            event_type, event = bodies.batch_event(item)
            cache_save = event_type == EVENT_CACHE_SAVE
        except InvalidInput as e:
            rejected.append({"index": index, "reason": e.reason})
            continue
        trace = item.get("trace_id") if isinstance(item.get("trace_id"), str) else trace_id
        changed = node.save_cache(event, trace, ORIGIN_PEER) if cache_save else node.apply(
            event_type, event, trace, ORIGIN_PEER)
        applied, unchanged = (applied + 1, unchanged) if changed else (applied, unchanged + 1)
    return {"applied": applied, "unchanged": unchanged, "rejected": rejected}


def repair_in_one_go(node, obj):
    rejected = 0
    for item in obj["tombstones"]:
        try:
            node.merge_tombstone(*parse_tombstone(item))
        except InvalidInput:
            rejected += 1
    answer = {"deleted": [], "prompt_deleted": [], "adopted": 0, "unresolved": 0}
    for item in obj["records"]:
        try:
            record = parse_record(item)
        except InvalidInput:
            rejected += 1
            continue
        outcome = reconcile(node, record, node.clock.seconds())
        if outcome in ("peer_delete", "peer_prompt"):
            answer["deleted" if outcome == "peer_delete" else "prompt_deleted"].append(record[0])
        elif outcome in ("adopted", "unresolved"):
            answer[outcome] += 1
    answer["rejected"] = rejected
    return answer


def batch_events(count):
    events = []
    for i in range(count):
        kind = i % 7
        if kind == 3:
            events.append({"type": "load.stats.delete", "body": {"request_id": f"r{i - 3}"}})
        elif kind == 4:
            events.append({"type": "load.stats.set", "body": {"cluster": "m", "request_id": f"bad{i}", "ip": "x"}})
        elif kind == 5:
            events.append({"type": EVENT_CACHE_SAVE, "trace_id": f"t{i}",
                           "body": {"cluster": "m", "prompt_hash": [i, i + 1], "ip": "10.0.0.2"}})
        elif kind == 6:
            events.append("not an object" if i % 2 else {"type": "load.bogus", "body": {}})
        else:
            events.append({"type": "load.stats.set", "trace_id": f"t{i}",
                           "body": {"cluster": f"m{i % 5}", "request_id": f"r{i}", "ip": f"10.0.0.{i % 9 + 1}",
                                    "prompt_length": i}})
    events.append(events[0])  # a duplicate: unchanged
    return events


# -- POST /v1/replica/batch -------------------------------------------------------------


def test_a_big_batch_is_applied_over_turns_while_gateways_are_served_with_the_same_answer():
    events = batch_events(400)
    body = json.dumps({"events": events}).encode()
    node, oracle = Node(), Node()
    turns, (status, answer) = served_in_between(node, node.send("/v1/replica/batch", body))
    assert status == 200
    assert turns >= 2 * (400 // CHECK_EVERY)  # parsed, then applied, CHECK_EVERY items a turn
    expected = batch_in_one_go(oracle.node, json.loads(body)["events"], TRACE)
    assert answer["data"] == expected
    assert expected["applied"] > 200 and expected["unchanged"] == 1 and len(expected["rejected"]) > 100
    # The same state and the same events, in the batch's order (the gateways' adds aside).
    assert len(oracle.applied) > 250
    assert [e for e in node.applied if not str(e[1][1]).startswith("gateway-")] == oracle.applied
    assert node.state() == oracle.state()
    assert node.node.state.cluster_load("live")[0]["queued_req_num"] == turns


def test_a_small_batch_is_still_answered_in_the_turn_it_arrived():
    node = Node(budget=1.0)
    transport = node.send("/v1/replica/batch", json.dumps({"events": batch_events(20)}).encode())
    status, answer = answered(transport)
    assert status == 200 and answer["data"]["applied"] > 0
    assert not node.turns.run()


@pytest.mark.parametrize("damage", ["truncated", "trailing comma", "garbage after", "too many digits",
                                    "not an array", "too many events", "not utf-8"])
def test_a_bad_big_body_is_a_400_with_the_one_go_reason_and_nothing_is_applied(damage):
    events = batch_events(300)
    text = json.dumps({"events": events})
    body = {
        "truncated": text[:-40],
        "trailing comma": text[:-2] + ",]}",
        "garbage after": text + " x",
        "too many digits": text[:-2] + ',{"type":"load.stats.set","body":{"prompt_length":' + "9" * 4400 + "}}]}",
        "not an array": json.dumps({"events": {str(i): e for i, e in enumerate(events)}}),
        "too many events": json.dumps({"events": [{}] * 10001}),
    }.get(damage, text)
    body = body.encode() if damage != "not utf-8" else text.encode()[:-30] + b"\xff" + text.encode()[-30:]
    node = Node()
    before = node.state()
    transport = node.send("/v1/replica/batch", body)
    turns = node.finish()
    status, answer = answered(transport)
    assert status == 400 and answer["error"]["code"] == 40001400
    try:
        obj = bodies.parse_json_object(body)
        reason = "field 'events' must be an array" if not isinstance(obj["events"], list) else \
            "field 'events' holds more than 10000 events"
    except ApiError as e:
        reason = e.reason
    assert answer["error"]["reason"] == reason
    assert node.state() == before and node.applied == []
    if damage not in ("not utf-8",):
        assert turns > 10  # found in steps too


def test_batches_in_flight_together_are_applied_in_the_order_they_arrived():
    node = Node()
    first = [{"type": "load.stats.set", "body": {"cluster": "m", "request_id": f"a{i}", "ip": "10.0.0.1"}}
             for i in range(200)]
    second = [{"type": "load.stats.delete", "body": {"request_id": f"a{i}"}} for i in range(200)]
    # The second is smaller and would be parsed first; it still waits for the first.
    one = node.send("/v1/replica/batch", json.dumps({"events": first, "padding": "x" * 20000}).encode())
    two = node.send("/v1/replica/batch", json.dumps({"events": second}).encode())
    node.finish()
    assert answered(one)[1]["data"]["applied"] == 200 and answered(two)[1]["data"]["applied"] == 200
    assert [e[0] for e in node.applied] == ["load.stats.set"] * 200 + ["load.stats.delete"] * 200
    assert node.node.state.request_count == 0


# -- POST /v1/replica/repair ------------------------------------------------------------


def repair_body(node):
    state = node.node.state
    for i in range(150):
        state.add("m", f"mine{i}", "10.0.0.1", 5)
    for i in range(0, 150, 3):
        state.delete(f"mine{i}")
    records = [[f"mine{i}", "m", "10.0.0.1", 5, 0, EPOCH] for i in range(150)]  # some deleted here
    records += [[f"theirs{i}", "m", "10.0.0.2", i, i % 2, EPOCH - 10] for i in range(150)]
    records += [[f"old{i}", "m", "10.0.0.2", 1, 0, EPOCH - 3600] for i in range(20)]
    records += [["bad", "m", "not an ip", 1, 0, EPOCH], "nonsense"]
    tombstones = [[f"mine{i}", 1] for i in range(1, 150, 5)] + [["x", 99], 7]
    return {"records": records, "tombstones": tombstones}


def test_a_big_repair_is_merged_over_turns_while_gateways_are_served_with_the_same_answer():
    node, oracle = Node(), Node()
    obj = repair_body(node)
    repair_body(oracle)
    turns, (status, answer) = served_in_between(node, node.send("/v1/replica/repair", json.dumps(obj).encode()))
    # CHECK_EVERY records merged a turn (a body under PARSE_IN_ONE_GO is parsed at once)
    assert status == 200 and turns >= 300 // CHECK_EVERY
    expected = repair_in_one_go(oracle.node, json.loads(json.dumps(obj)))
    assert answer["data"] == expected
    assert expected["deleted"] and expected["adopted"] and expected["unresolved"] and expected["rejected"] == 4
    assert node.state() == oracle.state()


@pytest.mark.parametrize("raw, reason", [
    (b'{"records": [[1,2,3]], "tombstones": {}}', "fields 'records' and 'tombstones' must be arrays"),
    (b'{"records": [["r", "m", "10.0.0.1", 5, 0, 1]], "tombstones": [["x", 1]]', None),
])
def test_a_bad_repair_body_is_a_400_and_nothing_is_merged(raw, reason):
    node = Node()
    before = node.state()
    transport = node.send("/v1/replica/repair", raw)
    node.finish()
    status, answer = answered(transport)
    if reason is None:
        with pytest.raises(ApiError) as refused:
            bodies.parse_json_object(raw)
        reason = refused.value.reason
    assert status == 400 and answer["error"]["reason"] == reason
    assert node.state() == before


# -- POST /v1/replica/buckets -----------------------------------------------------------


def test_buckets_are_answered_over_turns_while_gateways_are_served_with_the_same_bytes():
    node = Node()
    state = node.node.state
    for i in range(3000):
        state.add(f"c{i % 40}", f"r{i}", "10.0.0.1", 1)
    state.delete_prompt("r7")
    names = [f"c{i}" for i in range(40)] + ["nobody", "quote\"é"]
    turns, (status, answer) = served_in_between(node, node.send("/v1/replica/buckets",
                                                                 json.dumps({"clusters": names}).encode()))
    assert status == 200 and turns > 3000 // SCAN_CHUNK  # the scan alone takes that many
    expected = _buckets_at_once(state, names)
    body = responses(answered_raw(node, names))[0][1]
    assert answer["data"] == json.loads(json.dumps(expected)) and len(expected) == 42
    assert body == envelope.ok_body(expected, TRACE)  # byte for byte what the one-go answer was


def _buckets_at_once(state, names):
    found = BucketDigests(names)
    found.add(list(state.iter_requests()))
    return encode_buckets(found.result)


def answered_raw(node, names):
    transport = node.send("/v1/replica/buckets", json.dumps({"clusters": names}).encode())
    node.finish()
    return transport.value()


@pytest.mark.parametrize("raw", [b'{"clusters": "c"}', b'{"clusters": ["c", ""]}', b'{"clusters": ["c",]}'])
def test_a_bad_buckets_body_is_a_400_with_the_one_go_reason(raw):
    node = Node()
    transport = node.send("/v1/replica/buckets", raw)
    node.finish()
    status, answer = answered(transport)
    try:
        bodies.cluster_list(bodies.parse_json_object(raw))
    except (ApiError, InvalidInput) as e:
        reason = e.reason
    assert status == 400 and answer["error"]["reason"] == reason


# -- jsonsteps.parse is json.loads ------------------------------------------------------


def _outcome(parse_call):
    try:
        return "value", parse_call()
    except RecursionError:
        return "recursion", None
    except ValueError as e:
        return "error", str(e)


def _stepped(text):
    steps = jsonsteps.parse(text, lambda: True)
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return done.value


def test_parse_returns_and_raises_what_json_loads_does():
    base = json.dumps({"events": [{"type": "load.stats.set", "body": {"cluster": "m", "request_id": f"r{i}",
                                                                       "ip": "10.0.0.1", "n": [i, None, 1.5]}}
                                  for i in range(3)], "other": {"k": [1, 2], "j": "s\u00e9"}, "n": -5}, indent=1)
    texts = [base[:i] for i in range(len(base) + 1)]
    texts += ["", " ", "[", "{", "[1,]", '{"a":1,}', "[]", "{}", " [ ] ", "[1 2]", '{"a" 1}', '{"a":}', "{1:2}",
              "1 2", "nul", '"abc', '{"a":1}x', "[[[[1]]]]", '{"a":[1,2,]}', "[" * 100000, "NaN", '{"a":"\x01"}']
    rng = random.Random(11)
    for _ in range(4000):
        chars = list(base)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(chars))
            op = rng.random()
            if op < 0.4:
                chars[i] = rng.choice('{}[]:,"\\ 1-e.tnfx\n')
            elif op < 0.7:
                del chars[i]
            else:
                chars.insert(i, rng.choice('{}[]:,"\\ 1-e.tnfx\n'))
        texts.append("".join(chars))
    differing = [t for t in texts if _outcome(lambda: _stepped(t)) != _outcome(lambda: json.loads(t))]
    assert differing == []
    assert sum(_outcome(lambda: json.loads(t))[0] == "error" for t in texts) > 3000  # mostly refusals


def test_parse_yields_between_values_of_the_two_outer_levels_only():
    text = json.dumps({"a": [1, [2, 3], {"b": 4}], "c": 5})
    steps = jsonsteps.parse(text, lambda: True)
    assert sum(1 for _ in steps) == 4  # 1, [2, 3], {"b": 4}, 5
