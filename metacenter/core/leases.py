"""Gateway leases: what a lease is and the checks of its fields.

A gateway instance names its own lease (e.g. its pod name) and renews it
with keepalives; every request added under the lease is released when the
lease goes ``ttl_ms`` without a renewal, or at once when it is revoked. The
lease table itself lives in ``LoadState`` (core/load.py), next to the
requests it releases; this module holds the record and the rules.
"""

from metacenter.core.errors import InvalidInput
from metacenter.core.fields import check_length, checked_text, json_type, max_length

LEASE_NAME_MAX = 128
LEASE_TTL_MIN_MS = 1000
LEASE_TTL_MAX_MS = 300_000
LEASE_TTL_DEFAULT_MS = 10_000
REFRESH_MAX_ITEMS = 10_000


def lease_name(value: object, name: str = "lease") -> str:
    """A lease name: a non-empty string of valid Unicode text, at most the
    lease length limit (``fields.MAX_LENGTHS["lease"]``: 128 characters
    unless ``--max-lease-length`` says otherwise). Raises ``InvalidInput``
    (``FieldTooLong`` when too long) naming the field ``name``."""
    if value is None:
        raise InvalidInput(f"field '{name}' is required")
    maximum = max_length("lease") or LEASE_NAME_MAX
    if not isinstance(value, str):
        raise InvalidInput(f"field '{name}' must be a string of 1 to {maximum} characters, got {json_type(value)}")
    if not value:
        raise InvalidInput(f"field '{name}' must be a string of 1 to {maximum} characters, got 0 characters")
    check_length(value, "lease", f"field '{name}'")
    return checked_text(value, name)


def lease_ttl_ms(value: object, name: str = "ttl_ms") -> int:
    """A lease TTL in ms: an integer (not a boolean) in [1000, 300000]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"field '{name}' must be an integer in [{LEASE_TTL_MIN_MS}, {LEASE_TTL_MAX_MS}], "
                           f"got {json_type(value)}")
    if not LEASE_TTL_MIN_MS <= value <= LEASE_TTL_MAX_MS:
        raise InvalidInput(f"field '{name}' must be an integer in [{LEASE_TTL_MIN_MS}, {LEASE_TTL_MAX_MS}], "
                           f"got {value}")
    return value


class Lease:
    """One gateway's lease.

    ``number`` is the lease's id in the packed request ints (never reused, so
    a request never points at a later lease of the same name); ``requests``
    the ids added under it, a dict ``request_id -> None`` (of strs and None
    only, so the cyclic GC does not track it; a delete removes its id in
    O(1)). ``deadline`` is in the clock's seconds; ``alive`` turns False when
    the lease ends (expired or revoked) and stays False while its requests
    are being released. ``scheduled`` is the earliest deadline queued for it
    in the expiry heap.
    """

    __slots__ = ("name", "number", "ttl_ms", "deadline", "requests", "alive", "scheduled")

    def __init__(self, name: str, number: int, ttl_ms: int, deadline: float):
        self.name = name
        self.number = number
        self.ttl_ms = ttl_ms
        self.deadline = deadline
        self.requests = {}
        self.alive = True
        self.scheduled = deadline
