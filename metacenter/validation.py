"""Validation of every request body: one place, reasons that name the JSON field.

Replicated events go through the same functions as client requests.
"""

import ipaddress
import json

from metacenter.envelope import invalid, invalid_json
from metacenter.state import PROMPT_MAX

INT64_MAX = 2**63 - 1

_loads = json.JSONDecoder().decode


def parse_json_object(body):
    """bytes -> dict, or a 400 that says why. Any Content-Type is accepted:
    the gateway sends DELETE bodies without one."""
    if not body or not body.strip():
        raise invalid_json("request body is empty; expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_json("request body is not valid UTF-8") from None
    try:
        value = _loads(text)
    except ValueError as e:
        raise invalid_json(f"malformed JSON: {e}") from None
    except RecursionError:
        raise invalid_json("malformed JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise invalid_json(f"expected a JSON object, got {json_type(value)}")
    return value


def json_type(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def required_string(obj, name):
    value = obj.get(name)
    if value is None:
        raise invalid(f"field '{name}' is required")
    if not isinstance(value, str):
        raise invalid(f"field '{name}' must be a string, got {json_type(value)}")
    if not value:
        raise invalid(f"field '{name}' must not be empty")
    if not value.isascii() and any("\ud800" <= c <= "\udfff" for c in value):
        raise invalid(f"field '{name}' must be valid Unicode text, got a lone surrogate escape (\\ud800-\\udfff)")
    return value


_canonical_ips = {}  # text -> canonical form; engines are few, parsing is not cheap
_CANONICAL_IPS_MAX = 65536


def canonical_ip(text):
    """An IPv4 or IPv6 address in canonical form, so two spellings of one
    engine are one engine; ValueError otherwise. IPv6 zones (fe80::1%eth0)
    are refused: they only mean something on one host."""
    canonical = _canonical_ips.get(text)
    if canonical is not None:
        return canonical
    if "%" in text:
        raise ValueError(text)
    canonical = str(ipaddress.ip_address(text))
    if len(_canonical_ips) >= _CANONICAL_IPS_MAX:
        _canonical_ips.clear()
    _canonical_ips[text] = canonical
    return canonical


def ip_field(obj, name="ip"):
    value = required_string(obj, name)
    try:
        # The reference takes IPv4 only; IPv6 is an improvement.
        return canonical_ip(value)
    except ValueError:
        raise invalid(f"field '{name}' must be an IPv4 or IPv6 address, got {value!r}") from None


def int_field(obj, name, minimum, maximum, default=None):
    value = obj.get(name)
    if value is None:
        if default is None:
            raise invalid(f"field '{name}' is required")
        return default
    # bool is an int in Python, not in JSON.
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"field '{name}' must be an integer in [{minimum}, {maximum}], got {json_type(value)}")
    if not minimum <= value <= maximum:
        raise invalid(f"field '{name}' must be an integer in [{minimum}, {maximum}], got {value}")
    return value


def timestamp_field(obj):
    """Optional sender timestamp, ns since the epoch; None when absent."""
    value = obj.get("timestamp")
    if value is None:
        return None
    return int_field(obj, "timestamp", 0, INT64_MAX)


class LoadAdd(tuple):
    __slots__ = ()
    cluster = property(lambda self: self[0])
    request_id = property(lambda self: self[1])
    ip = property(lambda self: self[2])
    prompt_length = property(lambda self: self[3])
    timestamp = property(lambda self: self[4])


class LoadDelete(tuple):
    __slots__ = ()
    request_id = property(lambda self: self[0])
    timestamp = property(lambda self: self[1])


def load_add(obj):
    """POST /v1/load/stats and replicated load.stats.set."""
    return LoadAdd((
        required_string(obj, "cluster"),
        required_string(obj, "request_id"),
        ip_field(obj, "ip"),
        int_field(obj, "prompt_length", 0, PROMPT_MAX, default=0),
        timestamp_field(obj),
    ))


def load_delete(obj):
    """DELETE /v1/load/stats and /v1/load/prompt: only request_id counts; the
    gateway also sends its other (empty) fields, which are ignored."""
    return LoadDelete((required_string(obj, "request_id"), timestamp_field(obj)))


def cluster_query(args):
    """GET /v1/load/stats?cluster=NAME (args: Twisted's request.args)."""
    values = args.get(b"cluster")
    if not values or not values[0]:
        raise invalid("query parameter 'cluster' is required and must not be empty")
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("query parameter 'cluster' is not valid UTF-8") from None


LOG_LEVEL_REASON = "log LevelParam can only be [TRACE DEBUG INFO WARN ERROR FATAL]"


def log_level(obj):
    from metacenter.config import LOG_LEVELS

    value = obj.get("LevelParam")
    if not isinstance(value, str) or value not in LOG_LEVELS:
        raise invalid(LOG_LEVEL_REASON)
    return value
