"""Prints the Python sessions of docs/client.md, run against real nodes
(twistd metacenter on port 8080), so their outputs can be pasted as they are:

    .venv/bin/python tests/client/client_docs_sessions.py loop      # one node on 127.0.0.1
    .venv/bin/python tests/client/client_docs_sessions.py cluster   # three nodes on 127.0.0.2-4
    .venv/bin/python tests/client/client_docs_sessions.py pick      # needs issue 10's routes

Not a test (pytest does not collect it).
"""

import code
import contextlib
import io
import os
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for nodeproc
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository, for metacenter

from nodeproc import NodeProcess  # noqa: E402

SESSIONS = {
    'loop': (['127.0.0.1'], 'from metacenter.client import Client, MetacenterError, prompt_hashes\nclient = Client(["http://127.0.0.1:8080"])\nprompt = bytes((7 * i) % 256 for i in range(1200))\nhashes = prompt_hashes(prompt)\nhashes\nclient.cache_query("llama3-70b", hashes)\nclient.load("llama3-70b")\nclient.add_request("llama3-70b", "r1", "10.0.0.1", prompt_length=len(prompt))\nclient.load("llama3-70b")\nclient.placement("r1")\nclient.delete_prompt("r1")\nclient.load("llama3-70b")\nclient.delete_request("r1")\nclient.load("llama3-70b")\nclient.cache_save("llama3-70b", hashes, "10.0.0.1")\nclient.cache_query("llama3-70b", hashes + [12345], topk=10)\nclient.route_score("llama3-70b", hashes, ips=["10.0.0.1", "10.0.0.2"])\ntry:\n    client.add_request("llama3-70b", "r2", "10.0.0.1", prompt_length=True)\nexcept MetacenterError as e:\n    print(e.status, e.code, e.reason)\n\nclient.close()\n'),
    'cluster': (['127.0.0.2', '127.0.0.3', '127.0.0.4'], 'from metacenter.client import Client, NodeUnavailable\nclient = Client(["http://127.0.0.2:8080", "127.0.0.3:8080", "127.0.0.4:8080"], failure_threshold=3)\nclient.nodes\nclient.node_for("llama3-70b"), client.node_for("mistral-7b")\nclient.add_request("llama3-70b", "r1", "10.0.0.1", prompt_length=1200)\nclient.placement("r1")\nimport time; time.sleep(0.1)  # replication to the other nodes takes a few ms\nkill_node("http://127.0.0.4:8080")  # SIGKILL: the node of llama3-70b dies\nclient.add_request("llama3-70b", "r2", "10.0.0.1", prompt_length=800)\nclient.placement("r2")\nclient.load("llama3-70b")\nclient.load("llama3-70b"); client.load("llama3-70b")\nclient.breakers()\nclient.node_for("llama3-70b")\nclient.delete_request("r1")\nclient.load("llama3-70b")\nkill_node("http://127.0.0.2:8080"), kill_node("http://127.0.0.3:8080")\ntry:\n    client.load("llama3-70b")\nexcept NodeUnavailable as e:\n    print(e)\n    print(e.attempts)\n\n'),
    'pick': (['127.0.0.1'], 'from metacenter.client import Client, MetacenterError\nclient = Client(["http://127.0.0.1:8080"])\nclient.lease_keepalive("gateway-7f9c", ttl_ms=10000)\nclient.pick("llama3-70b", "r3", prompt_length=1200, ips=["10.0.0.1", "10.0.0.2"], lease="gateway-7f9c")\nclient.pick("llama3-70b", "r3", prompt_length=1200, ips=["10.0.0.1", "10.0.0.2"], lease="gateway-7f9c")\nclient.leases()\nclient.refresh(["r3"])\nclient.lease_revoke("gateway-7f9c")\nclient.load("llama3-70b")\nclient.reset_engine("llama3-70b", "10.0.0.1")\n'),
}


def port_is_free(host, port):
    # As twistd binds: SO_REUSEADDR, so a TIME_WAIT left by a previous run does not count.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def run(lines, namespace):
    """Feeds ``lines`` to an interactive console; returns the transcript."""
    console = code.InteractiveConsole(namespace)
    transcript, more = [], False
    for line in lines:
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            next_more = console.push(line)
        transcript.append(("... " if more else ">>> ") + line if line or not more else "...")
        more = next_more
        if captured.getvalue():
            transcript.append(captured.getvalue().rstrip("\n"))
    return "\n".join(transcript)


def main(name):
    hosts, text = SESSIONS[name]
    port = 8080
    assert all(port_is_free(host, port) for host in hosts), "port 8080 is taken"
    nodes = []
    for host in hosts:
        peers = [arg for other in hosts if other != host for arg in ("--peer", f"{other}:{port}")]
        nodes.append(NodeProcess(host, port, *peers))
    try:
        for node in nodes:
            node.start(wait_ready=True)
        namespace = {"__name__": "__console__",
                     "kill_node": lambda url: [node.kill() for node in nodes if node.url == url]}
        print(run(text.splitlines(), namespace))
    finally:
        for node in nodes:
            if node.process is not None and node.process.poll() is None:
                node.stop()


if __name__ == "__main__":
    main(sys.argv[1])
