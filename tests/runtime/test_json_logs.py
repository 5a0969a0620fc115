"""--log-format json: one JSON object per line, read back from a real node's
output, and the formatter's edge cases."""

import json
import math
from datetime import datetime

from twisted.logger import Logger

from metacenter.runtime import logs
from tests.nodeproc import NodeProcess

KEYS = {"time", "level", "namespace", "message", "fields"}
LEVELS = {"debug", "info", "warn", "error", "critical"}


def parse_lines(text):
    """Every line of the output as a JSON object (fails on any other line)."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        record = json.loads(line)
        assert isinstance(record, dict), (number, line)
        assert KEYS <= set(record) <= KEYS | {"traceback"}, (number, line)
        assert record["level"] in LEVELS, (number, line)
        assert datetime.fromisoformat(record["time"].replace("Z", "+00:00")).tzinfo is not None
        assert isinstance(record["namespace"], str) and isinstance(record["message"], str)
        assert isinstance(record["fields"], dict)
        records.append(record)
    return records


def test_a_node_with_json_logs_writes_only_json_lines():
    # An unreachable static peer makes the warm start and replication log with fields.
    node = NodeProcess("127.0.0.1", None, "--log-format", "json", "--peer", "127.0.0.1:1").start(wait_ready=True)
    try:
        assert node.call("POST", "/log/level", {"LevelParam": "DEBUG"})[0] == 200
        # The endpoint logs the change at INFO, under the new level: not written.
        assert node.call("POST", "/log/level", {"LevelParam": "WARN"})[0] == 200
    finally:
        node.stop()
    records = parse_lines(node.log())
    messages = [r["message"] for r in records]
    assert "log level set to DEBUG" in messages
    assert "log level set to WARN" not in messages
    level_set = next(r for r in records if r["message"] == "log level set to DEBUG")
    assert level_set["namespace"] == "metacenter.api.endpoint"
    assert level_set["fields"] == {"new_level": "DEBUG"}
    assert level_set["level"] == "info"
    joined = next(r for r in records if r["namespace"] == "metacenter.cluster.discovery")
    assert joined["fields"]["peer"] == "127.0.0.1:1"
    # twistd's own lines too, to the last one.
    assert messages[-1] == "Server Shut Down."


def test_the_environment_chooses_json_like_the_option():
    node = NodeProcess("127.0.0.1", None, env={"METACENTER_LOG_FORMAT": "json"}).start(wait_ready=True)
    node.stop()
    records = parse_lines(node.log())
    assert any(r["namespace"] == "twisted.scripts._twistd_unix.UnixAppLogger" for r in records)


def test_fields_json_cannot_hold_become_their_repr_and_a_failure_its_traceback():
    lines = []
    log = Logger(namespace="test.json", observer=lambda event: lines.append(logs.json_line(event)))
    log.warn("odd {what}", what=ValueError("bad"), ratio=math.nan, key={(1, 2): "tuple key"})
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("dividing {n}", n=1)
    assert all(line.endswith("\n") and line.count("\n") == 1 for line in lines)
    odd, failed = (json.loads(line) for line in lines)
    assert odd["level"] == "warn" and odd["namespace"] == "test.json"
    assert odd["message"] == "odd bad"
    assert odd["fields"] == {"what": "ValueError('bad')", "ratio": "nan", "key": "{(1, 2): 'tuple key'}"}
    assert failed["level"] == "critical" and failed["message"] == "dividing 1"
    assert failed["fields"] == {"n": 1}
    assert "ZeroDivisionError" in failed["traceback"]
