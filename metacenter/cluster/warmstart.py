"""Warm start: a starting node takes a full snapshot from a peer before it
reports ready on /readyz.

The node serves from the first moment (gateways and peers may write to it;
those events are applied as usual) but ``node.ready`` stays False until one
of these, whichever comes first:

- a peer streamed its whole snapshot (the last line says so), merged entry by
  entry as it arrives; every entry is an order-insensitive merge, so events
  that also arrive through replication meanwhile never count twice;
- there is no peer, or every peer was tried and none gave a snapshot (each
  unreachable, still warming up itself, or a reference node without the
  endpoint): it is alone, or the whole cluster is starting together;
- ``timeout`` seconds passed since the start (DNS lookup and every attempt
  included): it then reports ready with what it has, and anti-entropy fills in
  the rest.

Peers are tried in random order, so a restarting cluster does not pull every
snapshot from the same node.

Resync. A node that was out of the cluster for longer than anti-entropy can
repair exactly (see antientropy: the repair horizon) may hold requests that
were deleted meanwhile, with every tombstone gone, and lack old ones added
meanwhile. It cannot tell either from the peers' point of view, but it knows
that it is the stale one: ``StallWatch`` notices that the process did not
run (SIGSTOP, a frozen VM, a debugger), and anti-entropy notices that no peer
answered for that long (a partition). The node then resyncs: not ready, it
sends what it still has queued, takes a peer's snapshot, adopts everything in
it whatever its age, and deletes its own live requests born before the gap
that the snapshot does not hold (deleted while it was away). Deleting is the
safe side: a deleted request is never brought back.
"""

import random
from time import perf_counter

from prometheus_client import Counter, Gauge
from twisted.application.service import Service
from twisted.internet import defer

from metacenter.cluster.discovery import format_peer
from metacenter.cluster.snapshot import SnapshotMerger
from metacenter.core.load import TOMB_DELETED
from metacenter.runtime.logs import logger
from metacenter.runtime.periodic import Periodic
from metacenter.runtime.turns import scan

log = logger("metacenter.cluster.warmstart")

SNAPSHOT_PATH = "/v1/replica/snapshot"
SCAN_CHUNK = 250  # local requests looked at per reactor turn when resyncing (2,000 took up to 9 ms)


class WarmStart(Service):
    """Takes a peer's snapshot into ``node`` at start, and again on
    ``resync``. ``client`` is a ``PeerClient``, ``discovery`` a
    ``PeerDiscovery`` (``lookup_now()``, ``peers``), ``timeout`` the seconds
    a warm start or resync may take in all. It holds ``readiness`` (a
    ``runtime.node.Readiness``; the node's if None) from construction on and
    releases it when done. ``done`` fires (with a summary dict: ``outcome``,
    ``peer``, ``merged`` counts, ``seconds``) when the node became ready.
    """

    name = "warm-start"

    def __init__(self, node, client, discovery, clock, timeout=30.0, registry=None, shuffle=random.shuffle,
                 before_resync=None, readiness=None, on_position=None):
        self.node = node
        self.readiness = readiness if readiness is not None else node.readiness
        # Deferred-returning callable run before a resync takes its snapshot
        # (the replicator sends what it has queued).
        self._before_resync = before_resync
        # fn(log_id, offset): the warm start merged a snapshot taken at that
        # position of the serving peer's replication log (its stream resumes
        # there). Called before the node reports ready.
        self._on_position = on_position
        self.resyncing = None
        self.client = client
        self.discovery = discovery
        self.clock = clock
        self.timeout = timeout
        self._shuffle = shuffle
        self.done = defer.Deferred()
        self.summary = None
        registry = registry if registry is not None else node.metrics.registry
        self._seconds = Gauge("metacenter_warm_start_duration_seconds",
                              "How long the warm start took (0 until it is done).", registry=registry)
        self._resyncs = Counter("metacenter_resyncs", "Resyncs from a peer after this node was away, by outcome.",
                                ["outcome"], registry=registry)
        # Not ready from construction on: /readyz must never answer 200 before
        # the warm start had its chance.
        self.readiness.hold("warm start: fetching the state from a peer")

    def when_done(self):
        """A new Deferred firing when the node is ready (``done`` chains callbacks)."""
        d = defer.Deferred()
        if self.summary is not None:
            d.callback(self.summary)
        else:
            self.done.addBoth(lambda result: (d.callback(result), result)[1])
        return d

    def startService(self):
        super().startService()
        self._run().addErrback(self._crashed)

    def _crashed(self, failure):
        log.failure("warm start failed; reporting ready without it", failure)
        self._finish({"outcome": "error", "peer": None})

    @defer.inlineCallbacks
    def _run(self):
        started = perf_counter()
        deadline = self.clock.seconds() + self.timeout
        try:
            peers = yield self.discovery.lookup_now().addTimeout(self.timeout, self.clock)
        except defer.TimeoutError:
            peers = self.discovery.peers
        peers = sorted(peers)
        self._shuffle(peers)
        if not peers:
            log.info("warm start: no peers, starting empty")
            self._finish({"outcome": "alone", "peer": None, "seconds": perf_counter() - started})
            return
        attempts = []
        for peer in peers:
            remaining = deadline - self.clock.seconds()
            if remaining <= 0:
                break
            result = yield self._fetch(peer, remaining)
            attempts.append(f"{format_peer(peer)}: {result['outcome']}")
            if result["outcome"] == "complete":
                result["seconds"] = perf_counter() - started
                position = result.pop("position", None)
                if position is not None and self._on_position is not None:
                    try:
                        self._on_position(*position)
                    except Exception:
                        log.failure("recording the snapshot's log position failed")
                log.info("warm start from {peer} in {seconds:.3f} s: merged {requests} requests, "
                         "{tombstones} tombstones, {cache_engines} cache engines",
                         peer=format_peer(peer), seconds=result["seconds"], **result["merged"])
                self._finish(result)
                return
        timed_out = deadline - self.clock.seconds() <= 0
        log.warn("warm start: no peer gave a snapshot ({attempts}{timeout}); ready with what arrived meanwhile, "
                 "anti-entropy repairs the rest", attempts="; ".join(attempts) or "none tried",
                 timeout=f"; gave up after {self.timeout:g} s" if timed_out else "")
        self._finish({"outcome": "timed out" if timed_out else "no snapshot", "peer": None,
                      "attempts": attempts, "seconds": perf_counter() - started})

    @defer.inlineCallbacks
    def _fetch(self, peer, timeout, listed=None):
        merger = SnapshotMerger(self.node, listed)
        try:
            status, content = yield self.client.stream("GET", peer, SNAPSHOT_PATH, on_line=merger.line,
                                                       timeout=timeout)
        except (defer.TimeoutError, defer.CancelledError):
            return {"outcome": "timed out", "merged": merger.merged}
        except Exception as e:
            log.info("warm start: {peer} gave no snapshot: {error}", peer=format_peer(peer),
                     error=f"{type(e).__name__}: {e}")
            return {"outcome": "unreachable", "merged": merger.merged}
        if status == 503:
            return {"outcome": "warming up itself", "merged": merger.merged}
        if status in (404, 405):
            return {"outcome": "no snapshot endpoint (a reference node?)", "merged": merger.merged}
        if status != 200 or not merger.complete:
            return {"outcome": f"HTTP {status}" if status != 200 else "stream ended early", "merged": merger.merged}
        if merger.invalid:
            log.warn("warm start: {count} invalid snapshot entries from {peer} skipped, first: {reason}",
                     count=merger.invalid, peer=format_peer(peer), reason=merger.first_error)
        return {"outcome": "complete", "peer": format_peer(peer), "merged": merger.merged,
                "position": merger.position}

    def _finish(self, summary):
        if self.summary is not None:
            return
        self.summary = summary
        self.readiness.release()
        self._seconds.set(summary.get("seconds", 0.0))
        self.done.callback(summary)

    # -- resync --------------------------------------------------------------

    def resync(self, away_since, reason):
        """Catch up after being away since ``away_since`` (seconds, this
        node's clock); returns a Deferred of a summary dict. One at a time,
        and never during the warm start."""
        if self.summary is None or self.resyncing is not None:
            return defer.succeed({"outcome": "skipped"})
        log.warn("resync: {reason}; taking a peer's state", reason=reason)
        self.readiness.hold(f"resync: {reason}")
        self.resyncing = self._resync(away_since)
        self.resyncing.addErrback(self._resync_crashed)
        self.resyncing.addBoth(self._resync_done)
        return self.resyncing

    def _resync_crashed(self, failure):
        log.failure("resync failed", failure)
        return {"outcome": "error"}

    def _resync_done(self, summary):
        self.resyncing = None
        self.readiness.release()
        self._resyncs.labels(summary.get("outcome", "?")).inc()
        return summary

    @defer.inlineCallbacks
    def _resync(self, away_since):
        started = perf_counter()
        if self._before_resync is not None:
            yield self._before_resync()
        deadline = self.clock.seconds() + self.timeout
        peers = sorted(self.discovery.peers)
        self._shuffle(peers)
        for peer in peers:
            remaining = deadline - self.clock.seconds()
            if remaining <= 0:
                break
            listed = set()
            result = yield self._fetch(peer, remaining, listed)
            if result["outcome"] != "complete":
                continue
            deleted = yield self._delete_unlisted(listed, away_since)
            result.update(deleted=deleted, seconds=perf_counter() - started)
            log.info("resync from {peer} in {seconds:.3f} s: merged {requests} requests and {tombstones} "
                     "tombstones, deleted {deleted} requests the cluster finished while this node was away",
                     peer=result["peer"], seconds=result["seconds"], deleted=deleted, **result["merged"])
            return result
        log.warn("resync: no peer gave a snapshot; anti-entropy repairs what it can")
        return {"outcome": "no snapshot", "seconds": perf_counter() - started}

    def _delete_unlisted(self, listed, away_since):
        """Deletes this node's live requests born before ``away_since`` that
        the peer's snapshot did not hold, a chunk per reactor turn; a
        Deferred of how many."""
        node = self.node
        deleted = [0]

        def visit(records):
            for request_id, _, _, _, _, created_s in records:
                if created_s < away_since and request_id not in listed:
                    node.merge_tombstone(request_id, TOMB_DELETED)
                    deleted[0] += 1

        # iter_requests copies the ids first: deleting meanwhile is safe.
        d = scan(node.cooperate, node.state.iter_requests(), SCAN_CHUNK, visit)
        return d.addCallback(lambda _: deleted[0])


class StallWatch(Periodic):
    """Calls ``on_stall(stopped_at, seconds)`` (this clock's seconds) when
    the process did not run for more than ``threshold`` seconds: the clock
    jumped between two ticks ``tick`` seconds apart."""

    name = "stall-watch"

    def __init__(self, clock, threshold, on_stall, tick=1.0):
        super().__init__(tick, self._check, what="stall watch", clock=clock, now=False, log=log)
        self.threshold = threshold
        self.on_stall = on_stall
        self.tick = tick
        self._last = None

    def startService(self):
        self._last = self.clock.seconds()
        super().startService()

    def _check(self):
        now = self.clock.seconds()
        last, self._last = self._last, now
        gap = now - last - self.tick
        if gap > self.threshold:
            try:
                self.on_stall(last, gap)
            except Exception:
                log.failure("handling a stall of {gap:.1f} s failed", gap=gap)
