"""PeerVerdicts and several secrets, in memory (task.Clock, a real registry)."""

import json

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet import task
from twisted.logger import Logger

from metacenter.cluster.auth import PeerAuthenticator, PeerVerdicts, sign, verify
from metacenter.runtime.node import Readiness

A, B = ("10.0.0.1", 8080), ("10.0.0.2", 8080)
REFUSAL = json.dumps({"status": "ERROR", "error": {"code": 40101001, "message": "Unauthorized",
                                                   "reason": "bad signature: wrong cluster secret"}}).encode()


def make():
    clock, readiness, registry, events = task.Clock(), Readiness(), CollectorRegistry(), []
    verdicts = PeerVerdicts(readiness, clock, registry=registry, log=Logger(observer=events.append))
    return clock, readiness, registry, events, verdicts


def test_refused_by_every_answering_peer_holds_the_node_until_one_accepts():
    clock, readiness, registry, events, verdicts = make()
    verdicts.answered(A, 401, REFUSAL)
    assert not readiness.ready
    assert "10.0.0.1:8080: bad signature: wrong cluster secret" in readiness.reason
    verdicts.answered(B, 401, b"not json")
    assert registry.get_sample_value("metacenter_peer_auth_refused") == 2
    for _ in range(5):
        verdicts.answered(A, 401, REFUSAL)
    assert [e["log_format"] for e in events] == ["not ready: {why}"]  # once per interval
    clock.advance(60)
    verdicts.answered(B, 401, b"")
    assert len(events) == 2 and "refusals since not logged" in events[-1]["log_format"]
    verdicts.answered(B, 200, b"")
    assert readiness.ready and registry.get_sample_value("metacenter_peer_auth_refused") == 1


def test_unanswered_and_departed_peers_do_not_count_and_other_causes_stay():
    clock, readiness, registry, events, verdicts = make()
    readiness.hold("warm start: fetching the state from a peer")
    verdicts.answered(A, 401, REFUSAL)
    assert readiness.reason.startswith("warm start") and "refuses" in readiness.reason
    readiness.release()  # the warm start ends: the refusal still holds
    assert not readiness.ready
    verdicts.peers_changed(frozenset(), frozenset({A}))
    assert readiness.ready and registry.get_sample_value("metacenter_peer_auth_refused") == 0


def test_the_first_secret_signs_and_any_verifies():
    headers = PeerAuthenticator(["new", "old"]).headers("POST", "/v1/replica/batch", b"{}")
    assert headers == sign("new", "POST", "/v1/replica/batch", b"{}", float(headers["X-Metacenter-Timestamp"]) / 1000)
    now = int(headers["X-Metacenter-Timestamp"]) / 1000
    verify(["old", "new"], "POST", "/v1/replica/batch", b"{}", headers, now)
    verify(("new",), "POST", "/v1/replica/batch", b"{}", headers, now)
    with pytest.raises(Exception, match="bad signature"):
        verify(["old"], "POST", "/v1/replica/batch", b"{}", headers, now)
