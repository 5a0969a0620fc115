"""Request bodies -> core events: the only place where JSON meets the core.

Every reason names the JSON field and what was expected; the field checks
themselves are the core's (``metacenter.core.fields``), which raise
``InvalidInput`` (mapped to a 400 by ``api.endpoint``). Replicated events go
through the same functions as client requests.
"""

import json
import sys

from metacenter.core.cache import IPS_MAX_ITEMS, PROMPT_HASH_MAX_ITEMS, TOPK_DEFAULT, TOPK_MAX
from metacenter.core.errors import InvalidInput
from metacenter.core.events import EVENT_ADD, CacheSave, LoadAdd, LoadDelete
from metacenter.core.fields import (INT32_MAX, canonical_ip, check_length, int_field, ip_field, json_type,
                                    required_string, timestamp_field, uint64_list)
from metacenter.api.envelope import invalid, invalid_json

_loads = json.JSONDecoder().decode
# Python's text-to-int conversion refuses more than sys.get_int_max_str_digits()
# digits (4,300 by default); its message names no field.
_TOO_MANY_DIGITS = "for integer string conversion"


class _TooManyDigits:
    __slots__ = ("digits",)

    def __init__(self, digits):
        self.digits = digits


def _too_many_digits_reason(text):
    """The reason for a body with an over-long integer, naming where it is.
    Parsed again with a hook on integers: only on this refusal, since a hook
    makes every integer of every body a Python call."""
    limit = sys.get_int_max_str_digits()

    def parse_int(digits):
        length = len(digits.lstrip("-"))
        return _TooManyDigits(length) if limit and length > limit else int(digits)

    try:
        value = json.JSONDecoder(parse_int=parse_int).decode(text)
    except (ValueError, RecursionError):
        value = None
    found = _find_too_many_digits(value, ())
    if found is None:
        return f"a number has too many digits; integers of at most {limit} digits are accepted"
    path, digits = found
    keys = ".".join(str(p) for p in path if isinstance(p, str))
    items = "".join(f" item {p}" for p in path if isinstance(p, int))
    where = (f"field {keys!r}" if keys else "") + items
    return f"{where.strip() or 'a number'} has {digits} digits; integers of at most {limit} digits are accepted"


def _find_too_many_digits(value, path):
    """(path, digits) of the first over-long integer in document order, the
    path a tuple of keys and indexes; None if there is none."""
    if isinstance(value, _TooManyDigits):
        return path, value.digits
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _find_too_many_digits(item, path + (key,))
        if found is not None:
            return found
    return None


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
        if _TOO_MANY_DIGITS in str(e):
            raise invalid(_too_many_digits_reason(text)) from None
        raise invalid_json(f"malformed JSON: {e}") from None
    except RecursionError:
        raise invalid_json("malformed JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise invalid_json(f"expected a JSON object, got {json_type(value)}")
    return value


def load_add(obj):
    """POST /v1/load/stats and replicated ``load.stats.set`` -> ``LoadAdd``.

    ``{"cluster": str, "request_id": str, "ip": str, "prompt_length"?: int
    bytes in [0, 2^31-1] (default 0), "timestamp"?: int ns}`` (docs/api.md)."""
    return LoadAdd((
        required_string(obj, "cluster"),
        required_string(obj, "request_id"),
        ip_field(obj, "ip"),
        int_field(obj, "prompt_length", 0, INT32_MAX, default=0),
        timestamp_field(obj),
    ))


def load_delete(obj):
    """DELETE /v1/load/stats and /v1/load/prompt -> ``LoadDelete``: only
    request_id counts; the gateway also sends its other (empty) fields, which
    are ignored."""
    return LoadDelete((required_string(obj, "request_id"), timestamp_field(obj)))


def load_event(event_type, obj):
    """A replicated load event of a known type (``core.events.LOAD_EVENT_TYPES``)
    -> ``LoadAdd`` for an add, ``LoadDelete`` for either delete."""
    return load_add(obj) if event_type == EVENT_ADD else load_delete(obj)


def read_events(body, max_events):
    """A replica batch's bytes -> its ``events`` array (at most
    ``max_events`` items, each still to be checked on its own)."""
    events = parse_json_object(body).get("events")
    if not isinstance(events, list):
        raise InvalidInput("field 'events' must be an array")
    if len(events) > max_events:
        raise InvalidInput(f"field 'events' holds more than {max_events} events")
    return events


def cluster_list(obj):
    """``{"clusters": [str, ...]}`` (anti-entropy's requests) -> the names,
    each checked like a client's 'cluster' (non-empty, valid text)."""
    clusters = obj.get("clusters")
    if not isinstance(clusters, list):
        raise InvalidInput("field 'clusters' must be an array of strings")
    return [required_string({"cluster": c}, "cluster") for c in clusters]


def cluster_query(args):
    """GET /v1/load/stats?cluster=NAME (args: Twisted's request.args)."""
    values = args.get(b"cluster")
    if not values or not values[0]:
        raise InvalidInput("query parameter 'cluster' is required and must not be empty")
    try:
        cluster = values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("query parameter 'cluster' is not valid UTF-8") from None
    # The same limit as a written name's: longer was never written.
    return check_length(cluster, "cluster", "query parameter 'cluster'")


LOG_LEVEL_REASON = "log LevelParam can only be [TRACE DEBUG INFO WARN ERROR FATAL]"


def log_level(obj):
    """POST /log/level ``{"LevelParam": "TRACE"|...|"FATAL"}`` -> the name;
    the reference's own reason otherwise."""
    from metacenter.runtime.config import LOG_LEVELS

    value = obj.get("LevelParam")
    if not isinstance(value, str) or value not in LOG_LEVELS:
        raise InvalidInput(LOG_LEVEL_REASON)
    return value


def hash_list(obj, name="prompt_hash", allow_empty=True):
    """``obj[name]``: a JSON array of unsigned 64-bit block hashes."""
    return uint64_list(obj.get(name), name, PROMPT_HASH_MAX_ITEMS, allow_empty)


def _ip_list(obj, name):
    """An optional array of IP addresses, canonical form; None when absent."""
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidInput(f"field '{name}' must be an array of IP addresses, got {json_type(value)}")
    if len(value) > IPS_MAX_ITEMS:
        raise InvalidInput(f"field '{name}' has {len(value)} items; at most {IPS_MAX_ITEMS} are allowed")
    ips = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise InvalidInput(f"field '{name}' item {index} must be an IP address string, got {json_type(item)}")
        check_length(item, "ip", f"field '{name}' item {index}")
        try:
            ips.append(canonical_ip(item))
        except ValueError:
            raise InvalidInput(f"field '{name}' item {index} must be an IPv4 or IPv6 address, got {item!r}") from None
    return ips


def parse_cache_save(obj):
    """POST /v1/cache/save and replicated ``cache.save`` -> ``CacheSave``.
    An empty prompt_hash is a 400: there is nothing to save."""
    return CacheSave((
        required_string(obj, "cluster"),
        hash_list(obj, "prompt_hash", allow_empty=False),
        ip_field(obj, "ip"),
    ))


def parse_cache_query(obj):
    """POST /v1/cache/query -> (cluster, hashes, topk). An empty prompt_hash
    is valid and matches nothing; topk defaults to the gateway's 10."""
    return (
        required_string(obj, "cluster"),
        hash_list(obj, "prompt_hash"),
        int_field(obj, "topk", 1, TOPK_MAX, default=TOPK_DEFAULT),
    )


def parse_route_score(obj):
    """POST /v1/route/score -> (cluster, hashes, ips or None). ``ips``
    restricts the scored engines (the gateway's candidates)."""
    return (
        required_string(obj, "cluster"),
        hash_list(obj, "prompt_hash"),
        _ip_list(obj, "ips"),
    )
