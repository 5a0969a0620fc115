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
  younger than the last freeze.

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


class GcPolicy:
    """Freezes long-lived objects out of the collector's walks and times
    every collection.

    ``observe_pause(generation: str, seconds: float)`` is called after each
    collection (``Metrics.gc_pause``), ``on_freeze()`` after each freeze
    (``Metrics.gc_freezes``). ``install()`` registers the
    ``gc.callbacks`` hook, ``uninstall()`` removes it (tests, shutdown)."""

    def __init__(self, observe_pause=None, on_freeze=None):
        self._observe_pause = observe_pause
        self._on_freeze = on_freeze
        self._started = None
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
            if self._on_freeze is not None:
                self._on_freeze()
            log.debug("froze long-lived objects ({reason})", reason=reason)
        except Exception:
            log.failure("freezing long-lived objects failed")

    def observe_to(self, metrics):
        """Report into ``metrics`` (a ``runtime.metrics.Metrics``): the pause
        histogram and the freeze counter. Returns self."""
        self._observe_pause = lambda generation, seconds: metrics.gc_pause.observe((generation,), seconds)
        self._on_freeze = lambda: metrics.gc_freezes.inc(())
        return self
