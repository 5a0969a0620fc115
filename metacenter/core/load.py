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
are therefore split by hash into a few dicts (``ShardedDict``), each copied on
its own; expiry walks every shard from its oldest end.
"""

import heapq
import zlib
from collections import OrderedDict
from collections.abc import Iterator

from metacenter.core.clock import Clock

PROMPT_MAX = 2**31 - 1  # bytes; a prompt length is packed into 31 bits

_FLAG_PROMPT_DELETED = 1
_PROMPT_SHIFT = 1
_ENGINE_SHIFT = 32
_CREATED_SHIFT = 64
_LOW32 = 0xFFFFFFFF

TOMB_PROMPT = 1  # prompt delete seen, add not yet
TOMB_DELETED = 2  # delete seen (or the request expired)

# A power of two: requests and tombstones are split in this many dicts.
SHARDS = 16
_SHARD_MASK = SHARDS - 1

# Entries one expiry step looks at: a few milliseconds of reactor time.
EXPIRE_CHUNK = 2000


class ShardedDict:
    """The part of the dict interface the table uses, over ``SHARDS`` dicts
    chosen by key hash. Each shard keeps insertion order."""

    __slots__ = ("shards",)

    def __init__(self):
        self.shards = tuple({} for _ in range(SHARDS))

    def get(self, key: str, default: object = None) -> object:
        """``dict.get`` on the key's shard."""
        return self.shards[hash(key) & _SHARD_MASK].get(key, default)

    def pop(self, key: str, default: object = None) -> object:
        """``dict.pop`` on the key's shard."""
        return self.shards[hash(key) & _SHARD_MASK].pop(key, default)

    def __contains__(self, key):
        return key in self.shards[hash(key) & _SHARD_MASK]

    def __setitem__(self, key, value):
        self.shards[hash(key) & _SHARD_MASK][key] = value

    def __delitem__(self, key):
        del self.shards[hash(key) & _SHARD_MASK][key]

    def __len__(self):
        return sum(map(len, self.shards))

    def __iter__(self):
        for shard in self.shards:
            yield from shard

    def items(self) -> Iterator[tuple]:
        """(key, value) of every shard in turn, each in insertion order."""
        for shard in self.shards:
            yield from shard.items()


def _pack(created_s, engine_id, prompt_length, prompt_deleted):
    return (
        (created_s << _CREATED_SHIFT)
        | (engine_id << _ENGINE_SHIFT)
        | (prompt_length << _PROMPT_SHIFT)
        | (_FLAG_PROMPT_DELETED if prompt_deleted else 0)
    )


def _created(packed):
    return packed >> _CREATED_SHIFT


def _engine_id(packed):
    return (packed >> _ENGINE_SHIFT) & _LOW32


def _prompt(packed):
    return (packed & _LOW32) >> _PROMPT_SHIFT


def _prompt_deleted(packed):
    return bool(packed & _FLAG_PROMPT_DELETED)


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

    ``queued``: requests in flight; ``prompt``: their prompt bytes still in
    prefill; ``updated_ns``: ns since the epoch of the last change (the
    wire's ``updated_time``); ``engine_id``: unique for the state's life,
    never reused; ``version``: the state's sequence number at the last
    change, so readers can cache what they derive from the engine.
    """

    __slots__ = ("engine_id", "cluster", "ip", "queued", "prompt", "updated_ns", "version")

    def __init__(self, engine_id: int, cluster: str, ip: str, updated_ns: int):
        self.engine_id = engine_id
        self.cluster = cluster
        self.ip = ip
        self.queued = 0
        self.prompt = 0
        self.updated_ns = updated_ns
        self.version = 0

    def as_dict(self) -> dict:
        """The wire's engine object (the reference's field names):
        ``{"ip", "queued_req_num", "prompt_length": bytes, "updated_time": ns}``."""
        return {
            "ip": self.ip,
            "queued_req_num": self.queued,
            "prompt_length": self.prompt,
            "updated_time": self.updated_ns,
        }


class Cluster:
    """Engines of one cluster (a model), plus what replicas compare.

    ``engines``: {ip: Engine}. ``version``: the state's sequence number at
    the last change of any of its engines (state-wide, so a cluster that is
    removed and re-created never repeats one). ``live`` and ``digest``: the
    live request count and the XOR of their ``request_fingerprint``s, equal
    on two nodes (almost surely) iff they hold the same live requests in the
    same state.
    """

    __slots__ = ("name", "engines", "version", "live", "digest")

    def __init__(self, name: str):
        self.name = name
        self.engines = {}  # ip -> Engine
        self.version = 0
        self.live = 0
        self.digest = 0


class LoadState:
    """Clusters -> engines -> counters, and the request registry behind them.

    ``clock``: a ``core.clock.Clock``. ``request_expire``: seconds after its
    birth a request is dropped if no delete came (the gateway's 11 minutes);
    ``tombstone_ttl``: seconds a delete (or an early prompt delete) is
    remembered; ValueError unless both are positive. ``clusters`` is
    {name: Cluster}, for readers; only the methods here change it.
    Every mutation is O(1); a query is O(engines of the cluster).
    """

    def __init__(self, clock: Clock, request_expire: float = 660.0, tombstone_ttl: float = 60.0):
        if request_expire <= 0:
            raise ValueError("request_expire must be positive")
        if tombstone_ttl <= 0:
            raise ValueError("tombstone_ttl must be positive")
        self._clock = clock
        self.request_expire = request_expire
        self.tombstone_ttl = tombstone_ttl
        self._requests = ShardedDict()  # request_id -> packed int
        self._tombstones = ShardedDict()  # request_id -> (created_s << 2) | kind
        self._stragglers = []  # heap of (created_s, request_id) inserted out of order
        self._newest_created = 0
        self.clusters = {}  # name -> Cluster
        self._engines = OrderedDict()  # engine_id -> Engine, least recently updated first
        self._next_engine_id = 1
        self._sequence = 0
        # Observers (metrics, cache index) of engine removal: fn(Engine).
        self.engine_removed_callbacks = []
        self.stats = {"expired_requests": 0, "expired_tombstones": 0, "expired_engines": 0}

    # -- sizes ---------------------------------------------------------------

    @property
    def request_count(self) -> int:
        """Live requests (added, neither deleted nor expired)."""
        return len(self._requests)

    @property
    def tombstone_count(self) -> int:
        """Remembered deletes and early prompt deletes."""
        return len(self._tombstones)

    @property
    def engine_count(self) -> int:
        """Engines over all clusters."""
        return len(self._engines)

    # -- clock helpers -------------------------------------------------------

    def _now(self):
        return self._clock.seconds()

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

    def _engine_for(self, cluster_name, ip, now_ns):
        cluster = self.clusters.get(cluster_name)
        if cluster is None:
            cluster = self.clusters[cluster_name] = Cluster(cluster_name)
        engine = cluster.engines.get(ip)
        if engine is None:
            engine_id = self._next_engine_id
            self._next_engine_id += 1
            engine = cluster.engines[ip] = Engine(engine_id, cluster_name, ip, now_ns)
            self._engines[engine_id] = engine
        else:
            engine.updated_ns = now_ns
            self._engines.move_to_end(engine.engine_id)
        self._sequence += 1
        cluster.version = engine.version = self._sequence
        return engine, cluster

    def _touch(self, engine, now_ns):
        engine.updated_ns = now_ns
        self._engines.move_to_end(engine.engine_id)
        self._sequence += 1
        self.clusters[engine.cluster].version = engine.version = self._sequence

    # -- mutations -----------------------------------------------------------

    def add(self, cluster: str, request_id: str, ip: str, prompt_length: int = 0,
            timestamp_ns: int | None = None) -> bool:
        """A request was routed to engine (cluster, ip) with ``prompt_length``
        bytes of prompt; ``timestamp_ns``, the sender's time (ns since the
        epoch), dates its birth when plausible, so replicas expire it alike.
        Returns True if the counters changed (False for a duplicate or an
        already finished one). ValueError for a prompt_length outside
        [0, PROMPT_MAX] (callers validate first)."""
        now = self._now()
        return self._add(cluster, request_id, ip, prompt_length, now, self._created_from(now, timestamp_ns))

    def _add(self, cluster, request_id, ip, prompt_length, now, created):
        if not 0 <= prompt_length <= PROMPT_MAX:
            # It is packed into 31 bits; validation keeps clients in range.
            raise ValueError(f"prompt_length must be in [0, {PROMPT_MAX}], got {prompt_length}")
        now_ns = int(now * 1e9)
        if request_id in self._requests:
            return False
        tomb = self._tombstones.get(request_id)
        if tomb is not None and tomb & 3 == TOMB_DELETED:
            # It finished already: as if added then deleted, the engine exists
            # and its counters are unchanged.
            self._engine_for(cluster, ip, now_ns)
            return False
        prompt_deleted = tomb is not None  # a prompt tombstone
        if prompt_deleted:
            del self._tombstones[request_id]
        engine, cluster_obj = self._engine_for(cluster, ip, now_ns)
        self._insert(request_id, _pack(created, engine.engine_id, prompt_length, prompt_deleted), created)
        engine.queued += 1
        if not prompt_deleted:
            engine.prompt += prompt_length
        cluster_obj.live += 1
        cluster_obj.digest ^= request_fingerprint(request_id, prompt_deleted)
        return True

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
        if packed & _FLAG_PROMPT_DELETED:
            return False
        self._requests[request_id] = packed | _FLAG_PROMPT_DELETED
        engine = self._engines.get(_engine_id(packed))
        if engine is not None:
            engine.prompt -= _prompt(packed)
            self._touch(engine, int(self._now() * 1e9))
            cluster = self.clusters[engine.cluster]
            cluster.digest ^= request_fingerprint(request_id, False) ^ request_fingerprint(request_id, True)
        return True

    def delete(self, request_id: str) -> bool:
        """The request completed: forget it and leave a delete tombstone (a
        later add of it changes nothing). Returns True if the counters
        changed."""
        now = self._now()
        packed = self._requests.pop(request_id, None)
        self._tombstones.pop(request_id, None)  # re-insert: expiry follows insertion order
        self._tombstones[request_id] = (int(now) << 2) | TOMB_DELETED
        if packed is None:
            return False
        self._release(request_id, packed, int(now * 1e9))
        return True

    def _release(self, request_id, packed, now_ns):
        engine = self._engines.get(_engine_id(packed))
        if engine is None:
            return
        engine.queued -= 1
        prompt_deleted = _prompt_deleted(packed)
        if not prompt_deleted:
            engine.prompt -= _prompt(packed)
        cluster = self.clusters[engine.cluster]
        if now_ns is None:
            # Expiry is not a sign of life: an engine whose requests only
            # expire goes in the same sweep.
            self._sequence += 1
            cluster.version = engine.version = self._sequence
        else:
            self._touch(engine, now_ns)
        cluster.live -= 1
        cluster.digest ^= request_fingerprint(request_id, prompt_deleted)

    # -- queries -------------------------------------------------------------

    def cluster_load(self, cluster: str) -> list[dict]:
        """The engines of a cluster as the wire's list of ``Engine.as_dict``
        ([] if unknown)."""
        c = self.clusters.get(cluster)
        if c is None:
            return []
        return [e.as_dict() for e in c.engines.values()]

    def request_state(self, request_id: str) -> str | None:
        """For tests and repair: 'live', 'live-prompt-deleted', 'prompt-tombstone',
        'deleted' or None."""
        packed = self._requests.get(request_id)
        if packed is not None:
            return "live-prompt-deleted" if packed & _FLAG_PROMPT_DELETED else "live"
        tomb = self._tombstones.get(request_id)
        if tomb is None:
            return None
        return "deleted" if tomb & 3 == TOMB_DELETED else "prompt-tombstone"

    def request_record(self, request_id: str) -> tuple | None:
        """(cluster, ip, prompt_length, prompt_deleted, created_s) of a live
        request, None for any other."""
        packed = self._requests.get(request_id)
        if packed is None:
            return None
        engine = self._engines.get(_engine_id(packed))
        if engine is None:
            return None
        return (engine.cluster, engine.ip, _prompt(packed), _prompt_deleted(packed), _created(packed))

    def iter_requests(self) -> Iterator[tuple]:
        """Yield (request_id, cluster, ip, prompt_length, prompt_deleted, created_s)
        for every live request. The ids are copied first, so the state may
        change between items (callers chunk it over reactor turns); one deleted
        meanwhile is skipped."""
        engines = self._engines
        requests = self._requests
        for request_id in list(requests):
            packed = requests.get(request_id)
            if packed is None:
                continue
            engine = engines.get(_engine_id(packed))
            if engine is not None:
                yield (request_id, engine.cluster, engine.ip, _prompt(packed),
                       _prompt_deleted(packed), _created(packed))

    def iter_tombstones(self) -> Iterator[tuple]:
        """Yield (request_id, kind, created_s) for every tombstone; like
        iter_requests, safe across changes. (Copying the keys, not the items:
        a million item tuples would each be tracked by the GC.)"""
        tombstones = self._tombstones
        for request_id in list(tombstones):
            tomb = tombstones.get(request_id)
            if tomb is not None:
                yield request_id, tomb & 3, tomb >> 2

    def apply_record(self, request_id: str, cluster: str, ip: str, prompt_length: int, prompt_deleted: bool,
                     created_s: int | None) -> bool:
        """Merge one live request from a peer's snapshot: the same as the events
        it stands for (add, and prompt delete when set), keeping its birth time
        (``created_s``, seconds since the epoch, clamped to the expiry window).
        Returns True if the counters changed."""
        now = self._now()
        changed = self._add(cluster, request_id, ip, prompt_length, now, self._created_from_record(now, created_s))
        if prompt_deleted:
            changed = self.delete_prompt(request_id) or changed
        return changed

    def apply_tombstone(self, request_id: str, kind: int) -> bool:
        """Merge one tombstone from a peer (``kind`` TOMB_DELETED or
        TOMB_PROMPT): the event it stands for. Returns True if the counters
        changed."""
        if kind == TOMB_DELETED:
            return self.delete(request_id)
        return self.delete_prompt(request_id)

    # -- expiry --------------------------------------------------------------

    def expire(self, chunk: int = EXPIRE_CHUNK) -> Iterator[int]:
        """Remove what outlived its time. A generator: each step looks at no
        more than ``chunk`` entries and yields how many it removed, so a shell
        can spread a big sweep over several reactor turns (``task.cooperate``).
        Exhaust it for a full sweep. Mutations between steps are safe.
        Engines idle for ``request_expire`` go too (``engine_removed_callbacks``
        are told). ValueError for a chunk below 1."""
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        now = self._now()
        request_limit = now - self.request_expire
        while True:
            due = self._due_requests(request_limit, chunk)
            if due is None:
                break
            # Stamped with the time of this step: tombstones stay in time order
            # even when events arrived between steps.
            tomb = (int(self._now()) << 2) | TOMB_DELETED
            tomb_shards = self._tombstones.shards
            removed = 0
            for shard, request_id, packed in due:  # the shard dicts directly: a hot loop
                if shard.get(request_id) != packed:
                    continue  # a straggler also met at the front, already gone
                del shard[request_id]
                tomb_shard = tomb_shards[hash(request_id) & _SHARD_MASK]
                tomb_shard.pop(request_id, None)
                tomb_shard[request_id] = tomb
                self._release(request_id, packed, None)
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

        engine_limit_ns = int(request_limit * 1e9)
        while True:
            idle = []
            for engine in self._engines.values():
                if engine.updated_ns > engine_limit_ns or len(idle) >= chunk:
                    break
                idle.append(engine)
            if not idle:
                break
            for engine in idle:
                self._remove_engine(engine)
            self.stats["expired_engines"] += len(idle)
            yield len(idle)

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
        del cluster.engines[engine.ip]
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
