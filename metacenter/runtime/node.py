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
from metacenter.core.cache import CacheIndex
from metacenter.core import picking
from metacenter.core.events import (EVENT_ADD, EVENT_CACHE_SAVE, EVENT_DELETE, EVENT_ENGINE_RESET,
                                    EVENT_LEASE_KEEPALIVE, EVENT_LEASE_REVOKE, EVENT_PROMPT_DELETE, EVENT_REFRESH,
                                    LeaseKeepalive, LoadAdd, LoadDelete, ORIGIN_CLIENT, ORIGIN_PEER, Refresh)
from metacenter.core.limits import CountLimits
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


def _replicated_add(event):
    """The add a node replicates: never its condition (``if_updated_time``
    was checked here), and without prompt_tokens and lease when it has
    neither, so it is the 5-field add every peer knows."""
    if len(event) > 5 and (event[5] or (len(event) > 6 and event[6] is not None)):
        return LoadAdd(event[:7]) if len(event) > 7 else event
    return LoadAdd(event[:5]) if len(event) > 5 else event


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
    - ``limits``: the ``core.limits.CountLimits`` a client's add must keep
      (the defaults if None); a peer's events are applied over them and
      counted (``metacenter_limit_overruns_total``).
    - ``replication``: a callable returning what ``status()`` shows under
      ``"stream"`` (this node's replication listener: port, log id, the
      streams it receives), or None without one; None by default.
    - ``log_position``: a callable returning ``(log_id, offset)`` of this
      node's replication log (``ReplicationLog.position``), written in the
      header of the snapshots it serves; None without a log.
    - ``lease_timer``: the ``sweeper.LeaseTimer`` that ends due leases and
      releases their requests (a revoke kicks it), or None.
    - ``rng``: the ``random.Random`` a pick breaks equal scores with.
    """

    def __init__(self, state, cache, metrics, clock, *, readiness, cooperate, peer_status=_no_peers, listeners=(),
                 advertise="", limits=None, replication=None, log_position=None, lease_timer=None, rng=None):
        self.state = state
        self.cache = cache
        self.metrics = metrics
        self.clock = clock
        self.readiness = readiness
        self.cooperate = cooperate
        self.peer_status = peer_status
        self.event_listeners = list(listeners)
        self.advertise = advertise
        self.limits = limits if limits is not None else CountLimits()
        self._limits_log = logs.ThrottledLog(logs.logger("metacenter.runtime.limits"), clock, 60.0)
        self.replication = replication
        self.log_position = log_position
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
        refused event (``InvalidInput``, ``Conflict``, ``LimitReached``)
        changes nothing and goes nowhere."""
        state = self.state
        if event_type == EVENT_ADD or event_type == EVENT_DELETE or event_type == EVENT_PROMPT_DELETE:
            if event_type == EVENT_ADD:
                self._within_limits(event, origin)
            self.metrics.observe_event_timestamp(event.timestamp, self.clock.seconds())
            if origin == ORIGIN_CLIENT:
                event = self._stamped(event)
            if event_type == EVENT_ADD:
                result = state.add(*event)
                event = _replicated_add(event)
            elif event_type == EVENT_DELETE:
                result = state.delete(event.request_id)
            else:
                result = state.delete_prompt(event.request_id)
            changed = result
        else:
            result, changed, event = self._run_ours(event_type, event, origin)
        self._applied(event_type, event, changed, trace_id, origin)
        return result

    def _applied(self, event_type, event, changed, trace_id, origin):
        """Counts an applied event; a client's goes to every listener
        (replication)."""
        self.metrics.observe_event(event_type, origin, changed)
        if origin == ORIGIN_CLIENT:
            for listener in self.event_listeners:
                listener(event_type, event, trace_id)

    def _run_ours(self, event_type, event, origin=ORIGIN_PEER):
        """(the core's answer, changed, the event to replicate) of a reset,
        keepalive, revoke or refresh. A client's keepalive that would start
        a lease over ``--max-leases`` raises ``LimitReached`` first."""
        state = self.state
        if event_type == EVENT_ENGINE_RESET:
            result = picking.reset_engine(state, self.cache, event.cluster, event.ip)
            return result, result != (0, 0), event
        if event_type == EVENT_LEASE_KEEPALIVE:
            self._check_limit(self.limits.lease_exceeded(state, event.lease), origin)
            result = state.keepalive(event.lease, event.ttl_ms)
            return result, True, LeaseKeepalive((event.lease, result["ttl_ms"]))
        if event_type == EVENT_LEASE_REVOKE:
            result = state.revoke_lease(event.lease)
            if state.releasing and self.lease_timer is not None:
                self.lease_timer.run()  # the rest of its requests, a step per turn
            return result, result > 0, event
        if event_type == EVENT_REFRESH:
            result = state.refresh(event.request_ids)
            return result, result > 0, event
        raise ValueError(f"unknown event type {event_type!r}")

    def refresh_steps(self, request_ids, trace_id, spent):
        """A client's refresh (``run(EVENT_REFRESH, ...)``) a step at a time:
        a generator that yields (None) whenever ``spent()`` says a step's
        time is up and returns the count refreshed. A repeated id counts
        once. Each step's ids are their own replicated refresh event (the
        peers apply each), sent as soon as the step is applied."""
        distinct = list(dict.fromkeys(request_ids))
        count = len(distinct)
        refresh_some = self.state.refresh_some
        total = start = 0
        while True:
            end, refreshed = refresh_some(distinct, start, count, spent)
            total += refreshed
            # Done in one step: the client's own ids, as replicated before.
            one_go = start == 0 and end >= count
            event = Refresh((tuple(request_ids if one_go else distinct[start:end]),))
            self._applied(EVENT_REFRESH, event, refreshed > 0, trace_id, ORIGIN_CLIENT)
            if end >= count:
                return total
            start = end
            yield

    def pick(self, request, trace_id=None):
        """Pick-and-book (``core.picking.pick``): ``request`` holds its keyword
        arguments (``bodies.route_pick``). Returns ``{"ip", "score",
        "cache_length", "queued_req_num"}``; a booking is an add, replicated
        as one (stamped now). ``NotFound``, ``Conflict``, ``InvalidInput``
        as ``pick``'s; ``LimitReached`` (429) when the booking could take the
        node over a count limit (checked before choosing: with an unknown
        candidate among ``ips``, as if that one were chosen)."""
        self._pick_within_limits(request)
        now_ns = int(self.clock.seconds() * 1e9)
        answer = picking.pick(self.state, self.cache, rng=self.rng, timestamp_ns=now_ns, **request)
        booked = answer.pop("booked")
        self.metrics.observe_event(EVENT_ADD, ORIGIN_CLIENT, booked)
        if booked:
            event = _replicated_add(LoadAdd((request["cluster"], request["request_id"], answer["ip"],
                                             request["prompt_length"], now_ns, request["prompt_tokens"],
                                             request["lease"])))
            for listener in self.event_listeners:
                listener(EVENT_ADD, event, trace_id)
        return answer

    def _pick_within_limits(self, request):
        state, name = self.state, request["cluster"]
        ips = request.get("ips")
        if not ips:  # the cluster's known engines are the candidates: any one stands for them
            cluster = state.clusters.get(name)
            if cluster is None or not cluster.engines:
                return  # nothing to book on: pick answers 404
            ips = [next(iter(cluster.engines.values())).ip]
        unknown = [ip for ip in ips if state.engine(name, ip) is None]
        # The engine the check assumes: an unknown candidate if there is one
        # (the booking may create it), else a known one (it creates none).
        ip = unknown[0] if unknown else ips[0]
        self._within_limits(LoadAdd((request["cluster"], request["request_id"], ip, 0, None, 0,
                                     request.get("lease"))), ORIGIN_CLIENT)

    def _within_limits(self, event, origin):
        """Refuse a client's add over a count limit (``LimitReached``, before
        anything changed); a peer's is applied anyway, and counted."""
        self._check_limit(self.limits.exceeded(self.state, event.cluster, event.request_id, event.ip, event.lease),
                          origin)

    def _check_limit(self, reached, origin):
        """``reached`` (a ``LimitReached`` or None): raised for a client's
        event, counted and logged (throttled) either way."""
        if reached is None:
            return
        if origin != ORIGIN_CLIENT:
            self.metrics.limit_overruns.inc((reached.limit,))
            self._limits_log.emit("overrun:" + reached.limit, None, "warn",
                                  "applied a peer's event over a count limit ({reason}); the peers' limits differ "
                                  "or they admitted it meanwhile", reason=reached.reason, limit=reached.limit)
            return
        self.metrics.limit_refusals.inc((reached.limit,))
        self._limits_log.emit(reached.limit, None, "warn", "refusing clients' adds{also}: {reason}",
                              also=" and keepalives" if reached.limit == "leases" else "", reason=reached.reason,
                              limit=reached.limit)
        raise reached

    def field_too_long(self, error):
        """A request's or a peer's field refused for its length
        (``core.fields.FieldTooLong``): counted and logged, throttled."""
        limit = error.field + "_length"
        self.metrics.limit_refusals.inc((limit,))
        self._limits_log.emit(limit, None, "info", "refused a field longer than its limit: {reason}",
                              reason=error.reason, limit=limit)

    def apply_frame(self, events):
        """A frame of a peer's replication stream: ``events`` is a list of
        ``(event_type, typed event)`` pairs, already validated
        (``stream.decode_entries``), applied in order as peer events (never
        replicated again). Metrics are updated once per frame, not per event:
        effect counts per type, and the replication latency of the frame's
        newest timestamp. Returns how many changed the state. An event type
        without an applier raises ``KeyError`` after the ones before it were
        applied (the receiver logs and counts it)."""
        state = self.state
        add, delete, delete_prompt, save = state.add, state.delete, state.delete_prompt, self.cache.save
        counts = {}
        newest = None
        changed_total = 0
        for event_type, event in events:
            if event_type == EVENT_ADD:
                self._within_limits(event, ORIGIN_PEER)  # applied anyway; an overrun is counted
                timestamp = event[4]
                changed = add(event[0], event[1], event[2], event[3], timestamp, *event[5:7])
            elif event_type == EVENT_DELETE:
                timestamp = event[1]  # for the latency metric only: deletes ignore it
                changed = delete(event[0])
            elif event_type == EVENT_PROMPT_DELETE:
                timestamp = event[1]
                changed = delete_prompt(event[0])
            elif event_type == EVENT_CACHE_SAVE:
                timestamp = None
                changed = save(event[0], event[2], event[1]) > 0
            else:
                # Event types added later (engine resets, leases ...) bring
                # their own applier: fn(node, event) -> changed.
                timestamp = None
                changed = self.peer_appliers[event_type](self, event)
            if timestamp is not None and (newest is None or timestamp > newest):
                newest = timestamp
            key = (event_type, changed)
            counts[key] = counts.get(key, 0) + 1
            changed_total += changed
        metrics = self.metrics
        for (event_type, changed), count in counts.items():
            metrics.events.inc((event_type, ORIGIN_PEER, "applied" if changed else "no_change"), count)
        if newest is not None:
            metrics.observe_event_timestamp(newest, self.clock.seconds())
        return changed_total

    # Appliers of peer event types beyond the four above, by event type.
    peer_appliers = {
        EVENT_ENGINE_RESET: lambda node, event: node._run_ours(EVENT_ENGINE_RESET, event)[1],
        EVENT_LEASE_KEEPALIVE: lambda node, event: node._run_ours(EVENT_LEASE_KEEPALIVE, event)[1],
        EVENT_LEASE_REVOKE: lambda node, event: node._run_ours(EVENT_LEASE_REVOKE, event)[1],
        EVENT_REFRESH: lambda node, event: node._run_ours(EVENT_REFRESH, event)[1],
    }

    def save_cache(self, event, trace_id=None, origin=ORIGIN_CLIENT):
        """Engine ``ip`` now holds the KV cache of ``prompt_hash``'s prefixes;
        ``event`` is (cluster, hashes, ip) from ``cache.parse_cache_save``.
        Replicated like load events (saves are idempotent). Returns whether
        the index changed."""
        cluster, hashes, ip = event
        changed = self.cache.save(cluster, ip, hashes) > 0
        self._applied(EVENT_CACHE_SAVE, event, changed, trace_id, origin)
        return changed

    def save_cache_steps(self, event, trace_id, spent):
        """A client's ``save_cache`` a step at a time
        (``CacheIndex.save_steps``): a generator returning whether the index
        changed. The whole save is replicated once, when it is applied."""
        cluster, hashes, ip = event
        added = yield from self.cache.save_steps(cluster, ip, hashes, spent)
        self._applied(EVENT_CACHE_SAVE, event, added > 0, trace_id, ORIGIN_CLIENT)
        return added > 0

    def merge_record(self, request_id, cluster, ip, prompt_length, prompt_deleted, created_s, prompt_tokens=0,
                     lease=None):
        """A live request from a peer's snapshot or repair; an order-insensitive
        merge, so what also arrives as events is never counted twice."""
        return self.state.apply_record(request_id, cluster, ip, prompt_length, prompt_deleted, created_s,
                                       prompt_tokens, lease)

    def merge_lease(self, lease, ttl_ms, expires_in_ms):
        """A lease alive on a peer (its snapshot): alive here at least as long
        (over ``--max-leases`` too: counted as an overrun)."""
        self._check_limit(self.limits.lease_exceeded(self.state, lease), ORIGIN_PEER)
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
            **({"stream": stream} if (stream := self.replication and self.replication()) else {}),
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
               peer_status=_no_peers, listeners=(), count_limits=None, replication=None, log_position=None,
               lease_ttl=10.0, rng=None):
    """A node with its load table, KV-cache index and metrics wired together:
    the one place that does it (makeService, in-process tests).

    Times are seconds. ``registry``: the Prometheus registry for the node's
    series (a new one if None). ``readiness``: a ``Readiness`` (ready if
    None). ``cooperate``: the cooperator for big jobs (Twisted's global one if
    None; a process passes ``turns.chunk_per_turn(reactor).cooperate``).
    ``peer_status``, ``listeners``, ``replication`` and ``log_position`` as
    for ``Node``; ``count_limits`` is its ``limits``. ``lease_ttl``: the
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
                limits=count_limits, replication=replication, log_position=log_position,
                lease_timer=LeaseTimer(state, metrics, cooperate), rng=rng)
