"""Bounds (issue 11, item 3) through real ``twistd metacenter`` processes on
loopback: every field length and every count limit answers in the envelope
(400 naming the field and the limit; 429 naming the limit and its setting),
counts in ``metacenter_limit_refusals_total`` and leaves the state as it was;
the longest cluster name a client may write is read back with GET; a request
line over the limit gets 414 in the envelope, not a closed connection.
"""

import json
import socket
import urllib.parse

import pytest
import pytest_twisted

from tests.nodeproc import NodeProcess


@pytest.fixture(scope="module")
def node():
    """Default lengths (request_id 256, cluster 256, ip 64 characters)."""
    n = NodeProcess().start(wait_ready=True)
    yield n
    n.stop()


@pytest.fixture(scope="module")
def small():
    """Small count limits."""
    n = NodeProcess("127.0.0.1", None, "--max-clusters", "2", "--max-engines-per-cluster", "2", "--max-engines", "3",
                    "--max-requests", "4").start(wait_ready=True)
    yield n
    n.stop()


def state_of(n, *clusters):
    """What a refusal must leave untouched: the node's counts and the rows of
    ``clusters`` (updated_time included)."""
    _, _, status = n.call("GET", "/v1/node/status")
    data = status["data"]
    rows = {}
    for cluster in clusters:
        _, _, answer = n.call("GET", "/v1/load/stats?" + urllib.parse.urlencode({"cluster": cluster}))
        rows[cluster] = answer["data"]
    return (data["requests"], data["tombstones"], data["engines"], data["clusters"], data["digest"], rows)


def metric(n, name, limit):
    _, _, text = n.call("GET", "/metrics")
    text = text.decode() if isinstance(text, bytes) else text
    prefix = f'{name}{{limit="{limit}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    raise AssertionError(f"no {prefix!r} in /metrics")


def raw_exchange(n, data):
    """Send ``data`` on a fresh connection and read until the node closes."""
    with socket.create_connection((n.host, n.port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def envelope_of(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], json.loads(body)


# -- lengths -----------------------------------------------------------------------------

ADD = {"cluster": "bounds", "request_id": "len-1", "ip": "10.0.0.1", "prompt_length": 10}
TOO_LONG = [
    # (method, path, body, the field named, its limit)
    ("POST", "/v1/load/stats", {**ADD, "request_id": "r" * 257}, "field 'request_id'", 256, "request_id_length"),
    ("POST", "/v1/load/stats", {**ADD, "cluster": "c" * 257}, "field 'cluster'", 256, "cluster_length"),
    ("POST", "/v1/load/stats", {**ADD, "ip": "1" * 65}, "field 'ip'", 64, "ip_length"),
    ("DELETE", "/v1/load/stats", {"request_id": "len-1" + "x" * 300}, "field 'request_id'", 256, "request_id_length"),
    ("DELETE", "/v1/load/prompt", {"request_id": "y" * 257, "cluster": "", "ip": ""}, "field 'request_id'", 256,
     "request_id_length"),
    ("POST", "/v1/cache/save", {"cluster": "é" * 257, "prompt_hash": [1], "ip": "10.0.0.1"}, "field 'cluster'", 256,
     "cluster_length"),
    ("POST", "/v1/route/score", {"cluster": "bounds", "prompt_hash": [1], "ips": ["10.0.0.1", "2" * 100]},
     "field 'ips' item 1", 64, "ip_length"),
]


@pytest.mark.parametrize("method, path, body, named, limit, label", TOO_LONG,
                         ids=[f"{m} {p} {label}" for m, p, _, _, _, label in TOO_LONG])
def test_a_field_over_its_length_gets_400_naming_it_and_the_limit_and_changes_nothing(node, method, path, body,
                                                                                       named, limit, label):
    assert node.call("POST", "/v1/load/stats", ADD)[0] == 200
    before = state_of(node, "bounds")
    refusals = metric(node, "metacenter_limit_refusals_total", label)
    status, headers, answer = node.call(method, path, body)
    assert status == 400
    assert answer["status"] == "ERROR" and answer["error"]["code"] == 40001400
    reason = answer["error"]["reason"]
    assert reason.startswith(named) and f"at most {limit} characters" in reason
    assert state_of(node, "bounds") == before
    assert metric(node, "metacenter_limit_refusals_total", label) == refusals + 1


def test_a_query_parameter_over_the_cluster_length_gets_400(node):
    status, _, answer = node.call("GET", "/v1/load/stats?cluster=" + "q" * 257)
    assert status == 400
    assert answer["error"]["reason"] == "query parameter 'cluster' must be at most 256 characters long, got 257"


def test_a_replicated_event_is_checked_against_the_same_lengths(node):
    before = state_of(node, "bounds")
    events = [{"type": "load.stats.set", "body": {**ADD, "request_id": "p" * 257}},
              {"type": "load.stats.set", "body": {**ADD, "cluster": "c" * 257}}]
    status, _, answer = node.call("POST", "/v1/replica/batch", {"events": events})
    assert status == 200
    assert [r["reason"][:19] for r in answer["data"]["rejected"]] == ["field 'request_id' ", "field 'cluster' mus"]
    assert answer["data"]["applied"] == 0
    assert state_of(node, "bounds") == before


def test_the_longest_cluster_name_is_written_and_read_back_over_a_socket(node):
    # Four UTF-8 bytes per character: the longest percent-encoded URL.
    name = "\U0001F600" * 256
    assert node.call("POST", "/v1/load/stats", {"cluster": name, "request_id": "longest", "ip": "10.0.0.9",
                                                  "prompt_length": 7})[0] == 200
    query = urllib.parse.quote(name, safe="")
    assert len(query) == 3072
    status, _, answer = node.call("GET", "/v1/load/stats?cluster=" + query)
    assert status == 200
    assert [(row["ip"], row["queued_req_num"], row["prompt_length"]) for row in answer["data"]] == [
        ("10.0.0.9", 1, 7)]


def test_a_configured_longer_cluster_name_is_read_back_too():
    # 2,000 four-byte characters: 24,000 bytes of query, over Twisted's own
    # 16,384-byte line limit, which the node raises to match.
    n = NodeProcess("127.0.0.1", None, "--max-cluster-length", "2000").start(wait_ready=True)
    try:
        name = "\U0001F600" * 2000
        assert n.call("POST", "/v1/load/stats", {"cluster": name, "request_id": "long-2000", "ip": "10.0.0.9"})[0] \
            == 200
        status, _, answer = n.call("GET", "/v1/load/stats?cluster=" + urllib.parse.quote(name, safe=""))
        assert status == 200
        assert [row["ip"] for row in answer["data"]] == ["10.0.0.9"]
        assert n.call("POST", "/v1/load/stats", {"cluster": name + "x", "request_id": "long-2001",
                                                 "ip": "10.0.0.9"})[0] == 400
    finally:
        n.stop()


def test_a_request_line_over_the_limit_gets_414_in_the_envelope(node):
    before = metric(node, "metacenter_limit_refusals_total", "url_length")
    raw = raw_exchange(node, b"GET /v1/load/stats?cluster=" + b"%F0" * 6000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    line, answer = envelope_of(raw)
    assert line.startswith(b"HTTP/1.1 414")
    assert answer["error"]["code"] == 40001414
    assert "16384 bytes" in answer["error"]["reason"] and "--max-cluster-length" in answer["error"]["reason"]
    assert metric(node, "metacenter_limit_refusals_total", "url_length") == before + 1


def test_headers_over_their_allowance_get_431_in_the_envelope(node):
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 8000) for i in range(5))
    raw = raw_exchange(node, b"GET /livez HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    line, answer = envelope_of(raw)
    assert line.startswith(b"HTTP/1.1 431")
    assert answer["error"]["code"] == 40001431


# -- counts --------------------------------------------------------------------------------


def add(n, cluster, request_id, ip):
    return n.call("POST", "/v1/load/stats", {"cluster": cluster, "request_id": request_id, "ip": ip,
                                             "prompt_length": 5})


def assert_limit_reached(n, answer_tuple, setting, label, before_state, clusters, refusals_before):
    status, _, answer = answer_tuple
    assert status == 429
    assert answer["status"] == "ERROR" and answer["error"]["code"] == 42901429
    assert setting in answer["error"]["reason"]
    assert state_of(n, *clusters) == before_state
    assert metric(n, "metacenter_limit_refusals_total", label) == refusals_before + 1


def test_count_limits_refuse_client_adds_with_429_and_change_nothing(small):
    n = small
    assert add(n, "c1", "r1", "10.0.0.1")[0] == 200
    assert add(n, "c2", "r2", "10.0.0.1")[0] == 200

    # A third cluster (--max-clusters 2).
    before, refusals = state_of(n, "c1", "c2", "c3"), metric(n, "metacenter_limit_refusals_total", "clusters")
    assert_limit_reached(n, add(n, "c3", "r3", "10.0.0.1"), "--max-clusters", "clusters", before,
                         ("c1", "c2", "c3"), refusals)

    # A third engine in c1 (--max-engines-per-cluster 2).
    assert add(n, "c1", "r3", "10.0.0.2")[0] == 200
    before, refusals = state_of(n, "c1", "c2"), metric(n, "metacenter_limit_refusals_total", "engines_per_cluster")
    assert_limit_reached(n, add(n, "c1", "r4", "10.0.0.3"), "--max-engines-per-cluster", "engines_per_cluster",
                         before, ("c1", "c2"), refusals)

    # A fourth engine over all clusters (--max-engines 3).
    before, refusals = state_of(n, "c1", "c2"), metric(n, "metacenter_limit_refusals_total", "engines")
    assert_limit_reached(n, add(n, "c2", "r4", "10.0.0.2"), "--max-engines", "engines", before, ("c1", "c2"),
                         refusals)

    # A fifth in-flight request (--max-requests 4).
    assert add(n, "c1", "r4", "10.0.0.1")[0] == 200
    before, refusals = state_of(n, "c1", "c2"), metric(n, "metacenter_limit_refusals_total", "requests")
    assert_limit_reached(n, add(n, "c1", "r5", "10.0.0.1"), "--max-requests", "requests", before, ("c1", "c2"),
                         refusals)

    # What creates nothing is still admitted at the limit: a retried add.
    assert add(n, "c1", "r4", "10.0.0.1")[0] == 200
    # A finished request makes room.
    assert n.call("DELETE", "/v1/load/stats", {"request_id": "r1"})[0] == 200
    assert add(n, "c1", "r5", "10.0.0.1")[0] == 200


def test_peers_events_are_applied_over_the_count_limits_and_counted(small):
    # Refusing them would make this node diverge from the peer that admitted them.
    n = small
    clusters_before = state_of(n)[3]
    assert clusters_before == 2  # at --max-clusters
    # The node is also at --max-requests: the first limit found is counted.
    overruns = sum(metric(n, "metacenter_limit_overruns_total", limit) for limit in ("clusters", "requests"))
    refusals = metric(n, "metacenter_limit_refusals_total", "clusters")
    events = [{"type": "load.stats.set", "body": {"cluster": "from-peer", "request_id": "peer-1",
                                                  "ip": "10.0.0.7"}}]
    status, _, answer = n.call("POST", "/v1/replica/batch", {"events": events})
    assert status == 200 and answer["data"]["applied"] == 1
    assert state_of(n)[3] == clusters_before + 1
    assert sum(metric(n, "metacenter_limit_overruns_total", limit) for limit in ("clusters", "requests")) == \
        overruns + 1
    assert metric(n, "metacenter_limit_refusals_total", "clusters") == refusals
    assert n.call("DELETE", "/v1/load/stats", {"request_id": "peer-1"})[0] == 200


# -- the log line (in process: the node's log events, a task.Clock) -------------------------


@pytest.fixture
def log_events():
    from twisted.logger import globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest_twisted.inlineCallbacks
def test_refusals_are_logged_throttled(log_events):
    from metacenter.core.limits import CountLimits
    from tests.harness import Harness

    h = Harness()
    h.node.limits = CountLimits(max_clusters=1)
    assert (yield h.call_json("POST", "/v1/load/stats", {**ADD, "cluster": "a"}))[0].code == 200
    for request_id in ("x1", "x2", "x3"):
        response, answer = yield h.call_json("POST", "/v1/load/stats", {**ADD, "cluster": "b",
                                                                        "request_id": request_id})
        assert response.code == 429 and "--max-clusters" in answer["error"]["reason"]
    lines = [e for e in log_events if e.get("limit") == "clusters"]
    assert len(lines) == 1 and "refusing clients' adds" in lines[0]["log_format"]
    h.clock.advance(61)
    yield h.call_json("POST", "/v1/load/stats", {**ADD, "cluster": "b", "request_id": "x4"})
    assert len([e for e in log_events if e.get("limit") == "clusters"]) == 2
