"""Logging: twisted.logger everywhere, behind one level filter that
POST /log/level changes live.

Our modules log through ``logger(namespace)``; those events pass a
``FilteringLogObserver`` whose predicate holds the current level, then reach
the global publisher (and so twistd's log). Twisted's own events are unaffected.
"""

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

# The wire's level names; Twisted has no TRACE and calls FATAL "critical".
WIRE_LEVELS = {
    "TRACE": LogLevel.debug,
    "DEBUG": LogLevel.debug,
    "INFO": LogLevel.info,
    "WARN": LogLevel.warn,
    "ERROR": LogLevel.error,
    "FATAL": LogLevel.critical,
}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_filtered = FilteringLogObserver(lambda event: globalLogPublisher(event), [_predicate])
_current = ["INFO"]


def logger(namespace):
    """A ``twisted.logger.Logger`` for ``namespace`` whose events pass the
    live level filter (``set_level``, ``POST /log/level``) before they reach
    the global log publisher."""
    return Logger(namespace=namespace, observer=_filtered)


def set_level(wire_name):
    """Sets the level of every ``logger(...)``: one of ``WIRE_LEVELS``'s
    names (KeyError for another)."""
    _predicate.setLogLevelForNamespace(None, WIRE_LEVELS[wire_name])
    _current[0] = wire_name


def current_level():
    """The wire name of the current level, e.g. ``"INFO"``."""
    return _current[0]


class ThrottledLog:
    """Logs a recurring condition at most once per ``interval`` seconds per
    key (and at once when the key's reason changes), through a level-filtered
    ``logger``: one lost peer or one bad client must not flood the log.

    ``clock`` provides ``seconds()``. ``emit(key, reason, method, format,
    **fields)`` calls ``logger.<method>(format, **fields)`` when due and
    returns whether it did; ``reset(key)`` forgets a condition that ended, so
    its next occurrence is logged at once. Keys are few (peers, routes):
    reset the key of a peer that left.

    With ``suppressed_note`` (a format such as ``" ({suppressed} similar
    failures not logged)"``), a message that follows suppressed ones of its
    key gets the note appended and a ``suppressed`` field (their count).
    """

    def __init__(self, logger, clock, interval, suppressed_note=None):
        self._logger = logger
        self._clock = clock
        self._interval = interval
        self._note = suppressed_note
        self._last = {}  # key -> [seconds, reason, suppressed since]

    def emit(self, key, reason, method, format, /, **fields):
        # Positional-only: a message may have fields named "reason" or "key".
        now = self._clock.seconds()
        previous = self._last.get(key)
        if previous is not None and previous[1] == reason and now - previous[0] < self._interval:
            previous[2] += 1
            return False
        suppressed = previous[2] if previous is not None else 0
        self._last[key] = [now, reason, 0]
        if suppressed and self._note is not None:
            format += self._note
            fields["suppressed"] = suppressed
        getattr(self._logger, method)(format, **fields)
        return True

    def reset(self, key):
        """The condition of ``key`` ended: its next occurrence logs at once."""
        self._last.pop(key, None)
