"""``--max-leases`` (issue 11, item 3) through a real ``twistd metacenter``
process: a client's keepalive, add or pick that would start one lease more
than the limit gets 429 in the envelope naming the setting, counts in
``metacenter_limit_refusals_total{limit="leases"}`` and leaves the state as
it was; renewals and what names a lease already in the table pass; a peer's
keepalive is applied over the limit and counted as an overrun. The throttled
log line is checked in process."""

import urllib.parse

import pytest
import pytest_twisted

from tests.api.test_bounds import log_events, metric  # noqa: F401 (log_events: a fixture)
from tests.nodeproc import NodeProcess


@pytest.fixture(scope="module")
def node():
    n = NodeProcess("127.0.0.1", None, "--max-leases", "2").start(wait_ready=True)
    yield n
    n.stop()


def state_of(n):
    """What a refusal must leave untouched: the leases (names, TTLs, requests),
    the counts and the digests, and the cluster's rows."""
    _, _, leases = n.call("GET", "/v1/load/leases")
    _, _, status = n.call("GET", "/v1/node/status")
    _, _, rows = n.call("GET", "/v1/load/stats?" + urllib.parse.urlencode({"cluster": "lc"}))
    data = status["data"]
    return ([(lease["lease"], lease["ttl_ms"], lease["requests"]) for lease in leases["data"]],
            data["requests"], data["tombstones"], data["engines"], data["clusters"], data["digest"], rows["data"])


def assert_refused(n, answer, before, refusals):
    status, _, body = answer
    assert status == 429, body
    assert body["status"] == "ERROR" and body["error"]["code"] == 42901429 and body["data"] is None
    assert "--max-leases" in body["error"]["reason"] and "at most 2" in body["error"]["reason"]
    assert state_of(n) == before
    assert metric(n, "metacenter_limit_refusals_total", "leases") == refusals + 1


def keepalive(n, lease):
    return n.call("POST", "/v1/load/lease/keepalive", {"lease": lease, "ttl_ms": 300_000})


def add(n, request_id, lease):
    return n.call("POST", "/v1/load/stats", {"cluster": "lc", "request_id": request_id, "ip": "10.0.0.1",
                                             "prompt_length": 5, "lease": lease})


def test_every_way_of_starting_a_lease_over_the_limit_gets_429_and_changes_nothing(node):
    n = node
    assert keepalive(n, "gw-1")[0] == 200
    assert add(n, "r1", "gw-2")[0] == 200  # an add starts its lease too

    before, refusals = state_of(n), metric(n, "metacenter_limit_refusals_total", "leases")
    assert_refused(n, keepalive(n, "gw-3"), before, refusals)
    assert_refused(n, add(n, "r2", "gw-3"), before, refusals + 1)
    pick = {"cluster": "lc", "request_id": "r3", "prompt_length": 5, "ips": ["10.0.0.1"], "lease": "gw-3"}
    assert_refused(n, n.call("POST", "/v1/route/pick", pick), before, refusals + 2)

    # At the limit, what starts no lease passes: a renewal, an add and a pick
    # under a lease in the table, a retried add (it creates nothing).
    assert keepalive(n, "gw-1")[0] == 200
    assert add(n, "r2", "gw-1")[0] == 200
    assert n.call("POST", "/v1/route/pick", {**pick, "lease": "gw-2"})[0] == 200
    assert add(n, "r1", "gw-3")[0] == 200
    assert state_of(n)[0] == [("gw-1", 300_000, 1), ("gw-2", 10_000, 2)]
    assert metric(n, "metacenter_limit_refusals_total", "leases") == refusals + 3

    # A revoked lease makes room.
    assert n.call("DELETE", "/v1/load/lease", {"lease": "gw-2"})[0] == 200
    assert keepalive(n, "gw-3")[0] == 200
    assert [lease for lease, _, _ in state_of(n)[0]] == ["gw-1", "gw-3"]


def test_a_peers_keepalive_is_applied_over_the_limit_and_counted(node):
    # Refusing it would make this node diverge from the peer that admitted it.
    n = node
    leases = [lease for lease, _, _ in state_of(n)[0]]
    assert len(leases) == 2  # at --max-leases (the test above)
    overruns = metric(n, "metacenter_limit_overruns_total", "leases")
    refusals = metric(n, "metacenter_limit_refusals_total", "leases")
    events = [{"type": "load.lease.keepalive", "body": {"lease": "gw-peer", "ttl_ms": 5000}}]
    status, _, answer = n.call("POST", "/v1/replica/batch", {"events": events})
    assert status == 200 and answer["data"]["applied"] == 1, answer
    assert "gw-peer" in [lease for lease, _, _ in state_of(n)[0]]
    assert metric(n, "metacenter_limit_overruns_total", "leases") == overruns + 1
    assert metric(n, "metacenter_limit_refusals_total", "leases") == refusals
    assert n.call("DELETE", "/v1/load/lease", {"lease": "gw-peer"})[0] == 200


@pytest_twisted.inlineCallbacks
def test_lease_refusals_are_logged_throttled(log_events):  # noqa: F811 (a fixture)
    from metacenter.core.limits import CountLimits
    from tests.harness import Harness

    h = Harness()
    h.node.limits = CountLimits(max_leases=1)
    assert (yield h.call_json("POST", "/v1/load/lease/keepalive", {"lease": "a"}))[0].code == 200
    for lease in ("b", "c", "d"):
        response, answer = yield h.call_json("POST", "/v1/load/lease/keepalive", {"lease": lease})
        assert response.code == 429 and "--max-leases" in answer["error"]["reason"]
    assert h.state.lease_count == 1
    lines = [e for e in log_events if e.get("limit") == "leases"]
    assert len(lines) == 1 and "refusing clients' adds" in lines[0]["log_format"]
    assert lines[0]["also"] == " and keepalives"
    h.clock.advance(61)
    response, _ = yield h.call_json("POST", "/v1/load/lease/keepalive", {"lease": "e"})
    assert response.code == 429
    assert len([e for e in log_events if e.get("limit") == "leases"]) == 2
