"""Two real `twistd metacenter` nodes (127.0.0.2 and 127.0.0.3) that find each
other through a real DNS server (`twistd dns` with a zone file, its own
process on 127.0.0.1), replicate, run anti-entropy and expire requests, with
some gateway-like load on them: every series the dashboard and the alert rules
use exists on their ``/metrics``.

    cluster = LiveCluster.start(tmp_dir)
    cluster.nodes, cluster.series, cluster.dns_port
    cluster.stop()
"""

import json
import os
import subprocess
import tempfile
import time

from prometheus_client.parser import text_string_to_metric_families

from nodeproc import TWISTD, NodeProcess, free_port, port_is_free

PEERS_NAME = "metacenter-peers.test"
HOSTS = ("127.0.0.2", "127.0.0.3")
# The cache's known answer (docs/cache.md): the hashes of a 1,200-byte prompt.
PROMPT = [4269816323887316428, 4738464904102037223, 8673195530823563900]


def sample_labels(exposition):
    """{sample name: its label names} for the samples (not merely the # TYPE
    lines) of a /metrics text."""
    out = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def shared_free_port(hosts):
    for _ in range(50):
        port = free_port(hosts[0])
        if all(port_is_free(h, port) for h in hosts):
            return port
    raise RuntimeError("no port free on every host")


class LiveCluster:
    def __init__(self, directory):
        self.directory = directory
        self.nodes = []
        self.dns = None
        self.dns_port = None
        self.series = {}  # sample name -> label names, over every scrape

    @classmethod
    def start(cls, directory=None):
        c = cls(directory or tempfile.mkdtemp(prefix="metacenter-live-"))
        try:
            c._start()
        except BaseException:
            c.stop()
            raise
        return c

    def _start(self):
        # A zone, not a hosts file: twisted's hosts resolver answers NXDOMAIN
        # for AAAA where a zone answers "no records", as a Kubernetes DNS does.
        zone_file = os.path.join(self.directory, "zone.py")
        with open(zone_file, "w") as f:
            f.write('zone = [SOA("test", mname="ns.test", rname="root.test", serial=1, minimum=1),\n')
            f.writelines(f'        A("{PEERS_NAME}", "{h}", ttl=1),\n' for h in HOSTS)
            f.write("]\n")
        self.dns_port = free_port()
        self._dns_log = open(os.path.join(self.directory, "dns.log"), "wb")
        self.dns = subprocess.Popen(
            [TWISTD, "--nodaemon", "--pidfile=", "dns", "--interface", "127.0.0.1", "--port", str(self.dns_port),
             "--pyzone", zone_file],
            stdout=self._dns_log, stderr=subprocess.STDOUT, cwd=self.directory)
        port = shared_free_port(HOSTS)
        common = ["--peers-dns", PEERS_NAME, "--dns-server", f"127.0.0.1:{self.dns_port}", "--peer-port", str(port),
                  "--dns-interval", "0.5s", "--anti-entropy-interval", "1s", "--warm-start-timeout", "5s",
                  # Requests expire within a second: the expiry series appear.
                  "--request-expire", "1s", "--gc-interval", "0.5s"]
        first = NodeProcess(HOSTS[0], port, *common, "--advertise", HOSTS[0]).start(wait_ready=True)
        self.nodes.append(first)
        self._load(first, "before")
        second = NodeProcess(HOSTS[1], port, *common, "--advertise", HOSTS[1]).start(wait_ready=True)
        self.nodes.append(second)
        self._load(first, "a")
        self._load(second, "b")
        self._wait(lambda: all(self._peer_acked(n) for n in self.nodes), "replication to both peers")
        self._scrape()
        self._wait(lambda: all(self._expired(n) for n in self.nodes), "a request expiry on both nodes")
        self._wait(lambda: all(self._exchanged(n) for n in self.nodes), "an anti-entropy exchange on both nodes")
        self._load(first, "c")  # fresh load after the expiry, for the gauges
        self._scrape()

    def _load(self, node, tag):
        cluster = "llama3-70b"
        for i in range(6):
            rid = f"{tag}-{i}"
            node.call("POST", "/v1/load/stats",
                      {"cluster": cluster, "request_id": rid, "ip": f"10.0.0.{i % 3 + 1}", "prompt_length": 1200})
            if i % 2:
                node.call("DELETE", "/v1/load/prompt", raw=json.dumps({"request_id": rid}).encode())
            if i % 3 == 0:
                node.call("DELETE", "/v1/load/stats", raw=json.dumps({"request_id": rid}).encode())
        node.call("GET", f"/v1/load/stats?cluster={cluster}")
        node.call("POST", "/v1/cache/save", {"cluster": cluster, "prompt_hash": PROMPT[:2], "ip": "10.0.0.1"})
        node.call("POST", "/v1/cache/query", {"cluster": cluster, "prompt_hash": PROMPT, "topk": 10})
        node.call("POST", "/v1/cache/query", {"cluster": cluster, "prompt_hash": [1, 2], "topk": 10})
        node.call("POST", "/v1/load/stats", {"cluster": cluster, "request_id": "bad", "ip": "x"})  # a 400

    def metrics_text(self, node):
        status, _, body = node.call("GET", "/metrics")
        assert status == 200
        return body.decode() if isinstance(body, bytes) else json.dumps(body)

    def _scrape(self):
        for node in self.nodes:
            for name, labels in sample_labels(self.metrics_text(node)).items():
                self.series.setdefault(name, set()).update(labels)

    def _peer_acked(self, node):
        return "metacenter_replication_lag_seconds_bucket" in self.metrics_text(node)

    def _exchanged(self, node):
        return "metacenter_antientropy_unresolved_requests{" in self.metrics_text(node)

    def _expired(self, node):
        return 'metacenter_expired_total{kind="request"}' in self.metrics_text(node)

    @staticmethod
    def _wait(predicate, what, timeout=20.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError(f"gave up waiting for {what}")
            time.sleep(0.1)

    def stop(self):
        for node in self.nodes:
            node.stop()
        if self.dns is not None and self.dns.poll() is None:
            self.dns.terminate()
            self.dns.wait(5)
            self._dns_log.close()
