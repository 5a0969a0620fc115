"""Checks of single decoded values (from a JSON body, a replicated event or a
snapshot line): one place for each rule, every reason naming the field and
what was expected. Raises ``InvalidInput``; knows nothing of HTTP.
"""

import ipaddress

from metacenter.core.errors import InvalidInput

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1


def json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for reasons."""
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


class FieldTooLong(InvalidInput):
    """A text field longer than its limit. ``field`` is the field's name,
    ``maximum`` its limit and ``length`` the value's, in characters (code
    points), for the refusal metric."""

    def __init__(self, field: str, maximum: int, length: int, label: str | None = None):
        label = label or f"field '{field}'"
        super().__init__(f"{label} must be at most {maximum} characters long, got {length}")
        self.field = field
        self.maximum = maximum
        self.length = length


# Default lengths (characters). Generous for what gateways send (UUIDs, model
# names, pod names, addresses) but finite: every name is kept in memory, in
# every GET answer and /metrics line of its cluster; docs/deployment.md sizes
# a node from them. The lease limit is issue 10's wire contract.
DEFAULT_MAX_LENGTHS = {"request_id": 256, "cluster": 256, "ip": 64, "lease": 128}

# The lengths in force (field -> characters): the process's settings
# (``set_max_lengths``), shared by client requests, replicated events and
# snapshot records alike. Read it, never write it: fast paths that skip the
# checks here compare with it, to refuse what the checks would.
MAX_LENGTHS = dict(DEFAULT_MAX_LENGTHS)
_on_too_long = None


def set_max_lengths(lengths: dict | None = None, on_too_long=None) -> None:
    """Set the limits in force: ``lengths`` maps a field name (request_id,
    cluster, ip, lease) to its maximum length in characters (a positive int;
    ValueError otherwise); fields not named keep their defaults. Every field
    named ``cluster`` (clusters lists, queries) is checked with the cluster's.
    ``on_too_long(error)`` is called with each ``FieldTooLong`` before it is
    raised (metrics, log); None for none."""
    global _on_too_long
    merged = dict(DEFAULT_MAX_LENGTHS)
    for name, maximum in (lengths or {}).items():
        if name not in DEFAULT_MAX_LENGTHS:
            raise ValueError(f"no length limit for field {name!r}")
        if isinstance(maximum, bool) or not isinstance(maximum, int) or maximum <= 0:
            raise ValueError(f"the length limit of {name!r} must be a positive integer, got {maximum!r}")
        merged[name] = maximum
    MAX_LENGTHS.clear()
    MAX_LENGTHS.update(merged)
    _on_too_long = on_too_long


def max_length(name: str) -> int | None:
    """The length limit in force for field ``name`` (characters), or None."""
    return MAX_LENGTHS.get(name)


def check_length(value: str, name: str, label: str | None = None) -> str:
    """``value`` unless it is longer than the limit of field ``name``: a
    ``FieldTooLong`` whose reason starts with ``label`` (default "field
    'NAME'"; e.g. "query parameter 'cluster'", "field 'ips' item 3")."""
    maximum = MAX_LENGTHS.get(name)
    if maximum is not None and len(value) > maximum:
        error = FieldTooLong(name, maximum, len(value), label)
        if _on_too_long is not None:
            _on_too_long(error)
        raise error
    return value


def checked_text(value: str, name: str) -> str:
    """``value`` unless it holds a lone surrogate (JSON can carry ``\\ud800``;
    UTF-8 cannot, so it would fail later, when written)."""
    if not value.isascii() and any("\ud800" <= c <= "\udfff" for c in value):
        raise InvalidInput(f"field '{name}' must be valid Unicode text, got a lone surrogate escape (\\ud800-\\udfff)")
    return value


def required_string(obj: dict, name: str) -> str:
    """``obj[name]``: a non-empty string of valid Unicode text."""
    value = obj.get(name)
    if value is None:
        raise InvalidInput(f"field '{name}' is required")
    if not isinstance(value, str):
        raise InvalidInput(f"field '{name}' must be a string, got {json_type(value)}")
    if not value:
        raise InvalidInput(f"field '{name}' must not be empty")
    # Before the surrogate scan, which walks the whole text.
    maximum = MAX_LENGTHS.get(name)
    if maximum is not None and len(value) > maximum:
        check_length(value, name)
    return checked_text(value, name)


_canonical_ips = {}  # text -> canonical form; engines are few, parsing is not cheap
_CANONICAL_IPS_MAX = 65536


def canonical_ip(text: str) -> str:
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


def ip_value(value: str, name: str) -> str:
    """A string already known to be one, as a canonical IPv4/IPv6 address.
    Its length is checked against the ``ip`` limit first (an address is at
    most 45 characters; parsing a longer text is wasted work)."""
    check_length(value, "ip", None if name == "ip" else f"field '{name}'")
    try:
        # The reference takes IPv4 only; IPv6 is an improvement.
        return canonical_ip(value)
    except ValueError:
        raise InvalidInput(f"field '{name}' must be an IPv4 or IPv6 address, got {value!r}") from None


def ip_field(obj: dict, name: str = "ip") -> str:
    """``obj[name]``: a required IP address, canonical form."""
    return ip_value(required_string(obj, name), name)


def int_field(obj: dict, name: str, minimum: int, maximum: int, default: int | None = None) -> int:
    """``obj[name]``: an integer in [minimum, maximum]; ``default`` when
    absent or null (required when ``default`` is None). A JSON boolean is
    not an integer, though Python's bool is an int."""
    value = obj.get(name)
    if value is None:
        if default is None:
            raise InvalidInput(f"field '{name}' is required")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"field '{name}' must be an integer in [{minimum}, {maximum}], got {json_type(value)}")
    if not minimum <= value <= maximum:
        raise InvalidInput(f"field '{name}' must be an integer in [{minimum}, {maximum}], got {value}")
    return value


def timestamp_field(obj: dict) -> int | None:
    """Optional sender timestamp, ns since the epoch; None when absent."""
    if obj.get("timestamp") is None:
        return None
    return int_field(obj, "timestamp", 0, INT64_MAX)


def is_uint64(value: object) -> bool:
    """Whether ``value`` is an int (not a bool) in [0, 2^64-1]."""
    return type(value) is int and 0 <= value <= UINT64_MAX


_JUST_INT = {int}


def uint64_list(value: object, name: str, max_items: int, allow_empty: bool = True, start: int = 0) -> list:
    """A list of unsigned 64-bit integers (prompt block hashes, the full
    range as JSON numbers); floats, strings, booleans, negatives and values
    >= 2^64 are refused naming the item (its index plus ``start``, when
    ``value`` is a slice of a longer array checked a slice at a time)."""
    if value is None:
        raise InvalidInput(f"field '{name}' is required")
    if not isinstance(value, list):
        raise InvalidInput(f"field '{name}' must be an array of unsigned 64-bit integers, got {json_type(value)}")
    if not value and not allow_empty:
        raise InvalidInput(f"field '{name}' must not be empty")
    if len(value) > max_items:
        raise InvalidInput(f"field '{name}' has {len(value)} items; at most {max_items} are allowed")
    # Fast path for the common, valid case; the slow one finds the culprit.
    if not value or (set(map(type, value)) == _JUST_INT and min(value) >= 0 and max(value) <= UINT64_MAX):
        return value
    for index, item in enumerate(value, start):
        if not is_uint64(item):
            shown = item if type(item) in (int, float) else json_type(item)
            raise InvalidInput(f"field '{name}' item {index} must be an unsigned 64-bit integer, got {shown}")
    raise AssertionError("unreachable: the fast path refused a valid list")
