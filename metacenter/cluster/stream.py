"""Replication as one log streamed to every peer.

Every accepted client mutation is appended once to this node's
``ReplicationLog`` (``core.replog``, encoded there once for all peers). For
each peer a ``PeerStream`` keeps one persistent TCP connection (any Twisted
client endpoint: TCP, TLS) to the peer's replication listener
(``ReceiverFactory``, served on a Twisted endpoint string such as
``tcp:7070:interface=10.0.0.5``) and sends the entries its cursor has not sent
yet, as frames: slices of the log joined. A connection carries one direction:
the dialling node streams its log, the listening node applies it.

Wire. Messages are length-prefixed (4 bytes, big-endian;
``Int32StringReceiver``); the first byte of a message is its kind:

    sender -> receiver
      H hello      JSON {"v": 1, "max_v": 2, "node": S, "log": L, "nonce": Ns,
                         "ack_frames": n, "ack_bytes": b}
      P proof      JSON {"proof": hex, "start": offset}
      F frame      ">QId" (version 2) start offset, entry count and the
                   sender's wall-clock time (s) when the frame's oldest entry
                   was appended; ">QI" (version 1) without the time; then
                   the entries as one JSON array of arrays ([type, field,
                   ...], see core.replog)
      G gap        ">Q" the stream goes on at this offset: the entries between
                   were skipped (the receiver needs a repair)
    receiver -> sender
      C challenge  JSON {"v": V, "node": R, "nonce": Nr, "applied": offset|null, "proof": hex}
      A ack        ">Q" every entry of log L before this offset is applied (cumulative)
      R rejected   JSON {"offset": o, "count": n, "first": reason}: entries refused
                   as invalid (acknowledged all the same: sending them again
                   would not help)
    either
      E error      UTF-8 reason; the side sending it closes the connection

The receiver answers a valid proof with ``A`` at the start offset; the sender
counts the connection as established, and sends frames, from then on.

Versions. The hello offers ``v`` (the oldest version the sender speaks) to
``max_v`` (its newest); the receiver answers with the highest both speak
(``negotiate``) or refuses with ``E`` naming both ranges. Version 1 is the
previous release's: its hello has only ``v: 1`` (which this node accepts)
and its receivers check ``v == 1`` (which this node's hello keeps), so the
two releases stream to each other in version 1 during a rolling upgrade.
Version 2 adds the frame's time (``metacenter_stream_apply_lag_seconds``)
and lazy acknowledgements.

Handshake (challenge-response, both sides). Ns and Nr are 16 fresh random
bytes of each connection. The receiver proves itself with
HMAC-SHA256(secret, "metacenter-stream-v1\\nreceiver\\n" Ns Nr S R L applied),
the sender with HMAC-SHA256(secret, "...\\nsender\\n" Ns Nr S R L start) (fields
joined by newlines, hex). Each proof covers the other side's fresh nonce, so
a recorded handshake is useless on a new connection, and the role, so one
side's proof cannot be reflected as the other's. With several secrets
(rotation) the first signs and any verifies. Without a secret the handshake
runs with empty proofs and nothing is checked, like the HTTP peer routes;
a node with a secret refuses a peer that sends none. The handshake
authenticates the peers, not every byte after it: use a TLS endpoint where
the network is not trusted.

Resume. ``applied`` is the offset of log L the receiver has applied, which
it keeps per log id (``ReceiverFactory.applied``), or null for a log it does
not know (the sender restarted: a new log id; or the receiver did). The
sender continues from there when it still holds that offset (``RESUMED``),
else from its cursor and the peer needs a repair (``REPAIR``, reported
through ``on_repair``); an unknown log gets the entries from the cursor on
(``FRESH``). So a short outage costs no repair.

Flow. Appending arms one ``callLater(0)``: entries appended during a reactor
turn leave together right after it, never on a timer, and are put on the
socket in that turn (``_push``), not one loop iteration later. At most
``window`` frames and ``window_bytes`` bytes are unacknowledged; what is
appended meanwhile leaves with the next acknowledgement, so frames grow with
load. A version 2 receiver acknowledges (cumulatively) once ``ack_frames``
frames or ``ack_bytes`` bytes are unacknowledged (the sender asks for half
its window) or ``ack_delay`` after the first unacknowledged frame, whichever
comes first: at a steady load that is one ack per ``ack_delay``, not one per
frame, and the window never fills. A version 1 receiver acknowledges once
per network read.

Receiving. A frame's entries are decoded with one ``json.loads`` into lists
(no per-entry dict on the common path) and validated as strictly as a
client's request (``decode_entries``: the same ``api.bodies`` parsers, with a
positional fast path for load events that accepts only what they accept);
the valid events go to ``apply_frame(events)`` in one call, and counters are
updated once per frame.
"""

import hashlib
import hmac
import json
import os
import struct
from collections import OrderedDict

from twisted.application.service import Service
from twisted.internet import defer, task, tcp
from twisted.internet.protocol import Factory
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from metacenter.api import bodies
from metacenter.core.errors import InvalidInput
from metacenter.core.events import (EVENT_ADD, EVENT_CACHE_SAVE, EVENT_DELETE, EVENT_ENGINE_RESET,
                                    EVENT_LEASE_KEEPALIVE, EVENT_LEASE_REVOKE, EVENT_PROMPT_DELETE, EVENT_REFRESH,
                                    LoadAdd, LoadDelete)
from metacenter.core.fields import INT32_MAX, INT64_MAX, MAX_LENGTHS, canonical_ip
from metacenter.core.replog import FRESH, RESUMED
from metacenter.runtime.logs import ThrottledLog, logger

log = logger("metacenter.cluster.stream")

VERSION = 2  # the newest stream version this node speaks
MIN_VERSION = 1  # the oldest: the previous release's (untimed frames, an ack per read)
DOMAIN = b"metacenter-stream-v1"  # the proofs' domain, the same in every version

HELLO, PROOF, FRAME, GAP = b"H", b"P", b"F", b"G"
CHALLENGE, ACK, REJECTED, ERROR = b"C", b"A", b"R", b"E"

_FRAME = struct.Struct(">cQI")  # v1: kind, start offset, entry count
_FRAME_TIMED = struct.Struct(">cQId")  # v2: the same, then the oldest entry's append time (s, sender's clock)
_OFFSET = struct.Struct(">cQ")  # kind, offset (ack, gap)
_PREFIX = struct.Struct(">I")  # Int32StringReceiver's length prefix

HANDSHAKE_MAX_BYTES = 4096  # before authentication nobody makes us buffer more
MAX_MESSAGE_BYTES = 16 * 2**20  # after it; a frame always fits (see max_frame_bytes)
NODE_ID_MAX = 256
KNOWN_LOGS = 256  # sender logs whose applied offset a receiver remembers
ACK_DELAY = 0.02  # s: how long a receiver may hold an acknowledgement back (v2)
WINDOW = 64  # frames a sender may have unacknowledged
WINDOW_BYTES = 8 * 2**20  # bytes of frames a sender may have unacknowledged
MAX_LAG = 1e6  # s: a frame time further off than this is nonsense, not lag
LOG_INTERVAL = 30.0  # a recurring failure is logged again at most this often

_encode = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode
_decode = json.JSONDecoder().decode


class ProtocolError(Exception):
    """The other side broke the protocol, or failed the handshake; the
    message is sent to it (``E``) and the connection closed."""


# -- handshake -------------------------------------------------------------------


def normalise_secrets(secrets):
    """Cluster secrets (str or bytes, the first signs) -> a tuple of bytes;
    empty ones are dropped, so ``()`` means no authentication."""
    if isinstance(secrets, (str, bytes)):
        secrets = (secrets,)
    keys = tuple(s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in secrets or ())
    return tuple(k for k in keys if k)


def proof(secret, role, sender_nonce, receiver_nonce, sender, receiver, log_id, value):
    """hex HMAC-SHA256 binding a role (``b"sender"``/``b"receiver"``) to both
    nonces, both node ids, the log id and the offset the role asserts."""
    message = b"\n".join([DOMAIN, role, sender_nonce.encode("ascii"), receiver_nonce.encode("ascii"),
                          sender.encode("utf-8"), receiver.encode("utf-8"), log_id.encode("ascii"),
                          str(value).encode("ascii")])
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(secrets, *fields):
    """``proof`` with the first secret; "" without one."""
    return proof(secrets[0], *fields) if secrets else ""


def verify(secrets, given, *fields):
    """Raises ``ProtocolError`` unless ``given`` is a proof by any secret (a
    no-op without secrets)."""
    if not secrets:
        return
    if not given:
        raise ProtocolError("no proof: the peer has no cluster secret, this node requires one")
    expected = [proof(secret, *fields).encode("ascii") for secret in secrets]
    given = given.encode("ascii", "replace")
    # Every secret is tried, so the time taken does not tell which matched.
    if not sum(hmac.compare_digest(e, given) for e in expected):
        raise ProtocolError("bad proof: a different cluster secret, or a replayed handshake")


def new_nonce():
    return os.urandom(16).hex()


def _json_message(message, what):
    try:
        value = _decode(message[1:].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(f"malformed {what}: expected a JSON object") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"malformed {what}: expected a JSON object")
    return value


def _hex_field(obj, name, what, length=32):
    value = obj.get(name)
    if not isinstance(value, str) or len(value) != length or not all(c in "0123456789abcdef" for c in value):
        raise ProtocolError(f"{what}: field '{name}' must be {length} lowercase hex digits")
    return value


def _node_field(obj, what):
    value = obj.get("node")
    if not isinstance(value, str) or not value or len(value) > NODE_ID_MAX or not value.isprintable():
        raise ProtocolError(f"{what}: field 'node' must be a printable string of 1 to {NODE_ID_MAX} characters")
    return value


def _offset_field(obj, name, what, nullable=False):
    value = obj.get(name)
    if value is None and nullable:
        return None
    if type(value) is not int or not 0 <= value <= INT64_MAX:
        raise ProtocolError(f"{what}: field '{name}' must be an integer in [0, {INT64_MAX}]"
                            + (" or null" if nullable else ""))
    return value


def _proof_field(obj, what):
    value = obj.get("proof")
    if not isinstance(value, str) or len(value) > 64:
        raise ProtocolError(f"{what}: field 'proof' must be a string of at most 64 hex digits")
    return value


def _offset_message(message, what):
    if len(message) != _OFFSET.size:
        raise ProtocolError(f"malformed {what}: expected an 8-byte offset")
    return _OFFSET.unpack(message)[1]


def _int_field(obj, name, what, low, high):
    value = obj.get(name)
    if type(value) is not int or not low <= value <= high:
        raise ProtocolError(f"{what}: field '{name}' must be an integer in [{low}, {high}]")
    return value


def negotiate(hello):
    """The version a receiver speaks with the sender of ``hello``: the
    highest both know. A sender offers ``v`` (its oldest version, so a
    previous-version receiver, which checks ``v == 1``, still accepts it) to
    ``max_v`` (its newest; absent from a version 1 sender's hello).
    Raises ``ProtocolError`` naming both ranges when they do not meet."""
    low = hello.get("v")
    high = hello.get("max_v", low)
    if type(low) is not int or type(high) is not int or high < low:
        raise ProtocolError(f"hello: fields 'v' and 'max_v' must be integers with v <= max_v, "
                            f"got {low!r} and {high!r}")
    version = min(high, VERSION)
    if version < max(low, MIN_VERSION):
        raise ProtocolError(f"hello: unsupported stream version {low}..{high}, "
                            f"this node speaks {MIN_VERSION}..{VERSION}")
    return version


def _challenge_version(challenge):
    version = challenge.get("v")
    if type(version) is not int or not MIN_VERSION <= version <= VERSION:
        raise ProtocolError(f"challenge: unsupported stream version {version!r}, "
                            f"this node speaks {MIN_VERSION}..{VERSION}")
    return version


# -- decoding --------------------------------------------------------------------


class EventType:
    """How entries of one event type are checked on arrival.

    ``fields`` are the JSON names of the typed event's items, in tuple order
    (the entry is ``[name, *items]``); ``parse(dict)`` is the client body
    parser (``api.bodies``) that validates them and returns the typed event;
    ``fast(entry)`` optionally returns the same event without building a dict,
    or None to leave the entry to ``parse`` (it must accept only what
    ``parse`` accepts, with the same result). ``required``: how many of the
    fields an entry must have at least (all by default); the rest are
    optional trailing ones (an add's prompt_tokens and lease)."""

    __slots__ = ("name", "fields", "parse", "fast", "required")

    def __init__(self, name, fields, parse, fast=None, required=None):
        self.name, self.fields, self.parse, self.fast = name, tuple(fields), parse, fast
        self.required = len(self.fields) if required is None else required

    def decode(self, entry):
        if not self.required < len(entry) <= len(self.fields) + 1:
            counted = (f"{len(self.fields)}" if self.required == len(self.fields)
                       else f"{self.required} to {len(self.fields)}")
            raise InvalidInput(f"event '{self.name}' must have {counted} fields "
                               f"({', '.join(self.fields)}), got {len(entry) - 1}")
        if self.fast is not None:
            event = self.fast(entry)
            if event is not None:
                return event
        return self.parse(dict(zip(self.fields, entry[1:])))


def _fast_add(entry):
    if len(entry) != 6:
        return None  # with prompt_tokens and lease: parse() checks them
    _, cluster, request_id, ip, prompt_length, timestamp = entry
    if (type(cluster) is str and type(request_id) is str and type(ip) is str and cluster and request_id
            and cluster.isascii() and request_id.isascii()  # other text: parse() checks surrogates
            and len(cluster) <= MAX_LENGTHS["cluster"] and len(request_id) <= MAX_LENGTHS["request_id"]
            and len(ip) <= MAX_LENGTHS["ip"]  # longer: parse() refuses them, naming the field
            and type(prompt_length) is int and 0 <= prompt_length <= INT32_MAX
            and (timestamp is None or (type(timestamp) is int and 0 <= timestamp <= INT64_MAX))):
        try:
            canonical_ip(ip)  # validated; the core keeps the spelling (issue 10)
        except ValueError:
            return None
        return LoadAdd((cluster, request_id, ip, prompt_length, timestamp))
    return None


def _fast_delete(entry):
    _, request_id, timestamp = entry
    if (type(request_id) is str and request_id and request_id.isascii()
            and len(request_id) <= MAX_LENGTHS["request_id"]
            and (timestamp is None or (type(timestamp) is int and 0 <= timestamp <= INT64_MAX))):
        return LoadDelete((request_id, timestamp))
    return None


EVENT_TYPES = {}


def register_event_type(name, fields, parse, fast=None, required=None):
    """Lets events of type ``name`` travel over the stream (see ``EventType``).
    The sender needs nothing: any typed tuple is encoded as it is."""
    EVENT_TYPES[name] = EventType(name, fields, parse, fast, required)


# An add without prompt_tokens and lease travels as the 5 fields it always had.
register_event_type(EVENT_ADD, ("cluster", "request_id", "ip", "prompt_length", "timestamp", "prompt_tokens", "lease"),
                    bodies.peer_load_add, _fast_add, required=5)
register_event_type(EVENT_DELETE, ("request_id", "timestamp"), bodies.load_delete, _fast_delete)
register_event_type(EVENT_PROMPT_DELETE, ("request_id", "timestamp"), bodies.load_delete, _fast_delete)
register_event_type(EVENT_CACHE_SAVE, ("cluster", "prompt_hash", "ip"), bodies.parse_cache_save)
# Issue 10's: validated like the client requests they come from.
register_event_type(EVENT_ENGINE_RESET, ("cluster", "ip"), bodies.engine_reset)
register_event_type(EVENT_LEASE_KEEPALIVE, ("lease", "ttl_ms"), bodies.lease_keepalive)
register_event_type(EVENT_LEASE_REVOKE, ("lease",), bodies.lease_revoke)
register_event_type(EVENT_REFRESH, ("request_ids",), bodies.refresh)


def decode_entries(payload, count, types=None):
    """A frame's payload (a JSON array of ``count`` entries) -> ``(events,
    rejected, first_reason)``: ``events`` the valid ones as ``(event_type,
    event)`` pairs in order, ``rejected`` how many were refused and
    ``first_reason`` why the first was (reasons name the field like a client's
    400). A payload that is not such an array refuses all ``count``."""
    types = EVENT_TYPES if types is None else types
    try:
        entries = _decode(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        return [], count, f"malformed frame: {e}"
    if type(entries) is not list or len(entries) != count:
        return [], count, f"malformed frame: expected a JSON array of {count} events"
    events = []
    append = events.append
    rejected, first = 0, None
    for index, entry in enumerate(entries):
        try:
            if type(entry) is not list or not entry or type(entry[0]) is not str:
                raise InvalidInput("an event must be an array [type, field, ...]")
            kind = types.get(entry[0])
            if kind is None:
                raise InvalidInput(f"Unsupported event type {entry[0][:64]!r}")
            append((kind.name, kind.decode(entry)))
        except InvalidInput as e:
            rejected += 1
            if first is None:
                first = f"event {index}: {e.reason}"
    return events, rejected, first


def _no_delay(transport):
    """Frames and acks are small writes that must leave at once: with Nagle's
    algorithm a frame can wait for the ack of the previous one, which the
    other side's delayed ACK holds back for tens of milliseconds."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass


def _push(transport):
    """Puts what was just written on the socket in this reactor turn.

    ``transport.write`` only registers the socket for writing, so the bytes
    would leave one loop iteration later (an epoll round trip and a
    ``doWrite`` per frame and per ack). A plain TCP socket that is writable
    takes them at once; what it does not take stays buffered and registered
    as before, and an error is left for the reactor's own ``doWrite`` to
    find. Other transports (TLS, which encrypts in its protocol, memory
    transports in tests) are left alone."""
    # Not while disconnecting: doWrite would then finish the close and
    # return its reason to us instead of the reactor. (Streams never half-close.)
    if isinstance(transport, tcp.Connection) and transport.connected and not transport.disconnecting:
        transport.doWrite()


# -- receiver ----------------------------------------------------------------------


class ReceiverProtocol(Int32StringReceiver):
    """One incoming stream: handshake, then frames applied in order."""

    MAX_LENGTH = HANDSHAKE_MAX_BYTES

    def __init__(self, factory):
        self.factory = factory
        self.state = "hello"  # -> "proof" -> "streaming"; "closed" after an error
        self.peer_node = None
        self.log_id = None
        self.expected = None  # offset of the next entry
        self.version = None  # negotiated in the hello
        self._nonces = None
        self._ack_due = None  # offset to acknowledge, None when all is acknowledged
        self._ack_timer = None  # DelayedCall sending it at the latest (v2)
        self.ack_frames = self.ack_bytes = 1  # the sender's: acknowledge once this much is unacknowledged
        self._unacked_frames = self._unacked_bytes = 0
        self._timeout = None
        self.frames = self.entries = self.rejected = self.bytes = self.acks = 0

    def connectionMade(self):
        self.factory.connections_made += 1
        _no_delay(self.transport)
        self._timeout = self.factory.clock.callLater(self.factory.handshake_timeout, self._handshake_timed_out)

    def _handshake_timed_out(self):
        self._timeout = None
        try:
            if self.state != "streaming":
                self._fail(f"no handshake within {self.factory.handshake_timeout:g} s")
        except Exception:
            log.failure("closing a replication connection after its handshake timeout failed")

    def lengthLimitExceeded(self, length):
        self._fail(f"a message of {length} bytes exceeds this node's limit of {self.MAX_LENGTH}")

    def dataReceived(self, data):
        super().dataReceived(data)
        if self._ack_due is None or self.state != "streaming":
            return
        # Acknowledgements are cumulative: one covers every frame before it.
        # A version 1 sender (a window of 4) gets one per network read. A
        # version 2 sender has a window large enough for the receiver to
        # wait until half of it is used or ``ack_delay`` passed, so a busy
        # stream costs one ack per many frames, not a wake-up per frame.
        if (self.version < 2 or self._unacked_frames >= self.ack_frames or self._unacked_bytes >= self.ack_bytes
                or not self.factory.ack_delay):
            self._send_ack()
        elif self._ack_timer is None:
            self._ack_timer = self.factory.clock.callLater(self.factory.ack_delay, self._ack_delay_passed)

    def _send_ack(self):
        offset, self._ack_due = self._ack_due, None
        self._unacked_frames = self._unacked_bytes = 0
        timer, self._ack_timer = self._ack_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self.acks += 1
        self.factory.acks += 1
        self.transport.write(_PREFIX.pack(9) + _OFFSET.pack(ACK, offset))
        _push(self.transport)

    def _ack_delay_passed(self):
        self._ack_timer = None
        try:
            if self._ack_due is not None and self.state == "streaming":
                self._send_ack()
        except Exception:
            log.failure("acknowledging replication frames from {peer} failed", peer=self.peer_node)

    def stringReceived(self, message):
        if self.state == "closed":
            return
        kind = message[:1]
        try:
            if kind == FRAME and self.state == "streaming":
                self._frame(message)
            elif kind == GAP and self.state == "streaming":
                self._gap(message)
            elif kind == HELLO and self.state == "hello":
                self._hello(message)
            elif kind == PROOF and self.state == "proof":
                self._proof(message)
            elif kind == ERROR:
                self._peer_error(message)
            else:
                raise ProtocolError(f"unexpected message {kind!r} in state {self.state}")
        except ProtocolError as e:
            self._fail(str(e))

    # -- handshake -------------------------------------------------------------

    def _hello(self, message):
        factory = self.factory
        hello = _json_message(message, "hello")
        self.version = negotiate(hello)
        if self.version >= 2:
            self.ack_frames = _int_field(hello, "ack_frames", "hello", 1, 2**31 - 1)
            self.ack_bytes = _int_field(hello, "ack_bytes", "hello", 1, INT64_MAX)
        self.peer_node = _node_field(hello, "hello")
        self.log_id = _hex_field(hello, "log", "hello")
        sender_nonce = _hex_field(hello, "nonce", "hello")
        if self.log_id == factory.own_log_id:
            raise ProtocolError("connected to itself (the peer's log is this node's)")
        receiver_nonce = new_nonce()
        self._nonces = (sender_nonce, receiver_nonce)
        applied = factory.applied.get(self.log_id)
        reply = {"v": self.version, "node": factory.node_id, "nonce": receiver_nonce, "applied": applied,
                 "proof": sign(factory.secrets, b"receiver", sender_nonce, receiver_nonce, self.peer_node,
                               factory.node_id, self.log_id, applied)}
        self.state = "proof"
        self.sendString(CHALLENGE + _encode(reply).encode("ascii"))

    def _proof(self, message):
        factory = self.factory
        answer = _json_message(message, "proof")
        given = _proof_field(answer, "proof")
        start = _offset_field(answer, "start", "proof")
        sender_nonce, receiver_nonce = self._nonces
        verify(factory.secrets, given, b"sender", sender_nonce, receiver_nonce, self.peer_node, factory.node_id,
               self.log_id, start)
        self.state = "streaming"
        self.MAX_LENGTH = factory.max_message_bytes
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        applied = factory.applied.get(self.log_id)
        if applied is not None and start > applied:
            factory._gap(self, applied, start)
        self.expected = start
        factory._streaming(self)
        self.transport.write(_PREFIX.pack(9) + _OFFSET.pack(ACK, start))  # welcome: streaming may begin
        _push(self.transport)

    # -- streaming ---------------------------------------------------------------

    def _frame(self, message):
        header = _FRAME_TIMED if self.version >= 2 else _FRAME
        if len(message) < header.size:
            raise ProtocolError("malformed frame: shorter than its header")
        if self.version >= 2:
            _, start, count, sent_at = header.unpack_from(message)
        else:
            (_, start, count), sent_at = header.unpack_from(message), None
        if start != self.expected:
            raise ProtocolError(f"frame starts at offset {start}, expected {self.expected}")
        factory = self.factory
        events, rejected, first = decode_entries(message[header.size:], count, factory.event_types)
        if events:
            try:
                factory.apply_frame(events)
            except Exception:
                # A bug, not the sender's fault: sending the frame again would
                # fail again, so it counts as applied; anti-entropy repairs.
                factory.apply_errors += 1
                log.failure("applying a replication frame of {count} events from {peer} failed",
                            count=len(events), peer=self.peer_node)
        if sent_at is not None and factory.observe_lag is not None:
            lag = factory.clock.seconds() - sent_at
            # Clocks of two hosts disagree: a negative lag is skew and counts
            # as 0; NaN, infinities and absurd times are not lag at all.
            if lag < MAX_LAG:
                factory.observe_lag(lag if lag > 0.0 else 0.0)
        self.expected = stop = start + count
        # Applied is recorded before it is acknowledged: a reconnect resumes
        # from here, so a frame applied but not yet acknowledged is never
        # sent (and applied) again.
        factory.applied[self.log_id] = stop
        self._ack_due = stop
        self._unacked_frames += 1
        self._unacked_bytes += len(message) + 4
        self.frames += 1
        self.entries += count
        self.rejected += rejected
        self.bytes += len(message) + 4
        factory._count_frame(count, len(events), rejected, len(message) + 4)
        if rejected:
            factory.throttled.emit(("rejected", self.peer_node), "rejected", "warn",
                                   "refused {count} of {total} replicated events from {peer}, first: {first}",
                                   count=rejected, total=count, peer=self.peer_node, first=first)
            self.sendString(REJECTED + _encode({"offset": start, "count": rejected, "first": first}).encode("ascii"))

    def _gap(self, message):
        if len(message) != _OFFSET.size:
            raise ProtocolError("malformed gap: expected an 8-byte offset")
        _, offset = _OFFSET.unpack(message)
        if offset < self.expected:
            raise ProtocolError(f"gap back to offset {offset}, already at {self.expected}")
        self.factory._gap(self, self.expected, offset)
        self.expected = offset
        self.factory.applied[self.log_id] = offset
        self._ack_due = offset

    # -- closing -----------------------------------------------------------------

    def _peer_error(self, message):
        reason = message[1:301].decode("utf-8", "replace")
        self.factory.throttled.emit(("error", self.peer_node), reason, "warn",
                                    "replication sender {peer} closed its stream: {error}",
                                    peer=self.peer_node or self._peer_address(), error=reason)
        self.state = "closed"
        self.transport.loseConnection()

    def _fail(self, reason):
        if self.state == "closed":
            return
        if self.state != "streaming":
            self.factory.handshake_failures += 1
        # Keyed by host: a misconfigured peer dials again from a new port each time.
        host = getattr(self.transport.getPeer(), "host", "?") if self.transport is not None else "?"
        self.factory.throttled.emit(("fail", host), reason, "warn",
                                    "closed a replication stream from {peer} ({address}): {error}",
                                    peer=self.peer_node or "?", address=self._peer_address(), error=reason)
        self.close(reason)

    def close(self, reason):
        """Tells the sender why (``E``) and closes."""
        if self.state == "closed":
            return
        self.state = "closed"
        self.sendString(ERROR + reason.encode("utf-8")[:1000])
        self.transport.loseConnection()

    def _peer_address(self):
        address = self.transport.getPeer() if self.transport is not None else None
        return f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"

    def connectionLost(self, reason=None):
        self.state = "closed"
        for timer in (self._timeout, self._ack_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timeout = self._ack_timer = None
        self.factory._lost(self)


class ReceiverFactory(Factory):
    """The replication listener's factory: ``serverFromString(reactor,
    "tcp:7070:interface=...").listen(factory)``.

    ``apply_frame(events)`` gets each frame's valid events as a list of
    ``(event_type, typed event)`` pairs (``core.events``) and applies them
    (with origin peer: never replicated again). ``secrets``: the cluster
    secrets, the first signs (see ``normalise_secrets``). ``own_log_id``:
    this node's own log, refused as a peer's (a node dialling itself).
    ``on_gap(peer_node, log_id, skipped)``: the sender skipped ``skipped``
    entries this node lacks; it needs a repair. ``ack_delay`` (s): how long
    an acknowledgement to a version 2 sender may wait for more frames (0:
    one per network read, as in version 1). ``observe_lag(seconds)``: once
    per applied version 2 frame, the time from its oldest entry's append on
    the sender to its application here (both hosts' wall clocks, so their
    skew is included; negative values count as 0).

    Counters (plain ints, read at scrape time): ``frames``, ``entries``
    (received), ``events`` (valid), ``rejected``, ``bytes``, ``gaps``,
    ``skipped`` (entries lost in gaps), ``acks`` (sent), ``connections_made``,
    ``handshake_failures``, ``apply_errors``; ``streams`` maps log ids to the
    connection streaming them; ``applied`` log ids to offsets.
    """

    noisy = False

    def __init__(self, node_id, secrets, apply_frame, clock, *, own_log_id=None, on_gap=None,
                 handshake_timeout=5.0, max_message_bytes=MAX_MESSAGE_BYTES, known_logs=KNOWN_LOGS,
                 event_types=None, ack_delay=ACK_DELAY, observe_lag=None):
        self.node_id = node_id
        self.secrets = normalise_secrets(secrets)
        self.apply_frame = apply_frame
        self.clock = clock
        self.own_log_id = own_log_id
        self.on_gap = on_gap
        self.handshake_timeout = handshake_timeout
        self.max_message_bytes = max_message_bytes
        self.known_logs = known_logs
        self.event_types = EVENT_TYPES if event_types is None else event_types
        self.ack_delay = ack_delay
        self.observe_lag = observe_lag
        self.applied = OrderedDict()  # sender log id -> offset applied, oldest first
        self.streams = {}  # sender log id -> its streaming ReceiverProtocol
        self.throttled = ThrottledLog(log, clock, LOG_INTERVAL)
        self.frames = self.entries = self.events = self.rejected = self.bytes = 0
        self.gaps = self.skipped = self.connections_made = self.handshake_failures = self.apply_errors = 0
        self.acks = 0

    def buildProtocol(self, addr):
        return ReceiverProtocol(self)

    def set_applied(self, log_id, offset):
        """Records that every entry of ``log_id`` before ``offset`` is
        applied: a warm start that merged a snapshot taken at that position
        (``ReplicationLog.position()`` on the peer) calls this, so the peer's
        stream resumes there."""
        self.applied[log_id] = offset
        self.applied.move_to_end(log_id)
        while len(self.applied) > self.known_logs:
            self.applied.popitem(last=False)

    def _streaming(self, protocol):
        log_id = protocol.log_id
        older = self.streams.get(log_id)
        if older is not None and older is not protocol:
            # The sender reconnected before this side noticed the old
            # connection die: only the newest may move the offset.
            older.close("superseded by a newer connection from the same sender")
        self.streams[log_id] = protocol
        self.set_applied(log_id, protocol.expected)
        log.info("replication stream from {peer} (log {log_id}) starts at offset {offset}", peer=protocol.peer_node,
                 log_id=log_id, offset=protocol.expected)

    def _lost(self, protocol):
        if protocol.log_id is not None and self.streams.get(protocol.log_id) is protocol:
            del self.streams[protocol.log_id]

    def _gap(self, protocol, applied, start):
        skipped = start - applied
        self.gaps += 1
        self.skipped += skipped
        log.warn("replication stream from {peer} skips {skipped} events this node lacks "
                 "(it fell behind the sender's log): a repair is needed",
                 peer=protocol.peer_node, skipped=skipped)
        if self.on_gap is not None:
            try:
                self.on_gap(protocol.peer_node, protocol.log_id, skipped)
            except Exception:
                log.failure("on_gap failed")

    def _count_frame(self, entries, events, rejected, size):
        self.frames += 1
        self.entries += entries
        self.events += events
        self.rejected += rejected
        self.bytes += size

    def status(self):
        """One dict per sender streaming to this node."""
        return [{"peer": p.peer_node, "log": log_id, "version": p.version, "applied": p.expected,
                 "frames": p.frames, "entries": p.entries, "rejected": p.rejected, "bytes": p.bytes, "acks": p.acks}
                for log_id, p in self.streams.items()]


# -- sender ----------------------------------------------------------------------


class SenderProtocol(Int32StringReceiver):
    """One outgoing connection of a ``PeerStream``."""

    MAX_LENGTH = HANDSHAKE_MAX_BYTES

    def __init__(self, link):
        self.link = link
        self.state = "challenge"  # -> "welcome" -> "streaming"; "closed"
        self.version = None  # the receiver's choice, in its challenge
        self._nonce = new_nonce()
        self.start = None
        self.refused = False  # the peer closed with an error message
        self.progressed = False  # the peer acknowledged a frame on this connection
        self.peer_node = None
        self.failure_reason = None
        self._timeout = None

    def connectionMade(self):
        _no_delay(self.transport)
        link = self.link
        owner = link.owner
        self._timeout = owner.clock.callLater(owner.handshake_timeout, self._handshake_timed_out)
        # Acknowledgements are asked for at half the window, so the next
        # frames never wait for one while the receiver holds it back.
        hello = {"v": MIN_VERSION, "max_v": VERSION, "node": owner.node_id, "log": owner.log.log_id,
                 "nonce": self._nonce, "ack_frames": max(1, min(owner.window // 2, 2**31 - 1)),
                 "ack_bytes": max(1, min(owner.window_bytes // 2, INT64_MAX))}
        self.sendString(HELLO + _encode(hello).encode("ascii"))

    def _handshake_timed_out(self):
        self._timeout = None
        try:
            if self.state in ("challenge", "welcome"):
                self.fail(f"no answer to the handshake within {self.link.owner.handshake_timeout:g} s")
        except Exception:
            log.failure("closing a replication connection after its handshake timeout failed")

    def stringReceived(self, message):
        if self.state == "closed":
            return
        kind = message[:1]
        try:
            if kind == ACK and self.state == "streaming":
                self.link._acked(_offset_message(message, "ack"))
            elif kind == ACK and self.state == "welcome":
                self._welcome(_offset_message(message, "welcome"))
            elif kind == REJECTED and self.state == "streaming":
                self.link._rejected(_json_message(message, "rejection notice"))
            elif kind == CHALLENGE and self.state == "challenge":
                self._challenge(message)
            elif kind == ERROR:
                self.failure_reason = "the peer refused: " + message[1:301].decode("utf-8", "replace")
                self.refused = True
                self.state = "closed"
                self.transport.loseConnection()
            else:
                raise ProtocolError(f"unexpected message {kind!r} in state {self.state}")
        except (ProtocolError, InvalidInput) as e:
            self.fail(e.reason if isinstance(e, InvalidInput) else str(e))

    def _challenge(self, message):
        owner = self.link.owner
        challenge = _json_message(message, "challenge")
        self.version = _challenge_version(challenge)
        self.peer_node = _node_field(challenge, "challenge")
        receiver_nonce = _hex_field(challenge, "nonce", "challenge")
        applied = _offset_field(challenge, "applied", "challenge", nullable=True)
        log_id = owner.log.log_id
        verify(owner.secrets, _proof_field(challenge, "challenge"), b"receiver", self._nonce, receiver_nonce,
               owner.node_id, self.peer_node, log_id, applied)
        self.start = self.link._handshake(self, applied)  # InvalidInput: a claim beyond our end
        answer = {"proof": sign(owner.secrets, b"sender", self._nonce, receiver_nonce, owner.node_id,
                                self.peer_node, log_id, self.start), "start": self.start}
        self.sendString(PROOF + _encode(answer).encode("ascii"))
        self.state = "welcome"

    def _welcome(self, offset):
        if offset != self.start:
            raise ProtocolError(f"welcomed at offset {offset}, the stream starts at {self.start}")
        self.state = "streaming"
        self.MAX_LENGTH = MAX_MESSAGE_BYTES
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        self.link._streaming(self)

    def send_frame(self, start, count, payload, sent_at):
        """Writes one frame (``sent_at``: its oldest entry's append time,
        which version 1 frames do not carry); returns its size in bytes.
        ``push`` puts what was written on the socket."""
        if self.version >= 2:
            header = _FRAME_TIMED.pack(FRAME, start, count, sent_at)
        else:
            header = _FRAME.pack(FRAME, start, count)
        self.transport.writeSequence((_PREFIX.pack(len(header) + len(payload)), header, payload))
        return 4 + len(header) + len(payload)

    def send_gap(self, offset):
        self.transport.write(_PREFIX.pack(_OFFSET.size) + _OFFSET.pack(GAP, offset))

    def push(self):
        _push(self.transport)

    def fail(self, reason):
        """Tells the receiver why (``E``) and closes."""
        if self.state == "closed":
            return
        self.failure_reason = reason
        self.state = "closed"
        self.sendString(ERROR + reason.encode("utf-8")[:1000])
        self.transport.loseConnection()

    def abort(self, reason):
        """Drops the connection at once (the peer stopped answering)."""
        if self.state == "closed":
            return
        self.failure_reason = reason
        self.state = "closed"
        self.transport.abortConnection()

    def connectionLost(self, reason=None):
        self.state = "closed"
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None
        self.link._connection_lost(self, reason)


class _SenderFactory(Factory):
    noisy = False

    def __init__(self, link):
        self.link = link

    def buildProtocol(self, addr):
        return SenderProtocol(self.link)


class PeerStream:
    """One peer: its cursor in the log, its connection and its counters.

    Counters and state (plain attributes, for metrics and the console):
    ``connected``, ``connects`` (handshakes completed), ``reconnects`` (those
    after the first), ``resumes``, ``fresh_starts``, ``repairs`` (the peer
    fell behind the log and needs anti-entropy or a snapshot),
    ``frames_sent``, ``events_sent``, ``bytes_sent``, ``acks``,
    ``rejected`` (entries the peer refused as invalid), ``gaps_sent``,
    ``failures`` (connections that failed or that the peer refused, since
    the stream last made progress; they set the back-off),
    ``last_error``; ``window_in_use()``, ``lag_events()``,
    ``lag_seconds()``.
    """

    def __init__(self, owner, peer, name, endpoint):
        self.owner = owner
        self.peer = peer
        self.name = name
        self.endpoint = endpoint
        self.cursor = owner.log.cursor(name)
        self.cursor.on_fell_behind = self._fell_behind
        self.protocol = None  # the streaming connection, once authenticated
        self._connection = None  # the connection being set up or streaming
        self._attempt = None  # Deferred of a connect in progress
        self._retry = None  # DelayedCall of the next attempt
        self._ack_check = None  # DelayedCall watching for a silent peer
        self._progress_at = 0.0  # when the window last moved
        self.closed = False
        self.connects = self.reconnects = self.resumes = self.fresh_starts = self.repairs = 0
        self.frames_sent = self.events_sent = self.bytes_sent = self.acks = self.rejected = self.gaps_sent = 0
        self.failures = 0
        self.last_error = None
        self._outcome = None
        self._gap = 0
        self._throttled = ThrottledLog(log, owner.clock, LOG_INTERVAL)

    # -- connecting --------------------------------------------------------------

    def start(self):
        self._connect()

    def _connect(self):
        self._retry = None
        if self.closed or self._connection is not None or self._attempt is not None:
            return
        try:
            d = self._attempt = self.endpoint.connect(_SenderFactory(self))
        except Exception:
            self._attempt = None
            self._attempt_failed(Failure())
            return
        d.addCallbacks(self._tcp_connected, self._attempt_failed)

    def _tcp_connected(self, protocol):
        self._attempt = None
        self._connection = protocol
        if self.closed:
            protocol.transport.loseConnection()

    def _attempt_failed(self, failure):
        self._attempt = None
        if self.closed or failure.check(defer.CancelledError):
            return
        self._failed(_describe(failure))

    def _failed(self, reason):
        self.failures += 1
        self.last_error = reason
        self._throttled.emit("failing", reason, "warn",
                             "replication stream to {peer} failing ({error}); retrying with back-off, "
                             "{lag} events waiting", peer=self.name, error=reason, lag=self.cursor.lag_events())
        self._schedule_retry()
        if self.owner.on_failure is not None:
            try:
                self.owner.on_failure(self, reason)
            except Exception:
                log.failure("on_failure failed")

    def _schedule_retry(self):
        if self.closed or self._retry is not None:
            return
        owner = self.owner
        delay = min(owner.backoff_max, owner.backoff_first * 2 ** min(max(self.failures - 1, 0), 16))
        self._retry = owner.clock.callLater(delay, self._connect)

    def _handshake(self, protocol, applied):
        """The receiver's offset -> where this connection starts."""
        start, self._outcome, self._gap = self.cursor.restart(applied)
        return start

    def _streaming(self, protocol):
        """The receiver accepted the handshake."""
        self.protocol = protocol
        if self._outcome == RESUMED:
            self.resumes += 1
        elif self._outcome == FRESH:
            self.fresh_starts += 1
        # REPAIR was counted when the cursor fell off (on_fell_behind).
        if self._gap:
            self.gaps_sent += 1
        if self.connects:
            self.reconnects += 1
        self.connects += 1
        # ``failures`` is reset by the first acknowledged frame, not here: a
        # peer that accepts the handshake and then refuses the stream must
        # not be dialled again at the first back-off step forever.
        self.last_error = None
        log.info("replication stream to {peer} ({node}) {outcome} at offset {offset}", peer=self.name,
                 node=protocol.peer_node, outcome=self._outcome, offset=self.cursor.sent)
        self.flush()

    def _connection_lost(self, protocol, reason):
        if protocol is not self._connection:
            return
        self._connection = None
        was_streaming = self.protocol is protocol
        self.protocol = None
        if self._ack_check is not None and self._ack_check.active():
            self._ack_check.cancel()
        self._ack_check = None
        if self.closed:
            self.owner._link_closed(self)
            return
        why = protocol.failure_reason or (_describe(reason) if reason is not None else "connection closed")
        if was_streaming and protocol.progressed and not protocol.refused:
            self.last_error = why
            log.info("replication stream to {peer} lost ({reason}); reconnecting", peer=self.name, reason=why)
            self._schedule_retry()
        else:
            self._failed(why)

    # -- sending -----------------------------------------------------------------

    def flush(self):
        """Sends what the window allows; called at the end of a turn with
        appends and on every acknowledgement."""
        protocol = self.protocol
        if protocol is None:
            return
        owner = self.owner
        cursor = self.cursor
        written = False
        if cursor.lost:
            protocol.send_gap(cursor.sent)
            cursor.gap_announced()
            self.gaps_sent += 1
            written = True
        idle = not cursor.in_flight
        window, window_bytes = owner.window, owner.window_bytes
        max_events, max_bytes = owner.max_frame_events, owner.max_frame_bytes
        log_ = owner.log
        frame, appended_at = log_.frame, log_.appended_at
        while True:
            span = cursor.next_frame(window, max_events, max_bytes, window_bytes)
            if span is None:
                break
            start, stop = span
            self.bytes_sent += protocol.send_frame(start, stop - start, frame(start, stop), appended_at(start))
            self.frames_sent += 1
            self.events_sent += stop - start
            written = True
        if written:
            protocol.push()
        if idle and cursor.in_flight:
            self._progress_at = owner.clock.seconds()
            if self._ack_check is None:
                self._ack_check = owner.clock.callLater(owner.ack_timeout, self._check_acks)

    def _acked(self, offset):
        cursor = self.cursor
        previous = cursor.acked
        frames = cursor.ack(offset)  # InvalidInput beyond what was sent: the protocol closes
        self.acks += 1
        owner = self.owner
        self._progress_at = owner.clock.seconds()
        if offset > previous:
            self.protocol.progressed = True
        if self.failures and offset > previous:
            log.info("replication stream to {peer} works again after {failures} failed attempts",
                     peer=self.name, failures=self.failures)
            self.failures = 0
            self._throttled.reset("failing")
        if owner.on_ack is not None and offset > previous:
            # One observation per acknowledgement: the oldest entry's lag.
            owner.on_ack(self, offset - previous, owner.log.age(previous))
        if frames:
            self.flush()

    def _check_acks(self):
        self._ack_check = None
        try:
            if self.protocol is None or not self.cursor.in_flight:
                return
            owner = self.owner
            silent = owner.clock.seconds() - self._progress_at
            if silent >= owner.ack_timeout:
                self.protocol.abort(f"no acknowledgement for {silent:.1f} s")
            else:
                self._ack_check = owner.clock.callLater(owner.ack_timeout - silent, self._check_acks)
        except Exception:
            log.failure("checking replication acknowledgements of {peer} failed", peer=self.name)

    def _rejected(self, notice):
        count = notice.get("count")
        if type(count) is int and count > 0:
            self.rejected += count
        self._throttled.emit("rejected", "rejected", "warn",
                             "peer {peer} refused {count} replicated events, first: {first}",
                             peer=self.name, count=count, first=str(notice.get("first"))[:300])

    def _fell_behind(self, cursor, skipped):
        self.repairs += 1
        log.warn("peer {peer} fell behind the replication log ({skipped} events it lacks are gone): "
                 "it needs a repair", peer=self.name, skipped=skipped)
        if self.owner.on_repair is not None:
            try:
                self.owner.on_repair(self, skipped)
            except Exception:
                log.failure("on_repair failed")

    # -- state -------------------------------------------------------------------

    @property
    def connected(self):
        return self.protocol is not None

    def window_in_use(self):
        """Frames sent and not yet acknowledged."""
        return len(self.cursor.in_flight)

    def lag_events(self):
        return self.cursor.lag_events()

    def lag_seconds(self):
        return self.cursor.lag_seconds()

    @property
    def busy(self):
        return self.cursor.acked < self.owner.log.end

    def status(self):
        return {"peer": self.name, "mode": "stream", "connected": self.connected,
                "lag_events": self.lag_events(), "lag_ms": round(self.lag_seconds() * 1000, 3),
                "window": self.window_in_use(), "frames_sent": self.frames_sent, "events_sent": self.events_sent,
                "bytes_sent": self.bytes_sent, "acks": self.acks,
                "version": self.protocol.version if self.protocol is not None else None,
                "reconnects": self.reconnects, "resumes": self.resumes, "fresh_starts": self.fresh_starts,
                "repairs": self.repairs, "failures": self.failures, "rejected": self.rejected,
                "last_error": self.last_error}

    def close(self):
        """The peer left (or the node stops): no more connections."""
        self.closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        self.owner.log.remove_cursor(self.cursor)
        if self._connection is not None:
            # After a drain (or for a peer that left) nothing is worth waiting
            # for: a stopped peer with full buffers would hold a graceful close.
            self._connection.transport.abortConnection()
        else:
            self.owner._link_closed(self)


def _describe(failure):
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return "timed out"
    error = failure.value
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


class StreamReplicator(Service):
    """Streams this node's log to every peer.

    ``log``: this node's ``ReplicationLog``; ``node_id``: how this node names
    itself to peers (its advertised address); ``secrets``: the cluster
    secrets, the first signs; ``clock``: the reactor (``callLater``,
    ``seconds``); ``connect(peer)``: a client endpoint to the peer's
    replication listener (e.g. ``HostnameEndpoint(reactor, host,
    replication_port, timeout=0.5)`` or a TLS one).

    ``window``, ``window_bytes``: frames and bytes of frames unacknowledged
    per peer at most (a version 2 receiver is asked to acknowledge at half
    of either, so a stream never waits for its ack delay); ``max_frame_events``,
    ``max_frame_bytes``: a frame's bounds (a single larger entry goes alone;
    keep it under the receiver's ``MAX_MESSAGE_BYTES``);
    ``handshake_timeout``, ``ack_timeout`` (s): a peer silent for that long
    is dropped and dialled again; ``backoff_first``, ``backoff_max`` (s):
    delays between failed attempts.
    ``on_repair(link, skipped)``: a peer fell behind the log;
    ``on_ack(link, events, lag_seconds)``: once per acknowledgement, with the
    age of the oldest entry it acknowledged (for a lag histogram);
    ``on_failure(link, reason)``: a connection attempt failed or was refused
    (``link.failures`` counts them since the last progress), e.g. to fall
    back to HTTP replication for a peer without a replication listener.

    ``event_accepted`` is the node's event listener; ``peers_changed`` the
    discovery's.
    """

    name = "stream-replication"

    def __init__(self, log, node_id, secrets, clock, connect, *, window=WINDOW, window_bytes=WINDOW_BYTES,
                 max_frame_events=4096, max_frame_bytes=2**20, handshake_timeout=5.0, ack_timeout=10.0,
                 backoff_first=0.05, backoff_max=1.0, on_repair=None, on_ack=None, name_peer=None, on_failure=None):
        self.log = log
        self.node_id = node_id
        self.secrets = normalise_secrets(secrets)
        self.clock = clock
        self.connect = connect
        self.window = window
        self.window_bytes = window_bytes
        self.max_frame_events = max_frame_events
        self.max_frame_bytes = max_frame_bytes
        self.handshake_timeout = handshake_timeout
        self.ack_timeout = ack_timeout
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        self.on_repair = on_repair
        self.on_ack = on_ack
        self.on_failure = on_failure
        self._name_peer = name_peer or _peer_name
        self.links = {}  # peer -> PeerStream
        self._link_list = ()
        self._closing = {}  # PeerStream -> Deferred fired when its connection is gone
        self._flush_call = None
        self.flushes = 0

    # -- hooks -----------------------------------------------------------------

    def event_accepted(self, event_type, event, trace_id=None):
        """A node event listener: appends; the flush leaves after this turn."""
        self.log.append(event_type, event)

    def peers_changed(self, joined, left):
        for peer in left:
            link = self.links.pop(peer, None)
            if link is not None:
                self._close_link(link)
        for peer in joined:
            if peer not in self.links:
                link = self.links[peer] = PeerStream(self, peer, self._name_peer(peer), self.connect(peer))
                if self.running:
                    link.start()
        self._link_list = tuple(self.links.values())
        self._arm()

    # -- flushing --------------------------------------------------------------

    def _arm(self):
        self.log.wake = self._wake if self._link_list and self.running else None

    def _wake(self):
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self):
        self._flush_call = None
        self.flushes += 1
        for link in self._link_list:
            try:
                link.flush()
            except Exception:
                log.failure("replication flush to {peer} failed", peer=link.name)
                if link.protocol is not None:
                    link.protocol.abort("internal error while sending")
        self._arm()

    # -- service ---------------------------------------------------------------

    def startService(self):
        super().startService()
        for link in self._link_list:
            link.start()
        self._arm()

    @defer.inlineCallbacks
    def drain(self, timeout=2.0):
        """Fires when every connected peer acknowledged everything appended
        so far, or after ``timeout`` seconds."""
        deadline = self.clock.seconds() + timeout
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
            self._flush()
        while (any(link.connected and link.busy for link in self._link_list)
               and self.clock.seconds() < deadline):
            yield task.deferLater(self.clock, 0.01, lambda: None)

    @defer.inlineCallbacks
    def stopService(self):
        """Sends what the peers have not acknowledged (at most 2 s), then
        closes every stream."""
        yield self.drain()
        super().stopService()
        self.log.wake = None
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        links, self.links, self._link_list = self._link_list, {}, ()
        for link in links:
            self._close_link(link)
        if self._closing:
            yield defer.DeferredList(list(self._closing.values()))

    def _close_link(self, link):
        d = self._closing[link] = defer.Deferred()
        link.close()
        return d

    def _link_closed(self, link):
        d = self._closing.pop(link, None)
        if d is not None:
            d.callback(None)

    def peer_status(self):
        return [self.links[peer].status() for peer in sorted(self.links)]


def _peer_name(peer):
    host, port = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Gate(Factory):
    """The listener's factory: no protocol (the connection is closed at once)
    until the owner opens."""

    noisy = False

    def __init__(self, owner):
        self.owner = owner

    def buildProtocol(self, addr):
        owner = self.owner
        if not owner.opened:
            owner.turned_away += 1
            return None
        return owner.factory.buildProtocol(addr)


class StreamListener(Service):
    """Serves a ``ReceiverFactory`` on ``endpoint`` (a server endpoint),
    refusing connections (closed at once, before any byte) until ``open()``:
    a starting node takes its warm-start snapshot and records the serving
    peer's log position (``factory.set_applied``) before any stream may
    start. ``port`` is the port listened on (None before it listens), for
    ``/v1/node/status``, from which peers learn where to connect."""

    name = "stream-listener"

    def __init__(self, endpoint, factory):
        self.endpoint = endpoint
        self.factory = factory
        self.listening = None
        self.opened = False
        self.turned_away = 0  # connections closed because the node was not open yet

    @property
    def port(self):
        return self.listening.getHost().port if self.listening is not None else None

    def open(self, _=None):
        self.opened = True
        return _

    def startService(self):
        super().startService()
        d = self.endpoint.listen(_Gate(self))
        d.addCallbacks(self._listening, self._failed)
        return d

    def _failed(self, failure):
        # The node still serves and replicates over HTTP: its status reports
        # no stream port, so peers keep sending it HTTP batches.
        log.failure("the replication stream listener could not listen; peers will use HTTP replication", failure)

    def _listening(self, port):
        self.listening = port
        log.info("replication stream listener on port {port}", port=port.getHost().port)

    def stopService(self):
        super().stopService()
        for protocol in list(self.factory.streams.values()):
            protocol.transport.abortConnection()
        listening, self.listening = self.listening, None
        return listening.stopListening() if listening is not None else None
