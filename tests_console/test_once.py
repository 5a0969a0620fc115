"""``metacenter-console --once`` as an operator runs it: a real process
against real nodes, its tables and its exit codes."""

import json
import os
import subprocess
import sys
import time

import jsonschema_rs
import pytest

from console.format import human_bytes
from console.nodeclient import target_label
from console.report import JSON_SCHEMA
from nodeproc import REPO
from udp_dns import UdpDns

WIDE = dict(os.environ, COLUMNS="200", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_console(*args):
    result = subprocess.run([sys.executable, "-m", "console", *args], capture_output=True, text=True, env=WIDE,
                            timeout=60)
    return result.returncode, result.stdout, result.stderr


def table_cells(output, first_cell):
    """The cells of the table row whose first cell is ``first_cell``."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃").split("│")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{output}")


def post(node, cluster, request_id, ip, prompt):
    status, _, _ = node.call("POST", "/v1/load/stats",
                             {"cluster": cluster, "request_id": request_id, "ip": ip, "prompt_length": prompt})
    assert status == 200


@pytest.fixture
def loaded_node(node):
    post(node, "chat", "a", "10.1.0.1", 1000)
    post(node, "chat", "b", "10.1.0.1", 3000)
    post(node, "chat", "c", "10.1.0.2", 500)
    post(node, "embed", "d", "10.2.0.1", 64)
    return node


def test_overview_tables_and_exit_zero_when_every_node_answers(loaded_node):
    code, out, err = run_console("--once", loaded_node.url)
    assert code == 0, err
    cluster_cells = table_cells(out, "chat")
    assert cluster_cells[:7] == ["chat", "2", "3", human_bytes(4500), "10.1.0.1 (2)", "10.1.0.2 (1)", "1"]
    assert table_cells(out, "embed")[:4] == ["embed", "1", "1", "64 B"]
    node_cells = table_cells(out, f"{target_label(loaded_node.url)} ◉")  # ◉: the node the data is from
    assert node_cells[1] == "up"
    assert node_cells[4:6] == ["4", "3"]  # requests, engines
    assert f"Data from {target_label(loaded_node.url)}" in out
    assert "1/1 node answering" in out


def test_cluster_engines_with_cluster_option(loaded_node):
    code, out, err = run_console("--once", "--cluster", "chat", loaded_node.url)
    assert code == 0, err
    assert "Cluster chat: 2 engines, 3 in flight" in out
    busy, quiet = table_cells(out, "10.1.0.1"), table_cells(out, "10.1.0.2")
    assert busy[1:3] == ["2", human_bytes(4000)] and busy[4] == "67%"
    assert quiet[1:3] == ["1", "500 B"] and quiet[4] == "33%"
    assert out.index("10.1.0.1") < out.index("10.1.0.2")  # busiest first

    code, out, _ = run_console("--once", "--cluster", "no-such-cluster", loaded_node.url)
    assert code == 0
    assert "Cluster 'no-such-cluster' has no engines" in out


def test_after_deletes_everything_is_back_to_zero(loaded_node):
    for request_id in "abcd":
        assert loaded_node.call("DELETE", "/v1/load/stats", {"request_id": request_id})[0] == 200
    code, out, _ = run_console("--once", loaded_node.url)
    assert code == 0
    assert table_cells(out, "chat")[1:4] == ["2", "0", "0 B"]
    assert table_cells(out, "embed")[1:4] == ["1", "0", "0 B"]


def test_exit_one_when_a_node_does_not_answer(loaded_node):
    from nodeproc import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    code, out, _ = run_console("--once", loaded_node.url, dead)
    assert code == 1
    assert table_cells(out, target_label(dead))[1] == "down"
    assert f"{target_label(dead)}: down: connection refused" in out
    assert "1/2 nodes answering" in out
    # the answering node's data is still printed
    assert table_cells(out, "chat")[2] == "3"

    code, out, _ = run_console("--once", dead)
    assert code == 1
    assert "No node answers" in out


def test_usage_errors_exit_two():
    assert run_console("--once", "--interval", "0")[0] == 2
    assert run_console("--once", "ftp://node")[0] == 2
    assert run_console("--once", "--dns", "x", "http://127.0.0.1:1")[0] == 2
    code, _, err = run_console("--once", "--dns-server", "127.0.0.1:53")
    assert code == 2 and "--dns-server needs --dns" in err


@pytest.fixture
def dns_server():
    server = UdpDns().start()
    yield server
    server.stop()


def test_dns_name_watches_every_node_behind_it(loaded_node, dns_server):
    dns_server.set_records("nodes.test", ["127.0.0.1"])
    args = ["--once", "--dns", "nodes.test", "--dns-server", dns_server.address, "--port", str(loaded_node.port)]
    code, out, err = run_console(*args)
    assert code == 0, out + err
    assert table_cells(out, f"{target_label(loaded_node.url)} ◉")[1] == "up"
    assert f"dns nodes.test:{loaded_node.port} via {dns_server.address}" in out

    # a second address behind the name, where no node listens
    dns_server.set_records("nodes.test", ["127.0.0.1", "127.0.0.2"])
    code, out, _ = run_console(*args)
    assert code == 1
    assert table_cells(out, f"127.0.0.2:{loaded_node.port}")[1] == "down"

    code, out, _ = run_console("--once", "--dns", "missing.test", "--dns-server", dns_server.address)
    assert code == 1
    assert "missing.test has no A or AAAA records" in out


def test_dns_with_the_system_resolver(loaded_node):
    code, out, err = run_console("--once", "--dns", "localhost", "--port", str(loaded_node.port))
    # localhost may also resolve to ::1, where this node does not listen;
    # IPv4 addresses come first, so the data is from 127.0.0.1
    assert table_cells(out, f"{target_label(loaded_node.url)} ◉")[1] == "up", out + err
    assert table_cells(out, "chat")[2] == "3"


# -- in a pipe, as scripts run it: nothing cut, three outputs ----------------

# A pipe with no COLUMNS set: what a script gets (rich would assume 80 columns).
PIPED = {k: v for k, v in WIDE.items() if k not in ("COLUMNS", "LINES")}
LONG_CLUSTER = "llama-3.1-405b-instruct-fp8-long-context-eu-west-production-pool-a"  # 66 characters


def run_piped(shell_tail, *args):
    """``python -m console ARGS | SHELL_TAIL`` through a real shell pipe;
    (exit status of the console, output of the pipe's last command)."""
    command = " ".join([sys.executable, "-m", "console", *args])
    result = subprocess.run(["bash", "-c", f"set -o pipefail; {command} | {shell_tail}"], capture_output=True,
                            text=True, env=PIPED, timeout=60)
    return result.returncode, result.stdout


def run_json(*args):
    code, out = run_piped("cat", "--once", "--output", "json", *args)
    return code, json.loads(out)


@pytest.fixture
def two_peered_nodes(start_node):
    """Two nodes on one host (same address, two ports) that replicate to
    each other, with load on a cluster whose name is long."""
    from nodeproc import free_port

    port_a, port_b = free_port(), free_port()
    a = start_node(port_a, "--peer", f"127.0.0.1:{port_b}")
    b = start_node(port_b, "--peer", f"127.0.0.1:{port_a}")
    post(a, LONG_CLUSTER, "r1", "10.9.0.1", 1000)
    post(a, LONG_CLUSTER, "r2", "10.9.0.1", 2000)
    post(a, LONG_CLUSTER, "r3", "10.9.0.2", 500)
    post(a, "embed", "r4", "10.2.0.1", 64)
    wait_replicated(b, requests=4)
    return a, b


def wait_replicated(node, requests, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, _, body = node.call("GET", "/v1/node/status")
        if body["data"]["requests"] == requests:
            return
        time.sleep(0.05)
    raise AssertionError(f"{node.url} never reached {requests} requests")


def test_table_through_a_pipe_cuts_nothing(two_peered_nodes):
    a, b = two_peered_nodes
    code, count = run_piped(f"grep -c -- {LONG_CLUSTER}", "--once", a.url, b.url)
    assert (code, count.strip()) == (0, "1")  # the cluster's row, its name whole

    code, out = run_piped("cat", "--once", a.url, b.url)
    assert code == 0
    assert max(len(line) for line in out.splitlines()) > 80  # as wide as the tables need
    assert "…" not in out
    assert table_cells(out, LONG_CLUSTER)[:7] == [LONG_CLUSTER, "2", "3", human_bytes(3500), "10.9.0.1 (2)",
                                                  "10.9.0.2 (1)", "1"]
    # two nodes on one host stay apart: each full address on its own row
    assert table_cells(out, f"{target_label(a.url)} ◉")[1] == "up"
    assert table_cells(out, target_label(b.url))[1] == "up"
    assert "2/2 nodes answering" in out
    assert "\x1b[" not in out  # no colour codes in a pipe


def test_wide_through_a_pipe_adds_columns_and_every_peer(two_peered_nodes):
    a, b = two_peered_nodes
    code, out = run_piped("cat", "--once", "--output", "wide", a.url, b.url)
    assert code == 0 and "…" not in out
    header = next(line for line in out.splitlines() if "Cluster" in line and "Mean/engine" in line)
    assert "Updated" in header
    assert table_cells(out, LONG_CLUSTER)[3] == "1.5"  # mean in flight per engine
    node_header = next(line for line in out.splitlines() if line.startswith("┃ Node") and "Tombstones" in line)
    assert "Log level" in node_header and "Ready" in node_header
    # the peers table, last: one row per node and peer, here A -> B and B -> A
    peers_table = out[out.index("\nPeers\n"):]
    rows = [[c.strip() for c in line.strip("│").split("│")] for line in peers_table.splitlines()
            if line.startswith("│")]
    # Each peer starts on HTTP batches and moves to the stream once its status says it has one.
    assert [row[:2] for row in rows] == [[target_label(a.url), target_label(b.url)],
                                         [target_label(b.url), target_label(a.url)]]
    assert all(row[2] in ("batch", "stream") for row in rows)


def test_json_through_a_pipe_follows_the_schema(two_peered_nodes):
    a, b = two_peered_nodes
    code, document = run_json(a.url, b.url)
    assert code == 0
    jsonschema_rs.validate(JSON_SCHEMA, document)
    assert document["schema_version"] == 1 and document["answering"] == 2
    assert document["view_node"] == a.url
    clusters = {c["name"]: c for c in document["clusters"]}
    assert [c["name"] for c in document["clusters"]] == [LONG_CLUSTER, "embed"]  # busiest first
    assert clusters[LONG_CLUSTER] | {"updated_age_seconds": None} == {
        "name": LONG_CLUSTER, "engines": 2, "in_flight": 3, "prompt_bytes": 3500,
        "busiest": {"ip": "10.9.0.1", "queued": 2}, "idlest": {"ip": "10.9.0.2", "queued": 1}, "spread": 1,
        "kv_blocks": None, "kv_engines": None, "updated_age_seconds": None,
    }
    assert document["clusters_empty_reason"] is None
    assert "engines" not in document and "cluster" not in document
    nodes = document["nodes"]
    assert [n["url"] for n in nodes] == [a.url, b.url]
    assert [(n["state"], n["viewed"], n["requests"], n["engines"]) for n in nodes] == [
        ("up", True, 4, 3), ("up", False, 4, 3)]
    assert nodes[0]["peers"][0]["peer"] == f"127.0.0.1:{b.port}"
    assert nodes[0]["fingerprint"] == nodes[1]["fingerprint"]
    assert document["agreement"] == {"basis": "digest", "agree": True, "nodes": [a.url, b.url], "differences": []}


def test_json_with_cluster_lists_its_engines(loaded_node):
    code, document = run_json("--cluster", "chat", loaded_node.url)
    assert code == 0
    jsonschema_rs.validate(JSON_SCHEMA, document)
    assert document["cluster"] == "chat"
    engines = [{k: e[k] for k in ("ip", "queued", "prompt_bytes", "share", "mark")} for e in document["engines"]]
    assert engines == [
        {"ip": "10.1.0.1", "queued": 2, "prompt_bytes": 4000, "share": 2 / 3, "mark": None},
        {"ip": "10.1.0.2", "queued": 1, "prompt_bytes": 500, "share": 1 / 3, "mark": None},
    ]
    code, document = run_json("--cluster", "no-such-cluster", loaded_node.url)
    assert code == 0 and document["engines"] == []
    jsonschema_rs.validate(JSON_SCHEMA, document)


def test_json_exit_codes_and_failures_are_the_tables(loaded_node):
    from nodeproc import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    code, document = run_json(loaded_node.url, dead)
    assert code == 1
    jsonschema_rs.validate(JSON_SCHEMA, document)
    down = document["nodes"][1]
    assert (down["url"], down["state"], down["requests"], down["peers"]) == (dead, "down", None, None)
    assert "connection refused" in down["detail"]
    assert document["answering"] == 1 and len(document["clusters"]) == 2

    code, document = run_json(dead)
    assert code == 1
    jsonschema_rs.validate(JSON_SCHEMA, document)
    assert document["clusters"] == [] and document["clusters_empty_reason"] == "no_node_answered"
    assert document["view_node"] is None

    code, document = run_json("--dns", "name.invalid", "--dns-server", "127.0.0.1:9")  # nothing answers there
    assert code == 1
    jsonschema_rs.validate(JSON_SCHEMA, document)
    assert document["discovery_error"].startswith("cannot resolve name.invalid") and document["nodes"] == []


def test_an_empty_overview_says_why(node):
    code, out = run_piped("cat", "--once", node.url)
    assert code == 0
    assert f"No clusters yet: {target_label(node.url)} answers but holds no load" in out
    code, document = run_json(node.url)
    assert (code, document["clusters"], document["clusters_empty_reason"]) == (0, [], "no_clusters_yet")

    from nodeproc import free_port

    code, out = run_piped("cat", "--once", f"http://127.0.0.1:{free_port()}")
    assert code == 1
    assert "No clusters to show: the node has not answered" in out
    code, document = run_json(f"http://127.0.0.1:{free_port()}")
    assert (code, document["clusters"], document["clusters_empty_reason"]) == (1, [], "no_node_answered")


def test_output_without_once_is_a_usage_error():
    code, _, err = run_console("--output", "json")
    assert code == 2 and "--output json needs --once" in err
    code, _, err = run_console("--once", "--output", "yaml")
    assert code == 2 and "invalid choice: 'yaml'" in err
