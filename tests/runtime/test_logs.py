"""The live level filter and the one throttled logger."""

from twisted.internet import task
from twisted.logger import LogLevel, Logger, formatEvent, globalLogPublisher

from metacenter.runtime import logs


def test_throttled_messages_per_key_and_reason():
    clock = task.Clock()
    events = []
    throttled = logs.ThrottledLog(Logger(observer=events.append), clock, 60.0,
                                  suppressed_note=" ({suppressed} similar not logged)")
    assert throttled.emit("peer-a", "down", "warn", "{peer} failed: {reason}", peer="a", reason="down")
    assert not throttled.emit("peer-a", "down", "warn", "{peer} failed: {reason}", peer="a", reason="down")
    assert throttled.emit("peer-b", "down", "warn", "{peer} failed: {reason}", peer="b", reason="down")
    clock.advance(59)
    assert not throttled.emit("peer-a", "down", "warn", "{peer} failed: {reason}", peer="a", reason="down")
    clock.advance(1)
    assert throttled.emit("peer-a", "down", "warn", "{peer} failed: {reason}", peer="a", reason="down")
    assert throttled.emit("peer-a", "slow", "warn", "{peer} failed: {reason}", peer="a", reason="slow")
    throttled.reset("peer-a")
    assert throttled.emit("peer-a", "slow", "error", "{peer} failed: {reason}", peer="a", reason="slow")
    assert [formatEvent(e) for e in events] == [
        "a failed: down", "b failed: down", "a failed: down (2 similar not logged)", "a failed: slow",
        "a failed: slow"]
    assert events[-1]["log_level"] == LogLevel.error


def test_the_level_filters_our_loggers_live():
    seen = []

    def observer(event):
        if event.get("log_namespace") == "test.logs.level":
            seen.append(event["log_level"])

    log = logs.logger("test.logs.level")
    globalLogPublisher.addObserver(observer)
    try:
        logs.set_level("WARN")
        assert logs.current_level() == "WARN"
        log.info("hidden")
        log.warn("shown")
        logs.set_level("DEBUG")
        log.debug("shown too")
    finally:
        globalLogPublisher.removeObserver(observer)
        logs.set_level("INFO")
    assert seen == [LogLevel.warn, LogLevel.debug]
