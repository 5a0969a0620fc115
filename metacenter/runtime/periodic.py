"""Periodic work as ``TimerService``s (as magic-wormhole's ``server_tap.py``
runs its periodic jobs): the one way this node repeats anything.

A bare TimerService stops for good at the first exception or failed Deferred
of its call; ``Periodic`` catches and logs both, so the next tick runs as
planned, and never starts a call while the previous one is still running.
"""

from twisted.application.internet import TimerService
from twisted.internet import defer

from metacenter.runtime.logs import logger

_log = logger("metacenter.runtime.periodic")


class Periodic(TimerService):
    """Calls ``work()`` every ``interval`` seconds of ``clock`` (an
    ``IReactorTime``; the global reactor if None) while the service runs.

    - ``now``: the first call at start (True) or one interval later (False).
    - ``what`` names the job in the log; errors go to ``log`` (a
      ``metacenter.runtime.logs.logger``), so the live level governs them.
    - ``work`` may return a Deferred. With ``detached=False`` the timer waits
      for it (the next call is at the next tick after it fired) and
      ``stopService`` waits for a call in progress; with ``detached=True``
      the timer does not (ticks while it runs are skipped, and stopping
      leaves it to finish or fail on its own): for jobs that may wait on the
      network for many seconds, which must not hold up a stopping process.
    """

    def __init__(self, interval, work, *, what, clock=None, now=True, detached=False, log=None):
        super().__init__(interval, self._tick)
        self.clock = clock
        self.what = what
        self._work = work
        self._now = now
        self._detached = detached
        self._log = log if log is not None else _log
        self._skip = False
        self.in_progress = None  # the Deferred of a detached call still running

    def startService(self):
        self._skip = not self._now  # TimerService always calls at once
        super().startService()

    def _tick(self):
        if self._skip:
            self._skip = False
            return None
        if self.in_progress is not None:
            return None  # detached: the previous call still runs
        d = defer.maybeDeferred(self._work)  # an exception becomes a failed Deferred
        d.addErrback(lambda failure: self._log.failure("{what} failed", failure, what=self.what))
        if not self._detached:
            return d
        if not d.called:
            self.in_progress = d
            d.addBoth(self._detached_done)
        return None

    def _detached_done(self, result):
        self.in_progress = None
        return result
