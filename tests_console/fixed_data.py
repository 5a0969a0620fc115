"""Fixed, realistic data for snapshot tests and the documentation's
screenshots: three nodes (one down), four clusters, five minutes of history.
Nothing here depends on the wall clock."""

from console.app import ConsoleApp
from console.format import plural
from console.model import (
    CacheFigures,
    Cluster,
    Engine,
    NodeSnapshot,
    NodeStatus,
    Overview,
    Peer,
)

NOW = 1_750_000_000.0  # the fixed "now" of every fixed-data app
NOW_NS = int(NOW * 1e9)
NODE_A, NODE_B, NODE_C = "http://10.0.0.5:8080", "http://10.0.0.6:8080", "http://10.0.0.7:8080"
TARGETS = [NODE_A, NODE_B, NODE_C]
KIB = 1024

# cluster -> [(engine ip, queued requests, prompt bytes, seconds since update)]
LOAD = {
    "llama-3-70b": [("10.0.1.11", 14, 1900 * KIB, 0.2), ("10.0.1.12", 6, 700 * KIB, 0.4),
                    ("10.0.1.13", 5, 512 * KIB, 1.1), ("10.0.1.14", 0, 0, 48.0)],
    "qwen2.5-32b": [("10.0.2.21", 3, 96 * KIB, 0.9), ("10.0.2.22", 4, 130 * KIB, 2.5), ("10.0.2.23", 3, 88 * KIB, 3.0)],
    "deepseek-r1": [("10.0.3.31", 9, 4200 * KIB, 0.1), ("10.0.3.32", 8, 3900 * KIB, 0.3)],
    "mistral-7b": [("10.0.4.41", 0, 0, 130.0), ("10.0.4.42", 0, 0, 140.0)],
}
CACHE = {"llama-3-70b": CacheFigures(18234, 4), "qwen2.5-32b": CacheFigures(5120, 3),
         "deepseek-r1": CacheFigures(40961, 2)}


def load_at(scale):
    """LOAD with every queue multiplied by ``scale`` (0..1), for history."""
    return {
        name: [(ip, round(queued * scale), round(prompt * scale), age) for ip, queued, prompt, age in engines]
        for name, engines in LOAD.items()
    }


def overview(load, time_ns=NOW_NS):
    clusters = tuple(
        Cluster(name, tuple(Engine(ip, q, p, time_ns - int(age * 1e9)) for ip, q, p, age in engines))
        for name, engines in load.items()
    )
    return Overview(time_ns, clusters)


def status(node, peers, load, started_ago=86_400 * 3 + 3_600 * 5, log_level=None):
    requests = sum(q for engines in load.values() for _, q, _, _ in engines)
    # a stand-in for the node's digest: equal exactly when the live counts are
    live = {name: sum(q for _, q, _, _ in engines) for name, engines in load.items()}
    digest = {name: (count, f"{count * 7919 + len(name):016x}") for name, count in live.items()}
    return NodeStatus(
        version="0.1.0", node=node, started_at_ns=NOW_NS - int(started_ago * 1e9), ready=True,
        requests=requests, tombstones=212, engines=sum(len(e) for e in load.values()), clusters=len(load),
        peers=tuple(peers), digest=digest, log_level=log_level,
    )


def peer(name, queue=0, sent=48_211, failed=0, dropped=0, lag_ms=3.2):
    return Peer(name, "batch", queue, sent, failed, dropped, lag_ms)


def node_snapshots(when=NOW, scale=1.0, disagree=False, empty=False):
    """A and B answer (B reports its log level, DEBUG; A is of a version that
    does not), C does not. ``empty``: the nodes hold no clusters yet."""
    load = {} if empty else load_at(scale)
    load_b = {} if empty else load_at(scale)
    if disagree:  # node B missed the last two adds of one cluster
        ip, q, p, age = load_b["qwen2.5-32b"][1]
        load_b["qwen2.5-32b"][1] = (ip, q - 2, p, age)
    time_ns = int(when * 1e9)
    # both replicate to C, which does not answer: a queue builds up, sends fail
    peers_a = [peer("10.0.0.6:8080"), peer("10.0.0.7:8080", queue=37, failed=12, lag_ms=None)]
    peers_b = [peer("10.0.0.5:8080", lag_ms=4.8), peer("10.0.0.7:8080", queue=35, failed=11, lag_ms=None)]
    a = NodeSnapshot(NODE_A, when, 0.004, ready=True, overview=overview(load, time_ns),
                     status=status("10.0.0.5:8080", peers_a, load), cache=CACHE, leases=LEASES)
    b = NodeSnapshot(NODE_B, when, 0.006, ready=True, overview=overview(load_b, time_ns),
                     status=status("10.0.0.6:8080", peers_b, load_b, started_ago=3_600 * 2, log_level="DEBUG"),
                     cache=CACHE)
    c = NodeSnapshot(NODE_C, when, 2.0, error="timed out after 2s")
    return [a, b, c]


# Two gateways' leases on node A; node B's are not reported (an older node).
LEASES = ({"lease": "gateway-7f9c", "ttl_ms": 10000, "expires_in_ms": 8400, "requests": 41},
          {"lease": "gateway-2b1d", "ttl_ms": 10000, "expires_in_ms": 1200, "requests": 17})


def history_scale(step, steps):
    """A deterministic busy-then-quieter-then-busy wave between 0.2 and 1."""
    pattern = [0.2, 0.3, 0.5, 0.8, 1.0, 0.9, 0.7, 0.6, 0.5, 0.6, 0.8, 1.0]
    return pattern[step * len(pattern) // steps]


class FixedSource:
    """A data source that always returns the same snapshots; the app reads
    it exactly as it reads ``HttpSource``."""

    def __init__(self, snapshots):
        self.snapshots = {s.target: s for s in snapshots}

    def describe(self):
        return plural(len(self.snapshots), "node")  # what FixedTargets says for as many URLs

    def discover(self):
        return list(self.snapshots)

    def fetch(self, target):
        return self.snapshots[target]

    def set_log_level(self, target, level):
        raise RuntimeError("fixed data: no node to talk to")

    def reset_engine(self, target, cluster, ip):
        raise RuntimeError("fixed data: no node to talk to")


def outage_snapshots(when=NOW):
    return [NodeSnapshot(t, when, 0.0, error="connection refused") for t in TARGETS]


def fixed_app(disagree=False, open_cluster=None, history_steps=60, outage_for=None, empty=False):
    """A ConsoleApp on fixed data and a fixed clock, with five minutes of
    history already recorded, that never polls on its own. ``outage_for``
    seconds: every node stopped answering that long ago. ``empty``: the
    nodes answer but hold no clusters (and there is no history)."""
    current = outage_snapshots() if outage_for else node_snapshots(disagree=disagree, empty=empty)
    if empty:
        history_steps = 0
    history_end = NOW - (outage_for or 0)
    app = ConsoleApp(FixedSource(current), interval=None, clock=lambda: NOW, open_cluster=open_cluster)
    app.state.set_targets(TARGETS)
    for step in range(history_steps):
        when = history_end - 300 + step * 300 / history_steps
        for snapshot in node_snapshots(when, history_scale(step, history_steps)):
            app.state.absorb(snapshot)
    if outage_for:
        for snapshot in node_snapshots(history_end):
            app.state.absorb(snapshot)
    for snapshot in current:
        app.state.absorb(snapshot)
    return app
