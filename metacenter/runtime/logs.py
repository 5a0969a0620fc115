"""Logging: twisted.logger everywhere, behind one level filter that
POST /log/level changes live.

Our modules log through ``logger(namespace)``; those events pass a
``FilteringLogObserver`` whose predicate holds the current level, then reach
the global publisher (and so twistd's log). Twisted's own events are unaffected.

``--log-format json`` replaces twistd's text lines with ``json_line``'s one
JSON object per line (``json_observer_factory``, given to twistd as its
``--logger``).
"""

import json
import sys
import time
from datetime import datetime, timezone

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogPublisher,
)
from twisted.python.logfile import LogFile

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


# Keys of events from twisted.python.log (the legacy API, still used inside
# Twisted) that repeat what "time", "namespace" and "message" already say.
_LEGACY_KEYS = frozenset({"message", "format", "time", "system", "isError", "printed", "why", "failure"})


def _iso_time(seconds):
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def json_line(event):
    """One ``twisted.logger`` event as one line of JSON (ending in "\\n"):

    ``{"time": "2026-01-31T12:00:00.123456Z" (UTC), "level": "debug" | "info"
    | "warn" | "error" | "critical", "namespace": "metacenter.cluster.replication",
    "message": the formatted text, "fields": {the event's own fields}}``,
    plus ``"traceback"`` (str) when the event carries a failure. A field
    whose value JSON cannot hold (an object, NaN) is given as its ``repr``.

    Twisted's ``jsonFileLogObserver`` does not fit log pipelines: its records
    start with an RS character, hold every internal ``log_*`` key and no
    formatted message, and their level is an object.
    """
    fields = {k: v for k, v in event.items() if not k.startswith("log_") and k not in _LEGACY_KEYS}
    line = {
        "time": _iso_time(event.get("log_time") or time.time()),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace") or "-",
        "message": formatEvent(event),
        "fields": fields,
    }
    failure = event.get("log_failure")
    if failure is not None:
        line["traceback"] = failure.getTraceback()
    try:
        text = json.dumps(line, default=repr, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError):  # NaN, or a dict with keys JSON has no form for
        line["fields"] = {k: repr(v) for k, v in fields.items()}
        text = json.dumps(line, default=repr, allow_nan=False, ensure_ascii=False)
    return text + "\n"


# twistd's options while --log-format json is on (``log_as_json``): where
# twistd would have written its text lines.
_twistd_options = {}


def log_as_json(twistd_options):
    """Makes twistd log through ``json_observer``: sets its ``--logger``
    option (``twistd_options``, its ``ServerOptions``, whose postOptions
    imports the observer factory by name) before twistd builds its logger."""
    _twistd_options.clear()
    _twistd_options.update(logfile=twistd_options.get("logfile"), nodaemon=twistd_options.get("nodaemon"))
    twistd_options["logger"] = f"{__name__}.json_observer"


def json_observer():
    """twistd's ``--logger`` factory for ``--log-format json``: a
    ``FileLogObserver`` writing ``json_line``s where twistd would write its
    text lines (stdout with ``--nodaemon`` and no ``--logfile`` or
    ``--logfile -``, else the ``--logfile`` file, ``twistd.log`` by default)."""
    name = _twistd_options.get("logfile") or ""
    nodaemon = _twistd_options.get("nodaemon")
    if name == "-" or (nodaemon and not name):
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")  # twistd's own words for this case
        out = sys.stdout
    else:
        out = LogFile.fromFullPath(name or "twistd.log")
    return FileLogObserver(out, json_line)
