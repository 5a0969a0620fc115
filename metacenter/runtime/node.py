"""The node: the load state plus what happens around each accepted mutation
(metrics, replication). The HTTP layer and the replication receiver both call
these methods; neither touches the state directly.
"""

import time

from twisted.internet import task

from metacenter import __version__
from metacenter.core.cache import CacheIndex
from metacenter.runtime.metrics import CacheCollector, Metrics
from metacenter.core.load import LoadState
from metacenter.core.events import (EVENT_ADD, EVENT_CACHE_SAVE, EVENT_DELETE, LoadAdd, LoadDelete,
                                    ORIGIN_CLIENT)



class Node:
    def __init__(self, state, clock, metrics, advertise=""):
        self.state = state
        self.clock = clock
        self.metrics = metrics
        self.advertise = advertise
        self.started_at_ns = int(time.time() * 1e9)
        self.version = __version__
        # fn(event_type, event, trace_id) for every accepted client mutation.
        self.event_listeners = []
        # Set by the replication layer: not ready until the warm start is done.
        self.ready = True
        self.not_ready_reason = None
        # Optional providers filled in by other services (replication, cache).
        self.peer_status = lambda: []
        # Runs big jobs in chunks (task.cooperate's signature); the service
        # tree sets one that gives each chunk its own reactor turn.
        self.cooperate = task.cooperate
        self.cache = None

    def _stamped(self, event):
        """Events leaving this node carry a timestamp (set now if the client
        sent none), so every replica agrees on the request's birth."""
        if event.timestamp is not None:
            return event
        now_ns = int(self.clock.seconds() * 1e9)
        if isinstance(event, LoadAdd):
            return LoadAdd(event[:4] + (now_ns,))
        return LoadDelete((event[0], now_ns))

    def apply(self, event_type, event, trace_id=None, origin=ORIGIN_CLIENT):
        """Apply one validated load event; returns whether the state changed."""
        self.metrics.observe_event_timestamp(event.timestamp, self.clock.seconds())
        if origin == ORIGIN_CLIENT:
            event = self._stamped(event)
        state = self.state
        if event_type == EVENT_ADD:
            changed = state.add(event.cluster, event.request_id, event.ip, event.prompt_length, event.timestamp)
        elif event_type == EVENT_DELETE:
            changed = state.delete(event.request_id, event.timestamp)
        else:
            changed = state.delete_prompt(event.request_id, event.timestamp)
        self.metrics.observe_event(event_type, origin, changed)
        if origin == ORIGIN_CLIENT:
            for listener in self.event_listeners:
                listener(event_type, event, trace_id)
        return changed

    def save_cache(self, event, trace_id=None, origin=ORIGIN_CLIENT):
        """Engine ``ip`` now holds the KV cache of ``prompt_hash``'s prefixes;
        ``event`` is (cluster, hashes, ip) from ``cache.parse_cache_save``.
        Replicated like load events (saves are idempotent)."""
        cluster, hashes, ip = event
        changed = self.cache.save(cluster, ip, hashes) > 0
        self.metrics.observe_event(EVENT_CACHE_SAVE, origin, changed)
        if origin == ORIGIN_CLIENT:
            for listener in self.event_listeners:
                listener(EVENT_CACHE_SAVE, event, trace_id)
        return changed

    def merge_record(self, request_id, cluster, ip, prompt_length, prompt_deleted, created_s):
        """A live request from a peer's snapshot or repair; an order-insensitive
        merge, so what also arrives as events is never counted twice."""
        return self.state.apply_record(request_id, cluster, ip, prompt_length, prompt_deleted, created_s)

    def merge_tombstone(self, request_id, kind):
        """A delete (or early prompt delete) from a peer's snapshot or repair."""
        return self.state.apply_tombstone(request_id, kind)

    def status(self):
        state = self.state
        return {
            "version": self.version,
            "node": self.advertise,
            "started_at": self.started_at_ns,
            "ready": self.ready,
            "requests": state.request_count,
            "tombstones": state.tombstone_count,
            "engines": state.engine_count,
            "clusters": len(state.clusters),
            "peers": self.peer_status(),
            "digest": {name: {"live": c.live, "digest": format(c.digest, "016x")}
                       for name, c in state.clusters.items()},
        }

    def overview(self):
        return {
            "time": int(self.clock.seconds() * 1e9),
            "clusters": [{"cluster": name, "engines": [e.as_dict() for e in c.engines.values()]}
                         for name, c in self.state.clusters.items()],
        }


def build_node(clock, *, request_expire=660.0, tombstone_ttl=60.0, cache_engine_blocks=None, cache_ttl=None,
               cache_max_blocks=None, advertise=""):
    """A node with its load table, KV-cache index and metrics wired together:
    the one place that does it (makeService, in-process tests)."""
    state = LoadState(clock, request_expire=request_expire, tombstone_ttl=tombstone_ttl)
    metrics = Metrics(state)
    node = Node(state, clock, metrics, advertise=advertise)
    limits = {name: value for name, value in (("engine_blocks", cache_engine_blocks), ("ttl", cache_ttl),
                                              ("max_blocks", cache_max_blocks)) if value is not None}
    node.cache = CacheIndex(clock, **limits)
    # An engine that left the load table took its KV cache with it.
    state.engine_removed_callbacks.append(node.cache.engine_removed)
    metrics.registry.register(CacheCollector(node.cache))
    return node
