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
from metacenter.core.events import (EVENT_ADD, EVENT_CACHE_SAVE, EVENT_ENGINE_RESET, EVENT_LEASE_KEEPALIVE,
                                    EVENT_LEASE_REVOKE, EVENT_REFRESH, LOAD_EVENT_TYPES, TRUTH_EVENT_TYPES, CacheSave,
                                    EngineReset, LeaseKeepalive, LeaseRevoke, LoadAdd, LoadDelete, Refresh)
from metacenter.core.fields import (INT32_MAX, canonical_ip, check_length, int_field, ip_value, json_type,
                                    required_string, timestamp_field, uint64_list)
from metacenter.core.leases import REFRESH_MAX_ITEMS, lease_name, lease_ttl_ms
from metacenter import jsonsteps
from metacenter.api.envelope import invalid, invalid_json

_loads = json.JSONDecoder().decode
# Python's text-to-int conversion refuses more than sys.get_int_max_str_digits()
# digits (4,300 by default); its message names no field.
_TOO_MANY_DIGITS = "for integer string conversion"


class _TooManyDigits:
    __slots__ = ("digits",)

    def __init__(self, digits):
        self.digits = digits


def _digits_decoder():
    """A decoder that parses an over-long integer as ``_TooManyDigits``."""
    limit = sys.get_int_max_str_digits()

    def parse_int(digits):
        length = len(digits.lstrip("-"))
        return _TooManyDigits(length) if limit and length > limit else int(digits)

    return json.JSONDecoder(parse_int=parse_int)


def _too_many_digits_reason(text):
    """The reason for a body with an over-long integer, naming where it is.
    Parsed again with a hook on integers: only on this refusal, since a hook
    makes every integer of every body a Python call."""
    try:
        value = _digits_decoder().decode(text)
    except (ValueError, RecursionError):
        value = None
    return _digits_reason(_find_too_many_digits(value, ()))


def _digits_reason(found):
    """The reason for an over-long integer found by ``_find_too_many_digits``
    (None: somewhere in a body that was malformed too)."""
    limit = sys.get_int_max_str_digits()
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


def _body_text(body):
    """A request body's bytes -> its text, or the 400 for an empty or
    non-UTF-8 body."""
    if not body or body.isspace():
        raise invalid_json("request body is empty; expected a JSON object")
    if body.startswith(b"\xef\xbb\xbf"):  # json.loads' own reason would be "Expecting value: ... (char 0)"
        raise invalid_json("request body starts with a UTF-8 byte order mark; expected a JSON object without one")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid_json("request body is not valid UTF-8") from None


def parse_json_object(body):
    """bytes -> dict, or a 400 that says why. Any Content-Type is accepted:
    the gateway sends DELETE bodies without one."""
    text = _body_text(body)
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


UPDATED_TIME_MAX = 2**63 - 1  # ns; the gateway's updated_time is an int64


def spelled_ip(obj, name="ip"):
    """``obj[name]``: a required IPv4/IPv6 address, validated but returned as
    the client spelled it: the core keys engines by the canonical form and
    answers with the first spelling (the Go gateway finds engines by the
    exact string it sent)."""
    value = required_string(obj, name)
    ip_value(value, name)  # raises, naming the field
    return value


def optional_lease(obj, name="lease"):
    """``obj[name]``: a lease name, or None when absent or null."""
    value = obj.get(name)
    return None if value is None else lease_name(value, name)


def load_add(obj):
    """POST /v1/load/stats and replicated ``load.stats.set`` -> ``LoadAdd``.

    ``{"cluster": str, "request_id": str, "ip": str, "prompt_length"?: int
    bytes in [0, 2^31-1] (default 0), "timestamp"?: int ns, "prompt_tokens"?:
    int in [0, 2^31-1] (default 0), "lease"?: str (1-128 characters),
    "if_updated_time"?: int ns in [0, 2^63-1]}`` (docs/api.md). The ip is
    passed on as spelled."""
    if_updated_time = obj.get("if_updated_time")
    if if_updated_time is not None:
        if_updated_time = int_field(obj, "if_updated_time", 0, UPDATED_TIME_MAX)
    return LoadAdd((
        required_string(obj, "cluster"),
        required_string(obj, "request_id"),
        spelled_ip(obj, "ip"),
        int_field(obj, "prompt_length", 0, INT32_MAX, default=0),
        timestamp_field(obj),
        int_field(obj, "prompt_tokens", 0, INT32_MAX, default=0),
        optional_lease(obj),
        if_updated_time,
    ))


def peer_load_add(obj):
    """A replicated add (HTTP batch or stream) -> ``LoadAdd``, validated like
    a client's: never with a condition, and the 5-tuple every node knows
    when it has neither prompt_tokens nor lease."""
    event = load_add(obj)
    if not event[5] and event[6] is None:
        return LoadAdd(event[:5])
    return LoadAdd(event[:7])


def engine_reset(obj):
    """DELETE /v1/load/engine and replicated ``load.engine.reset`` ->
    ``EngineReset``: ``{"cluster": str, "ip": str}`` (ip as spelled)."""
    return EngineReset((required_string(obj, "cluster"), spelled_ip(obj, "ip")))


def lease_keepalive(obj):
    """POST /v1/load/lease/keepalive and replicated ``load.lease.keepalive``
    -> ``LeaseKeepalive``: ``{"lease": str, "ttl_ms"?: int in [1000,
    300000]}``; ttl_ms None means the node's ``--lease-ttl``."""
    ttl_ms = obj.get("ttl_ms")
    return LeaseKeepalive((lease_name(obj.get("lease")), None if ttl_ms is None else lease_ttl_ms(ttl_ms)))


def lease_revoke(obj):
    """DELETE /v1/load/lease and replicated ``load.lease.revoke`` ->
    ``LeaseRevoke``: ``{"lease": str}``."""
    return LeaseRevoke((lease_name(obj.get("lease")),))


def refresh(obj):
    """POST /v1/load/refresh and replicated ``load.refresh`` -> ``Refresh``:
    ``{"request_ids": [str, ...]}``, at most 10,000 non-empty strings."""
    value = obj.get("request_ids")
    if value is None:
        raise InvalidInput("field 'request_ids' is required")
    if not isinstance(value, list):
        raise InvalidInput(f"field 'request_ids' must be an array of strings, got {json_type(value)}")
    if len(value) > REFRESH_MAX_ITEMS:
        raise InvalidInput(f"field 'request_ids' has {len(value)} items; at most {REFRESH_MAX_ITEMS} are allowed")
    check_request_ids(value)
    return Refresh((tuple(value),))


def check_request_ids(items, start=0):
    """Each of ``items`` (``request_ids[start:start + len(items)]``) is a
    non-empty string of valid text, like a client's request_id; InvalidInput
    naming the first bad one by its index in the whole array."""
    for index, item in enumerate(items, start):
        if not isinstance(item, str) or not item:
            got = json_type(item) if not isinstance(item, str) else "an empty string"
            raise InvalidInput(f"field 'request_ids' item {index} must be a non-empty string, got {got}")
        required_string({"request_id": item}, "request_id")


def route_pick(obj):
    """POST /v1/route/pick -> keyword arguments of ``core.picking.pick``
    (without ``rng``): ``{"cluster", "request_id", "prompt_length"?,
    "prompt_tokens"?, "prompt_hash"?: [uint64], "ips"?: [ip as spelled],
    "lease"?}``."""
    ips = obj.get("ips")
    if ips is not None:
        ips = _ip_list(obj, "ips", canonical=False)
    hashes = obj.get("prompt_hash")
    return {
        "cluster": required_string(obj, "cluster"),
        "request_id": required_string(obj, "request_id"),
        "prompt_length": int_field(obj, "prompt_length", 0, INT32_MAX, default=0),
        "prompt_tokens": int_field(obj, "prompt_tokens", 0, INT32_MAX, default=0),
        "prompt_hash": None if hashes is None else hash_list(obj, "prompt_hash"),
        "ips": ips,
        "lease": optional_lease(obj),
    }


def load_delete(obj):
    """DELETE /v1/load/stats and /v1/load/prompt -> ``LoadDelete``: only
    request_id counts; the gateway also sends its other (empty) fields, which
    are ignored."""
    return LoadDelete((required_string(obj, "request_id"), timestamp_field(obj)))


_OUR_EVENTS = {
    EVENT_ENGINE_RESET: engine_reset,
    EVENT_LEASE_KEEPALIVE: lease_keepalive,
    EVENT_LEASE_REVOKE: lease_revoke,
    EVENT_REFRESH: refresh,
}


def load_event(event_type, obj):
    """A replicated load event of a known type (``core.events.LOAD_EVENT_TYPES``
    or ``TRUTH_EVENT_TYPES``) -> ``LoadAdd`` for an add, ``LoadDelete`` for
    either delete, the typed event of ours otherwise. A replicated add never
    carries a condition: ``if_updated_time`` is dropped (it was checked on
    the node the client called)."""
    if event_type == EVENT_ADD:
        return peer_load_add(obj)
    parse = _OUR_EVENTS.get(event_type)
    return load_delete(obj) if parse is None else parse(obj)


# Bodies up to this size are parsed by one ``json.loads`` (~0.1 ms): the
# stepped parser walks arrays item by item in Python, several times slower,
# which the hot path's small bodies must not pay.
PARSE_IN_ONE_GO = 16 * 1024


def json_object_steps(body, spent):
    """``parse_json_object`` over several steps, for bodies too big to parse
    in one reactor turn: a generator that yields (None) whenever ``spent()``
    is true after a value, and returns the dict; the same 400s, with the same
    reasons (``jsonsteps.parse`` raises what ``json.loads`` raises). Even a
    refusal is found in steps: an over-long integer's reason comes from a
    second stepped parse. A body up to ``PARSE_IN_ONE_GO`` bytes is parsed
    at once."""
    if len(body) <= PARSE_IN_ONE_GO:
        return parse_json_object(body)
    text = _body_text(body)
    try:
        value = yield from jsonsteps.parse(text, spent)
    except ValueError as e:
        if _TOO_MANY_DIGITS not in str(e):
            raise invalid_json(f"malformed JSON: {e}") from None
        try:
            value = yield from jsonsteps.parse(text, spent, _digits_decoder().raw_decode)
        except (ValueError, RecursionError):
            value = None
        found = yield from _find_in_steps(value, spent)
        raise invalid(_digits_reason(found)) from None
    except RecursionError:
        raise invalid_json("malformed JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise invalid_json(f"expected a JSON object, got {json_type(value)}")
    return value


def _find_in_steps(value, spent):
    """``_find_too_many_digits(value, ())``, the top two levels walked here
    (as ``jsonsteps.parse`` parsed them) with a step after each value."""
    top = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
    if top is None:
        return _find_too_many_digits(value, ())
    for key, item in top:
        inner = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else None
        if inner is None:
            inner = ((None, item),)
        for index, sub in inner:
            found = _find_too_many_digits(sub, (key,) if index is None else (key, index))
            if found is not None:
                return found
            if spent():
                yield
    return None


def read_events(body, max_events, spent):
    """A replica batch's bytes -> its ``events`` array (at most
    ``max_events`` items, each still to be checked on its own), parsed in
    steps: a generator as ``json_object_steps``, returning the list. A body
    that is not such an object is refused (400) before any event is used."""
    events = (yield from json_object_steps(body, spent)).get("events")
    if not isinstance(events, list):
        raise InvalidInput("field 'events' must be an array")
    if len(events) > max_events:
        raise InvalidInput(f"field 'events' holds more than {max_events} events")
    return events


def batch_event(item):
    """One item of a replica batch's ``events`` (``{"type", "body",
    "trace_id"?}``) -> ``(event_type, typed event)``: a load event, one of
    ours (``TRUTH_EVENT_TYPES``) or a ``cache.save``, its body checked as a
    client's. InvalidInput with the reason the batch reports by index."""
    if not isinstance(item, dict):
        raise InvalidInput("an event must be an object")
    event_type = item.get("type")
    cache_save = event_type == EVENT_CACHE_SAVE
    if not cache_save and event_type not in LOAD_EVENT_TYPES and event_type not in TRUTH_EVENT_TYPES:
        raise InvalidInput("Unsupported event type")
    payload = item.get("body")
    if not isinstance(payload, dict):
        raise InvalidInput("field 'body' must be an object")
    return event_type, parse_cache_save(payload) if cache_save else load_event(event_type, payload)


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


def _ip_list(obj, name, canonical=True):
    """An optional array of IP addresses, canonical form (as spelled when
    ``canonical`` is false); None when absent."""
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidInput(f"field '{name}' must be an array of IP addresses, got {json_type(value)}")
    if len(value) > IPS_MAX_ITEMS:
        raise InvalidInput(f"field '{name}' has {len(value)} items; at most {IPS_MAX_ITEMS} are allowed")
    return check_ips(value, name, canonical)


def check_ips(items, name, canonical=True, start=0):
    """``items`` (``obj[name][start:start + len(items)]``) checked as IP
    addresses -> them in canonical form (as spelled when ``canonical`` is
    false); InvalidInput naming the first bad one by its index in the whole
    array."""
    ips = []
    for index, item in enumerate(items, start):
        if not isinstance(item, str):
            raise InvalidInput(f"field '{name}' item {index} must be an IP address string, got {json_type(item)}")
        check_length(item, "ip", f"field '{name}' item {index}")
        try:
            address = canonical_ip(item)
            ips.append(address if canonical else item)
        except ValueError:
            raise InvalidInput(f"field '{name}' item {index} must be an IPv4 or IPv6 address, got {item!r}") from None
    return ips


# Items checked between two calls of a step's ``spent()`` (which reads the
# clock every 16 calls): hashes at C speed (~40 ns each), addresses ~5 µs.
HASHES_PER_CHECK = 256
IPS_PER_CHECK = 4


def hash_list_steps(obj, allow_empty, spent, name="prompt_hash"):
    """``hash_list(obj, name, allow_empty)`` a slice at a time, for
    ``endpoint.in_turns`` work: a generator returning the list, or raising
    the same InvalidInput (the item named by its index in the whole array)."""
    value = obj.get(name)
    if not isinstance(value, list) or not value or len(value) > PROMPT_HASH_MAX_ITEMS:
        return hash_list(obj, name, allow_empty)  # its reason, or [] when that is allowed
    for start in range(0, len(value), HASHES_PER_CHECK):
        uint64_list(value[start:start + HASHES_PER_CHECK], name, PROMPT_HASH_MAX_ITEMS, start=start)
        if spent():
            yield
    return value


def ip_list_steps(obj, name, spent):
    """``_ip_list(obj, name, canonical=False)`` a slice at a time (10,000
    addresses took ~25 ms in one go): a generator returning the addresses as
    spelled (None when absent), or raising the same InvalidInput."""
    value = obj.get(name)
    if not isinstance(value, list) or len(value) > IPS_MAX_ITEMS:
        return _ip_list(obj, name, canonical=False)  # None when absent, else its reason
    for start in range(0, len(value), IPS_PER_CHECK):
        check_ips(value[start:start + IPS_PER_CHECK], name, canonical=False, start=start)
        if spent():
            yield
    return list(value)


def parse_cache_save(obj):
    """POST /v1/cache/save and replicated ``cache.save`` -> ``CacheSave``.
    An empty prompt_hash is a 400: there is nothing to save."""
    return CacheSave((
        required_string(obj, "cluster"),
        hash_list(obj, "prompt_hash", allow_empty=False),
        spelled_ip(obj, "ip"),
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
        _ip_list(obj, "ips", canonical=False),  # as spelled: rows carry the engines' spellings
    )
