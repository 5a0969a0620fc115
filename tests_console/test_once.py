"""``metacenter-console --once`` as an operator runs it: a real process
against real nodes, its tables and its exit codes."""

import os
import subprocess
import sys

import pytest

from console.format import human_bytes
from console.nodeclient import target_label
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
    assert "1/1 nodes answering" in out


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
