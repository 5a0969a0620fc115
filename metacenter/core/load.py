"""The load table: a pure in-memory state machine, no I/O, injected clock.

Each request id moves through a tiny lattice whose state depends only on the
*set* of events seen for it, never on their order:

    events seen            state                      engine contribution
    {add}                  live                       queued +1, prompt +L
    {add, prompt}          live, prompt deleted       queued +1
    {prompt}               prompt tombstone           -
    any set with delete    delete tombstone           -

so replicas that apply the same events in any order, any number of times, end
equal. Tombstones live for ``tombstone_ttl`` seconds, long enough to outlast any
reordering.

Memory: a live request is one dict entry ``request_id -> int`` where the int
packs the created second, the engine id, the prompt length and a flag. Neither
str nor int is tracked by the cyclic GC, so a million requests cost the
collector nothing. Every request has the same time to live and is inserted in
(nearly) created order, so expiry walks the dict from its oldest end and stops
at the first request that is still young; the few inserted out of order
(snapshots, clock steps) go to a small heap of stragglers.

Pauses: CPython grows (and compacts) a dict by copying all of it within one
insertion, tens of milliseconds at a million entries. Requests and tombstones
are therefore split by hash into ``SHARDS`` dicts (``ShardedDict``), each
copied on its own; expiry walks every shard from its oldest end. A snapshot
walks them one shard at a time, from a copy of that shard's ids only (a
whole-table copy touched a million keys in one go: a quarter of a second).
"""

import heapq
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterator

from metacenter.core.clock import Clock
from metacenter.core.errors import Conflict, InvalidInput
from metacenter.core.fields import INT32_MAX, canonical_ip, ip_value
from metacenter.core.leases import (LEASE_TTL_MAX_MS, LEASE_TTL_MIN_MS, REFRESH_MAX_ITEMS, Lease, lease_name,
                                    lease_ttl_ms)
from metacenter.core.steps import never

PROMPT_MAX = 2**31 - 1  # bytes; a prompt length is packed into 31 bits
TOKENS_MAX = 2**31 - 1
# The Go gateway decodes the counters of a row as int32: one overflow and it
# drops the whole answer, so rows saturate here (metrics read exact values).
WIRE_INT_MAX = INT32_MAX

# The packed int of a live request, low bits first. 158 bits at most: six
# 30-bit digits, the same 48-byte object as the four digits before tokens and
# leases were added.
_FLAG_PROMPT_DELETED = 1
_PROMPT_SHIFT = 1  # 31 bits: prompt bytes
_TOKENS_SHIFT = 32  # 31 bits: prompt tokens
_ENGINE_SHIFT = 63  # 32 bits: engine id
_LEASE_SHIFT = 95  # 32 bits: lease number, 0 for none
_CREATED_SHIFT = 127  # the created second
_LOW31 = 0x7FFFFFFF
_LOW32 = 0xFFFFFFFF
_BELOW_CREATED = (1 << _CREATED_SHIFT) - 1

TOMB_PROMPT = 1  # prompt delete seen, add not yet
TOMB_DELETED = 2  # delete seen (or the request expired)
# Released by an engine reset or a lease: finished like a delete, and a late
# add of it does not even bring its engine's row back. On the wire (snapshots)
# it travels as TOMB_DELETED unless asked for (``iter_tombstones(full=True)``).
TOMB_RELEASED = 3
_TOMB_FINISHED = 2  # the bit kinds 2 and 3 share

# A power of two: requests and tombstones are split in this many dicts. At
# the 2M-request limit a shard holds ~8k ids: its resize on an add and the
# copy of its ids for a walk each stay well under a millisecond.
SHARDS = 256
_SHARD_MASK = SHARDS - 1

# How far updated_time stamps may run ahead of the clock (see _stamp).
_STAMP_SLACK_NS = 1_000_000

# Entries one expiry step looks at: ~3.5 us apiece when a whole gateway's
# requests expire at once, so a step stays near a millisecond (2,000 was
# ~6 ms a step, measured at 300k expiring requests).
EXPIRE_CHUNK = 250
# Requests one lease release step ends: each touches its engine (a release
# is a change a gateway reads), about 5 us apiece, so fewer than expiry's.
RELEASE_CHUNK = 200


_MISSING = object()


class ShardedDict:
    """The part of the dict interface the table uses, over ``SHARDS`` dicts
    chosen by key hash. Each shard keeps insertion order."""

    __slots__ = ("shards", "size")

    def __init__(self):
        self.shards = tuple({} for _ in range(SHARDS))
        # Kept here, not summed over the shards: the request limit reads it on
        # every add. Code that mutates a shard directly (the sweep's hot
        # loops) adjusts it too.
        self.size = 0

    def get(self, key: str, default: object = None) -> object:
        """``dict.get`` on the key's shard."""
        return self.shards[hash(key) & _SHARD_MASK].get(key, default)

    def pop(self, key: str, default: object = None) -> object:
        """``dict.pop`` on the key's shard, ``default`` when it is absent."""
        value = self.shards[hash(key) & _SHARD_MASK].pop(key, _MISSING)
        if value is _MISSING:
            return default
        self.size -= 1
        return value

    def __contains__(self, key):
        return key in self.shards[hash(key) & _SHARD_MASK]

    def __setitem__(self, key, value):
        shard = self.shards[hash(key) & _SHARD_MASK]
        if key not in shard:
            self.size += 1
        shard[key] = value

    def __delitem__(self, key):
        del self.shards[hash(key) & _SHARD_MASK][key]
        self.size -= 1

    def __len__(self):
        return self.size

    def __iter__(self):
        for shard in self.shards:
            yield from shard

    def items(self) -> Iterator[tuple]:
        """(key, value) of every shard in turn, each in insertion order."""
        for shard in self.shards:
            yield from shard.items()


def _pack(created_s, engine_id, prompt_length, prompt_deleted, prompt_tokens=0, lease_number=0):
    return (
        (created_s << _CREATED_SHIFT)
        | (lease_number << _LEASE_SHIFT)
        | (engine_id << _ENGINE_SHIFT)
        | (prompt_tokens << _TOKENS_SHIFT)
        | (prompt_length << _PROMPT_SHIFT)
        | (_FLAG_PROMPT_DELETED if prompt_deleted else 0)
    )


def _created(packed):
    return packed >> _CREATED_SHIFT


def _engine_id(packed):
    return (packed >> _ENGINE_SHIFT) & _LOW32


def _prompt(packed):
    return (packed >> _PROMPT_SHIFT) & _LOW31


def _tokens(packed):
    return (packed >> _TOKENS_SHIFT) & _LOW31


def _lease_number(packed):
    return (packed >> _LEASE_SHIFT) & _LOW32


def _prompt_deleted(packed):
    return bool(packed & _FLAG_PROMPT_DELETED)


def wire_int(value: int) -> int:
    """A counter as a wire row carries it: saturated at 2^31-1."""
    return value if value <= WIRE_INT_MAX else WIRE_INT_MAX


def request_fingerprint(request_id: str, prompt_deleted: bool) -> int:
    """A stable 64-bit hash of a live request's replicated state (its id and
    whether its prompt was deleted), the same on every node and Python
    process: ``Cluster.digest`` is the XOR of these over the live requests."""
    data = request_id.encode("utf-8", "surrogatepass")
    low = zlib.crc32(data)
    # The prompt flag changes the hash by an id-dependent amount: a constant
    # would cancel out of an XOR digest for every two requests that differ
    # in it only (anti-entropy would then miss both).
    high = zlib.adler32(data) ^ (zlib.crc32(data, 0x9E3779B9) if prompt_deleted else 0)
    return (high << 32) | low


class Engine:
    """Counters of one inference engine (cluster, ip).

    ``address`` is the canonical form of the engine's IP, the key of
    ``Cluster.engines``: two spellings of one address (``::ffff:10.0.0.1``
    and ``::ffff:a00:1``, ``2001:DB8::1`` and ``2001:db8::1``) are one
    engine. ``ip`` is the spelling this engine was first seen with, which
    every answer carries (the Go gateway finds engines by the exact string it
    sent); an engine re-created after a reset or expiry takes the spelling of
    its new first request.

    Counters are exact (metrics read them); ``as_dict`` saturates them.
    ``queued`` requests in flight, ``prompt`` prompt bytes in prefill,
    ``prefill`` requests in prefill (prompt not yet deleted),
    ``prefill_tokens`` / ``queued_tokens`` the sums of the adds'
    ``prompt_tokens`` over the requests in prefill / in flight, ``digest`` the
    XOR of the fingerprints of its live requests (its share of the cluster's).
    ``updated_ns``: ns since the epoch of the last change (the wire's
    ``updated_time``); ``engine_id``: unique for the state's life, never
    reused; ``version``: the state's sequence number at the last change, so
    readers can cache what they derive from the engine.
    """

    __slots__ = ("engine_id", "cluster", "ip", "address", "queued", "prompt", "prefill", "prefill_tokens",
                 "queued_tokens", "digest", "updated_ns", "version")

    def __init__(self, engine_id: int, cluster: str, ip: str, updated_ns: int, address: str | None = None):
        self.engine_id = engine_id
        self.cluster = cluster
        self.ip = ip
        self.address = ip if address is None else address
        self.queued = 0
        self.prompt = 0
        self.prefill = 0
        self.prefill_tokens = 0
        self.queued_tokens = 0
        self.digest = 0
        self.updated_ns = updated_ns
        self.version = 0

    def as_dict(self) -> dict:
        """The wire row: ``{"ip": str, "queued_req_num": int,
        "prompt_length": int (bytes), "updated_time": int (ns since the
        epoch), "prefill_req_num": int, "prefill_tokens": int,
        "queued_tokens": int}``. Every counter saturates at 2^31-1 (the Go
        gateway reads them as int32); ``updated_time`` is an int64 there and
        is never saturated."""
        top = WIRE_INT_MAX  # inline, not wire_int(): GET builds rows on the hot path
        queued, prompt, prefill = self.queued, self.prompt, self.prefill
        prefill_tokens, queued_tokens = self.prefill_tokens, self.queued_tokens
        return {
            "ip": self.ip,
            "queued_req_num": queued if queued <= top else top,
            "prompt_length": prompt if prompt <= top else top,
            "updated_time": self.updated_ns,
            "prefill_req_num": prefill if prefill <= top else top,
            "prefill_tokens": prefill_tokens if prefill_tokens <= top else top,
            "queued_tokens": queued_tokens if queued_tokens <= top else top,
        }


def idle_row(ip: str) -> dict:
    """The wire row of an engine this node has never seen (or has forgotten)."""
    return {"ip": ip, "queued_req_num": 0, "prompt_length": 0, "updated_time": 0,
            "prefill_req_num": 0, "prefill_tokens": 0, "queued_tokens": 0}


def engine_address(ip: str) -> str:
    """The canonical form of an engine's IP (the key engines are found by);
    ``InvalidInput`` naming field 'ip' if it is not an IPv4/IPv6 address."""
    try:
        return canonical_ip(ip)  # cached: one dict lookup for a known spelling
    except ValueError:
        return ip_value(ip, "ip")  # raises, with the API's reason


class Cluster:
    """Engines of one cluster (a model), plus what replicas compare.

    ``engines``: {canonical address: Engine}. ``version``: the state's
    sequence number at the last change of any of its engines (state-wide, so
    a cluster that is removed and re-created never repeats one). ``live`` and
    ``digest``: the live request count and the XOR of their
    ``request_fingerprint``s, equal on two nodes (almost surely) iff they
    hold the same live requests in the same state.
    """

    __slots__ = ("name", "engines", "version", "live", "digest")

    def __init__(self, name: str):
        self.name = name
        self.engines = {}  # canonical address -> Engine
        self.version = 0
        self.live = 0
        self.digest = 0


class LoadState:
    """Clusters -> engines -> counters, the request registry behind them, and
    the gateways' leases.

    ``clock``: a ``core.clock.Clock``. ``request_expire``: seconds after its
    birth a request is dropped if no delete came (the gateway's 11 minutes);
    ``tombstone_ttl``: seconds a delete (or an early prompt delete) is
    remembered; ValueError unless both are positive. ``clusters`` is
    {name: Cluster}, for readers; only the methods here change it.
    Every mutation is O(1) (a lease's release and expiry are generators of
    bounded steps); a query is O(engines of the cluster). ``lease_ttl`` is
    the default lease TTL in seconds (``--lease-ttl``), in [1, 300].
    """

    def __init__(self, clock: Clock, request_expire: float = 660.0, tombstone_ttl: float = 60.0,
                 lease_ttl: float = 10.0):
        if request_expire <= 0:
            raise ValueError("request_expire must be positive")
        if tombstone_ttl <= 0:
            raise ValueError("tombstone_ttl must be positive")
        if not LEASE_TTL_MIN_MS <= round(lease_ttl * 1000) <= LEASE_TTL_MAX_MS:
            raise ValueError(f"lease_ttl must be in [{LEASE_TTL_MIN_MS / 1000:g}, {LEASE_TTL_MAX_MS / 1000:g}] s")
        self._clock = clock
        self.request_expire = request_expire
        self.tombstone_ttl = tombstone_ttl
        self.lease_ttl_ms = round(lease_ttl * 1000)
        self._requests = ShardedDict()  # request_id -> packed int
        self._tombstones = ShardedDict()  # request_id -> (created_s << 2) | kind
        self._stragglers = []  # heap of (created_s, request_id) inserted out of order
        self._newest_created = 0
        self.clusters = {}  # name -> Cluster
        self._engines = OrderedDict()  # engine_id -> Engine, least recently updated first
        self._next_engine_id = 1
        self._sequence = 0
        # Requests still in ``_requests`` whose engine was reset: released
        # already, turned into tombstones when next touched or swept.
        self._retired = 0
        # Every updated_time handed out is larger than the one before, so a
        # conditional add never mistakes a changed engine for an unchanged one.
        self._last_ns = 0
        self._leases = {}  # name -> Lease, alive ones
        self._lease_numbers = {}  # number -> Lease, alive or still releasing
        self._lease_heap = []  # (deadline, number); see Lease.scheduled
        self._ending = deque()  # ended leases whose requests are being released
        self._next_lease = 1
        # Observers (metrics, cache index) of engine removal: fn(Engine).
        self.engine_removed_callbacks = []
        self.stats = {"expired_requests": 0, "expired_tombstones": 0, "expired_engines": 0,
                      "reset_engines": 0, "reset_requests": 0, "expired_leases": 0, "revoked_leases": 0,
                      "lease_released_requests": 0, "refreshed_requests": 0}

    # -- sizes ---------------------------------------------------------------

    @property
    def request_count(self) -> int:
        """Requests in flight (not those of a reset engine awaiting cleanup)."""
        return len(self._requests) - self._retired

    @property
    def tombstone_count(self) -> int:
        """Remembered deletes and early prompt deletes."""
        return len(self._tombstones)

    @property
    def engine_count(self) -> int:
        """Engines over all clusters."""
        return len(self._engines)

    @property
    def lease_count(self) -> int:
        """Leases alive (some may be past their deadline until the next sweep)."""
        return len(self._leases)

    def has_lease(self, name: str) -> bool:
        """Whether lease ``name`` is in the table (alive, or past its deadline
        and not ended yet): a keepalive or add naming it adds no lease."""
        return name in self._leases

    @property
    def releasing(self) -> int:
        """Requests of ended leases not yet released (``lease_steps`` does it);
        an upper bound: some may have been deleted or reset meanwhile."""
        return sum(len(lease.requests) for lease in self._ending)

    # -- clock helpers -------------------------------------------------------

    def _now(self):
        return self._clock.seconds()

    def _stamp(self, now):
        """An updated_time in ns: now, or one more than the last one handed
        out (same clock reading, or a clock that stepped back)."""
        ns = int(now * 1e9)
        if ns <= self._last_ns:
            ns = self._last_ns + 1
        self._last_ns = ns
        return ns

    def _created_from(self, now, timestamp_ns):
        """The request's birth second: the sender's timestamp when it is
        plausible (so expiry agrees across replicas), else now."""
        if timestamp_ns is not None:
            created = timestamp_ns / 1e9
            if now - self.request_expire < created <= now:
                return int(created)
        return int(now)

    def _created_from_record(self, now, created_s):
        """A peer's record is as old as the peer says, within bounds: one that
        is already past the expiry goes at the next sweep, as on the peer,
        instead of starting a new life here."""
        if created_s is None:
            return int(now)
        return int(min(max(created_s, now - self.request_expire), now))

    # -- engines -------------------------------------------------------------

    def _engine_for(self, cluster_name, ip, address, now):
        cluster = self.clusters.get(cluster_name)
        if cluster is None:
            cluster = self.clusters[cluster_name] = Cluster(cluster_name)
        engine = cluster.engines.get(address)
        now_ns = self._stamp(now)
        if engine is None:
            engine_id = self._next_engine_id
            self._next_engine_id += 1
            engine = cluster.engines[address] = Engine(engine_id, cluster_name, ip, now_ns, address)
            self._engines[engine_id] = engine
        else:
            engine.updated_ns = now_ns
            self._engines.move_to_end(engine.engine_id)
        self._sequence += 1
        cluster.version = engine.version = self._sequence
        return engine, cluster

    def _touch(self, engine, now):
        ns = int(now * 1e9)  # _stamp, inline: every mutation comes here
        if ns <= self._last_ns:
            ns = self._last_ns + 1
        self._last_ns = engine.updated_ns = ns
        self._engines.move_to_end(engine.engine_id)
        self._sequence += 1
        self.clusters[engine.cluster].version = engine.version = self._sequence

    def engine(self, cluster: str, ip: str) -> Engine | None:
        """The ``Engine`` of (cluster, ip) in any spelling of the address, or
        None. ``InvalidInput`` if ``ip`` is not an address."""
        c = self.clusters.get(cluster)
        return None if c is None else c.engines.get(engine_address(ip))

    def engine_of(self, request_id: str) -> Engine | None:
        """The ``Engine`` a live request is booked on, or None (unknown,
        finished, or its engine was reset)."""
        packed = self._requests.get(request_id)
        return None if packed is None else self._engines.get(_engine_id(packed))

    # -- mutations -----------------------------------------------------------

    def add(self, cluster: str, request_id: str, ip: str, prompt_length: int = 0, timestamp_ns: int | None = None,
            prompt_tokens: int = 0, lease: str | None = None, if_updated_time: int | None = None) -> bool:
        """A request was routed to engine (cluster, ip). Returns True if the
        counters changed (False for a duplicate or an already finished one).

        ``ip`` in any spelling (the engine keeps its first); ``prompt_length``
        bytes and ``prompt_tokens`` in [0, 2^31-1]; ``timestamp_ns`` the
        sender's; ``lease`` a lease name (a lease not alive is started, with
        the default TTL); ``if_updated_time`` (ns): apply only if the engine's
        ``updated_time`` equals it (0 for an unknown engine), else
        ``Conflict`` with the engine's row as ``data``. A duplicate or a
        finished request is not a conflict: it changes nothing either way.
        ``InvalidInput`` for a value out of range, state unchanged."""
        now = self._now()
        return self._add(cluster, request_id, ip, prompt_length, now, self._created_from(now, timestamp_ns),
                         prompt_tokens, lease, if_updated_time)

    def _add(self, cluster, request_id, ip, prompt_length, now, created, prompt_tokens=0, lease=None,
             if_updated_time=None):
        # Every refusal before any change.
        if not 0 <= prompt_length <= PROMPT_MAX:
            raise InvalidInput(f"field 'prompt_length' must be an integer in [0, {PROMPT_MAX}], got {prompt_length}")
        if prompt_tokens and not 0 <= prompt_tokens <= TOKENS_MAX:
            raise InvalidInput(f"field 'prompt_tokens' must be an integer in [0, {TOKENS_MAX}], got {prompt_tokens}")
        address = engine_address(ip)
        if lease is not None:
            lease_name(lease)
        packed = self._requests.get(request_id)
        if packed is not None:
            if _engine_id(packed) not in self._engines:
                self._requests.pop(request_id)
                self._finish(request_id, packed, now, TOMB_RELEASED, True)
            return False
        tomb = self._tombstones.get(request_id)
        if tomb is not None and tomb & _TOMB_FINISHED:
            if tomb & 3 == TOMB_DELETED:
                # It finished already: as if added then deleted, the engine
                # exists and its counters are unchanged. (A released request's
                # engine stays out: it was reset, or its gateway died.)
                self._engine_for(cluster, ip, address, now)
            return False
        if if_updated_time is not None:
            self._check_updated_time(cluster, ip, address, if_updated_time)
        prompt_deleted = tomb is not None  # a prompt tombstone
        if prompt_deleted:
            del self._tombstones[request_id]
        engine, cluster_obj = self._engine_for(cluster, ip, address, now)
        number = 0
        if lease is not None:
            lease_obj = self._live_lease(lease, now) or self._start_lease(lease, self.lease_ttl_ms, now)
            lease_obj.requests[request_id] = None
            number = lease_obj.number
        self._insert(request_id, _pack(created, engine.engine_id, prompt_length, prompt_deleted, prompt_tokens,
                                       number), created)
        engine.queued += 1
        engine.queued_tokens += prompt_tokens
        if not prompt_deleted:
            engine.prompt += prompt_length
            engine.prefill += 1
            engine.prefill_tokens += prompt_tokens
        fingerprint = request_fingerprint(request_id, prompt_deleted)
        engine.digest ^= fingerprint
        cluster_obj.live += 1
        cluster_obj.digest ^= fingerprint
        return True

    def _check_updated_time(self, cluster, ip, address, if_updated_time):
        c = self.clusters.get(cluster)
        engine = None if c is None else c.engines.get(address)
        current = 0 if engine is None else engine.updated_ns
        if current != if_updated_time:
            row = idle_row(ip) if engine is None else dict(engine.as_dict(), ip=ip)
            raise Conflict(f"engine {ip} of cluster {cluster!r} has updated_time {current}, not "
                           f"if_updated_time {if_updated_time}: its load changed; the current row is in data",
                           row)

    def _insert(self, request_id, packed, created):
        self._requests[request_id] = packed
        if created < self._newest_created:
            heapq.heappush(self._stragglers, (created, request_id))
        else:
            self._newest_created = created

    def delete_prompt(self, request_id: str) -> bool:
        """Prefill finished: drop the request's prompt bytes, once. Returns
        True if the counters changed; before its add, leaves a prompt
        tombstone (the add then counts no prompt bytes)."""
        packed = self._requests.get(request_id)
        if packed is None:
            if request_id not in self._tombstones:
                self._tombstones[request_id] = (int(self._now()) << 2) | TOMB_PROMPT
            return False
        engine = self._engines.get(_engine_id(packed))
        if engine is None:  # its engine was reset: released already
            self._requests.pop(request_id)
            self._finish(request_id, packed, self._now(), TOMB_RELEASED, True)
            return False
        if packed & _FLAG_PROMPT_DELETED:
            return False
        self._requests[request_id] = packed | _FLAG_PROMPT_DELETED
        engine.prompt -= _prompt(packed)
        engine.prefill -= 1
        engine.prefill_tokens -= _tokens(packed)
        self._touch(engine, self._now())
        flip = request_fingerprint(request_id, False) ^ request_fingerprint(request_id, True)
        engine.digest ^= flip
        self.clusters[engine.cluster].digest ^= flip
        return True

    def delete(self, request_id: str) -> bool:
        """The request completed: forget it and leave a delete tombstone (a
        later add of it changes nothing). Returns True if the counters
        changed."""
        now = self._now()
        packed = self._requests.pop(request_id, None)
        if packed is None or (packed >> _LEASE_SHIFT) & _LOW32 or _engine_id(packed) not in self._engines:
            return self._end_request(request_id, TOMB_DELETED, now, packed)
        # The common case inline: a live request without a lease.
        tombstones = self._tombstones
        tombstones.pop(request_id, None)  # re-insert: expiry follows insertion order
        tombstones[request_id] = (int(now) << 2) | TOMB_DELETED
        self._release(self._engines[_engine_id(packed)], request_id, packed, now)
        return True

    def release(self, request_id: str) -> bool:
        """Like ``delete``, but what it leaves is a released tombstone (a late
        add will not bring the engine's row back): a peer's reset or lease
        release, from a snapshot or repair (``apply_tombstone``)."""
        now = self._now()
        return self._end_request(request_id, TOMB_RELEASED, now, self._requests.pop(request_id, None))

    def _end_request(self, request_id, kind, now, packed):
        """``packed``: the request just taken out of ``_requests``, or None."""
        if packed is None:
            # Re-inserted: tombstone expiry follows insertion order.
            old = self._tombstones.pop(request_id, None)
            if old is not None and old & 3 == TOMB_RELEASED:
                kind = TOMB_RELEASED
            self._tombstones[request_id] = (int(now) << 2) | kind
            return False
        return self._finish(request_id, packed, now, kind, True)

    def _finish(self, request_id, packed, now, kind, touch):
        """A request already taken out of ``_requests`` ends: its tombstone,
        its lease's set, its engine's counters. Returns whether counters
        changed (not for a request of a reset engine: released already).
        ``touch``: whether this is a sign of life of the engine (not expiry)."""
        number = _lease_number(packed)
        if number:
            lease = self._lease_numbers.get(number)
            if lease is not None:
                lease.requests.pop(request_id, None)
        tombstones = self._tombstones
        tombstones.pop(request_id, None)  # re-insert: expiry follows insertion order
        engine = self._engines.get(_engine_id(packed))
        if engine is None:
            self._retired -= 1
            tombstones[request_id] = (int(now) << 2) | TOMB_RELEASED
            return False
        tombstones[request_id] = (int(now) << 2) | kind
        self._release(engine, request_id, packed, now if touch else None)
        return True

    def _release(self, engine, request_id, packed, now):
        tokens = _tokens(packed)
        engine.queued -= 1
        engine.queued_tokens -= tokens
        prompt_deleted = _prompt_deleted(packed)
        if not prompt_deleted:
            engine.prompt -= _prompt(packed)
            engine.prefill -= 1
            engine.prefill_tokens -= tokens
        cluster = self.clusters[engine.cluster]
        if now is None:
            # Expiry is not a sign of life: an engine whose requests only
            # expire goes in the same sweep.
            self._sequence += 1
            cluster.version = engine.version = self._sequence
        else:
            self._touch(engine, now)
        fingerprint = request_fingerprint(request_id, prompt_deleted)
        engine.digest ^= fingerprint
        cluster.live -= 1
        cluster.digest ^= fingerprint

    def reset_engine(self, cluster: str, ip: str) -> int:
        """Engine (cluster, ip) restarted: every in-flight request of it is
        released as if deleted, and the engine leaves the cluster's rows until
        it gets new traffic (observers are told, as for an idle engine).
        Returns the number of requests released (0 for an unknown engine).

        O(1) however many requests it had: the engine's id is retired, its
        share leaves the cluster's live count and digest at once, and its
        requests (which now point at no engine, so count nothing) turn into
        released tombstones when next touched, read or swept. A late delete,
        prompt delete, duplicate or replicated add of them changes nothing.
        ``InvalidInput`` if ``ip`` is not an address."""
        c = self.clusters.get(cluster)
        if c is None:
            engine_address(ip)
            return 0
        engine = c.engines.get(engine_address(ip))
        if engine is None:
            return 0
        released = engine.queued
        c.live -= released
        c.digest ^= engine.digest
        self._retired += released
        self.stats["reset_engines"] += 1
        self.stats["reset_requests"] += released
        self._remove_engine(engine)
        return released

    def refresh(self, request_ids: list[str]) -> int:
        """Restart the expiry clock of each known live request (its birth
        becomes now, and it moves to the young end of the expiry order);
        unknown, finished and released ids are ignored, a repeated id counts
        once. ``request_ids``: a sequence of at most 10,000 strings
        (``InvalidInput`` naming 'request_ids' otherwise). Returns how many
        were refreshed."""
        if len(request_ids) > REFRESH_MAX_ITEMS:
            raise InvalidInput(f"field 'request_ids' has {len(request_ids)} items; "
                               f"at most {REFRESH_MAX_ITEMS} are allowed")
        distinct = list(dict.fromkeys(request_ids))
        return self.refresh_some(distinct, 0, len(distinct), never)[1]

    def refresh_some(self, request_ids: list[str], start: int, stop: int, spent) -> int:
        """``refresh`` of ``request_ids[start:stop]`` (distinct ids, no limit
        on their number), stopping early after an id when ``spent()`` is
        true: a big refresh done a step at a time (``api.truth``). Returns
        ``(end, refreshed)``: ``request_ids[start:end]`` were done."""
        created = int(self._now())
        requests = self._requests
        engines = self._engines
        refreshed = 0
        end = start
        while end < stop:
            request_id = request_ids[end]
            end += 1
            packed = requests.get(request_id)
            if packed is not None and _engine_id(packed) in engines:
                del requests[request_id]
                self._insert(request_id, (packed & _BELOW_CREATED) | (created << _CREATED_SHIFT), created)
                refreshed += 1
            if spent():
                break
        self.stats["refreshed_requests"] += refreshed
        return end, refreshed

    # -- leases --------------------------------------------------------------

    def keepalive(self, lease: str, ttl_ms: int | None = None) -> dict:
        """Create or renew a gateway's lease: it now ends ``ttl_ms`` (in
        [1000, 300000], default the node's ``lease_ttl``) from now unless
        renewed again. A lease past its deadline has ended (its requests are
        released) and this starts a new one. Returns ``{"lease": str,
        "ttl_ms": int, "requests": int}``. ``InvalidInput`` naming 'lease' or
        'ttl_ms'."""
        lease_name(lease)
        ttl_ms = self.lease_ttl_ms if ttl_ms is None else lease_ttl_ms(ttl_ms)
        now = self._now()
        lease_obj = self._live_lease(lease, now)
        if lease_obj is None:
            lease_obj = self._start_lease(lease, ttl_ms, now)
        else:
            lease_obj.ttl_ms = ttl_ms
            self._set_deadline(lease_obj, now + ttl_ms / 1000)
        return {"lease": lease, "ttl_ms": ttl_ms, "requests": len(lease_obj.requests)}

    def revoke_lease(self, lease: str, chunk: int = RELEASE_CHUNK) -> int:
        """End a lease now (a gateway's clean shutdown): every request added
        under it is released, up to ``chunk`` of them at once and the rest by
        ``lease_steps``. Returns how many requests it held (0 for a lease not
        alive). ``InvalidInput`` naming 'lease'."""
        lease_name(lease)
        lease_obj = self._leases.get(lease)
        if lease_obj is None:
            return 0
        held = len(lease_obj.requests)
        self._end_lease(lease_obj)
        self.stats["revoked_leases"] += 1
        self._release_step(self._now(), chunk)
        return held

    def leases(self) -> list[dict]:
        """The leases alive, by name: ``[{"lease": str, "ttl_ms": int,
        "expires_in_ms": int, "requests": int}]``. ``requests`` counts the
        requests added under it and not yet finished (it may still count
        those of a reset engine until they are next touched)."""
        now = self._now()
        return [{"lease": lease.name, "ttl_ms": lease.ttl_ms, "expires_in_ms": _ms_until(lease.deadline, now),
                 "requests": len(lease.requests)}
                for lease in sorted(self._leases.values(), key=lambda lease: lease.name)
                if lease.deadline > now]

    def lease_of(self, request_id: str) -> str | None:
        """The name of the lease a live request was added under, or None."""
        packed = self._requests.get(request_id)
        if packed is None or _engine_id(packed) not in self._engines:
            return None
        return self._lease_name(packed)

    def iter_leases(self) -> Iterator[tuple]:
        """Yield (lease, ttl_ms, expires_in_ms) of every lease alive, for a
        snapshot (they go before the requests that name them)."""
        now = self._now()
        for lease in list(self._leases.values()):
            if lease.alive and lease.deadline > now:
                yield lease.name, lease.ttl_ms, _ms_until(lease.deadline, now)

    def apply_lease(self, lease: str, ttl_ms: int, expires_in_ms: int) -> None:
        """Merge a lease from a peer's snapshot: alive here until at least
        ``expires_in_ms`` from now (the later deadline wins). Returns whether
        anything changed."""
        lease_name(lease)
        ttl_ms = lease_ttl_ms(ttl_ms)
        if expires_in_ms <= 0:
            return False
        now = self._now()
        deadline = now + min(expires_in_ms, ttl_ms) / 1000
        lease_obj = self._live_lease(lease, now)
        if lease_obj is None:
            self._start_lease(lease, ttl_ms, now, deadline)
            return True
        if deadline <= lease_obj.deadline:
            return False
        lease_obj.ttl_ms = ttl_ms
        self._set_deadline(lease_obj, deadline)
        return True

    def lease_steps(self, chunk: int = RELEASE_CHUNK) -> Iterator[int]:
        """End the leases past their deadline and release the requests of
        ended leases. A generator like ``expire``: each step pops at most
        ``chunk`` expiry entries and releases at most ``chunk`` requests, and
        yields how many it released; the runtime drives one step per reactor
        turn, every second or so (a lease's TTL is seconds) and after a
        revoke that left requests behind (``releasing``)."""
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        while True:
            now = self._now()
            ended = self._end_due_leases(now, chunk)
            looked, released = self._release_step(now, chunk)
            if not ended and not looked:
                return
            yield released

    def _live_lease(self, name, now):
        lease = self._leases.get(name)
        if lease is not None and lease.deadline <= now:
            # A TTL without renewal: it ended, whether or not a sweep saw it.
            self._end_lease(lease)
            self.stats["expired_leases"] += 1
            return None
        return lease

    def _start_lease(self, name, ttl_ms, now, deadline=None):
        number = self._next_lease
        self._next_lease += 1
        lease = Lease(name, number, ttl_ms, now + ttl_ms / 1000 if deadline is None else deadline)
        self._leases[name] = lease
        self._lease_numbers[number] = lease
        heapq.heappush(self._lease_heap, (lease.deadline, number))
        return lease

    def _set_deadline(self, lease, deadline):
        lease.deadline = deadline
        # One live heap entry per lease (the one at ``scheduled``): a later
        # deadline is found when that entry comes due; an earlier one needs
        # its own entry.
        if deadline < lease.scheduled:
            lease.scheduled = deadline
            heapq.heappush(self._lease_heap, (deadline, lease.number))

    def _end_lease(self, lease):
        lease.alive = False
        if self._leases.get(lease.name) is lease:
            del self._leases[lease.name]
        if lease.requests:
            self._ending.append(lease)
        else:
            self._lease_numbers.pop(lease.number, None)

    def _end_due_leases(self, now, budget):
        heap = self._lease_heap
        popped = 0
        while heap and heap[0][0] <= now and popped < budget:
            deadline, number = heapq.heappop(heap)
            popped += 1
            lease = self._lease_numbers.get(number)
            if lease is None or not lease.alive or deadline != lease.scheduled:
                continue  # stale: the lease ended, or has an earlier entry
            if lease.deadline <= now:
                self._end_lease(lease)
                self.stats["expired_leases"] += 1
            else:  # renewed since: look again at its current deadline
                lease.scheduled = lease.deadline
                heapq.heappush(heap, (lease.deadline, number))
        return popped

    def _release_step(self, now, chunk):
        """Release up to ``chunk`` requests of ended leases, oldest lease
        first. Returns (ids looked at, requests released)."""
        looked = released = 0
        ending = self._ending
        requests = self._requests
        while ending and looked < chunk:
            lease = ending[0]
            held = lease.requests
            while held and looked < chunk:
                # popitem takes from the end: popping from the front of a dict
                # makes every next(iter()) walk the holes left behind.
                request_id, _ = held.popitem()
                looked += 1
                packed = requests.get(request_id)
                if packed is None or _lease_number(packed) != lease.number:
                    continue
                requests.pop(request_id)
                if self._finish(request_id, packed, now, TOMB_RELEASED, True):
                    released += 1
            if not held:
                ending.popleft()
                self._lease_numbers.pop(lease.number, None)
        self.stats["lease_released_requests"] += released
        return looked, released

    # -- queries -------------------------------------------------------------

    def cluster_load(self, cluster: str) -> list[dict]:
        """The engines of a cluster as the wire's list of ``Engine.as_dict``
        ([] if unknown)."""
        c = self.clusters.get(cluster)
        if c is None:
            return []
        return [e.as_dict() for e in c.engines.values()]

    def engine_row(self, cluster: str, ip: str) -> dict:
        """The wire row of engine (cluster, ip), with ``ip`` as spelled here;
        the idle row (zeros, updated_time 0) for an unknown engine."""
        engine = self.engine(cluster, ip)
        return idle_row(ip) if engine is None else dict(engine.as_dict(), ip=ip)

    def request_state(self, request_id: str) -> str | None:
        """For tests and repair: 'live', 'live-prompt-deleted', 'prompt-tombstone',
        'deleted' (also when released by a reset or a lease) or None."""
        packed = self._requests.get(request_id)
        if packed is not None:
            if _engine_id(packed) not in self._engines:
                return "deleted"
            return "live-prompt-deleted" if packed & _FLAG_PROMPT_DELETED else "live"
        tomb = self._tombstones.get(request_id)
        if tomb is None:
            return None
        return "deleted" if tomb & _TOMB_FINISHED else "prompt-tombstone"

    def released(self, request_id: str) -> bool:
        """Whether the request was released by an engine reset or a lease
        (and not only deleted or expired)."""
        packed = self._requests.get(request_id)
        if packed is not None:
            return _engine_id(packed) not in self._engines
        tomb = self._tombstones.get(request_id)
        return tomb is not None and tomb & 3 == TOMB_RELEASED

    def request_record(self, request_id: str, full: bool = False) -> tuple | None:
        """(cluster, ip, prompt_length, prompt_deleted, created_s) of a live
        request, None otherwise; with ``full``, also (prompt_tokens, lease or
        None) at the end."""
        packed = self._requests.get(request_id)
        if packed is None:
            return None
        engine = self._engines.get(_engine_id(packed))
        if engine is None:
            return None
        record = (engine.cluster, engine.ip, _prompt(packed), _prompt_deleted(packed), _created(packed))
        if full:
            record += (_tokens(packed), self._lease_name(packed))
        return record

    def _lease_name(self, packed):
        number = _lease_number(packed)
        lease = self._lease_numbers.get(number) if number else None
        # A request whose lease ended is about to be released: it names none.
        return lease.name if lease is not None and lease.alive else None

    def iter_requests(self, full: bool = False, released: list | None = None) -> Iterator[tuple]:
        """Yield (request_id, cluster, ip, prompt_length, prompt_deleted, created_s)
        for every live request; with ``full``, also (prompt_tokens, lease or
        None) at the end. The state may change between items (callers chunk
        it over reactor turns): the ids are copied one shard at a time (a
        ``SHARDS``-th of them, under a millisecond at a million requests,
        never the whole table in one go), a request deleted meanwhile is
        skipped, one added meanwhile may or may not be met. A request of a
        reset engine met on the way turns into its released tombstone here
        (so a snapshot read after it carries it as a tombstone, never as a
        live request); ``released``, a list, also gets its
        ``(request_id, TOMB_RELEASED, now_s)`` then, for a walk that already
        passed the tombstones, and None is yielded in its place (so the
        caller counts it in its chunk: a reset engine may leave a million)."""
        engines = self._engines
        for shard in self._requests.shards:
            get = shard.get
            for request_id in list(shard):
                packed = get(request_id)
                if packed is None:
                    continue
                engine = engines.get(_engine_id(packed))
                if engine is None:
                    del shard[request_id]
                    self._requests.size -= 1
                    now = self._now()
                    self._finish(request_id, packed, now, TOMB_RELEASED, False)
                    if released is not None:
                        released.append((request_id, TOMB_RELEASED, int(now)))
                        yield None
                    continue
                record = (request_id, engine.cluster, engine.ip, _prompt(packed), _prompt_deleted(packed),
                          _created(packed))
                if full:
                    record += (_tokens(packed), self._lease_name(packed))
                yield record

    def iter_tombstones(self, full: bool = False) -> Iterator[tuple]:
        """Yield (request_id, kind, created_s) for every tombstone; like
        iter_requests, safe across changes (the ids copied a shard at a
        time). ``kind`` is TOMB_PROMPT or TOMB_DELETED, or with ``full`` also
        TOMB_RELEASED (the wire's older readers know only the first two; a
        released request is a deleted one to them). Requests of a reset
        engine are tombstones only once ``iter_requests`` (or a touch, or the
        sweep) met them: a snapshot adds those its request walk meets. (Copying the
        keys, not the items: a million item tuples would each be tracked by
        the GC.)"""
        for shard in self._tombstones.shards:
            get = shard.get
            for request_id in list(shard):
                tomb = get(request_id)
                if tomb is not None:
                    kind = tomb & 3
                    yield request_id, (kind if full or kind != TOMB_RELEASED else TOMB_DELETED), tomb >> 2

    def apply_record(self, request_id: str, cluster: str, ip: str, prompt_length: int, prompt_deleted: bool,
                     created_s: int | None, prompt_tokens: int = 0, lease: str | None = None) -> bool:
        """Merge one live request from a peer's snapshot: the same as the events
        it stands for (add, and prompt delete when set), keeping its birth time
        (``created_s``, seconds since the epoch, clamped to the expiry window).
        Returns True if the counters changed."""
        now = self._now()
        changed = self._add(cluster, request_id, ip, prompt_length, now, self._created_from_record(now, created_s),
                            prompt_tokens, lease)
        if prompt_deleted:
            changed = self.delete_prompt(request_id) or changed
        return changed

    def apply_tombstone(self, request_id: str, kind: int) -> bool:
        """Merge one tombstone from a peer (``kind`` TOMB_DELETED,
        TOMB_RELEASED or TOMB_PROMPT): the event it stands for. Returns True
        if the counters changed."""
        if kind == TOMB_DELETED:
            return self.delete(request_id)
        if kind == TOMB_RELEASED:
            return self.release(request_id)
        return self.delete_prompt(request_id)

    # -- expiry --------------------------------------------------------------

    def expire(self, chunk: int = EXPIRE_CHUNK) -> Iterator[int]:
        """Remove what outlived its time: leases (as ``lease_steps``), then
        requests, tombstones and idle engines. A generator: each step looks
        at no more than ``chunk`` entries and yields how many it removed, so a
        shell can spread a big sweep over several reactor turns
        (``task.cooperate``). Exhaust it for a full sweep. Mutations between
        steps are safe."""
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        yield from self.lease_steps(min(chunk, RELEASE_CHUNK))
        now = self._now()
        request_limit = now - self.request_expire
        while True:
            due = self._due_requests(request_limit, chunk)
            if due is None:
                break
            # Stamped with the time of this step: tombstones stay in time order
            # even when events arrived between steps.
            step_now = self._now()
            tomb = (int(step_now) << 2) | TOMB_DELETED
            requests, tombstones = self._requests, self._tombstones
            tomb_shards = tombstones.shards
            engines = self._engines
            removed = 0
            for shard, request_id, packed in due:  # the shard dicts directly: a hot loop
                if shard.get(request_id) != packed:
                    continue  # a straggler also met at the front, already gone (or refreshed)
                del shard[request_id]
                requests.size -= 1
                engine = engines.get(_engine_id(packed))
                if engine is None or (packed >> _LEASE_SHIFT) & _LOW32:
                    # Rare: a reset engine's request, or one under a lease.
                    self._finish(request_id, packed, step_now, TOMB_DELETED, False)
                    removed += engine is not None
                    continue
                tomb_shard = tomb_shards[hash(request_id) & _SHARD_MASK]
                if tomb_shard.pop(request_id, None) is None:
                    tombstones.size += 1
                tomb_shard[request_id] = tomb
                self._release(engine, request_id, packed, None)
                removed += 1
            self.stats["expired_requests"] += removed
            yield removed

        tomb_limit = now - self.tombstone_ttl
        while True:
            due = []
            for shard in self._tombstones.shards:
                for request_id, tomb in shard.items():
                    if (tomb >> 2) > tomb_limit or len(due) >= chunk:
                        break
                    due.append(request_id)
            if not due:
                break
            for request_id in due:
                del self._tombstones[request_id]
            self.stats["expired_tombstones"] += len(due)
            yield len(due)

        # Stamps run ahead of the clock by a nanosecond per change made at one
        # clock reading (see _stamp); a millisecond of slack absorbs that.
        engine_limit_ns = int(request_limit * 1e9) + _STAMP_SLACK_NS
        # An engine can be idle with requests in flight (refreshed ones):
        # those engines stay, moved behind the others, and each is looked at
        # once per sweep.
        budget = len(self._engines)
        while budget > 0:
            idle = []
            for engine in self._engines.values():
                if engine.updated_ns > engine_limit_ns or len(idle) >= min(chunk, budget):
                    break
                idle.append(engine)
            if not idle:
                break
            budget -= len(idle)
            removed = 0
            for engine in idle:
                if engine.queued:
                    self._engines.move_to_end(engine.engine_id)
                else:
                    self._remove_engine(engine)
                    removed += 1
            self.stats["expired_engines"] += removed
            yield removed

    def _due_requests(self, request_limit, chunk):
        """Up to ``chunk`` (shard, request_id, packed) born at or before the limit,
        from the oldest end of each shard and from the stragglers' heap; None
        when there are none left. Stale heap entries count towards ``chunk`` so
        that a step stays bounded."""
        due = []
        shards = self._requests.shards
        for shard in shards:
            for request_id, packed in shard.items():
                if _created(packed) > request_limit or len(due) >= chunk:
                    break
                due.append((shard, request_id, packed))
        looked = len(due)
        stragglers = self._stragglers
        while stragglers and stragglers[0][0] <= request_limit and looked < chunk:
            created, request_id = heapq.heappop(stragglers)
            looked += 1
            shard = shards[hash(request_id) & _SHARD_MASK]
            packed = shard.get(request_id)
            if packed is not None and _created(packed) == created:
                due.append((shard, request_id, packed))
        return due if looked else None

    def _remove_engine(self, engine):
        del self._engines[engine.engine_id]
        cluster = self.clusters[engine.cluster]
        del cluster.engines[engine.address]
        self._sequence += 1
        cluster.version = self._sequence
        if not cluster.engines:
            del self.clusters[engine.cluster]
        for callback in self.engine_removed_callbacks:
            callback(engine)

    def expire_all(self) -> None:
        """Run a whole sweep at once (tests, small states)."""
        for _ in self.expire():
            pass


def _ms_until(deadline, now):
    return max(0, int((deadline - now) * 1000))
