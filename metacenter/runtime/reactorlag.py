"""How long the reactor is kept from its work: a timer due every
``interval`` seconds records how late it runs.

A timer runs late by however long the reactor was busy with something else
when it fell due (one long callback, a big body, a collection), so the
lateness of a frequent timer samples the reactor's pauses: every pause longer
than ``interval`` is seen, shorter ones in proportion to their length. An
idle tick costs ~200 µs of CPU on a small VM (wake-up and one callLater), so
the default is 20 ticks a second.

Observed into ``metacenter_reactor_lag_seconds`` (a histogram); a lag above
``warn_above`` is also logged, at most once per ``warn_interval``.
"""

from twisted.application.service import Service

from metacenter.runtime.logs import ThrottledLog, logger

log = logger("metacenter.runtime.reactorlag")


class LagProbe(Service):
    """``observe(seconds)`` is called on every tick with its lateness (>= 0).

    ``clock`` provides ``seconds()`` and ``callLater`` (the reactor, or a
    ``task.Clock`` in tests)."""

    name = "reactor-lag"

    def __init__(self, clock, observe, interval=0.05, warn_above=0.1, warn_interval=60.0):
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.clock = clock
        self.observe = observe
        self.interval = interval
        self.warn_above = warn_above
        self._warn = ThrottledLog(log, clock, warn_interval)
        self._call = None
        self._due = None
        self.worst = 0.0  # largest lag seen since start (tests, the bench reads the histogram)

    def startService(self):
        super().startService()
        self._schedule(self.clock.seconds())

    def stopService(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return super().stopService()

    def _schedule(self, now):
        # The next tick is due one interval after this one ran, not after it
        # was due: a long pause gives one late tick, not a burst of catch-up ones.
        self._due = now + self.interval
        self._call = self.clock.callLater(self.interval, self._tick)

    def _tick(self):
        now = self.clock.seconds()
        try:
            # A wall clock stepped back would give a negative lateness.
            lag = max(0.0, now - self._due)
            self.observe(lag)
            if lag > self.worst:
                self.worst = lag
            if lag > self.warn_above:
                self._warn.emit("lag", None, "warn", "the reactor was busy for {lag_ms:.0f} ms: requests waited as "
                                "long", lag_ms=lag * 1e3)
        except Exception:
            log.failure("reactor lag probe")
        finally:
            if self.running:
                self._schedule(now)
