"""The state on the wire between nodes: snapshots (warm start) and record
streams (anti-entropy), one JSON value per line.

    {"snapshot":1,"node":"10.0.0.5","time":<ns>,"log":L,"offset":n}   header
    ["l",lease,ttl_ms,expires_in_ms]                              a gateway lease alive (before the rest)
    ["t",request_id,kind,created_s]                               a tombstone (1 prompt, 2 deleted,
                                                                  3 released by a reset or a lease)
    ["r",request_id,cluster,ip,prompt_length,prompt_deleted,created_s,prompt_tokens,lease]
                                                                  a live request (snapshots; anti-entropy's
                                                                  records stop at created_s)
    ["c",cluster,ip,[hash,...]]                                    KV-cache blocks of an engine
    {"end":true,"requests":n,"tombstones":n,"cache_engines":n}    the stream is complete

The sender writes it in chunks of at most ``CHUNK`` entries looked at, one
chunk per step of the node's cooperator (a reactor turn), paused by the HTTP
connection's back-pressure, so a million requests never stall the reactor
nor fill memory with one body. The
receiver validates every entry like a client request before merging it;
``log``/``offset`` (only from a node with a replication log) is the end of
the serving node's log when the snapshot started: the receiver resumes that
log's stream there, so nothing between the two is missed;
``created_s`` carries the request's birth, so expiry deadlines travel along.
An ip travels as the engine's first spelling (validated, never rewritten).
"""

import json
from json.encoder import encode_basestring

from twisted.internet import defer, task
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from metacenter.core.errors import InvalidInput
from metacenter.core.fields import INT32_MAX, INT64_MAX, int_field, ip_value, is_uint64, required_string
from metacenter.core.leases import lease_name, lease_ttl_ms
from metacenter.core.load import TOMB_DELETED, TOMB_PROMPT, TOMB_RELEASED
from metacenter.runtime.turns import in_chunks

FORMAT = 1
# Entries looked at per chunk (a reactor turn): about a millisecond here.
CHUNK = 250
# KV-cache hashes per chunk (an engine holds up to 16,384 of them).
CACHE_CHUNK = 16384

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_decode = json.JSONDecoder().decode
# What _encode writes for a str (the C encoder, ensure_ascii=False).
_string = encode_basestring


# -- encoding --------------------------------------------------------------------


def ip_field(fields, name="ip"):
    """``fields[name]``: a required IP address, validated and kept as spelled."""
    value = required_string(fields, name)
    ip_value(value, name)
    return value


def record_entry(record):
    """A live request's record tuple (``LoadState.iter_requests``, with
    ``full`` or not) -> its ``["r", ...]`` entry."""
    request_id, cluster, ip, prompt_length, prompt_deleted, created_s = record[:6]
    entry = ["r", request_id, cluster, ip, prompt_length, 1 if prompt_deleted else 0, created_s]
    if len(record) > 6:
        entry += [record[6], record[7]]
    return entry


def _lines(entries):
    return "".join(_encode(e) + "\n" for e in entries).encode("utf-8")


def record_line(record):
    """``_encode(record_entry(record)) + "\n"``, the same text built from its
    strings (about 4x faster: a snapshot writes a million of them)."""
    request_id, cluster, ip, prompt_length, prompt_deleted, created_s = record[:6]
    line = '["r",%s,%s,%s,%d,%d,%s' % (_string(request_id), _string(cluster), _string(ip), prompt_length,
                                       1 if prompt_deleted else 0, "null" if created_s is None else "%d" % created_s)
    if len(record) > 6:
        lease = record[7]
        return line + ',%d,%s]\n' % (record[6], "null" if lease is None else _string(lease))
    return line + "]\n"


def tombstone_line(request_id, kind, created_s):
    """``_encode(["t", request_id, kind, created_s]) + "\n"`` (see ``record_line``)."""
    return '["t",%s,%d,%d]\n' % (_string(request_id), kind, created_s)


def state_chunks(node, clusters=None, tombstones=True, cache=True, keep=None):
    """A generator of bytes chunks (whole lines, possibly empty) of a
    snapshot of ``node``: everything, or the live requests of the given
    clusters only (``clusters`` a set, for anti-entropy), and of those only
    the records for which ``keep(record)`` is true. Each chunk looks at no
    more than ``CHUNK`` entries (requests, tombstones) or ``CACHE_CHUNK``
    KV-cache hashes (at least one engine), so the consumer paces the walk
    and each step stays around a millisecond; the walk holds no more than
    one entry's objects at a time (nothing piles up for the cyclic GC)."""
    state = node.state
    header = {"snapshot": FORMAT, "node": node.advertise, "time": int(node.clock.seconds() * 1e9)}
    position = getattr(node, "log_position", None)
    if position is not None and clusters is None and keep is None:
        # Taken now, before the first record: what is appended from here on
        # comes again through the stream (merges do not count it twice).
        header["log"], header["offset"] = position()
    yield _lines([header])
    counts = {"requests": 0, "tombstones": 0, "cache_engines": 0}
    full = tombstones and cache and clusters is None  # a warm start's snapshot, not anti-entropy's records
    if full:
        # Leases first: the requests that name one find it alive. (Few: one
        # per gateway instance.)
        for looked in in_chunks(state.iter_leases(), CHUNK):
            counts["leases"] = counts.get("leases", 0) + len(looked)
            yield _lines(["l", lease, ttl_ms, expires_in_ms] for lease, ttl_ms, expires_in_ms in looked)
    # Tombstones before requests: an event arriving during the walk only
    # moves an entry from the tombstones to the requests (an add meeting a
    # prompt tombstone) or to a delete tombstone (which needs no snapshot:
    # its request is gone everywhere). The other order would lose a prompt
    # tombstone turned into a request after the requests were walked, with
    # nothing in the log after the header's offset to bring it back. The
    # requests of a reset engine not yet touched turn into released
    # tombstones during the request walk: they follow as tombstone lines.
    if tombstones:
        parts = []
        for request_id, kind, created_s in state.iter_tombstones(full=full):
            parts.append(tombstone_line(request_id, kind, created_s))
            if len(parts) >= CHUNK:
                counts["tombstones"] += len(parts)
                yield "".join(parts).encode("utf-8")
                parts = []
        counts["tombstones"] += len(parts)
        yield "".join(parts).encode("utf-8")
    released = [] if tombstones else None
    kind = TOMB_RELEASED if full else TOMB_DELETED
    parts = []
    looked = 0
    for record in state.iter_requests(full=full, released=released):
        looked += 1
        if record is not None and (clusters is None or record[1] in clusters) and (keep is None or keep(record)):
            parts.append(record_line(record))
            counts["requests"] += 1
        if released:
            counts["tombstones"] += len(released)
            parts.extend(tombstone_line(request_id, kind, created_s) for request_id, _, created_s in released)
            released.clear()
        if looked >= CHUNK:
            yield "".join(parts).encode("utf-8")
            parts = []
            looked = 0
    if released:  # met after the last record
        counts["tombstones"] += len(released)
        parts.extend(tombstone_line(request_id, kind, created_s) for request_id, _, created_s in released)
    yield "".join(parts).encode("utf-8")
    if cache and clusters is None:
        parts = []
        hashes_looked = 0
        for cluster, ip, hashes in node.cache.iter_snapshot():
            counts["cache_engines"] += 1
            parts.append(_encode(["c", cluster, ip, hashes]) + "\n")
            hashes_looked += len(hashes) + 1
            if hashes_looked >= CACHE_CHUNK:
                yield "".join(parts).encode("utf-8")
                parts = []
                hashes_looked = 0
        yield "".join(parts).encode("utf-8")
    yield _lines([dict(end=True, **counts)])


@implementer(IPushProducer)
class ChunkProducer:
    """Writes ``chunks`` (an iterator of bytes, e.g. ``state_chunks``) to a
    twisted.web request, one chunk per step of ``cooperate`` (the node's
    cooperator, ``Node.cooperate``: a chunk per reactor turn), pausing while
    the connection's buffer is full. ``start()`` returns ``done``, which
    fires with None when the stream ended or the client went away, and
    fails with what building a chunk raised (the caller then aborts the
    connection: a stream without its end line is incomplete to the reader).
    """

    def __init__(self, request, chunks, cooperate=task.cooperate):
        self._request = request
        self._chunks = chunks
        self._cooperate = cooperate
        self._task = None
        self._paused = False
        self.done = defer.Deferred()

    def start(self):
        self._request.registerProducer(self, True)
        self._task = self._cooperate(self._write_all())
        self._task.whenDone().addCallbacks(self._finished, self._failed)
        return self.done

    def _write_all(self):
        write = self._request.write
        for chunk in self._chunks:
            if chunk:
                write(chunk)
            yield None

    def _finished(self, _):
        if not self.done.called:
            self._request.unregisterProducer()
            self.done.callback(None)

    def _failed(self, failure):
        if not self.done.called:  # else stopProducing ended it: the client went away
            self._request.unregisterProducer()
            self.done.errback(failure)

    def pauseProducing(self):
        if not self._paused and not self.done.called:
            self._paused = True
            self._task.pause()

    def resumeProducing(self):
        if self._paused and not self.done.called:
            self._paused = False
            self._task.resume()

    def stopProducing(self):
        if not self.done.called:
            self.done.callback(None)
            self._task.stop()


# -- decoding --------------------------------------------------------------------


def parse_record(item):
    """A ``["r", ...]`` entry (or the same without the tag) -> the record
    tuple, validated like a client's add; InvalidInput otherwise. A record
    with prompt_tokens and lease (a snapshot's) gives an 8-tuple, one
    without (anti-entropy's) the 6-tuple."""
    # Tagged entries are one longer, so an untagged request id "r" is not a tag.
    if isinstance(item, list) and len(item) in (7, 9) and item[0] == "r":
        item = item[1:]
    if not isinstance(item, list) or len(item) not in (6, 8):
        raise InvalidInput("a record must be [request_id, cluster, ip, prompt_length, prompt_deleted, created_s] "
                           "or the same with prompt_tokens and lease")
    extra = ()
    if len(item) == 8:
        tokens, lease = item[6], item[7]
        extra = (int_field({"prompt_tokens": tokens}, "prompt_tokens", 0, INT32_MAX, default=0),
                 None if lease is None else lease_name(lease))
        item = item[:6]
    request_id, cluster, ip, prompt_length, prompt_deleted, created_s = item
    fields = {"request_id": request_id, "cluster": cluster, "ip": ip, "prompt_length": prompt_length}
    request_id, cluster = required_string(fields, "request_id"), required_string(fields, "cluster")
    ip, prompt_length = ip_field(fields), int_field(fields, "prompt_length", 0, INT32_MAX, default=0)
    if prompt_deleted not in (0, 1) or isinstance(prompt_deleted, float):
        raise InvalidInput("field 'prompt_deleted' of a record must be 0 or 1")
    if created_s is not None and (isinstance(created_s, bool) or not isinstance(created_s, int) or created_s < 0):
        raise InvalidInput("field 'created_s' of a record must be a non-negative integer")
    return (request_id, cluster, ip, prompt_length, bool(prompt_deleted), created_s) + extra


def parse_lease(item):
    """``["l", lease, ttl_ms, expires_in_ms]`` -> (lease, ttl_ms, expires_in_ms)."""
    if len(item) != 4:
        raise InvalidInput("a lease entry must be [\"l\", lease, ttl_ms, expires_in_ms]")
    _, lease, ttl_ms, expires_in_ms = item
    if isinstance(expires_in_ms, bool) or not isinstance(expires_in_ms, int) or expires_in_ms < 0:
        raise InvalidInput("field 'expires_in_ms' of a lease entry must be a non-negative integer")
    return lease_name(lease), lease_ttl_ms(ttl_ms), expires_in_ms


def parse_tombstone(item):
    """``["t", id, kind, created_s]`` or ``[id, kind]`` -> (request_id, kind)."""
    if isinstance(item, list) and len(item) == 4 and item[0] == "t":
        item = item[1:3]
    if not isinstance(item, list) or len(item) != 2:
        raise InvalidInput("a tombstone must be [request_id, kind]")
    request_id = required_string({"request_id": item[0]}, "request_id")
    kind = item[1]
    if kind not in (TOMB_PROMPT, TOMB_DELETED, TOMB_RELEASED) or isinstance(kind, bool) or isinstance(kind, float):
        raise InvalidInput(f"field 'kind' of a tombstone must be {TOMB_PROMPT}, {TOMB_DELETED} or {TOMB_RELEASED}")
    return request_id, kind


def parse_cache_entry(item):
    """``["c", cluster, ip, [hashes]]`` -> (cluster, ip, hashes)."""
    if len(item) != 4:
        raise InvalidInput("a cache entry must be [\"c\", cluster, ip, hashes]")
    _, cluster, ip, hashes = item
    fields = {"cluster": cluster, "ip": ip}
    cluster, ip = required_string(fields, "cluster"), ip_field(fields)
    if not isinstance(hashes, list) or not all(map(is_uint64, hashes)):
        raise InvalidInput("field 'hashes' of a cache entry must be an array of unsigned 64-bit integers")
    return cluster, ip, hashes


def decode_line(line):
    """A snapshot line (bytes, no newline) -> its JSON value; InvalidInput
    if it is not UTF-8 JSON."""
    try:
        return _decode(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput("a snapshot line is not valid JSON") from None


class SnapshotMerger:
    """Merges a peer's snapshot, line by line, into a node: every entry is
    an order-insensitive merge, so events arriving meanwhile (or a second
    snapshot after a broken one) never count twice.

    ``line(raw)`` takes each line; an invalid entry is counted (``invalid``,
    ``first_error``) and skipped, an unknown format header raises
    InvalidInput. ``complete`` turns True with the end line (``expected``
    holds its counts); ``merged`` counts requests, tombstones and cache
    engines; ``listed``, if a set is given, receives the ids of the peer's
    live requests. ``position`` is the serving node's ``(log_id, offset)``
    from the header, or None if it sent none (or a malformed one)."""

    def __init__(self, node, listed=None):
        self._node = node
        self.listed = listed  # a set: the ids of the peer's live requests go in it
        self.complete = False
        self.merged = {"requests": 0, "tombstones": 0, "cache_engines": 0, "leases": 0}
        self.invalid = 0
        self.first_error = None
        self.expected = None
        self.position = None

    def line(self, raw):
        entry = decode_line(raw)
        if isinstance(entry, dict):
            if entry.get("end") is True:
                self.complete = True
                self.expected = entry
            elif entry.get("snapshot") != FORMAT:
                raise InvalidInput(f"unknown snapshot format {entry.get('snapshot')!r}")
            else:
                log_id, offset = entry.get("log"), entry.get("offset")
                if (isinstance(log_id, str) and len(log_id) == 32 and type(offset) is int
                        and 0 <= offset <= INT64_MAX):
                    self.position = (log_id, offset)
            return
        try:
            tag = entry[0] if isinstance(entry, list) and entry else None
            if tag == "r":
                record = parse_record(entry)
                self._node.merge_record(*record)
                if self.listed is not None:
                    self.listed.add(record[0])
                self.merged["requests"] += 1
            elif tag == "t":
                self._node.merge_tombstone(*parse_tombstone(entry))
                self.merged["tombstones"] += 1
            elif tag == "l":
                self._node.merge_lease(*parse_lease(entry))
                self.merged["leases"] += 1
            elif tag == "c":
                self._node.cache.apply_snapshot(*parse_cache_entry(entry))
                self.merged["cache_engines"] += 1
            else:
                raise InvalidInput("unknown snapshot entry")
        except InvalidInput as e:
            self.invalid += 1
            if self.first_error is None:
                self.first_error = e.reason
