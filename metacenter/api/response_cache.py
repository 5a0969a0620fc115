"""Serialised ``GET /v1/load/stats`` bodies, kept between reads.

Gateways read a cluster's load on every request and change one engine
between two reads, so re-serialising the whole list each time would be most
of the route's cost. The load table gives each cluster and engine a
``version`` (a state-wide sequence number, so a cluster that goes and comes
back never repeats one); this cache keeps

    cluster name -> (version, body of the whole engine list)
    engine id    -> (version, body of one engine)

and a read costs two dict lookups while nothing changed; after a change only
the engines that changed are serialised again. Entries go when their engine
or cluster leaves the table (``LoadState.engine_removed_callbacks``), so the
cache holds at most one entry per live engine and per live cluster.
"""

from metacenter.api.endpoint import Raw
from metacenter.api.envelope import dumps


class LoadResponseCache:
    """The bodies of one ``LoadState``'s clusters, built on demand."""

    def __init__(self, state):
        self._state = state
        self._clusters = {}  # name -> (version, Raw)
        self._engines = {}  # engine_id -> (version, bytes)
        state.engine_removed_callbacks.append(self._engine_removed)

    def body(self, cluster):
        """A ``core.load.Cluster``'s engines as the wire's JSON array
        (``Raw`` bytes: [{"ip", "queued_req_num", "prompt_length",
        "updated_time", ...}])."""
        cached = self._clusters.get(cluster.name)
        if cached is not None and cached[0] == cluster.version:
            return cached[1]
        fragment = self.fragment
        body = Raw(b"[" + b",".join([fragment(engine) for engine in cluster.engines.values()]) + b"]")
        self._clusters[cluster.name] = (cluster.version, body)
        return body

    def is_fresh(self, cluster):
        """Whether ``body(cluster)`` would be a dict lookup (no serialising)."""
        cached = self._clusters.get(cluster.name)
        return cached is not None and cached[0] == cluster.version

    def fragment(self, engine):
        """One engine's serialised row, serialised again only after it changed."""
        fragment = self._engines.get(engine.engine_id)
        if fragment is None or fragment[0] != engine.version:
            fragment = self._engines[engine.engine_id] = (engine.version, dumps(engine.as_dict()))
        return fragment[1]

    def store(self, cluster, version, body):
        """Keep a body built elsewhere in steps (``api.views``) from engines
        read at ``version``; ignored when the cluster changed meanwhile."""
        if cluster.version == version and cluster.name in self._state.clusters:
            self._clusters[cluster.name] = (version, body)

    def _engine_removed(self, engine):
        self._engines.pop(engine.engine_id, None)
        if engine.cluster not in self._state.clusters:
            self._clusters.pop(engine.cluster, None)

    def __len__(self):
        """Entries held (clusters and engines), for tests of the bound."""
        return len(self._clusters) + len(self._engines)
