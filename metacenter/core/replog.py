"""The replication log: every accepted client mutation, encoded once, in a
bounded in-memory ring that every peer reads through its own cursor.

Offsets. The n-th entry appended since this log was made has offset n (from
0); offsets only grow and are never reused. ``base`` is the oldest offset
still held, ``end`` the offset the next entry will get, so the log holds
``[base, end)``. ``log_id`` is random per log (per process start): an offset
means something only together with it, so a peer never resumes into a log
that is not the one it was reading.

Encoding. An entry is one event as a compact JSON array, ``[type, field,
...]``: the event type name (``core.events``: ``load.stats.set``,
``cache.save`` ...) followed by the items of its typed tuple, in order. It is
made once, at append time; a frame for any peer is a slice of entries joined
into one JSON array (``frame``), so a new event type needs no change here.

Cursors. A ``Cursor`` is one peer's position: ``acked`` (every entry before
it was applied by the peer), ``sent`` (every entry before it was sent) and
the frames in flight between the two. The per-peer work per event is only
moving these offsets; a frame's bytes are a C-level join of the slice.

Bounds. The log holds at most ``capacity`` entries and ``max_bytes`` bytes
of encoded entries (the newest entry is always kept). Appending evicts the
oldest entries. A cursor whose ``acked`` falls behind ``base`` can no longer
be resumed exactly: it is reported (``Cursor.on_fell_behind(cursor,
skipped)``, ``ReplicationLog.fell_behind``), jumps to the end, and is marked
``lost`` until the peer was told about the gap; the peer then needs a repair
(anti-entropy or a snapshot). Finding such cursors costs nothing per append:
the log keeps a lower bound of every cursor's ``acked`` and walks the
cursors only when ``base`` passes it.

Pure: no Twisted; ``clock`` is anything with ``seconds()``.
"""

import json
import os
from collections import deque

from metacenter.core.errors import InvalidInput

# How a connection to a peer starts (``Cursor.restart``).
RESUMED = "resumed"  # the peer told an offset we still hold: exactly where it stopped
FRESH = "fresh"  # the peer does not know this log: from where its cursor stands
REPAIR = "repair"  # entries the peer lacks are gone: it needs a repair

DEFAULT_CAPACITY = 200_000  # entries; ~1 minute of a busy cluster's mutations
DEFAULT_MAX_BYTES = 64 * 2**20

# ASCII output: entries are joined and sent as they are, whatever the text.
_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), check_circular=False).encode

_NO_CURSOR = float("inf")


def encode_event(event_type: str, event: tuple) -> bytes:
    """``event_type`` and a typed event (``core.events``) -> the entry,
    ``[event_type, *event]`` as compact ASCII JSON."""
    return _encode((event_type, *event)).encode("ascii")


def new_log_id() -> str:
    """32 random hex digits."""
    return os.urandom(16).hex()


class Cursor:
    """One peer's position in a ``ReplicationLog``; made by ``log.cursor``.

    ``acked`` <= ``sent`` <= ``log.end``; ``in_flight`` holds the end offset
    of each frame sent and not yet acknowledged, oldest first.
    """

    __slots__ = ("log", "name", "acked", "sent", "in_flight", "lost", "on_fell_behind")

    def __init__(self, log, name, offset):
        self.log = log
        self.name = name
        self.acked = self.sent = offset
        self.in_flight = deque()
        # True from falling off the tail until the peer is told (a gap).
        self.lost = False
        # fn(cursor, skipped_entries), called when the cursor falls off.
        self.on_fell_behind = None

    # -- sending ---------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Entries appended and not yet sent."""
        return self.log.end - self.sent

    def next_frame(self, window: int, max_events: int, max_bytes: int, window_bytes: int | None = None):
        """The next frame to send, ``(start, stop)`` offsets, and marks it in
        flight; None when nothing waits, ``window`` frames are already
        unacknowledged, or (if given) ``window_bytes`` bytes of entries are.
        A frame holds at most ``max_events`` entries and ``max_bytes`` bytes
        of entries, and no more than the byte window has room for, but
        always at least one entry."""
        if len(self.in_flight) >= window:
            return None
        start = self.sent
        log = self.log
        stop = log.end
        if start >= stop:
            return None
        if window_bytes is not None and start > self.acked:
            room = window_bytes - (log._start_of(start) - log._start_of(max(self.acked, log.base)))
            if room <= 0:
                return None
            max_bytes = min(max_bytes, room)
        if stop - start > max_events:
            stop = start + max_events
        stop = log.cut(start, stop, max_bytes)
        self.sent = stop
        self.in_flight.append(stop)
        return start, stop

    def ack(self, offset: int) -> int:
        """The peer applied every entry before ``offset`` (cumulative);
        returns how many frames that acknowledged. An offset behind ``acked``
        (an old frame's, after a jump) only retires frames; one beyond
        ``sent`` raises ``InvalidInput``."""
        if offset > self.sent:
            raise InvalidInput(f"acknowledged offset {offset} is beyond the last one sent ({self.sent})")
        if offset > self.acked:
            self.acked = offset
        in_flight = self.in_flight
        done = 0
        while in_flight and in_flight[0] <= offset:
            in_flight.popleft()
            done += 1
        return done

    def gap_announced(self):
        """The peer was told that the stream continues at ``sent``."""
        self.lost = False

    def restart(self, claimed: int | None):
        """A new connection to the peer: where its stream starts.

        ``claimed`` is the offset of this log the peer says it applied, or
        None if it does not know this log (a new or restarted peer process).
        Returns ``(start, outcome, gap)``: ``outcome`` is ``RESUMED`` (the
        peer's offset is still held), ``REPAIR`` (it is not, or the cursor
        already fell off: entries the peer lacks are gone) or ``FRESH``
        (unknown to the peer: from this cursor's ``acked``); ``gap`` is how
        many entries are skipped after the peer's offset (0 when unknown).
        Frames in flight are forgotten. An offset beyond ``end`` raises
        ``InvalidInput``."""
        log = self.log
        if claimed is not None and (type(claimed) is not int or claimed < 0 or claimed > log.end):
            raise InvalidInput(f"the peer claims offset {claimed!r} of log {log.log_id}, which ends at {log.end}")
        if claimed is not None and claimed >= log.base:
            start, outcome = claimed, RESUMED
        elif claimed is not None:
            if not self.lost:
                # The peer is behind our tail although this cursor is not: it
                # lost entries we never knew it lacked (a restart that kept
                # its offsets, a reconnect after an eviction between acks).
                self._report(self.acked - claimed)
            start, outcome = self.acked, REPAIR
        else:
            start, outcome = self.acked, (REPAIR if self.lost else FRESH)
        gap = start - claimed if claimed is not None and start > claimed else 0
        self.acked = self.sent = start
        self.in_flight.clear()
        self.lost = False
        log._lower_bound(start)
        return start, outcome, gap

    # -- state -----------------------------------------------------------------

    def lag_events(self) -> int:
        """Entries appended and not yet acknowledged by the peer."""
        return self.log.end - self.acked

    def lag_seconds(self) -> float:
        """Age of the oldest entry not yet acknowledged (0 when none)."""
        return self.log.age(self.acked)

    def _fall_behind(self, at):
        skipped = at - self.acked
        self.acked = self.sent = at
        self.lost = True
        self._report(skipped)

    def _report(self, skipped):
        self.log.fell_behind += 1
        if self.on_fell_behind is not None:
            self.on_fell_behind(self, skipped)

    def __repr__(self):
        return f"Cursor({self.name!r}, acked={self.acked}, sent={self.sent}, lost={self.lost})"


class ReplicationLog:
    """A bounded log of encoded events; see the module docstring.

    ``wake`` is a one-shot hook: if set, the next append calls it (and
    clears it). The sender sets it to schedule one flush at the end of the
    reactor turn, so appends in between cost only the ``is None`` test.
    """

    def __init__(self, clock, capacity: int = DEFAULT_CAPACITY, max_bytes: int = DEFAULT_MAX_BYTES,
                 log_id: str | None = None):
        if capacity < 1 or max_bytes < 1:
            raise ValueError("capacity and max_bytes must be at least 1")
        self.clock = clock
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.log_id = log_id or new_log_id()
        self.base = 0
        self.end = 0
        self.bytes = 0  # encoded bytes held
        self.evicted = 0  # entries dropped off the tail, ever
        self.fell_behind = 0  # times a cursor fell off the tail, ever
        self.wake = None
        # A ring: offset o lives at index o % capacity.
        self._entries = [None] * capacity
        self._times = [0.0] * capacity  # clock.seconds() at append
        self._starts = [0] * capacity  # bytes appended before the entry, ever
        self._total = 0  # bytes appended, ever
        self._cursors = []
        self._min_acked = _NO_CURSOR  # <= every cursor's acked
        self._frame_cache = (-1, -1, b"")

    # -- appending ---------------------------------------------------------------

    def append(self, event_type: str, event: tuple) -> int:
        """Encodes and appends one event; returns its offset."""
        return self.append_encoded(encode_event(event_type, event))

    def append_encoded(self, entry: bytes) -> int:
        """Appends an entry already encoded (``encode_event``); returns its offset."""
        end = self.end
        size = len(entry)
        if end - self.base >= self.capacity or self.bytes + size > self.max_bytes:
            self._make_room(size)
        i = end % self.capacity
        self._entries[i] = entry
        self._times[i] = self.clock.seconds()
        self._starts[i] = self._total
        self._total += size
        self.bytes += size
        self.end = end + 1
        wake = self.wake
        if wake is not None:
            self.wake = None
            wake()
        return end

    def _make_room(self, size):
        capacity, entries, end = self.capacity, self._entries, self.end
        base = self.base
        while base < end and (end - base >= capacity or self.bytes + size > self.max_bytes):
            i = base % capacity
            self.bytes -= len(entries[i])
            entries[i] = None
            base += 1
        self.evicted += base - self.base
        self.base = base
        if base > self._min_acked:
            self._drop_behind(end)

    def _drop_behind(self, at):
        """Cursors behind ``base`` jump to ``at``; amortised: runs once each
        time the tail passes the lowest cursor."""
        lowest = _NO_CURSOR
        base = self.base
        for cursor in self._cursors:
            if cursor.acked < base:
                cursor._fall_behind(at)
            if cursor.acked < lowest:
                lowest = cursor.acked
        self._min_acked = lowest

    def _lower_bound(self, offset):
        if offset < self._min_acked:
            self._min_acked = offset

    # -- cursors -----------------------------------------------------------------

    def cursor(self, name: str, offset: int | None = None) -> Cursor:
        """A new cursor at ``offset`` (default: ``end``, i.e. only what is
        appended from now on), which must be in [base, end]."""
        offset = self.end if offset is None else offset
        if not self.base <= offset <= self.end:
            raise InvalidInput(f"offset {offset} is outside the log [{self.base}, {self.end}]")
        cursor = Cursor(self, name, offset)
        self._cursors.append(cursor)
        self._lower_bound(offset)
        return cursor

    def remove_cursor(self, cursor: Cursor):
        """Forgets a cursor (its peer left); unknown cursors are ignored."""
        try:
            self._cursors.remove(cursor)
        except ValueError:
            pass

    @property
    def cursors(self):
        return tuple(self._cursors)

    # -- reading -----------------------------------------------------------------

    def _check_span(self, start, stop):
        if not self.base <= start <= stop <= self.end:
            raise InvalidInput(f"entries [{start}, {stop}) are not in the log [{self.base}, {self.end})")

    def entries(self, start: int, stop: int) -> list:
        """The encoded entries ``[start, stop)``, which must be held."""
        self._check_span(start, stop)
        capacity, n = self.capacity, stop - start
        i = start % capacity
        if i + n <= capacity:
            return self._entries[i:i + n]
        return self._entries[i:] + self._entries[:i + n - capacity]

    def frame(self, start: int, stop: int) -> bytes:
        """Entries ``[start, stop)`` as one JSON array. The last frame built
        is kept: peers in step share one join."""
        cached = self._frame_cache
        if cached[0] == start and cached[1] == stop:
            return cached[2]
        payload = b"[" + b",".join(self.entries(start, stop)) + b"]"
        self._frame_cache = (start, stop, payload)
        return payload

    def _start_of(self, offset):
        return self._total if offset >= self.end else self._starts[offset % self.capacity]

    def span_bytes(self, start: int, stop: int) -> int:
        """Bytes of the encoded entries ``[start, stop)`` (held ones), O(1)."""
        self._check_span(start, stop)
        return self._start_of(stop) - self._start_of(start)

    def cut(self, start: int, stop: int, max_bytes: int) -> int:
        """The largest ``s`` in [start + 1, stop] whose entries ``[start, s)``
        take at most ``max_bytes`` (``start + 1`` if even one entry is
        larger); a binary search, O(log n)."""
        first = self._start_of(start)
        if self._start_of(stop) - first <= max_bytes:
            return stop
        low, high = start + 1, stop  # low fits (or is the one-entry minimum), high does not
        while high - low > 1:
            middle = (low + high) // 2
            if self._start_of(middle) - first <= max_bytes:
                low = middle
            else:
                high = middle
        return low

    def appended_at(self, offset: int) -> float:
        """``clock.seconds()`` when the held entry ``offset`` was appended."""
        self._check_span(offset, offset + 1)
        return self._times[offset % self.capacity]

    def age(self, offset: int) -> float:
        """Seconds since entry ``offset`` was appended; 0 at ``end``; for an
        evicted entry, the age of the oldest held one."""
        if offset >= self.end:
            return 0.0
        offset = max(offset, self.base)
        return max(0.0, self.clock.seconds() - self._times[offset % self.capacity])

    def position(self):
        """``(log_id, end)``: where a snapshot taken now leaves this log. A
        node that merged the snapshot resumes this log's stream from there
        (entries appended while the snapshot streams are then applied twice,
        which merges are indifferent to; none is missed)."""
        return self.log_id, self.end

    def __len__(self):
        return self.end - self.base
