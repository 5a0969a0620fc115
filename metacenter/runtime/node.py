"""The node: the load state and KV-cache index plus what happens around each
accepted mutation (metrics, listeners such as replication). The HTTP layer
and the replication receiver both call these methods; neither touches the
state directly.

``build_node`` is the one place that wires a node (makeService and the
in-process test harnesses); everything a node uses is handed to ``Node`` when
it is built, nothing is filled in afterwards.
"""

import random
import time

from twisted.internet import task

from metacenter import __version__
from metacenter.core import picking
from metacenter.core.cache import CacheIndex
from metacenter.core.events import (EVENT_ADD, EVENT_CACHE_SAVE, EVENT_DELETE, EVENT_ENGINE_RESET,
                                    EVENT_LEASE_KEEPALIVE, EVENT_LEASE_REVOKE, EVENT_PROMPT_DELETE, EVENT_REFRESH,
                                    LeaseKeepalive, LoadAdd, LoadDelete, ORIGIN_CLIENT)
from metacenter.core.load import LoadState
from metacenter.runtime import logs
from metacenter.runtime.metrics import CacheCollector, Metrics
from metacenter.runtime.sweeper import LeaseTimer


class Readiness:
    """Whether this node's state is complete enough to be served as the
    cluster's (``/readyz``, the replica routes a starting peer reads), and if
    not, why. Shared by the node (which reports it) and the jobs that decide
    it: the warm start and resync (cause ``"state"``), the peers' verdict on
    this node's signature (cause ``"peer-auth"``).

    ``ready`` (bool) and ``reason`` (str, or None while ready) are read-only;
    ``hold(reason, cause)`` makes the node not ready, ``release(cause)``
    lifts that cause. Causes are independent: the node is ready when none
    holds, and ``reason`` joins the reasons of all that do.
    """

    def __init__(self):
        self._reasons = {}  # cause -> reason, in the order they were held

    @property
    def ready(self):
        return not self._reasons

    @property
    def reason(self):
        return "; ".join(self._reasons.values()) if self._reasons else None

    def hold(self, reason, cause="state"):
        """Not ready, because of ``reason`` (a non-empty str for /readyz)."""
        self._reasons[cause] = reason

    def release(self, cause="state"):
        """``cause`` no longer holds (ready if no other does)."""
        self._reasons.pop(cause, None)


def _no_peers():
    return []


class Node:
    """One node's state and its collaborators, all given here:

    - ``state``: the ``LoadState``; ``cache``: the ``CacheIndex``;
      ``metrics``: the ``Metrics`` (its ``registry`` takes other series);
      ``clock``: an ``IReactorTime`` (seconds as float).
    - ``readiness``: a ``Readiness`` (``ready``/``not_ready_reason`` read it).
    - ``cooperate``: runs big jobs a step at a time (``task.cooperate``'s
      signature; ``turns.chunk_per_turn(clock).cooperate`` in a process).
    - ``peer_status``: a callable returning the per-peer status list shown
      in ``status()`` (the replicator's); no peers by default.
    - ``listeners``: callables ``fn(event_type, event, trace_id)`` called for
      every accepted client mutation (replication); ``event_listeners`` is
      the list, which subscribers may append to.
    - ``advertise``: this node's addresses, for status and snapshots.
    - ``lease_timer``: the ``sweeper.LeaseTimer`` that ends due leases and
      releases their requests (a revoke kicks it), or None.
    - ``rng``: the ``random.Random`` a pick breaks equal scores with.
    """

    def __init__(self, state, cache, metrics, clock, *, readiness, cooperate, peer_status=_no_peers, listeners=(),
                 advertise="", lease_timer=None, rng=None):
        self.state = state
        self.cache = cache
        self.metrics = metrics
        self.clock = clock
        self.readiness = readiness
        self.cooperate = cooperate
        self.peer_status = peer_status
        self.event_listeners = list(listeners)
        self.advertise = advertise
        self.lease_timer = lease_timer
        self.rng = rng if rng is not None else random.Random()
        self.started_at_ns = int(time.time() * 1e9)
        self.version = __version__

    @property
    def ready(self):
        """True while the node serves a complete state (``Readiness``)."""
        return self.readiness.ready

    @property
    def not_ready_reason(self):
        """Why the node is not ready (str), None while it is."""
        return self.readiness.reason

    def _stamped(self, event):
        """Events leaving this node carry a timestamp (set now if the client
        sent none), so every replica agrees on the request's birth. An add
        keeps its prompt_tokens, lease and condition."""
        if event.timestamp is not None:
            return event
        now_ns = int(self.clock.seconds() * 1e9)
        if isinstance(event, LoadAdd):
            return LoadAdd(event[:4] + (now_ns,) + event[5:])
        return LoadDelete((event[0], now_ns))

    def apply(self, event_type, event, trace_id=None, origin=ORIGIN_CLIENT):
        """Apply one validated load event (``LoadAdd`` for ``EVENT_ADD``,
        ``LoadDelete`` for either delete, ``EngineReset``, ``LeaseKeepalive``,
        ``LeaseRevoke`` or ``Refresh`` for ours); returns whether the state
        changed. ``run`` is the same with the core's answer."""
        result = self.run(event_type, event, trace_id, origin)
        if event_type == EVENT_ENGINE_RESET:
            return result != (0, 0)
        if event_type == EVENT_LEASE_KEEPALIVE:
            return True  # a renewal moves the deadline
        return bool(result)

    def run(self, event_type, event, trace_id=None, origin=ORIGIN_CLIENT):
        """Apply one validated event and return the core's answer: a bool for
        the add and deletes, ``(released_requests, cache_blocks)`` for a
        reset, ``{"lease", "ttl_ms", "requests"}`` for a keepalive, the
        requests held for a revoke, the count refreshed for a refresh.

        A client's event goes to every listener (replication) after it was
        applied: an add stamped with the time now if it had no timestamp
        (ns) and without its ``if_updated_time`` (a condition checked here,
        never replicated), a keepalive with its resolved ``ttl_ms``. A
        refused event (``InvalidInput``, ``Conflict``) changes nothing and
        goes nowhere."""
        state = self.state
        if event_type == EVENT_ADD or event_type == EVENT_DELETE or event_type == EVENT_PROMPT_DELETE:
            self.metrics.observe_event_timestamp(event.timestamp, self.clock.seconds())
            if origin == ORIGIN_CLIENT:
                event = self._stamped(event)
            if event_type == EVENT_ADD:
                result = state.add(*event)
                if len(event) > 7:
                    event = LoadAdd(event[:7])  # the condition stays here
            elif event_type == EVENT_DELETE:
                result = state.delete(event.request_id)
            else:
                result = state.delete_prompt(event.request_id)
            changed = result
        elif event_type == EVENT_ENGINE_RESET:
            result = picking.reset_engine(state, self.cache, event.cluster, event.ip)
            changed = result != (0, 0)
        elif event_type == EVENT_LEASE_KEEPALIVE:
            result = state.keepalive(event.lease, event.ttl_ms)
            event = LeaseKeepalive((event.lease, result["ttl_ms"]))
            changed = True
        elif event_type == EVENT_LEASE_REVOKE:
            result = state.revoke_lease(event.lease)
            changed = result > 0
            if state.releasing and self.lease_timer is not None:
                self.lease_timer.run()  # the rest of its requests, a step per turn
        elif event_type == EVENT_REFRESH:
            result = state.refresh(event.request_ids)
            changed = result > 0
        else:
            raise ValueError(f"unknown event type {event_type!r}")
        self.metrics.observe_event(event_type, origin, changed)
        if origin == ORIGIN_CLIENT:
            for listener in self.event_listeners:
                listener(event_type, event, trace_id)
        return result

    def pick(self, request, trace_id=None):
        """Pick-and-book (``core.picking.pick``): ``request`` holds its keyword
        arguments (``bodies.route_pick``). Returns ``{"ip", "score",
        "cache_length", "queued_req_num"}``; a booking is an add, replicated
        as one (stamped now). ``NotFound``, ``Conflict``, ``InvalidInput``
        as ``pick``'s."""
        now_ns = int(self.clock.seconds() * 1e9)
        answer = picking.pick(self.state, self.cache, rng=self.rng, timestamp_ns=now_ns, **request)
        booked = answer.pop("booked")
        self.metrics.observe_event(EVENT_ADD, ORIGIN_CLIENT, booked)
        if booked:
            event = LoadAdd((request["cluster"], request["request_id"], answer["ip"], request["prompt_length"],
                             now_ns, request["prompt_tokens"], request["lease"]))
            for listener in self.event_listeners:
                listener(EVENT_ADD, event, trace_id)
        return answer

    def save_cache(self, event, trace_id=None, origin=ORIGIN_CLIENT):
        """Engine ``ip`` now holds the KV cache of ``prompt_hash``'s prefixes;
        ``event`` is (cluster, hashes, ip) from ``cache.parse_cache_save``.
        Replicated like load events (saves are idempotent). Returns whether
        the index changed."""
        cluster, hashes, ip = event
        changed = self.cache.save(cluster, ip, hashes) > 0
        self.metrics.observe_event(EVENT_CACHE_SAVE, origin, changed)
        if origin == ORIGIN_CLIENT:
            for listener in self.event_listeners:
                listener(EVENT_CACHE_SAVE, event, trace_id)
        return changed

    def merge_record(self, request_id, cluster, ip, prompt_length, prompt_deleted, created_s, prompt_tokens=0,
                     lease=None):
        """A live request from a peer's snapshot or repair; an order-insensitive
        merge, so what also arrives as events is never counted twice."""
        return self.state.apply_record(request_id, cluster, ip, prompt_length, prompt_deleted, created_s,
                                       prompt_tokens, lease)

    def merge_lease(self, lease, ttl_ms, expires_in_ms):
        """A lease alive on a peer (its snapshot): alive here at least as long."""
        return self.state.apply_lease(lease, ttl_ms, expires_in_ms)

    def merge_tombstone(self, request_id, kind):
        """A delete (or early prompt delete) from a peer's snapshot or repair."""
        return self.state.apply_tombstone(request_id, kind)

    def status_head(self):
        """The ``GET /v1/node/status`` data but the digests: version, start
        (ns), readiness, counts, the peers' replication status, log level.
        O(peers); the API adds the digests in slices (``api.views``)."""
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
            "log_level": logs.current_level(),
        }

    def status(self):
        """``status_head()`` plus each cluster's digest (live count, hex XOR)
        in one go: O(clusters), for tests and small states."""
        state = self.state
        return {**self.status_head(),
                "digest": {name: {"live": c.live, "digest": format(c.digest, "016x")}
                           for name, c in state.clusters.items()}}


def build_node(clock, *, request_expire=660.0, tombstone_ttl=60.0, cache_engine_blocks=None, cache_ttl=None,
               cache_max_blocks=None, advertise="", registry=None, readiness=None, cooperate=None,
               peer_status=_no_peers, listeners=(), lease_ttl=10.0, rng=None):
    """A node with its load table, KV-cache index and metrics wired together:
    the one place that does it (makeService, in-process tests).

    Times are seconds. ``registry``: the Prometheus registry for the node's
    series (a new one if None). ``readiness``: a ``Readiness`` (ready if
    None). ``cooperate``: the cooperator for big jobs (Twisted's global one if
    None; a process passes ``turns.chunk_per_turn(reactor).cooperate``).
    ``peer_status`` and ``listeners`` as for ``Node``. ``lease_ttl``: the
    default lease TTL in seconds (``--lease-ttl``). ``rng``: as for ``Node``.
    """
    state = LoadState(clock, request_expire=request_expire, tombstone_ttl=tombstone_ttl, lease_ttl=lease_ttl)
    metrics = Metrics(state, registry)
    limits = {name: value for name, value in (("engine_blocks", cache_engine_blocks), ("ttl", cache_ttl),
                                              ("max_blocks", cache_max_blocks)) if value is not None}
    cache = CacheIndex(clock, **limits)
    # An engine that left the load table took its KV cache with it.
    state.engine_removed_callbacks.append(cache.engine_removed)
    metrics.registry.register(CacheCollector(cache))
    cooperate = cooperate if cooperate is not None else task.cooperate
    return Node(state, cache, metrics, clock, readiness=readiness if readiness is not None else Readiness(),
                cooperate=cooperate, peer_status=peer_status, listeners=listeners, advertise=advertise,
                lease_timer=LeaseTimer(state, metrics, cooperate), rng=rng)
