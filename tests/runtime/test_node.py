"""The node is built in one call with every collaborator; nothing is filled
in afterwards."""

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet import task

from metacenter.core.events import EVENT_ADD, ORIGIN_CLIENT, ORIGIN_PEER, LoadAdd
from metacenter.runtime.node import Readiness, build_node
from metacenter.runtime.turns import chunk_per_turn


def test_a_node_is_built_with_its_collaborators_and_reports_them():
    clock = task.Clock()
    clock.advance(1_700_000_000)
    registry = CollectorRegistry(auto_describe=True)
    readiness = Readiness()
    cooperate = chunk_per_turn(clock).cooperate
    heard = []
    node = build_node(clock, registry=registry, readiness=readiness, cooperate=cooperate,
                      peer_status=lambda: [{"peer": "10.0.0.9:80", "queue_depth": 3}],
                      listeners=[lambda *event: heard.append(event)], advertise="10.0.0.1")
    assert node.metrics.registry is registry and node.cooperate is cooperate
    assert node.cache is not None and node.readiness is readiness
    node.apply(EVENT_ADD, LoadAdd(("m", "r1", "10.0.0.2", 5, None)), "t1", ORIGIN_CLIENT)
    node.apply(EVENT_ADD, LoadAdd(("m", "r2", "10.0.0.2", 5, None)), "t2", ORIGIN_PEER)
    assert [(e[0], e[1].request_id, e[2]) for e in heard] == [(EVENT_ADD, "r1", "t1")]  # peers' events stay
    status = node.status()
    assert status["peers"] == [{"peer": "10.0.0.9:80", "queue_depth": 3}]
    assert status["node"] == "10.0.0.1" and status["requests"] == 2 and status["ready"] is True
    # The KV-cache series live on the node's registry.
    node.save_cache(("m", [1, 2], "10.0.0.2"))
    assert registry.get_sample_value("metacenter_cache_blocks", {"cluster": "m"}) == 2


def test_readiness_is_read_through_the_node():
    readiness = Readiness()
    node = build_node(task.Clock(), readiness=readiness)
    assert node.ready is True and node.not_ready_reason is None
    readiness.hold("warm start: fetching the state from a peer")
    assert node.ready is False and node.not_ready_reason == "warm start: fetching the state from a peer"
    assert node.status()["ready"] is False
    readiness.release()
    assert node.ready is True and node.not_ready_reason is None


def test_without_a_cluster_a_node_has_no_peers():
    assert build_node(task.Clock()).status()["peers"] == []


def _pick_request(request_id, ips=None):
    return {"cluster": "m", "request_id": request_id, "prompt_length": 10, "prompt_tokens": 0,
            "prompt_hash": None, "ips": ips, "lease": None}


def test_a_pick_keeps_the_count_limits_of_an_add():
    from metacenter.core.limits import CountLimits, LimitReached

    node = build_node(task.Clock(), registry=CollectorRegistry(),
                      count_limits=CountLimits(max_engines_per_cluster=1, max_requests=3))
    node.apply(EVENT_ADD, LoadAdd(("m", "r0", "10.0.0.1", 0, None)), None, ORIGIN_CLIENT)
    # A candidate the cluster does not know would be a second engine: refused, nothing booked.
    with pytest.raises(LimitReached) as refused:
        node.pick(_pick_request("r1", ["10.0.0.1", "10.0.0.2"]))
    assert refused.value.limit == "engines_per_cluster" and node.state.request_count == 1
    # Among known engines (any spelling of one) or without ips it books.
    assert node.pick(_pick_request("r1", ["10.0.0.1"]))["ip"] == "10.0.0.1"
    assert node.pick(_pick_request("r2"))["ip"] == "10.0.0.1"
    with pytest.raises(LimitReached) as refused:  # a third request would pass --max-requests
        node.pick(_pick_request("r3"))
    assert refused.value.limit == "requests" and node.state.request_count == 3
