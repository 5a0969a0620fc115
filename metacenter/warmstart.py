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
"""

import random
from time import perf_counter

from prometheus_client import Gauge
from twisted.application.service import Service
from twisted.internet import defer

from metacenter.discovery import format_peer
from metacenter.logs import logger
from metacenter.snapshot import SnapshotMerger

log = logger("metacenter.warmstart")

SNAPSHOT_PATH = "/v1/replica/snapshot"


class WarmStart(Service):
    """``done`` fires (with a summary dict) when the node became ready."""

    name = "warm-start"

    def __init__(self, node, client, discovery, clock, timeout=30.0, registry=None, shuffle=random.shuffle):
        self.node = node
        self.client = client
        self.discovery = discovery
        self.clock = clock
        self.timeout = timeout
        self._shuffle = shuffle
        self.done = defer.Deferred()
        self.summary = None
        self._seconds = Gauge("metacenter_warm_start_duration_seconds",
                              "How long the warm start took (0 until it is done).",
                              registry=registry if registry is not None else node.metrics.registry)
        # Not ready from construction on: /readyz must never answer 200 before
        # the warm start had its chance.
        node.ready = False
        node.not_ready_reason = "warm start: fetching the state from a peer"

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
    def _fetch(self, peer, timeout):
        merger = SnapshotMerger(self.node)
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
        return {"outcome": "complete", "peer": format_peer(peer), "merged": merger.merged}

    def _finish(self, summary):
        if self.summary is not None:
            return
        self.summary = summary
        self.node.ready = True
        self.node.not_ready_reason = None
        self._seconds.set(summary.get("seconds", 0.0))
        self.done.callback(summary)
