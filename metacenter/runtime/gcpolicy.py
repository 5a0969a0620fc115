"""The cyclic garbage collector's policy: one place.

CPython's full (generation 2) collections walk every object the collector
tracks. A node's long-lived state is mostly such objects (each ``Cluster``,
``Engine`` and their dicts; the in-flight requests are str -> int and are not
tracked), so at 20,000 clusters one full collection blocked the reactor for
~45 ms, whenever enough new objects had survived to trigger one.

``gc.freeze()`` moves every tracked object into a permanent generation that
no collection walks. Frozen objects are still freed by reference counting
when their last reference goes; only the cyclic collector ignores them. So:

- the process freezes once it is built (``makeService``) and again once the
  warm start imported a peer's state (``GcPolicy.freeze``);
- every ``--gc-freeze-interval`` a ``Periodic`` runs a young collection
  (generations 0 and 1: what is garbage among the newest objects goes) and
  freezes what is left, so automatic full collections only ever walk what is
  younger than the last freeze;
- and, checked every second, as soon as the state holds ``FREEZE_GROWTH``
  more clusters, engines and leases than at the last freeze.

The price: an object frozen while alive that later becomes garbage *inside
a reference cycle* is never collected. The core's state makes no cycles
(tests/runtime/test_gcpolicy.py proves it for every kind of mutation), so
removed clusters, engines, requests, leases and KV blocks are freed by
reference counting. Twisted's connections do make cycles (the protocol and
its transport point at each other): a keep-alive connection that was open
at a freeze and closes later stays in memory. docs/performance.md gives the
measured size and why it stays bounded.

Series: ``metacenter_gc_freezes_total`` and
``metacenter_gc_pause_seconds{generation}`` (every collection's duration, from
``gc.callbacks``). There is no gauge of the frozen objects:
``gc.get_freeze_count()`` walks the permanent generation's list, 6-8 ms at
20,000 clusters, itself a pause of the kind this module removes.
"""

import gc
from time import perf_counter

from metacenter.runtime.logs import logger

log = logger("metacenter.runtime.gcpolicy")

# New long-lived objects (clusters, engines, leases) that make a freeze due
# before the interval: a full collection walks ~1-2 µs per such object and
# its dicts, so 1,000 of them cost a pause of a few milliseconds at most.
FREEZE_GROWTH = 1000
GROWTH_CHECK_INTERVAL = 1.0  # s between growth checks (an O(1) comparison)


class GcPolicy:
    """Freezes long-lived objects out of the collector's walks and times
    every collection.

    ``observe_pause(generation: str, seconds: float)`` is called after each
    collection (``Metrics.gc_pause``), ``on_freeze()`` after each freeze
    (``Metrics.gc_freezes``). ``install()`` registers the
    ``gc.callbacks`` hook, ``uninstall()`` removes it (tests, shutdown).

    ``size()``: how many long-lived tracked objects the state holds (a
    node's clusters, engines and leases); ``freeze_if_grown`` freezes once
    it grew by ``growth`` since the last freeze, without waiting for the
    interval."""

    def __init__(self, observe_pause=None, on_freeze=None, size=None, growth=FREEZE_GROWTH):
        self._observe_pause = observe_pause
        self._on_freeze = on_freeze
        self._started = None
        self._size = size
        self.growth = growth
        self._size_at_freeze = 0
        self.freezes = 0  # how many times freeze() ran
        self.installed = False

    # -- the pause histogram ------------------------------------------------

    def install(self):
        if not self.installed:
            gc.callbacks.append(self._callback)
            self.installed = True
        return self

    def uninstall(self):
        if self.installed:
            gc.callbacks.remove(self._callback)
            self.installed = False

    def _callback(self, phase, info):
        # Runs inside the collector: no allocation-heavy work, never raise.
        if phase == "start":
            self._started = perf_counter()
        elif self._started is not None:
            elapsed = perf_counter() - self._started
            self._started = None
            if self._observe_pause is not None:
                try:
                    self._observe_pause(str(info["generation"]), elapsed)
                except Exception:  # a metric must never break a collection
                    pass

    # -- freezing -------------------------------------------------------------

    def freeze(self, reason="periodic"):
        """A young collection, then every object left is frozen (also the
        ``--gc-freeze-interval`` ``Periodic``'s callback). O(young
        objects): the freeze itself splices the generations' lists (~2 µs).
        Never raises (a timer's callback logs its own errors)."""
        try:
            gc.collect(1)
            gc.freeze()
            self.freezes += 1
            if self._size is not None:
                self._size_at_freeze = self._size()
            if self._on_freeze is not None:
                self._on_freeze()
            log.debug("froze long-lived objects ({reason})", reason=reason)
        except Exception:
            log.failure("freezing long-lived objects failed")

    def freeze_if_grown(self):
        """Freezes (``freeze("growth")``) when ``size()`` grew by ``growth``
        or more since the last freeze. A state that grows fast (a burst of
        new clusters) would otherwise wait up to ``--gc-freeze-interval``,
        and an automatic full collection meanwhile walks all of it: ~25 ms
        for 20,000 new clusters. O(1); never raises."""
        try:
            if self._size is not None and self._size() - self._size_at_freeze >= self.growth:
                self.freeze("growth")
        except Exception:
            log.failure("checking the state's growth for a freeze failed")

    def observe_to(self, metrics):
        """Report into ``metrics`` (a ``runtime.metrics.Metrics``): the pause
        histogram and the freeze counter. Returns self."""
        self._observe_pause = lambda generation, seconds: metrics.gc_pause.observe((generation,), seconds)
        self._on_freeze = lambda: metrics.gc_freezes.inc(())
        return self
