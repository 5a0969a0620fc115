"""The KV-cache prefix index: which engine holds which prompt blocks.

A pure in-memory structure, no I/O, injected clock (``.seconds()``).

Per cluster, ``owners`` maps a block hash to a bitmask of the engines (by a
small per-cluster slot number) that hold it. A query walks the prompt's hashes
from the first, AND-ing masks, and stops at the first hash no remaining engine
holds: its cost is the longest match plus the number of engines, whatever else
is stored.

Per engine, an exact LRU made of two plain dicts: ``tick_of`` (hash -> tick)
and ``hash_at`` (tick -> hash). Every touch takes the engine's next tick, so
the least recently used block is the one with the smallest live tick; a cursor
walks up to it, and since the cursor never goes back each eviction costs O(1)
amortised. A save touches its hashes from the last to the first, so a prompt's
head is always fresher than its tail and eviction drops tails first (as engines
do), leaving held prefixes intact.

Every container here is a dict of ints: the cyclic GC does not track such
dicts at all, so a million blocks cost the collector nothing.

Idle TTL: each engine keeps a short list of marks (time bucket, first tick
touched in it), buckets of ttl/64 seconds (at least one), so at most ~65 marks
per engine however busy it is; blocks whose whole bucket ended more than
``ttl`` ago go in one cursor walk.
"""

import heapq
import sys
from collections import OrderedDict, deque
from collections.abc import Iterator

from metacenter.core.clock import Clock
from metacenter.core.fields import canonical_ip, ip_value
from metacenter.core.steps import never, to_end

PROMPT_HASH_MAX_ITEMS = 100_000
TOPK_MAX = 1000
TOPK_DEFAULT = 10
IPS_MAX_ITEMS = 10_000
# Hashes of a stepped save or query between two calls of its ``spent()``
# (~0.2 µs each; the step's clock is read every 16 calls, ~0.2 ms).
SAVE_PER_CHECK = 64

# 16384 blocks of 512 prompt bytes (~128 tokens each) is ~2M tokens of KV
# cache: more than an 8-GPU 80 GB node keeps for a 70B model, about what one
# 141 GB GPU keeps for an 8B model with an FP8 cache.
DEFAULT_ENGINE_BLOCKS = 16384
DEFAULT_TTL = 1800.0
# At ~210 bytes a stored block (bench/cache_index.py) about 420 MiB: a
# hundred engines at the default capacity, with room to spare.
DEFAULT_MAX_BLOCKS = 2_000_000

EVICTION_REASONS = ("capacity", "global", "ttl", "engine")

_MISSING = object()
# Object sizes used by approx_bytes(): a tick (< 2^60) and a block hash
# (mostly >= 2^60) as CPython allocates them (16-byte aligned).
_TICK_BYTES = 32
_HASH_BYTES = 48


class _EngineBlocks:
    """The blocks one engine holds, in LRU order. ``address`` is the
    canonical form of its IP (the key), ``ip`` the spelling it was first
    saved with (what answers carry), as in the load table."""

    __slots__ = ("serial", "cluster", "ip", "address", "slot", "bit", "tick_of", "hash_at",
                 "oldest", "next_tick", "mark_buckets", "mark_ticks")

    def __init__(self, serial, cluster, ip, slot, address=None):
        self.serial = serial
        self.cluster = cluster
        self.ip = ip
        self.address = ip if address is None else address
        self.slot = slot
        self.bit = 1 << slot
        self.tick_of = {}  # hash -> tick of its last touch
        self.hash_at = {}  # tick -> hash
        self.oldest = 0  # no live tick is below this
        self.next_tick = 0
        # Parallel: mark_ticks[j] is the first tick touched in time bucket
        # mark_buckets[j]; ticks below mark_ticks[0] count as its bucket too.
        self.mark_buckets = deque()
        self.mark_ticks = deque()

    def ticks_in_order(self):
        return sorted(self.hash_at)


class _ClusterBlocks:
    __slots__ = ("name", "owners", "engines", "by_slot", "free_slots", "blocks")

    def __init__(self, name):
        self.name = name
        self.owners = {}  # hash -> bitmask of engine slots
        self.engines = {}  # canonical address -> _EngineBlocks
        self.by_slot = []  # slot -> _EngineBlocks or None
        self.free_slots = []  # heap: the lowest free slot first keeps masks small
        self.blocks = 0  # stored (engine, block) pairs


class CacheIndex:
    """Cluster -> block hash -> engines, with per-engine LRU capacity, an idle
    TTL and a global cap on stored (engine, block) pairs.

    ``clock``: a ``core.clock.Clock``. ``engine_blocks``: blocks one engine
    keeps (least recently used go first); ``ttl``: seconds a block may stay
    unused; ``max_blocks``: (engine, block) pairs over all engines (the least
    recently saved engine gives first). ValueError unless all are positive.
    Block hashes are the gateway's unsigned 64-bit ints (``core.hashing``).
    ``evictions`` ({reason: blocks}), ``queries``, ``queries_with_location``
    and ``matched_fraction_sum`` are counters for the metrics.
    """

    def __init__(self, clock: Clock, engine_blocks: int = DEFAULT_ENGINE_BLOCKS, ttl: float = DEFAULT_TTL,
                 max_blocks: int = DEFAULT_MAX_BLOCKS):
        if engine_blocks < 1:
            raise ValueError("engine_blocks must be positive")
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        if max_blocks < 1:
            raise ValueError("max_blocks must be positive")
        self._clock = clock
        self.engine_blocks = engine_blocks
        self.ttl = ttl
        self.max_blocks = max_blocks
        # TTL precision: at most ~64 marks per engine, however busy.
        self._mark_step = max(1.0, ttl / 64)
        self._clusters = {}  # name -> _ClusterBlocks
        # Every engine, least recently saved to first: the global cap takes
        # from the front.
        self._engines = OrderedDict()  # serial -> _EngineBlocks
        self._next_serial = 1
        self._blocks = 0
        # Metrics.
        self.evictions = dict.fromkeys(EVICTION_REASONS, 0)
        self.queries = 0
        self.queries_with_location = 0
        self.matched_fraction_sum = 0.0

    # -- sizes and metrics ---------------------------------------------------

    @property
    def block_count(self) -> int:
        """Stored (engine, block) pairs over all clusters."""
        return self._blocks

    @property
    def engine_count(self) -> int:
        """Engines holding at least one block."""
        return len(self._engines)

    def blocks_by_cluster(self) -> dict[str, int]:
        """{cluster: stored (engine, block) pairs}."""
        return {name: c.blocks for name, c in self._clusters.items()}

    def distinct_blocks_by_cluster(self) -> dict[str, int]:
        """{cluster: distinct block hashes held by any engine}."""
        return {name: len(c.owners) for name, c in self._clusters.items()}

    def engines_by_cluster(self) -> dict[str, int]:
        """{cluster: engines holding at least one block}."""
        return {name: len(c.engines) for name, c in self._clusters.items()}

    def engine_ip(self, cluster: str, ip: str) -> str | None:
        """The spelling engine (cluster, ip) was first saved with (``ip`` in
        any spelling), or None for an engine holding nothing."""
        engine = self._find(cluster, ip)
        return None if engine is None else engine.ip

    def engine_block_count(self, cluster: str, ip: str) -> int:
        """Blocks engine ``ip`` (any spelling) of ``cluster`` holds (0 if unknown)."""
        engine = self._find(cluster, ip)
        return 0 if engine is None else len(engine.tick_of)

    def approx_bytes(self) -> int:
        """Memory held by the index in bytes, estimated in O(engines + clusters): the
        dict tables exactly, the int objects by their usual size."""
        total = 0
        for engine in self._engines.values():
            total += sys.getsizeof(engine.tick_of) + sys.getsizeof(engine.hash_at)
        for cluster in self._clusters.values():
            total += sys.getsizeof(cluster.owners)
            mask_bytes = 0 if len(cluster.by_slot) <= 8 else sys.getsizeof(1 << len(cluster.by_slot))
            total += len(cluster.owners) * ((mask_bytes + 15) & ~15)
        return total + self._blocks * (_TICK_BYTES + _HASH_BYTES)

    # -- engines -------------------------------------------------------------

    def _find(self, cluster, ip):
        c = self._clusters.get(cluster)
        if c is None:
            return None
        try:
            address = canonical_ip(ip)
        except ValueError:
            return None  # not an address: no engine has it
        return c.engines.get(address)

    def _engine_for(self, cluster_name, ip):
        address = ip_value(ip, "ip")  # before any change: a refusal leaves the index as it was
        cluster = self._clusters.get(cluster_name)
        if cluster is None:
            cluster = self._clusters[cluster_name] = _ClusterBlocks(cluster_name)
        engine = cluster.engines.get(address)
        if engine is None:
            if cluster.free_slots:
                slot = heapq.heappop(cluster.free_slots)
            else:
                slot = len(cluster.by_slot)
                cluster.by_slot.append(None)
            engine = _EngineBlocks(self._next_serial, cluster_name, ip, slot, address)
            self._next_serial += 1
            cluster.engines[address] = engine
            cluster.by_slot[slot] = engine
            self._engines[engine.serial] = engine
        return engine, cluster

    def _drop_engine(self, engine, reason):
        """Remove an engine and all its blocks. O(its blocks), O(1) when it
        is the last engine of its cluster."""
        cluster = self._clusters[engine.cluster]
        count = len(engine.tick_of)
        if len(cluster.engines) == 1:
            del self._clusters[engine.cluster]
        else:
            owners = cluster.owners
            keep = ~engine.bit
            for block in engine.tick_of:
                mask = owners[block] & keep
                if mask:
                    owners[block] = mask
                else:
                    del owners[block]
            del cluster.engines[engine.address]
            cluster.by_slot[engine.slot] = None
            heapq.heappush(cluster.free_slots, engine.slot)
            cluster.blocks -= count
        del self._engines[engine.serial]
        self._blocks -= count
        self.evictions[reason] += count
        return count

    def forget_engine(self, cluster: str, ip: str) -> int:
        """The engine restarted or went away: its cache is gone. ``ip`` in
        any spelling. Returns the number of blocks dropped (0 for an unknown
        engine). O(its blocks), at most ``engine_blocks``."""
        engine = self._find(cluster, ip)
        if engine is None:
            return 0
        return self._drop_engine(engine, "engine")

    def engine_removed(self, engine: object) -> None:
        """For ``LoadState.engine_removed_callbacks``: anything with
        ``.cluster`` and ``.ip``."""
        self.forget_engine(engine.cluster, engine.ip)

    # -- LRU primitives ------------------------------------------------------

    def _evict_before(self, engine, cluster, limit, budget, reason):
        """Drop up to ``budget`` blocks of ``engine`` last touched before tick
        ``limit``, least recently used first. Returns how many went."""
        hash_at = engine.hash_at
        tick_of = engine.tick_of
        owners = cluster.owners
        keep = ~engine.bit
        tick = engine.oldest
        evicted = 0
        while tick < limit and evicted < budget:
            block = hash_at.pop(tick, _MISSING)
            tick += 1
            if block is _MISSING:
                continue
            del tick_of[block]
            mask = owners[block] & keep
            if mask:
                owners[block] = mask
            else:
                del owners[block]
            evicted += 1
        engine.oldest = tick
        cluster.blocks -= evicted
        self._blocks -= evicted
        self.evictions[reason] += evicted
        return evicted

    def _mark_now(self, engine, now):
        bucket = int(now // self._mark_step)
        buckets = engine.mark_buckets
        ticks = engine.mark_ticks
        # A clock that steps back keeps the current mark: marks stay sorted.
        if not buckets or bucket > buckets[-1]:
            buckets.append(bucket)
            ticks.append(engine.next_tick)
            # A bucket whose blocks were all evicted (by capacity) is noise.
            while len(ticks) > 1 and ticks[1] <= engine.oldest:
                buckets.popleft()
                ticks.popleft()

    def _enforce_global_cap(self):
        while self._blocks > self.max_blocks:
            engine = next(iter(self._engines.values()))
            over = self._blocks - self.max_blocks
            if over >= len(engine.tick_of):
                self._drop_engine(engine, "global")
            else:
                self._evict_before(engine, self._clusters[engine.cluster], engine.next_tick, over, "global")

    # -- mutations -----------------------------------------------------------

    def save(self, cluster: str, ip: str, hashes: list[int]) -> int:
        """Engine ``ip`` of ``cluster`` now holds the prefixes ``hashes``
        (the prompt's block hashes, first block first). Idempotent: saving
        the same list again only refreshes it. Returns the blocks added."""
        return to_end(self.save_steps(cluster, ip, hashes, never))

    def save_steps(self, cluster: str, ip: str, hashes: list[int], spent) -> Iterator[None]:
        """``save`` as a generator that yields (None) between slices of
        ``SAVE_PER_CHECK`` hashes when ``spent()`` is true (a big save over
        several reactor turns, ``api.cache``), and returns the blocks added.
        Driven to the end without other changes in between, the index is
        exactly ``save``'s: one mark, the same ticks in the same order, the
        capacity and global cap enforced once at the end. Saves to other
        engines in between are independent; another save to the same engine
        takes the ticks after the ones already written (the index is
        advisory). If the engine is dropped meanwhile (a reset), the save
        starts over on the new engine: as if it came after the reset, the
        order in which the peers get the two."""
        if not hashes:
            return 0
        engine, cluster_obj = self._engine_for(cluster, ip)
        self._mark_now(engine, self._clock.seconds())
        # Not the global cap's first victim while it is paused; a one-go save
        # moved it before enforcing the cap too.
        self._engines.move_to_end(engine.serial)
        tick_of = engine.tick_of
        hash_at = engine.hash_at
        owners = cluster_obj.owners
        bit = engine.bit
        added = 0
        stop = len(hashes)
        while stop:
            start = max(0, stop - SAVE_PER_CHECK)
            tick = engine.next_tick
            step_added = 0
            # From the last hash to the first: the prompt's head is the freshest.
            for index in range(stop - 1, start - 1, -1):
                block = hashes[index]
                old = tick_of.get(block)
                if old is None:
                    owners[block] = owners.get(block, 0) | bit
                    step_added += 1
                else:
                    del hash_at[old]
                tick_of[block] = tick
                hash_at[tick] = block
                tick += 1
            engine.next_tick = tick
            cluster_obj.blocks += step_added
            self._blocks += step_added
            added += step_added
            stop = start
            if stop and spent():
                yield
                if self._engines.get(engine.serial) is not engine:
                    return (yield from self.save_steps(cluster, ip, hashes, spent))
        over = len(tick_of) - self.engine_blocks
        if over > 0:
            self._evict_before(engine, cluster_obj, engine.next_tick, over, "capacity")
        self._enforce_global_cap()
        return added

    # -- queries -------------------------------------------------------------

    def match_lengths(self, cluster: str, hashes: list[int]) -> dict[str, int]:
        """{ip: number of leading ``hashes`` the engine holds} for every engine
        holding at least the first, ``ip`` as the engine was first spelled.
        Does not count as a query in the metrics."""
        return self._match(cluster, hashes, "ip")

    def match_addresses(self, cluster: str, hashes: list[int]) -> dict[str, int]:
        """Like ``match_lengths``, keyed by canonical address: for joining
        with the load table whatever the spellings."""
        return self._match(cluster, hashes, "address")

    def _match(self, cluster: str, hashes: list[int], key: str) -> dict[str, int]:
        return to_end(self.match_steps(cluster, hashes, key, never))

    def match_steps(self, cluster: str, hashes: list[int], key: str, spent) -> Iterator[None]:
        """``match_lengths`` (``key`` "ip") or ``match_addresses`` ("address")
        as a generator that yields (None) between slices of
        ``SAVE_PER_CHECK`` hashes when ``spent()`` is true, and returns the
        dict. Saves, evictions and resets between two steps may or may not
        be seen by the rest of the walk: acceptable, the index is advisory
        (an engine dropped meanwhile may be named by the one given its slot)."""
        c = self._clusters.get(cluster)
        if c is None or not hashes:
            return {}
        get = c.owners.get
        active = get(hashes[0], 0)
        if not active:
            return {}
        by_slot = c.by_slot
        lengths = {}
        count = len(hashes)
        index = 1
        while index < count:
            stop = min(count, index + SAVE_PER_CHECK)
            while index < stop:
                mask = get(hashes[index], 0) & active
                if mask != active:
                    gone = active ^ mask
                    while gone:
                        low = gone & -gone
                        engine = by_slot[low.bit_length() - 1]
                        if engine is not None:  # None: dropped while the walk was paused
                            lengths[getattr(engine, key)] = index
                        gone ^= low
                    active = mask
                    if not active:
                        return lengths
                index += 1
            if index < count and spent():
                yield
        while active:
            low = active & -active
            engine = by_slot[low.bit_length() - 1]
            if engine is not None:
                lengths[getattr(engine, key)] = count
            active ^= low
        return lengths

    def query(self, cluster: str, hashes: list[int], topk: int = TOPK_DEFAULT) -> list[dict]:
        """The wire's ``locations`` (docs/cache.md):
        [{"ip", "length": leading hashes held}], longest match first, ties by
        ip (the same order on every node), at most ``topk``. Counted in the
        query metrics."""
        return to_end(self.query_steps(cluster, hashes, topk, never))

    def query_steps(self, cluster: str, hashes: list[int], topk: int, spent) -> Iterator[None]:
        """``query`` as a generator over the steps of its walk
        (``match_steps``), returning the locations."""
        lengths = yield from self.match_steps(cluster, hashes, "ip", spent)
        ranked = sorted(lengths.items(), key=_best_first)[:topk]
        self.queries += 1
        if ranked:
            self.queries_with_location += 1
            self.matched_fraction_sum += ranked[0][1] / len(hashes)
        return [{"ip": ip, "length": length} for ip, length in ranked]

    # -- expiry --------------------------------------------------------------

    def expire(self, chunk: int = 10000) -> Iterator[int]:
        """Drop blocks idle for longer than ``ttl`` (they go between ``ttl``
        and ``ttl`` + one mark step later). A generator like
        ``LoadState.expire``: each step evicts about ``chunk`` blocks at most;
        exhaust it for a full sweep."""
        step = self._mark_step
        # A mark's bucket must have ended more than ``ttl`` ago.
        last_stale_bucket = int((self._clock.seconds() - self.ttl) // step) - 1
        done = 0
        for engine in list(self._engines.values()):
            buckets = engine.mark_buckets
            if not buckets or buckets[0] > last_stale_bucket:
                continue
            if self._engines.get(engine.serial) is not engine:
                continue  # dropped while the sweep was paused
            ticks = engine.mark_ticks
            while buckets and buckets[0] <= last_stale_bucket:
                buckets.popleft()
                ticks.popleft()
            if not buckets:
                done += self._drop_engine(engine, "ttl")
            else:
                cluster = self._clusters[engine.cluster]
                # Saves during a pause only add ticks above the limit.
                while self._engines.get(engine.serial) is engine:
                    evicted = self._evict_before(engine, cluster, ticks[0], max(1, chunk - done), "ttl")
                    done += evicted
                    if done < chunk:
                        break
                    yield done
                    done = 0
            if done >= chunk:
                yield done
                done = 0
        if done:
            yield done

    def expire_all(self) -> None:
        """Run a whole TTL sweep at once (tests, small indexes)."""
        for _ in self.expire():
            pass

    # -- replication ---------------------------------------------------------

    def iter_snapshot(self) -> Iterator[tuple]:
        """Yield (cluster, ip, [hashes, least recently used first]) for every
        engine, least recently saved engine first. Applying them in that
        order on an empty index rebuilds the same LRU orders."""
        for engine in list(self._engines.values()):
            if self._engines.get(engine.serial) is not engine:
                continue
            hash_at = engine.hash_at
            yield engine.cluster, engine.ip, [hash_at[t] for t in engine.ticks_in_order()]

    def apply_snapshot(self, cluster: str, ip: str, hashes: list[int]) -> int:
        """Merge a peer's view of one engine (hashes least recently used
        first). Blocks already held keep their place; the others go behind
        them, as less recently used, in the peer's order: what this node
        saw itself is at least as fresh. Returns the blocks added."""
        if not hashes:
            return 0
        engine, cluster_obj = self._engine_for(cluster, ip)
        if not engine.mark_buckets:
            self._mark_now(engine, self._clock.seconds())
        tick_of = engine.tick_of
        hash_at = engine.hash_at
        owners = cluster_obj.owners
        bit = engine.bit
        tick = engine.oldest
        room = self.engine_blocks - len(tick_of)
        added = 0
        for block in reversed(hashes):
            if room <= 0:
                break  # older than everything kept: it would go first
            if block in tick_of:
                continue
            tick -= 1
            tick_of[block] = tick
            hash_at[tick] = block
            owners[block] = owners.get(block, 0) | bit
            added += 1
            room -= 1
        engine.oldest = tick
        cluster_obj.blocks += added
        self._blocks += added
        self._enforce_global_cap()
        return added


def _best_first(item):
    ip, length = item
    return -length, ip
