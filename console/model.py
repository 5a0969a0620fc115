"""What a node tells us, as immutable values, and the figures derived from it.

Parsing is strict about types (a node that answers nonsense is reported as
such, see ``BadResponse``) but tolerant of missing optional fields, so the
console keeps working against nodes of other versions.
"""

from dataclasses import dataclass, field

# The wire's level names, lowest first (POST /log/level).
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL")


class BadResponse(ValueError):
    """A node answered, but not with what the API promises."""


def _int(value, name, default=None):
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadResponse(f"{name}: expected an integer, got {value!r}")
    return value


def _str(value, name):
    if not isinstance(value, str):
        raise BadResponse(f"{name}: expected a string, got {value!r}")
    return value


def _dict(value, name):
    if not isinstance(value, dict):
        raise BadResponse(f"{name}: expected an object, got {type(value).__name__}")
    return value


def _list(value, name):
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadResponse(f"{name}: expected a list, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Engine:
    ip: str
    queued: int
    prompt_bytes: int
    updated_ns: int

    @classmethod
    def parse(cls, raw):
        raw = _dict(raw, "engine")
        return cls(
            ip=_str(raw.get("ip"), "ip"),
            queued=_int(raw.get("queued_req_num"), "queued_req_num", 0),
            prompt_bytes=_int(raw.get("prompt_length"), "prompt_length", 0),
            updated_ns=_int(raw.get("updated_time"), "updated_time", 0),
        )


def _load_order(engine):
    """Busiest first: more queued requests, then more prompt bytes in prefill;
    the ip makes the order total so ties never flicker between refreshes."""
    return (-engine.queued, -engine.prompt_bytes, engine.ip)


@dataclass(frozen=True)
class Cluster:
    name: str
    engines: tuple

    @property
    def in_flight(self):
        return sum(e.queued for e in self.engines)

    @property
    def prompt_bytes(self):
        return sum(e.prompt_bytes for e in self.engines)

    @property
    def busiest(self):
        return min(self.engines, key=_load_order, default=None)

    @property
    def idlest(self):
        return max(self.engines, key=_load_order, default=None)

    @property
    def spread(self):
        """In-flight requests between the busiest and the idlest engine."""
        if not self.engines:
            return 0
        return self.busiest.queued - self.idlest.queued

    @property
    def mean_queued(self):
        return self.in_flight / len(self.engines) if self.engines else 0.0

    @property
    def updated_ns(self):
        return max((e.updated_ns for e in self.engines), default=0)


@dataclass(frozen=True)
class Overview:
    time_ns: int
    clusters: tuple

    @classmethod
    def parse(cls, raw):
        raw = _dict(raw, "overview")
        clusters = []
        for item in _list(raw.get("clusters"), "clusters"):
            item = _dict(item, "cluster")
            engines = tuple(Engine.parse(e) for e in _list(item.get("engines"), "engines"))
            clusters.append(Cluster(_str(item.get("cluster"), "cluster"), engines))
        return cls(time_ns=_int(raw.get("time"), "time", 0), clusters=tuple(clusters))

    def cluster(self, name):
        for cluster in self.clusters:
            if cluster.name == name:
                return cluster
        return None


@dataclass(frozen=True)
class Peer:
    peer: str
    mode: str
    queue_depth: int
    sent: int
    failed: int
    dropped: int
    lag_ms: float | None
    # Replication stream peers only (mode "stream"): frames unacknowledged,
    # reconnections, of which resumed at the peer's offset, repairs (the
    # peer fell behind the log), frames and bytes sent. For them the table's
    # Queue is the events not yet acknowledged, Sent the events sent and
    # Failed the events the peer refused.
    window: int = 0
    reconnects: int = 0
    resumes: int = 0
    repairs: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0

    @property
    def streaming(self):
        return self.mode == "stream"

    @classmethod
    def parse(cls, raw):
        raw = _dict(raw, "peer")
        lag = raw.get("lag_ms")
        if lag is not None and (isinstance(lag, bool) or not isinstance(lag, (int, float))):
            raise BadResponse(f"lag_ms: expected a number or null, got {lag!r}")
        stream = raw.get("mode") == "stream"
        return cls(
            peer=_str(raw.get("peer"), "peer"),
            mode=str(raw.get("mode") or ""),
            queue_depth=_int(raw.get("lag_events" if stream else "queue_depth"), "queue_depth", 0),
            sent=_int(raw.get("events_sent" if stream else "sent"), "sent", 0),
            failed=_int(raw.get("rejected" if stream else "failed"), "failed", 0),
            dropped=_int(raw.get("dropped"), "dropped", 0),
            lag_ms=None if lag is None else float(lag),
            **({name: _int(raw.get(name), name, 0) for name in
                ("window", "reconnects", "resumes", "repairs", "frames_sent", "bytes_sent")} if stream else {}),
        )


@dataclass(frozen=True)
class NodeStatus:
    version: str
    node: str
    started_at_ns: int
    ready: bool | None
    requests: int
    tombstones: int
    engines: int
    clusters: int
    peers: tuple
    # cluster -> (live requests, digest); None when the node does not offer digests
    digest: dict | None
    # The node's live log level (normally one of LOG_LEVELS); None when the
    # node does not report it (nodes before ``log_level`` in /v1/node/status).
    log_level: str | None = None

    @classmethod
    def parse(cls, raw):
        raw = _dict(raw, "status")
        digest = None
        if raw.get("digest") is not None:
            digest = {}
            for name, item in _dict(raw["digest"], "digest").items():
                item = _dict(item, f"digest[{name}]")
                digest[name] = (_int(item.get("live"), "live", 0), str(item.get("digest") or ""))
        ready = raw.get("ready")
        log_level = raw.get("log_level")
        if log_level is not None:
            # a level name this console does not know is shown as given
            log_level = _str(log_level, "log_level")
        return cls(
            version=str(raw.get("version") or "?"),
            node=str(raw.get("node") or ""),
            started_at_ns=_int(raw.get("started_at"), "started_at", 0),
            ready=ready if isinstance(ready, bool) else None,
            requests=_int(raw.get("requests"), "requests", 0),
            tombstones=_int(raw.get("tombstones"), "tombstones", 0),
            engines=_int(raw.get("engines"), "engines", 0),
            clusters=_int(raw.get("clusters"), "clusters", 0),
            peers=tuple(Peer.parse(p) for p in _list(raw.get("peers"), "peers")),
            digest=digest,
            log_level=log_level,
        )

    @property
    def replication_queue(self):
        return sum(p.queue_depth for p in self.peers)

    @property
    def max_lag_ms(self):
        return max((p.lag_ms for p in self.peers if p.lag_ms is not None), default=None)

    @property
    def replication_failures(self):
        return sum(p.failed + p.dropped for p in self.peers)


@dataclass(frozen=True)
class CacheFigures:
    blocks: int
    engines: int


def parse_cache_stats(raw):
    """``{"clusters": [{"cluster", "blocks", "engines"}]}`` -> {cluster: CacheFigures}."""
    raw = _dict(raw, "cache stats")
    figures = {}
    for item in _list(raw.get("clusters"), "clusters"):
        item = _dict(item, "cache cluster")
        figures[_str(item.get("cluster"), "cluster")] = CacheFigures(
            blocks=_int(item.get("blocks"), "blocks", 0), engines=_int(item.get("engines"), "engines", 0)
        )
    return figures


@dataclass(frozen=True)
class NodeSnapshot:
    """One poll of one node. ``error`` set means the node could not be read at
    all (down, timed out, or nonsense); the other fields are then empty."""

    target: str
    fetched_at: float  # console clock, seconds since the epoch
    latency: float  # seconds the poll took
    error: str | None = None
    ready: bool | None = None
    overview: Overview | None = None
    status: NodeStatus | None = None
    status_error: str | None = None  # /v1/node/status missing or failing
    cache: dict | None = None  # None: the node does not offer /v1/cache/stats
    notes: tuple = field(default=())
    # The gateway leases alive on the node (GET /v1/load/leases): a tuple of
    # its {"lease", "ttl_ms", "expires_in_ms", "requests"}; None when the
    # node does not offer them (older nodes).
    leases: tuple | None = None

    @property
    def reachable(self):
        return self.error is None

    def engine_age(self, engine, now):
        """Seconds since the engine last changed, measured on the node's clock
        (the overview carries the node's time) so clock skew between the node
        and the console does not distort it."""
        if not engine.updated_ns or self.overview is None or not self.overview.time_ns:
            return None
        return (self.overview.time_ns - engine.updated_ns) / 1e9 + (now - self.fetched_at)
