"""Periodic expiry: drives ``LoadState.expire`` (and the KV-cache index's
``expire``), and the leases' ends (``LoadState.lease_steps``), in chunks
through the node's cooperator, so a sweep over a million requests never
stalls the gateways being served."""

from itertools import chain
from time import perf_counter

from metacenter.runtime.logs import logger
from metacenter.runtime.turns import run

log = logger("metacenter.runtime.sweeper")

LEASE_INTERVAL = 1.0  # seconds between lease checks: a lease's TTL is at least 1 s


class _ChunkedPass:
    """One pass of bounded steps through ``cooperate`` at a time: ``start()``
    never raises (a timer callback must not), never overlaps the pass in
    progress (it returns that one's Deferred), and logs a failure as
    "``what`` failed". Subclasses give ``_begin() -> (steps, context)`` and
    ``_done(context)``."""

    what = "pass"

    def __init__(self, state, metrics, cooperate, chunk):
        self._state = state
        self._metrics = metrics
        self._cooperate = cooperate
        self._chunk = chunk
        self.running = None

    def start(self):
        if self.running is not None:
            return self.running
        try:
            steps, context = self._begin()
            d = run(self._cooperate, steps)
        except Exception:
            log.failure("{what} failed to start", what=self.what)
            return None
        d.addCallback(lambda _: self._done(context))
        d.addErrback(lambda f: log.failure("{what} failed", f, what=self.what))
        d.addBoth(self._finished)
        self.running = d
        return d

    def _finished(self, result):
        self.running = None
        return None


class Sweeper(_ChunkedPass):
    """``sweep()`` is the callback of a ``periodic.Periodic``: one expiry
    sweep of ``state`` (and ``cache``, if given), ``chunk`` entries per
    cooperator step (``cooperate``: ``Node.cooperate``), counted in
    ``metrics`` (``metacenter_expired_total``, the sweep duration). Returns
    the sweep's Deferred (None if it could not start)."""

    what = "expiry sweep"

    # About 2-3 ms of work per reactor turn at 1M in-flight requests
    # (bench/memory_state.py measures a step).
    def __init__(self, state, metrics, cooperate, chunk=1000, cache=None):
        super().__init__(state, metrics, cooperate, chunk)
        self._cache = cache

    def sweep(self):
        """The ``Periodic``'s callback: ``start()``."""
        return self.start()

    def _begin(self):
        before = dict(self._state.stats)
        started = perf_counter()
        steps = self._state.expire(self._chunk)
        if self._cache is not None:
            steps = chain(steps, self._cache.expire(self._chunk))
        return steps, (before, started)

    def _done(self, context):
        before, started = context
        elapsed = perf_counter() - started
        self._metrics.gc_sweep_seconds.observe(elapsed)
        stats = self._state.stats
        removed = {}
        for key, kind in (("expired_requests", "request"), ("expired_tombstones", "tombstone"),
                          ("expired_engines", "engine")):
            count = stats[key] - before.get(key, 0)
            if count:
                self._metrics.expired.labels(kind).inc(count)
            removed[kind] = count
        if removed["request"] or removed["engine"]:
            log.info("expiry sweep removed {requests} requests, {tombstones} tombstones, {engines} engines "
                     "in {seconds:.3f}s", requests=removed["request"], tombstones=removed["tombstone"],
                     engines=removed["engine"], seconds=elapsed)


class LeaseTimer(_ChunkedPass):
    """Ends the gateways' leases that went their TTL without a keepalive and
    releases their requests (``LoadState.lease_steps``), one bounded step
    per reactor turn through ``cooperate`` (``Node.cooperate``). ``run()`` is
    the callback of a ``periodic.Periodic`` every ``LEASE_INTERVAL``, and a
    revoke that left requests behind calls it too. The expiry sweep (every
    ``--gc-interval``) is far too slow for a 10 s lease."""

    what = "lease pass"

    def __init__(self, state, metrics, cooperate, chunk=None):
        super().__init__(state, metrics, cooperate, chunk)

    def run(self):
        """The ``Periodic``'s callback, and a revoke's: ``start()``."""
        return self.start()

    def _begin(self):
        steps = self._state.lease_steps() if self._chunk is None else self._state.lease_steps(self._chunk)
        return steps, self._state.stats["expired_leases"]

    def _done(self, before):
        expired = self._state.stats["expired_leases"] - before
        if expired:
            log.info("{count} gateway leases expired; their requests were released", count=expired)
