"""The console's pure parts: formatting, parsing, history, node health,
agreement between nodes, the view node."""

import pytest

from console.discovery import parse_server
from console.format import bar, human_age, human_bytes, sparkline
from console.history import History
from console.model import BadResponse, Cluster, Engine, NodeSnapshot, NodeStatus, Overview, parse_cache_stats
from console.nodeclient import normalize_target
from console.state import DOWN, NOT_READY, SLOW, UP, WAITING, ConsoleState, KnownLevel, state_fingerprint


def test_human_units():
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 5 * 1024**2)] == ["0 B", "1023 B", "1.0 KiB", "1.5 KiB",
                                                                          "5.0 MiB"]
    assert [human_age(s) for s in (None, -1, 0.44, 12.7, 185, 7380, 86400 * 2 + 3600 * 5)] == [
        "—", "0.0s", "0.4s", "12s", "3m05s", "2h03m", "2d05h"]


def test_sparkline_scales_to_its_largest_value_and_keeps_gaps():
    assert sparkline([0, 4, 8, None, 2]) == "▁▅█ ▃"
    assert sparkline([1, 7]) == "▂█"
    assert sparkline([0, 0, None]) == "▁▁ "
    assert sparkline([]) == ""


def test_bar_fills_in_eighths_and_keeps_its_width():
    assert bar(1.0, 4) == "████"
    assert bar(0.5, 4) == "██  "
    assert bar(1 / 16, 2) == "▏ "
    assert bar(0.0, 3) == "   "


def engine(ip, queued, prompt=0, updated=0):
    return Engine(ip, queued, prompt, updated)


def test_cluster_figures_busiest_idlest_spread():
    cluster = Cluster("c", (engine("10.0.0.2", 3, 10), engine("10.0.0.1", 7), engine("10.0.0.3", 3, 50)))
    assert cluster.in_flight == 13 and cluster.prompt_bytes == 60
    assert cluster.busiest.ip == "10.0.0.1"
    # equal queues: the one with more prompt bytes in prefill is the busier
    assert cluster.idlest.ip == "10.0.0.2"
    assert cluster.spread == 4
    empty = Cluster("e", ())
    assert (empty.busiest, empty.idlest, empty.spread, empty.mean_queued) == (None, None, 0, 0.0)


def test_parsing_rejects_nonsense_and_accepts_missing_optional_fields():
    overview = Overview.parse({"time": 5, "clusters": [{"cluster": "c", "engines": [
        {"ip": "10.0.0.1", "queued_req_num": 2, "prompt_length": 9, "updated_time": 4}]}]})
    assert overview.cluster("c").engines == (Engine("10.0.0.1", 2, 9, 4),)
    assert Overview.parse({"clusters": None}).clusters == ()
    with pytest.raises(BadResponse, match="queued_req_num"):
        Overview.parse({"clusters": [{"cluster": "c", "engines": [{"ip": "x", "queued_req_num": "2"}]}]})
    with pytest.raises(BadResponse):
        Overview.parse([])
    status = NodeStatus.parse({"version": "1", "peers": [{"peer": "a:1", "queue_depth": 3, "lag_ms": 2}]})
    assert status.digest is None and status.peers[0].lag_ms == 2.0 and status.replication_queue == 3
    with pytest.raises(BadResponse, match="lag_ms"):
        NodeStatus.parse({"peers": [{"peer": "a:1", "lag_ms": "slow"}]})
    assert parse_cache_stats({"clusters": [{"cluster": "c", "blocks": 4, "engines": 2}]})["c"].blocks == 4


def test_engine_age_is_measured_on_the_node_clock():
    overview = Overview(100_000_000_000, (Cluster("c", (engine("e", 1, 0, 97_000_000_000),)),))
    # the console's clock is 1000 s ahead of the node's: the age must not care
    snapshot = NodeSnapshot("http://n:1", fetched_at=1100.0, latency=0.0, overview=overview)
    assert snapshot.engine_age(overview.clusters[0].engines[0], now=1102.0) == pytest.approx(5.0)


def test_history_slices_take_the_largest_sample_and_leave_gaps():
    history = History(window_seconds=60)
    for when, value in ((0, 1), (5, 9), (7, 3), (45, 2), (44, 8)):  # 44 after 45: out of order, ignored
        history.record("k", when, value)
    assert history.slices("k", now=60, count=4) == [9, None, None, 2]
    history.prune(now=100)
    assert history.slices("k", now=100, count=4) == [2, None, None, None]
    history.prune(now=200)
    assert history.latest("k") is None


def status(requests=0, digest=None, engines=1):
    return NodeStatus("v", "", 0, True, requests, 0, engines, 1, (), digest)


def snap(target, when, error=None, latency=0.01, ready=True, status_=None, clusters=()):
    if error:
        return NodeSnapshot(target, when, latency, error=error)
    return NodeSnapshot(target, when, latency, ready=ready, overview=Overview(int(when * 1e9), tuple(clusters)),
                        status=status_)


A, B, C = "http://a:1", "http://b:1", "http://c:1"


def test_view_node_is_the_pinned_one_while_it_answers_then_the_first_answering():
    state = ConsoleState([A, B, C])
    assert state.view_snapshot() == (None, False)
    state.absorb(snap(A, 1, error="connection refused"))
    state.absorb(snap(B, 1))
    state.absorb(snap(C, 0.5))
    assert state.view_target() == B
    state.pinned = C
    assert state.view_target() == C
    state.absorb(snap(C, 2, error="timed out"))
    assert state.view_target() == B
    state.absorb(snap(B, 3, error="connection refused"))
    # nobody answers: the freshest data any node gave, flagged as not current
    snapshot, current = state.view_snapshot()
    assert (snapshot.target, snapshot.fetched_at, current) == (B, 1, False)


def test_node_health_states():
    state = ConsoleState([A, B, C], interval=1.0)
    assert state.health(A, 0).state == WAITING
    state.begin_poll(A, 0)
    assert state.health(A, 0.5).state == WAITING
    assert state.health(A, 1.5).state == SLOW  # the first poll hangs
    state.absorb(snap(A, 10, error="connection refused"))
    state.absorb(snap(A, 15, error="connection refused"))
    health = state.health(A, 20)
    assert health.state == DOWN and "connection refused (for 10s)" in health.detail and health.data_age is None
    state.absorb(snap(B, 10, latency=0.9))
    assert state.health(B, 10).state == SLOW
    state.absorb(snap(B, 11, ready=False))
    assert state.health(B, 11).state == NOT_READY
    state.absorb(snap(C, 10))
    assert state.health(C, 10).state == UP
    assert state.begin_poll(C, 10) and not state.begin_poll(C, 10.5)  # one poll at a time
    assert state.health(C, 10.5).state == UP
    health = state.health(C, 13)
    assert health.state == SLOW and "no answer for 3.0s" in health.detail and health.data_age == 3


def test_agreement_by_digest_ignores_clusters_without_live_requests():
    state = ConsoleState([A, B])
    state.absorb(snap(A, 1, status_=status(digest={"x": (2, "00aa"), "idle": (0, "0000")})))
    state.absorb(snap(B, 1, status_=status(digest={"x": (2, "00aa")})))
    assert state.agreement().agree is True
    assert state_fingerprint(state.latest[A].status) == state_fingerprint(state.latest[B].status)
    state.absorb(snap(B, 2, status_=status(digest={"x": (1, "00bb")})))
    agreement = state.agreement()
    assert agreement.agree is False and agreement.basis == "digest"
    assert agreement.differences == ("x: a:1 live 2, b:1 live 1",)
    assert state.disagree_since == 2
    state.absorb(snap(B, 3, status_=status(digest={"x": (2, "00aa")})))
    assert state.agreement().agree is True and state.disagree_since is None


def test_agreement_falls_back_to_totals_and_needs_two_nodes():
    state = ConsoleState([A, B])
    state.absorb(snap(A, 1, status_=status(requests=3)))
    assert state.agreement().agree is None
    state.absorb(snap(B, 1, status_=status(requests=4)))
    agreement = state.agreement()
    assert (agreement.basis, agreement.agree) == ("totals", False)


def test_nodes_dropped_from_dns_are_forgotten():
    state = ConsoleState([A, B])
    state.absorb(snap(A, 1))
    state.pinned = A
    state.set_targets([B])
    assert A not in state.latest and state.pinned is None
    state.absorb(snap(A, 2))  # its poll finished after it was dropped
    assert A not in state.latest


def test_target_spelling():
    assert normalize_target("127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert normalize_target("http://[::1]:81/") == "http://[::1]:81"
    assert normalize_target("https://node") == "https://node:443"
    with pytest.raises(ValueError):
        normalize_target("ftp://node")
    assert parse_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_server("[::1]:53") == ("::1", 53)
    assert parse_server("10.0.0.1") == ("10.0.0.1", 53)
    with pytest.raises(ValueError):
        parse_server("dns.example:53")


def test_plurals():
    from console.format import plural

    assert [plural(n, "node") for n in (0, 1, 2)] == ["0 nodes", "1 node", "2 nodes"]
    assert plural(1, "engine") == "1 engine" and plural(2, "engine") == "2 engines"


def test_texts_with_counts_use_the_right_number():
    from console.views import agreement_text, data_line

    state = ConsoleState(["http://n:1"], interval=1.0)
    state.absorb(NodeSnapshot("http://n:1", 10.0, 0.01, overview=Overview(0, ()), status=NodeStatus.parse({})))
    assert "1/1 node answering" in data_line(state, 10.0).plain
    assert agreement_text(state.agreement(), None, 10.0).plain == "Agreement: nothing to compare (1 node with status)"
    state = ConsoleState(["http://a:1", "http://b:1"], interval=1.0)
    state.absorb(NodeSnapshot("http://a:1", 10.0, 0.01, overview=Overview(0, ()),
                              status=NodeStatus.parse({"requests": 1, "engines": 1})))
    state.absorb(NodeSnapshot("http://b:1", 10.0, 0.01, overview=Overview(0, ()),
                              status=NodeStatus.parse({"requests": 2, "engines": 1})))
    assert state.agreement().differences == ("totals differ: a:1 1 request/1 engine, b:1 2 requests/1 engine",)
    assert "1/2 nodes answering" not in data_line(state, 10.0).plain  # both answer
    assert "2/2 nodes answering" in data_line(state, 10.0).plain


def test_log_level_is_parsed_when_the_node_reports_it():
    assert NodeStatus.parse({}).log_level is None
    assert NodeStatus.parse({"log_level": "WARN"}).log_level == "WARN"
    with pytest.raises(BadResponse, match="log_level"):
        NodeStatus.parse({"log_level": 3})


def test_the_known_log_level_prefers_the_newest_word():
    state = ConsoleState(["http://n:1"], interval=1.0)
    assert state.log_level("http://n:1") == KnownLevel(None, "")
    state.absorb(NodeSnapshot("http://n:1", 10.0, 0.01, overview=Overview(0, ()),
                              status=NodeStatus.parse({"log_level": "WARN"})))
    assert state.log_level("http://n:1") == KnownLevel("WARN", "node")
    # set from here after that poll: the node reports it only at the next one
    state.record_level_set("http://n:1", "DEBUG", 11.0)
    assert state.log_level("http://n:1") == KnownLevel("DEBUG", "console")
    state.absorb(NodeSnapshot("http://n:1", 12.0, 0.01, overview=Overview(0, ()),
                              status=NodeStatus.parse({"log_level": "ERROR"})))  # someone else changed it since
    assert state.log_level("http://n:1") == KnownLevel("ERROR", "node")
    # a node that does not report its level: what was set from here, if anything
    state.absorb(NodeSnapshot("http://n:1", 13.0, 0.01, overview=Overview(0, ()), status=NodeStatus.parse({})))
    assert state.log_level("http://n:1") == KnownLevel("DEBUG", "console")


def test_empty_overview_reasons():
    from console.views import NO_CLUSTERS_YET, NO_NODE_ANSWERED, empty_overview_text, empty_reason

    state = ConsoleState(["http://a:1", "http://b:1"], interval=1.0)
    assert empty_reason(state) == NO_NODE_ANSWERED
    assert "waiting for the first answer" in empty_overview_text(state).plain
    state.absorb(NodeSnapshot("http://a:1", 10.0, 0.0, error="connection refused"))
    assert empty_overview_text(state).plain.startswith("No clusters to show: none of the 2 nodes has answered")
    state.absorb(NodeSnapshot("http://b:1", 10.0, 0.01, overview=Overview(0, ())))
    assert empty_reason(state) == NO_CLUSTERS_YET
    assert empty_overview_text(state).plain.startswith("No clusters yet: b:1 answers but holds no load")
    state.absorb(NodeSnapshot("http://b:1", 11.0, 0.01, overview=Overview(0, (Cluster("c", ()),))))
    assert empty_reason(state) is None and empty_overview_text(state) is None


def test_json_document_of_fixed_data_follows_the_schema():
    import jsonschema_rs

    from console.report import JSON_SCHEMA, once_document
    from fixed_data import NODE_A, NODE_B, NODE_C, NOW, TARGETS, node_snapshots

    state = ConsoleState(TARGETS, interval=None)
    for snapshot in node_snapshots(disagree=True):
        state.absorb(snapshot)
    document = once_document(state, NOW, "3 nodes", "llama-3-70b")
    jsonschema_rs.validate(JSON_SCHEMA, document)
    assert [c["name"] for c in document["clusters"]] == ["llama-3-70b", "deepseek-r1", "qwen2.5-32b", "mistral-7b"]
    assert document["clusters"][0]["kv_blocks"] == 18234 and document["clusters"][-1]["kv_blocks"] is None
    assert [e["mark"] for e in document["engines"]] == ["hot", None, None, "idle"]
    assert document["engines"][0]["updated_age_seconds"] == pytest.approx(0.2)
    assert [n["log_level"] for n in document["nodes"]] == [None, "DEBUG", None]
    assert [n["state"] for n in document["nodes"]] == ["up", "up", "down"]
    assert document["nodes"][0]["peers"][1] == {"peer": "10.0.0.7:8080", "mode": "batch", "queue_depth": 37,
                                                "sent": 48211, "failed": 12, "dropped": 0, "lag_seconds": None}
    assert document["agreement"]["agree"] is False and document["agreement"]["nodes"] == [NODE_A, NODE_B]
    assert NODE_C not in document["agreement"]["nodes"]
    # a field the schema does not name is refused: the schema lists all of them
    with pytest.raises(jsonschema_rs.ValidationError):
        jsonschema_rs.validate(JSON_SCHEMA, {**document, "extra": 1})
