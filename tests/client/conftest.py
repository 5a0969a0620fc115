"""A real 3-node cluster for the client's tests: `twistd metacenter` on
127.0.0.2-4, one port, each node replicating to the other two (static
peers), shared by every test of tests/client/."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

import nodeproc
from nodeproc import NodeProcess

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]

# Tests that must not time out on a busy machine pass this; the 100 ms
# default is the gateway's production setting.
TIMEOUT = 5.0


def shared_port():
    return nodeproc.shared_port(HOSTS)


class ThreeNodes:
    def __init__(self):
        self.port = shared_port()
        self.nodes = [self.make_node(host) for host in HOSTS]

    def make_node(self, host):
        peers = [arg for other in HOSTS if other != host for arg in ("--peer", f"{other}:{self.port}")]
        return NodeProcess(host, self.port, *peers, "--replica-probe-interval", "0.5s")

    @property
    def urls(self):
        return [node.url for node in self.nodes]

    def start(self):
        for node in self.nodes:
            node.start(wait_ready=False, timeout=30.0)
        for node in self.nodes:
            node.wait_for("/readyz", 30.0)

    def index_of(self, url):
        return self.urls.index(url)

    def kill(self, index):
        self.nodes[index].kill()

    def restart(self, index):
        """A fresh process on the same address (blocking until it is ready)."""
        self.nodes[index].kill()
        self.nodes[index] = self.make_node(HOSTS[index])
        self.nodes[index].start(wait_ready=True, timeout=30.0)

    def stop(self):
        for node in self.nodes:
            node.stop(timeout=10)

    def requests_served(self, index, method, url):
        """How many requests of ``method url`` node ``index`` answered, any
        status, from its own http_request_status_code_total series (blocking)."""
        status, _, text = self.nodes[index].call("GET", "/metrics")
        assert status == 200
        total = 0
        for family in text_string_to_metric_families(text.decode()):
            if family.name != "http_request_status_code":
                continue
            for sample in family.samples:
                if (sample.name.endswith("_total") and sample.labels.get("method") == method
                        and sample.labels.get("url") == url):
                    total += sample.value
        return int(total)


@pytest.fixture(scope="session")
def three_nodes():
    cluster = ThreeNodes()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def healthy(three_nodes):
    """The cluster with every node running (a test before may have killed one)."""
    for index, node in enumerate(three_nodes.nodes):
        if node.process is None or node.process.poll() is not None:
            three_nodes.restart(index)
    return three_nodes
