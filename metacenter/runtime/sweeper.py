"""Periodic expiry: drives ``LoadState.expire`` (and the KV-cache index's
``expire``) in chunks through the node's cooperator, so a sweep over a
million requests never stalls the gateways being served."""

from itertools import chain
from time import perf_counter

from metacenter.runtime.logs import logger
from metacenter.runtime.turns import run

log = logger("metacenter.runtime.sweeper")


class Sweeper:
    """``sweep()`` is the callback of a ``periodic.Periodic``: one expiry
    sweep of ``state`` (and ``cache``, if given), ``chunk`` entries per
    cooperator step (``cooperate``: ``Node.cooperate``), counted in
    ``metrics`` (``metacenter_expired_total``, the sweep duration)."""

    # About 2-3 ms of work per reactor turn at 1M in-flight requests
    # (bench/memory_state.py measures a step).
    def __init__(self, state, metrics, cooperate, chunk=1000, cache=None):
        self._state = state
        self._cache = cache
        self._metrics = metrics
        self._chunk = chunk
        self._cooperate = cooperate
        self.running = None

    def sweep(self):
        """Starts a sweep; returns its Deferred (None if it could not start).
        Never raises (a timer callback must not), never overlaps a sweep
        still in progress (returns that one's Deferred)."""
        if self.running is not None:
            return self.running
        try:
            before = dict(self._state.stats)
            started = perf_counter()
            steps = self._state.expire(self._chunk)
            if self._cache is not None:
                steps = chain(steps, self._cache.expire(self._chunk))
            d = run(self._cooperate, steps)
        except Exception:
            log.failure("expiry sweep failed to start")
            return None
        d.addCallback(lambda _: self._done(before, started))
        d.addErrback(lambda f: log.failure("expiry sweep failed", f))
        d.addBoth(self._finished)
        self.running = d
        return d

    def _finished(self, result):
        self.running = None
        return None

    def _done(self, before, started):
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
