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
    return Logger(namespace=namespace, observer=_filtered)


def set_level(wire_name):
    _predicate.setLogLevelForNamespace(None, WIRE_LEVELS[wire_name])
    _current[0] = wire_name


def current_level():
    return _current[0]


def enabled(level):
    """Cheap check before building an expensive log event."""
    return level >= _predicate.logLevelForNamespace(None)
