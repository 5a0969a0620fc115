"""Count limits of the load table: whether a client's add that would create a
new cluster, a new engine or a new in-flight request is admitted, and whether
a new lease is. Pure: it reads the table's counts and raises ``LimitReached``;
the node decides where it applies (client admissions only, see
``CountLimits.exceeded``).

Each check is O(1): a few dict lookups and lengths.
"""

# The default counts, sized for a 2 GiB node (docs/deployment.md, "Memory
# sizing"): above what the benchmarks hold (20,000 clusters, 5,000 engines in
# one cluster, 1,000,000 in-flight requests), below what the budget allows.
DEFAULT_MAX_CLUSTERS = 50_000
DEFAULT_MAX_ENGINES_PER_CLUSTER = 10_000
DEFAULT_MAX_ENGINES = 100_000
DEFAULT_MAX_REQUESTS = 2_000_000
DEFAULT_MAX_LEASES = 10_000

# limit name (the metric's label) -> the setting that raises it.
SETTINGS = {
    "clusters": "--max-clusters",
    "engines_per_cluster": "--max-engines-per-cluster",
    "engines": "--max-engines",
    "requests": "--max-requests",
    "leases": "--max-leases",
}


class LimitReached(Exception):
    """A client's add (or lease) refused: the table holds as many of a kind
    as allowed. ``limit`` is the limit's name (a key of ``SETTINGS``),
    ``maximum`` its value, ``reason`` the whole sentence, naming the limit
    and the setting that raises it."""

    def __init__(self, limit: str, maximum: int, what: str):
        self.limit = limit
        self.maximum = maximum
        self.reason = (f"limit reached: {what} (at most {maximum}; raise {SETTINGS[limit]} "
                       f"or wait for some to finish or expire)")
        super().__init__(self.reason)


class CountLimits:
    """The count limits of one node; every value a positive int (ValueError
    otherwise).

    - ``max_clusters``: clusters in the load table;
    - ``max_engines_per_cluster``: engines of one cluster;
    - ``max_engines``: engines over all clusters (what memory is sized by);
    - ``max_requests``: in-flight (live) requests of the node;
    - ``max_leases``: gateway leases (``lease_exceeded``).
    """

    __slots__ = ("max_clusters", "max_engines_per_cluster", "max_engines", "max_requests", "max_leases")

    def __init__(self, max_clusters: int = DEFAULT_MAX_CLUSTERS,
                 max_engines_per_cluster: int = DEFAULT_MAX_ENGINES_PER_CLUSTER,
                 max_engines: int = DEFAULT_MAX_ENGINES, max_requests: int = DEFAULT_MAX_REQUESTS,
                 max_leases: int = DEFAULT_MAX_LEASES):
        for name, value in (("max_clusters", max_clusters), ("max_engines_per_cluster", max_engines_per_cluster),
                            ("max_engines", max_engines), ("max_requests", max_requests),
                            ("max_leases", max_leases)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, value)

    def exceeded(self, state, cluster: str, request_id: str, ip: str, lease: str | None = None) \
            -> LimitReached | None:
        """What an add of ``request_id`` on engine (``cluster``, ``ip``) to
        ``state`` (a ``core.load.LoadState``), under ``lease`` (a lease name
        or None), would take over a limit, as a ``LimitReached`` (not
        raised), or None if it creates nothing over one.

        Only what the add would create counts: a duplicate add, an add of a
        finished request (its tombstone), an add on a known engine and an
        add under a lease in the table are always within the limits, so a
        gateway's retries and the traffic of the engines and gateways
        already known go on while the node is full.

        Clients' adds are refused with it (``check_add``); a peer's events and
        snapshot records are applied anyway and only counted: refusing them
        would make this node diverge from its peers, which admitted them.
        """
        requests = state.request_count
        # New unless live or finished; a prompt tombstone becomes a request.
        # Only a new request starts its lease.
        new = (requests >= self.max_requests or lease is not None) and \
            state.request_state(request_id) in (None, "prompt-tombstone")
        if new and requests >= self.max_requests:
            return LimitReached("requests", self.max_requests, f"this node holds {requests} in-flight requests")
        if new and lease is not None:
            reached = self.lease_exceeded(state, lease)
            if reached is not None:
                return reached
        known = state.clusters.get(cluster)
        if known is None:
            clusters = len(state.clusters)
            if clusters >= self.max_clusters:
                return LimitReached("clusters", self.max_clusters, f"this node holds {clusters} clusters")
        elif state.engine(cluster, ip) is not None:  # by address, whatever the spelling
            return None
        elif len(known.engines) >= self.max_engines_per_cluster:
            return LimitReached("engines_per_cluster", self.max_engines_per_cluster,
                                f"cluster {cluster!r} has {len(known.engines)} engines")
        engines = state.engine_count
        if engines >= self.max_engines:
            return LimitReached("engines", self.max_engines, f"this node holds {engines} engines")
        return None

    def check_add(self, state, cluster: str, request_id: str, ip: str) -> None:
        """Raise ``exceeded``'s ``LimitReached`` for a client's add, if any."""
        reached = self.exceeded(state, cluster, request_id, ip)
        if reached is not None:
            raise reached

    def lease_exceeded(self, state, lease: str) -> LimitReached | None:
        """Whether a keepalive of ``lease`` (or an add that names it) would
        take ``state`` over ``max_leases``: a ``LimitReached`` (not raised)
        when the table holds that many leases and not this one, else None.
        A renewal is always admitted, and so is a lease past its deadline
        still in the table (starting it again ends the old one: the count
        does not grow)."""
        count = state.lease_count
        if count >= self.max_leases and not state.has_lease(lease):
            return LimitReached("leases", self.max_leases, f"this node holds {count} leases")
        return None
