"""``metacenter-console --once --output json``: what the tables show, as one
JSON document for scripts, and the JSON Schema it follows.

The schema is part of the console's interface (docs/console.md prints it and a
test keeps the two equal). Within one ``schema_version`` fields are only
added, never renamed, removed or changed in meaning; units are the base units
(bytes, seconds), times are the console's clock in seconds since the epoch.
"""

from console.model import LOG_LEVELS
from console.state import DOWN, NOT_READY, SLOW, UP, WAITING, state_fingerprint
from console.views import NO_CLUSTERS_YET, NO_NODE_ANSWERED, empty_reason, engine_mark, node_rows

SCHEMA_VERSION = 1

_COUNT = {"type": "integer", "minimum": 0}
_COUNT_OR_NULL = {"type": ["integer", "null"], "minimum": 0}
_SECONDS_OR_NULL = {"type": ["number", "null"]}
_URL = {"type": "string", "pattern": "^https?://"}


def _object(properties, required=None):
    """Every listed field is always present (null where the schema allows)."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


_ENGINE_LOAD = {
    "description": "An engine and its requests in flight.",
    "oneOf": [{"type": "null"}, _object({"ip": {"type": "string"}, "queued": _COUNT})],
}

_CLUSTER = _object({
    "name": {"type": "string"},
    "engines": {**_COUNT, "description": "Number of engines."},
    "in_flight": {**_COUNT, "description": "Requests in flight: the sum of the engines' queued_req_num."},
    "prompt_bytes": {**_COUNT, "description": "Prompt bytes still in prefill."},
    "busiest": _ENGINE_LOAD,
    "idlest": _ENGINE_LOAD,
    "spread": {**_COUNT, "description": "In-flight requests of the busiest minus those of the idlest engine."},
    "kv_blocks": {**_COUNT_OR_NULL, "description": "KV-cache blocks; null when the node has none for it."},
    "kv_engines": {**_COUNT_OR_NULL, "description": "Engines holding KV-cache blocks; null as kv_blocks."},
    "updated_age_seconds": {**_SECONDS_OR_NULL,
                            "description": "Since any engine of the cluster last changed, on the node's clock."},
})

_ENGINE = _object({
    "ip": {"type": "string"},
    "queued": {**_COUNT, "description": "Requests in flight (queued_req_num)."},
    "prompt_bytes": {**_COUNT, "description": "Prompt bytes still in prefill."},
    "share": {"type": "number", "minimum": 0, "maximum": 1,
              "description": "Fraction of the cluster's requests in flight."},
    "mark": {"enum": ["hot", "idle", None],
             "description": "hot: at least 1.5 times and 2 more than the mean; idle: at most half the mean."},
    "updated_age_seconds": {**_SECONDS_OR_NULL, "description": "Since the engine last changed."},
})

_PEER = _object({
    "peer": {"type": "string"},
    "mode": {"type": "string"},
    "queue_depth": _COUNT,
    "sent": _COUNT,
    "failed": _COUNT,
    "dropped": _COUNT,
    "lag_seconds": _SECONDS_OR_NULL,
})

_NODE = _object({
    "url": _URL,
    "state": {"enum": [UP, SLOW, NOT_READY, DOWN, WAITING]},
    "detail": {"type": "string", "description": "Why the node is in this state."},
    "viewed": {"type": "boolean", "description": "The clusters and engines are this node's view."},
    "ready": {"type": ["boolean", "null"], "description": "/readyz answered 200; null when not polled."},
    "latency_seconds": {**_SECONDS_OR_NULL, "description": "How long the poll took; null when it failed."},
    "version": {"type": ["string", "null"]},
    "uptime_seconds": _SECONDS_OR_NULL,
    "requests": _COUNT_OR_NULL,
    "tombstones": _COUNT_OR_NULL,
    "engines": _COUNT_OR_NULL,
    "clusters": _COUNT_OR_NULL,
    "log_level": {"type": ["string", "null"],
                  "description": f"One of {' '.join(LOG_LEVELS)}; null when the node does not report it."},
    "replication_queue": {**_COUNT_OR_NULL, "description": "Events waiting for peers, all peers together."},
    "max_lag_seconds": _SECONDS_OR_NULL,
    "replication_failures": {**_COUNT_OR_NULL, "description": "Failed plus dropped replication events."},
    "fingerprint": {"type": ["string", "null"], "description": "Equal on nodes that hold the same state."},
    "peers": {"oneOf": [{"type": "null"}, {"type": "array", "items": _PEER}]},
    "problems": {"type": "array", "items": {"type": "string"},
                 "description": "Parts of an answer that could not be used (such as a failing /v1/node/status)."},
})

JSON_SCHEMA = {
    "title": "metacenter-console --once --output json",
    **_object({
        "schema_version": {"const": SCHEMA_VERSION},
        "time": {"type": "number", "description": "When the nodes were polled (console clock)."},
        "source": {"type": "string", "description": "What was watched: URLs or a DNS name."},
        "discovery_error": {"type": ["string", "null"], "description": "Why the DNS name gave no node."},
        "answering": {**_COUNT, "description": "Nodes that answered; the exit status is 0 when all did."},
        "view_node": {"oneOf": [{"type": "null"}, _URL],
                      "description": "The node whose clusters and engines are shown; null when none answered."},
        "clusters": {"type": "array", "items": _CLUSTER, "description": "Busiest first."},
        "clusters_empty_reason": {
            "enum": [NO_NODE_ANSWERED, NO_CLUSTERS_YET, None],
            "description": "Why clusters is empty; null when it is not.",
        },
        "cluster": {"type": "string", "description": "Only with --cluster: its name."},
        "engines": {"type": "array", "items": _ENGINE,
                    "description": "Only with --cluster: its engines, busiest first; empty when it has none."},
        "nodes": {"type": "array", "items": _NODE, "description": "In command-line or DNS order."},
        "agreement": _object({
            "basis": {"enum": ["digest", "totals", None],
                      "description": "What was compared; null when fewer than two nodes have a status."},
            "agree": {"type": ["boolean", "null"]},
            "nodes": {"type": "array", "items": _URL},
            "differences": {"type": "array", "items": {"type": "string"}},
        }),
    }, required=["schema_version", "time", "source", "discovery_error", "answering", "view_node", "clusters",
                 "clusters_empty_reason", "nodes", "agreement"]),
}
# With --cluster, "cluster" and "engines" are always there too.
JSON_SCHEMA["dependentRequired"] = {"cluster": ["engines"], "engines": ["cluster"]}


def _engine_load(engine):
    return None if engine is None else {"ip": engine.ip, "queued": engine.queued}


def _cluster(cluster, cache, snapshot, now):
    newest = max(cluster.engines, key=lambda e: e.updated_ns, default=None)
    return {
        "name": cluster.name,
        "engines": len(cluster.engines),
        "in_flight": cluster.in_flight,
        "prompt_bytes": cluster.prompt_bytes,
        "busiest": _engine_load(cluster.busiest),
        "idlest": _engine_load(cluster.idlest),
        "spread": cluster.spread,
        "kv_blocks": None if cache is None else cache.blocks,
        "kv_engines": None if cache is None else cache.engines,
        "updated_age_seconds": None if newest is None else snapshot.engine_age(newest, now),
    }


def _engine(engine, cluster, snapshot, now):
    total = cluster.in_flight
    return {
        "ip": engine.ip,
        "queued": engine.queued,
        "prompt_bytes": engine.prompt_bytes,
        "share": engine.queued / total if total else 0.0,
        "mark": engine_mark(engine, cluster) or None,
        "updated_age_seconds": snapshot.engine_age(engine, now),
    }


def _lag_seconds(lag_ms):
    return None if lag_ms is None else lag_ms / 1000.0


def _node(row, state):
    snapshot, status = row.snapshot, row.status
    latest = state.latest.get(row.target)
    uptime = None
    if status is not None and status.started_at_ns and snapshot.overview is not None and snapshot.overview.time_ns:
        uptime = (snapshot.overview.time_ns - status.started_at_ns) / 1e9 + (row.now - snapshot.fetched_at)
    problems = []
    if latest is not None and latest.reachable:
        problems = [p for p in (latest.status_error, *latest.notes) if p]

    def number(name):
        return None if status is None else getattr(status, name)

    return {
        "url": row.target,
        "state": row.health.state,
        "detail": row.health.detail,
        "viewed": row.viewed,
        "ready": None if latest is None or not latest.reachable else latest.ready,
        "latency_seconds": None if latest is None or not latest.reachable else latest.latency,
        "version": number("version"),
        "uptime_seconds": uptime,
        "requests": number("requests"),
        "tombstones": number("tombstones"),
        "engines": number("engines"),
        "clusters": number("clusters"),
        "log_level": number("log_level"),
        "replication_queue": number("replication_queue"),
        "max_lag_seconds": None if status is None else _lag_seconds(status.max_lag_ms),
        "replication_failures": number("replication_failures"),
        "fingerprint": state_fingerprint(status),
        "peers": None if status is None else [
            {"peer": p.peer, "mode": p.mode, "queue_depth": p.queue_depth, "sent": p.sent, "failed": p.failed,
             "dropped": p.dropped, "lag_seconds": _lag_seconds(p.lag_ms)}
            for p in sorted(status.peers, key=lambda p: p.peer)
        ],
        "problems": problems,
    }


def once_document(state, now, source_description, cluster_name=None, discovery_error=None):
    """The JSON document of one ``--once`` poll (a dict that follows JSON_SCHEMA)."""
    snapshot, _ = state.view_snapshot()
    overview = None if snapshot is None else snapshot.overview
    cache = {} if snapshot is None else (snapshot.cache or {})
    clusters = [] if overview is None else sorted(overview.clusters, key=lambda c: (-c.in_flight, c.name))
    agreement = state.agreement()
    document = {
        "schema_version": SCHEMA_VERSION,
        "time": now,
        "source": source_description,
        "discovery_error": discovery_error,
        "answering": state.reachable_count(),
        "view_node": None if snapshot is None else snapshot.target,
        "clusters": [_cluster(c, cache.get(c.name), snapshot, now) for c in clusters],
        "clusters_empty_reason": empty_reason(state),
    }
    if cluster_name is not None:
        cluster = None if overview is None else overview.cluster(cluster_name)
        engines = [] if cluster is None else sorted(cluster.engines, key=lambda e: (-e.queued, e.ip))
        document["cluster"] = cluster_name
        document["engines"] = [_engine(e, cluster, snapshot, now) for e in engines]
    document["nodes"] = [_node(row, state) for row in node_rows(state, now)]
    document["agreement"] = {
        "basis": agreement.basis or None,
        "agree": agreement.agree,
        "nodes": list(agreement.nodes),
        "differences": list(agreement.differences),
    }
    return document
