"""Replication streams: decoding as strict as a client request, the
handshake (wrong secret, replay, rotation), flushing at the end of a turn,
the window, acknowledgements, resuming after a reconnect, falling off the
log's tail; in memory (MemoryReactorClock, iosim) and over real loopback
TCP."""

import json

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.test.iosim import ConnectionCompleter

from metacenter.api import bodies
from metacenter.core.errors import InvalidInput
from metacenter.core.events import (EVENT_ADD, EVENT_CACHE_SAVE, EVENT_DELETE, EVENT_ENGINE_RESET,
                                    EVENT_LEASE_KEEPALIVE, EVENT_LEASE_REVOKE, EVENT_PROMPT_DELETE, EVENT_REFRESH,
                                    ORIGIN_PEER, CacheSave, EngineReset, LeaseKeepalive, LeaseRevoke, LoadAdd,
                                    LoadDelete, Refresh)
from metacenter.core.replog import ReplicationLog, encode_event
from metacenter.cluster import stream
from metacenter.cluster.stream import ReceiverFactory, StreamReplicator, decode_entries
from metacenter.runtime.node import build_node

PORT = 7070
PEER = ("127.0.0.2", PORT)
TS = 1_700_000_000_000_000_000


def add(i, cluster="c", ip="10.0.0.1"):
    return EVENT_ADD, LoadAdd((cluster, f"r{i}", ip, i, TS + i))


def frame_of(*entries):
    return b"[" + b",".join(entries) + b"]"


# -- decoding ----------------------------------------------------------------------


def test_valid_entries_decode_to_the_events_the_client_parsers_make():
    events = [add(1), (EVENT_DELETE, LoadDelete(("r1", TS))), (EVENT_PROMPT_DELETE, LoadDelete(("r2", None))),
              (EVENT_CACHE_SAVE, CacheSave(("c", [1, 2**64 - 1], "10.0.0.9"))),
              (EVENT_ADD, LoadAdd(("集群", "r\u00e9", "fd00::1", 0, None)))]
    decoded, rejected, first = decode_entries(frame_of(*(encode_event(*e) for e in events)), len(events))
    assert (rejected, first) == (0, None)
    assert decoded == events
    assert all(type(e) is type(d) for (_, e), (_, d) in zip(events, decoded))


def test_addresses_are_validated_and_kept_as_spelled_like_a_clients():
    # Issue 10: the core keys engines by the canonical address and answers
    # with the first spelling, so every path passes the spelling through.
    decoded, _, _ = decode_entries(frame_of(b'["load.stats.set","c","r","fd00:0::0001",1,null]'), 1)
    assert decoded == [(EVENT_ADD, LoadAdd(("c", "r", "fd00:0::0001", 1, None)))]


def test_the_new_event_types_decode_like_client_requests():
    events = [(EVENT_ADD, LoadAdd(("c", "r", "10.0.0.1", 1, TS, 7, "gw-1"))),
              (EVENT_ENGINE_RESET, EngineReset(("c", "2001:DB8::1"))),
              (EVENT_LEASE_KEEPALIVE, LeaseKeepalive(("gw-1", 5000))),
              (EVENT_LEASE_REVOKE, LeaseRevoke(("gw-1",))),
              (EVENT_REFRESH, Refresh((("r1", "r2"),)))]
    decoded, rejected, first = decode_entries(frame_of(*(encode_event(*e) for e in events)), len(events))
    assert (rejected, first) == (0, None)
    assert [(t, tuple(e)) for t, e in decoded] == [
        (EVENT_ADD, ("c", "r", "10.0.0.1", 1, TS, 7, "gw-1")), (EVENT_ENGINE_RESET, ("c", "2001:DB8::1")),
        (EVENT_LEASE_KEEPALIVE, ("gw-1", 5000)), (EVENT_LEASE_REVOKE, ("gw-1",)),
        (EVENT_REFRESH, (("r1", "r2"),))]


@pytest.mark.parametrize("entry, reason", [
    (b'["load.engine.reset","c","10.0.0.300"]', "field 'ip' must be an IPv4 or IPv6 address"),
    (b'["load.engine.reset","c"]', "event 'load.engine.reset' must have 2 fields"),
    (b'["load.lease.keepalive","gw",999]', "field 'ttl_ms' must be an integer in [1000, 300000], got 999"),
    (b'["load.lease.keepalive","",1000]', "field 'lease' must be a string of 1 to 128 characters"),
    (b'["load.lease.revoke",true]', "field 'lease' must be a string of 1 to 128 characters, got boolean"),
    (b'["load.refresh",["r",""]]', "field 'request_ids' item 1 must be a non-empty string"),
    (b'["load.refresh","r"]', "field 'request_ids' must be an array of strings, got string"),
    (b'["load.stats.set","c","r","10.0.0.1",1,null,-1,null]',
     "field 'prompt_tokens' must be an integer in [0, 2147483647], got -1"),
    (b'["load.stats.set","c","r","10.0.0.1",1,null,0,5]', "field 'lease' must be a string"),
])
def test_a_bad_new_event_is_refused_with_the_clients_reason(entry, reason):
    good = encode_event(*add(1))
    decoded, rejected, first = decode_entries(frame_of(good, entry, good), 3)
    assert rejected == 1 and len(decoded) == 2
    assert first.startswith("event 1: " + reason), first


@pytest.mark.parametrize("entry, reason", [
    (b'["load.stats.set","c","r","10.0.0.1",true,null]',
     "field 'prompt_length' must be an integer in [0, 2147483647], got boolean"),
    (b'["load.stats.set","c","r","10.0.0.1",-1,null]',
     "field 'prompt_length' must be an integer in [0, 2147483647], got -1"),
    (b'["load.stats.set","c","r","10.0.0.300",1,null]', "field 'ip' must be an IPv4 or IPv6 address, got '10.0.0.300'"),
    (b'["load.stats.set","","r","10.0.0.1",1,null]', "field 'cluster' must not be empty"),
    (b'["load.stats.set","c","\\ud800","10.0.0.1",1,null]', "field 'request_id' must be valid Unicode text"),
    (b'["load.stats.set","c","r","10.0.0.1",1,1.5]', "field 'timestamp' must be an integer"),
    (b'["load.stats.delete",7,null]', "field 'request_id' must be a string, got number"),
    (b'["cache.save","c",[1,-2],"10.0.0.1"]', "field 'prompt_hash' item 1 must be an unsigned 64-bit integer, got -2"),
    (b'["cache.save","c",[],"10.0.0.1"]', "field 'prompt_hash' must not be empty"),
    (b'["load.stats.set","c","r","10.0.0.1",1]', "event 'load.stats.set' must have 5 to 7 fields"),
    (b'["engine.reset","c"]', "Unsupported event type 'engine.reset'"),
    (b'{"type":"load.stats.delete"}', "an event must be an array"),
    (b'[]', "an event must be an array"),
])
def test_an_invalid_entry_is_refused_with_the_clients_reason_and_costs_no_other(entry, reason):
    good = encode_event(*add(1))
    decoded, rejected, first = decode_entries(frame_of(good, entry, good), 3)
    assert rejected == 1
    assert first.startswith("event 1: " + reason)
    assert decoded == [add(1), add(1)]


def test_a_malformed_frame_refuses_all_its_entries():
    assert decode_entries(b'[["load.stats.delete","r",null]', 1)[1:] == (1, "malformed frame: Expecting ',' "
                                                                           "delimiter: line 1 column 32 (char 31)")
    assert decode_entries(b'{"a":1}', 3)[:2] == ([], 3)
    assert decode_entries(frame_of(encode_event(*add(1))), 2)[:2] == ([], 2)  # count does not match
    assert decode_entries(b"\xff", 1)[:2] == ([], 1)


_values = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**63 + 2), st.floats(allow_nan=False),
                    st.text(max_size=4), st.sampled_from(["10.0.0.1", "::1", "fd00:0::1", "", "\ud800", "é"]),
                    st.lists(st.integers(0, 3), max_size=2))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([EVENT_ADD, EVENT_DELETE, EVENT_CACHE_SAVE]), st.lists(_values, min_size=5, max_size=5))
def test_the_fast_path_accepts_exactly_what_the_client_parser_accepts(event_type, values):
    kind = stream.EVENT_TYPES[event_type]
    fields = values[:len(kind.fields)]
    try:
        expected = ("ok", kind.parse(dict(zip(kind.fields, fields))))
    except InvalidInput as e:
        expected = ("refused", e.reason)
    entry = json.dumps([event_type, *fields]).encode()
    decoded, rejected, first = decode_entries(b"[" + entry + b"]", 1)
    got = ("ok", decoded[0][1]) if decoded else ("refused", first.removeprefix("event 0: "))
    assert got == expected
    if decoded:
        assert type(decoded[0][1]) is type(expected[1])


# -- in memory: one sender, one receiver ---------------------------------------------------


class Pair:
    """A StreamReplicator and a ReceiverFactory on one MemoryReactorClock;
    connections are completed (``connect``) and pumped by hand."""

    def __init__(self, sender_secrets=("s3cret",), receiver_secrets=("s3cret",), capacity=10000, **options):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000)
        self.frames = []
        self.gaps = []
        self.repairs = []
        self.acks = []
        self.lags = []  # the receiver's apply lag, per frame
        self.receiver = self.make_receiver(receiver_secrets)
        self.log = ReplicationLog(self.reactor, capacity=capacity)
        self.sender = StreamReplicator(
            self.log, "sender-node", sender_secrets, self.reactor,
            lambda peer: TCP4ClientEndpoint(self.reactor, peer[0], peer[1]),
            on_repair=lambda link, skipped: self.repairs.append(skipped),
            on_ack=lambda link, events, lag: self.acks.append((events, lag)), **options)
        self.sender.startService()
        self.sender.peers_changed({PEER}, set())
        self.link = self.sender.links[PEER]
        self.completer = ConnectionCompleter(self.reactor)
        self.pump = None

    def make_receiver(self, secrets, port=PORT):
        receiver = ReceiverFactory("receiver-node", secrets, self.frames.append, self.reactor,
                                   on_gap=lambda node, log_id, skipped: self.gaps.append(skipped),
                                   observe_lag=self.lags.append)
        self.reactor.listenTCP(port, receiver)
        return receiver

    def connect(self):
        self.pump = self.completer.succeedOnce()
        assert self.pump is not None, "no connection attempt waiting"
        self.pump.flush()
        return self.pump

    def append(self, start, n):
        for i in range(start, start + n):
            self.sender.event_accepted(*add(i), None)

    def applied_ids(self):
        return [event.request_id for frame in self.frames for _, event in frame]

    def cut(self, lose_in_flight=False):
        """The network breaks; what is in flight is lost if asked."""
        if lose_in_flight:
            self.pump.clientIO.getOutBuffer()
            self.pump.serverIO.getOutBuffer()
        self.pump.clientIO.loseConnection()
        self.pump.flush()

    def settle(self):
        """Delivers what is on the wire, lets the receiver's ack delay pass
        and delivers its acknowledgement."""
        self.pump.flush()
        self.reactor.advance(self.receiver.ack_delay)
        self.pump.flush()

    def retry(self):
        """Lets the back-off pass and completes the next connection."""
        self.reactor.advance(self.sender.backoff_max + 0.01)
        return self.connect()


def test_events_stream_after_an_authenticated_handshake():
    pair = Pair()
    pair.append(0, 3)
    pair.connect()
    assert pair.link.connected and pair.link.fresh_starts == 1
    assert pair.applied_ids() == ["r0", "r1", "r2"]
    pair.settle()
    assert pair.link.cursor.acked == 3 and pair.link.lag_events() == 0
    assert pair.receiver.applied[pair.log.log_id] == 3
    assert (pair.receiver.frames, pair.receiver.events, pair.receiver.rejected) == (1, 3, 0)
    assert pair.link.frames_sent == 1 and pair.link.events_sent == 3 and pair.link.bytes_sent > 0
    assert pair.acks == [(3, pytest.approx(stream.ACK_DELAY))]  # acknowledged after the receiver's delay


def test_events_leave_at_the_end_of_the_turn_they_were_appended_in():
    pair = Pair()
    pair.connect()
    timers = len(pair.reactor.getDelayedCalls())
    pair.append(0, 5)
    assert pair.pump.clientIO.stream == []  # nothing written during the turn
    assert len(pair.reactor.getDelayedCalls()) == timers + 1  # one flush, however many appends
    pair.reactor.advance(0)  # the turn ends
    assert pair.link.frames_sent == 1 and pair.link.events_sent == 5
    pair.pump.flush()
    assert len(pair.frames) == 1 and pair.applied_ids() == [f"r{i}" for i in range(5)]


def test_events_appended_while_the_window_is_full_wait_and_leave_together():
    pair = Pair(window=1)
    pair.connect()
    pair.append(0, 1)
    pair.reactor.advance(0)  # frame 1 in flight, not yet delivered
    for turn in range(5):
        pair.append(1 + 10 * turn, 10)
        pair.reactor.advance(0)
    assert pair.link.frames_sent == 1 and pair.link.window_in_use() == 1
    assert pair.link.lag_events() == 51
    pair.pump.flush()  # the ack of frame 1 releases the 50 as one frame
    assert [len(f) for f in pair.frames] == [1, 50]
    assert pair.link.frames_sent == 2 and pair.link.cursor.acked == 51


def test_frames_are_bounded_by_events_and_bytes():
    pair = Pair(max_frame_events=7, max_frame_bytes=10**6)
    pair.connect()
    pair.append(0, 20)
    pair.pump.flush()
    assert [len(f) for f in pair.frames] == [7, 7, 6]
    entry = len(encode_event(*add(30)))
    pair.sender.max_frame_bytes = 3 * entry + 2
    pair.append(30, 7)
    pair.pump.flush()
    assert [len(f) for f in pair.frames[3:]] == [3, 3, 1]


def test_one_ack_per_network_read_however_many_frames_it_held():
    pair = Pair(max_frame_events=2, window=10)
    pair.connect()
    pair.append(0, 10)
    pair.reactor.advance(0)  # five frames written
    pair.pump.pump()  # the receiver reads them in one go and answers once
    assert pair.link.acks == 0
    pair.pump.pump()
    assert pair.link.acks == 1 and pair.link.cursor.acked == 10 and pair.link.window_in_use() == 0


# -- the handshake -------------------------------------------------------------------------


def test_a_wrong_secret_is_refused_and_nothing_is_applied():
    pair = Pair(sender_secrets=("alpha",), receiver_secrets=("beta",))
    pair.append(0, 3)
    pair.connect()
    assert not pair.link.connected and pair.frames == []
    # The sender checks the receiver's proof first, and says why it leaves.
    assert "bad proof" in pair.link.last_error
    assert pair.link.failures == 1 and pair.link.connects == 0
    # It keeps trying, with back-off, and keeps failing.
    pair.retry()
    assert pair.link.failures == 2 and pair.frames == []


def test_the_receiver_refuses_a_sender_without_the_secret():
    pair = Pair(sender_secrets=(), receiver_secrets=("beta",))
    pair.append(0, 3)
    pair.connect()
    assert not pair.link.connected and pair.frames == []
    assert pair.receiver.handshake_failures == 1
    assert "the peer refused: no proof" in pair.link.last_error
    assert pair.link.connects == 0 and pair.link.failures == 1  # back-off grows: no reconnect storm


def test_the_sender_refuses_a_receiver_without_the_secret():
    pair = Pair(sender_secrets=("alpha",), receiver_secrets=())
    pair.append(0, 3)
    pair.connect()
    assert not pair.link.connected and pair.frames == []
    assert "no proof" in pair.link.last_error


def test_without_any_secret_the_handshake_runs_unauthenticated():
    pair = Pair(sender_secrets=(), receiver_secrets=())
    pair.append(0, 3)
    pair.connect()
    assert pair.link.connected and pair.applied_ids() == ["r0", "r1", "r2"]


@pytest.mark.parametrize("sender, receiver", [
    (("new", "old"), ("old", "new")),  # mid-rotation: each signs with its first, verifies with any
    (("old", "new"), ("new", "old")),
    (("new", "old"), ("new",)),  # the receiver already dropped the old secret
    (("new",), ("new", "old")),  # the sender did
])
def test_secret_rotation(sender, receiver):
    pair = Pair(sender_secrets=sender, receiver_secrets=receiver)
    pair.append(0, 2)
    pair.connect()
    assert pair.link.connected and pair.applied_ids() == ["r0", "r1"]


def test_rotation_cannot_skip_a_step():
    pair = Pair(sender_secrets=("new", "old"), receiver_secrets=("old",))
    pair.connect()
    assert not pair.link.connected and "bad proof" in pair.link.last_error


class Wire:
    """A sender and a receiver protocol on StringTransports; bytes move by hand."""

    def __init__(self, pair):
        self.receiver = pair.receiver.buildProtocol(None)
        self.server = StringTransport()
        self.receiver.makeConnection(self.server)
        self.sender = stream.SenderProtocol(pair.link)
        pair.link._connection = self.sender
        self.client = StringTransport()
        self.sender.makeConnection(self.client)  # writes the hello
        self._to_receiver = self._to_sender = 0

    def to_receiver(self):
        data = self.client.value()[self._to_receiver:]
        self._to_receiver += len(data)
        self.receiver.dataReceived(data)

    def to_sender(self):
        data = self.server.value()[self._to_sender:]
        self._to_sender += len(data)
        self.sender.dataReceived(data)


def test_a_replayed_sender_handshake_is_refused():
    # Everything a genuine sender writes in one session is recorded.
    pair = Pair()
    wire = Wire(pair)
    wire.to_receiver()  # hello
    wire.to_sender()  # challenge
    wire.to_receiver()  # proof
    wire.to_sender()  # welcome
    pair.append(0, 2)
    pair.reactor.advance(0)
    wire.to_receiver()  # a frame
    assert pair.applied_ids() == ["r0", "r1"] and pair.receiver.handshake_failures == 0
    recorded = wire.client.value()
    # Replayed to the listener, it fails: the new challenge's nonce is not
    # the one the recorded proof answered, and the frame is never applied.
    replay = pair.receiver.buildProtocol(None)
    transport = StringTransport()
    replay.makeConnection(transport)
    replay.dataReceived(recorded)
    assert replay.state == "closed" and transport.disconnecting
    assert b"bad proof" in transport.value()
    assert pair.receiver.handshake_failures == 1 and pair.applied_ids() == ["r0", "r1"]


def test_a_replayed_receiver_challenge_is_refused():
    # A fake listener replays a genuine receiver's challenge to a sender.
    pair = Pair()
    wire = Wire(pair)
    wire.to_receiver()
    challenge = wire.server.value()
    later = stream.SenderProtocol(pair.link)
    later_transport = StringTransport()
    later.makeConnection(later_transport)
    later.dataReceived(challenge)
    assert later.state == "closed" and "bad proof" in later.failure_reason
    assert b"bad proof" in later_transport.value()


def test_a_frame_before_the_proof_is_refused():
    pair = Pair()
    receiver = pair.receiver.buildProtocol(None)
    transport = StringTransport()
    receiver.makeConnection(transport)
    hello = {"v": 1, "node": "x", "log": "0" * 32, "nonce": "1" * 32}
    receiver.dataReceived(_message(b"H" + json.dumps(hello).encode()))
    receiver.dataReceived(_message(stream._FRAME.pack(b"F", 0, 1) + frame_of(encode_event(*add(1)))))
    assert receiver.state == "closed" and pair.frames == []
    assert b"unexpected message b'F' in state proof" in transport.value()


def test_a_handshake_bigger_than_its_limit_closes_the_connection():
    pair = Pair()
    receiver = pair.receiver.buildProtocol(None)
    transport = StringTransport()
    receiver.makeConnection(transport)
    receiver.dataReceived(stream._PREFIX.pack(stream.HANDSHAKE_MAX_BYTES + 1) + b"H")
    assert transport.disconnecting


@pytest.mark.parametrize("hello, reason", [
    ({"v": 3, "max_v": 4, "node": "x", "log": "0" * 32, "nonce": "1" * 32},
     "unsupported stream version 3..4, this node speaks 1..2"),
    ({"v": 1, "max_v": True, "node": "x", "log": "0" * 32, "nonce": "1" * 32},
     "fields 'v' and 'max_v' must be integers with v <= max_v"),
    ({"v": 1, "max_v": 2, "node": "x", "log": "0" * 32, "nonce": "1" * 32, "ack_bytes": 1},
     "field 'ack_frames' must be an integer in [1, 2147483647]"),
    ({"v": 1, "node": "", "log": "0" * 32, "nonce": "1" * 32}, "field 'node' must be a printable string"),
    ({"v": 1, "node": "x", "log": "0" * 31, "nonce": "1" * 32}, "field 'log' must be 32 lowercase hex digits"),
    ({"v": 1, "node": "x", "log": "0" * 32, "nonce": True}, "field 'nonce' must be 32 lowercase hex digits"),
])
def test_a_malformed_hello_is_refused_naming_the_field(hello, reason):
    pair = Pair()
    receiver = pair.receiver.buildProtocol(None)
    transport = StringTransport()
    receiver.makeConnection(transport)
    receiver.dataReceived(_message(b"H" + json.dumps(hello).encode()))
    assert reason.encode() in transport.value() and transport.disconnecting


def test_a_silent_peer_is_dropped_after_the_handshake_timeout():
    pair = Pair()
    receiver = pair.receiver.buildProtocol(None)
    transport = StringTransport()
    receiver.makeConnection(transport)
    pair.reactor.advance(4.9)
    assert not transport.disconnecting
    pair.reactor.advance(0.2)
    assert transport.disconnecting and b"no handshake within 5 s" in transport.value()


def test_a_listener_that_never_answers_is_given_up_and_retried_with_back_off():
    pair = Pair()
    pair.reactor.tcpServers.clear()
    pair.reactor.listenTCP(PORT, Factory.forProtocol(Protocol))  # accepts, says nothing
    pair.connect()
    pair.reactor.advance(5.1)
    pair.pump.flush()
    assert not pair.link.connected and "no answer to the handshake within 5 s" in pair.link.last_error
    assert pair.link.failures == 1
    retries = [call.getTime() - pair.reactor.seconds() for call in pair.reactor.getDelayedCalls()]
    assert retries == [pytest.approx(pair.sender.backoff_first)]


def test_a_node_dialling_itself_is_refused():
    pair = Pair()
    pair.receiver.own_log_id = pair.log.log_id
    pair.connect()
    assert not pair.link.connected and "connected to itself" in pair.link.last_error


def _message(payload):
    return stream._PREFIX.pack(len(payload)) + payload


# -- acknowledgements, reconnects, resuming ---------------------------------------------------


def test_a_short_outage_resumes_from_the_receivers_offset_without_repair():
    pair = Pair(max_frame_events=10)
    pair.connect()
    pair.append(0, 30)
    pair.settle()
    pair.append(30, 25)
    pair.reactor.advance(0)  # frames in flight ...
    pair.cut(lose_in_flight=True)  # ... lost with the connection
    assert not pair.link.connected and pair.link.cursor.acked == 30
    pair.append(55, 5)  # appended during the outage
    pair.retry()
    assert pair.link.resumes == 1 and pair.link.reconnects == 1 and pair.link.repairs == 0
    assert pair.applied_ids() == [f"r{i}" for i in range(60)]  # each once, in order
    assert pair.gaps == [] and pair.repairs == []


def test_lost_acks_do_not_make_the_receiver_apply_anything_twice():
    pair = Pair()
    pair.connect()
    pair.append(0, 10)
    pair.reactor.advance(0)
    pair.pump.pump()  # the frame arrives and is applied; its ack is written ...
    pair.cut(lose_in_flight=True)  # ... and lost
    assert pair.link.cursor.acked == 0 and pair.receiver.applied[pair.log.log_id] == 10
    pair.retry()
    assert pair.link.resumes == 1 and pair.link.cursor.acked == 10
    assert pair.applied_ids() == [f"r{i}" for i in range(10)]


def test_a_restarted_receiver_gets_everything_since_its_last_ack():
    pair = Pair()
    pair.connect()
    pair.append(0, 10)
    pair.settle()
    pair.cut()
    pair.append(10, 5)
    pair.reactor.tcpServers.clear()
    pair.receiver = pair.make_receiver(("s3cret",))  # a new process: knows no log
    pair.retry()
    assert pair.link.fresh_starts == 2 and pair.link.resumes == 0
    assert pair.applied_ids()[10:] == [f"r{i}" for i in range(10, 15)]


def test_a_restarted_sender_is_a_new_log_not_resumed_into():
    pair = Pair()
    pair.connect()
    pair.append(0, 10)
    pair.pump.flush()
    old_log = pair.log.log_id
    pair.link.close()
    pair.pump.flush()
    # The sender process restarts: a new log, offsets from 0 again.
    pair.log = ReplicationLog(pair.reactor)
    sender = StreamReplicator(pair.log, "sender-node", ("s3cret",), pair.reactor,
                              lambda peer: TCP4ClientEndpoint(pair.reactor, *peer))
    sender.startService()
    sender.peers_changed({PEER}, set())
    sender.event_accepted(*add(100), None)
    pair.connect()
    link = sender.links[PEER]
    assert link.fresh_starts == 1 and link.resumes == 0
    assert pair.applied_ids()[-1] == "r100"
    assert pair.receiver.applied[old_log] == 10 and pair.receiver.applied[pair.log.log_id] == 1


def test_a_warm_start_seeds_where_the_stream_resumes():
    pair = Pair()
    pair.append(0, 20)
    log_id, offset = pair.log.position()
    pair.log.cursor("snapshot")  # irrelevant reader
    pair.receiver.set_applied(log_id, 15)  # the snapshot held the first 15
    pair.connect()
    assert pair.link.resumes == 1 and pair.applied_ids() == [f"r{i}" for i in range(15, 20)]
    assert offset == 20


def test_a_peer_that_stops_acknowledging_is_dropped_and_dialled_again():
    pair = Pair(ack_timeout=10.0)
    pair.connect()
    pair.append(0, 5)
    pair.reactor.advance(0)  # sent; the peer is stopped: no pump
    pair.reactor.advance(9.9)
    assert pair.link.connected
    pair.reactor.advance(0.2)
    pair.pump.flush()
    assert not pair.link.connected and pair.link.last_error == "no acknowledgement for 10.1 s"
    pair.retry()
    assert pair.link.connected and pair.link.resumes == 1


def test_acks_keep_a_busy_peer_alive():
    pair = Pair(ack_timeout=10.0)
    pair.connect()
    for second in range(30):
        pair.append(second, 1)
        pair.pump.flush()
        pair.reactor.advance(1)
    assert pair.link.connected and pair.link.reconnects == 0


# -- falling off the tail -------------------------------------------------------------------------


def test_a_peer_away_longer_than_the_log_is_repaired_and_told_of_the_gap():
    pair = Pair(capacity=20)
    pair.connect()
    pair.append(0, 5)
    pair.settle()
    pair.cut()
    pair.append(5, 30)  # the cursor (5) falls off the 20-entry log
    assert pair.repairs == [20] and pair.link.repairs == 1 and pair.log.fell_behind == 1
    pair.retry()
    assert pair.link.connected and pair.link.resumes == 0
    assert pair.gaps == [20] and pair.receiver.gaps == 1 and pair.receiver.skipped == 20
    # What was appended after the fall streams as usual.
    assert pair.applied_ids() == [f"r{i}" for i in range(5)] + [f"r{i}" for i in range(25, 35)]
    assert pair.link.repairs == 1  # reported once


def test_a_connected_peer_too_slow_for_the_log_is_told_of_the_gap_in_the_stream():
    pair = Pair(capacity=20, window=1, max_frame_events=5)
    pair.connect()
    pair.append(0, 5)
    pair.reactor.advance(0)  # frame [0, 5) in flight, unacknowledged
    pair.append(5, 25)  # appending entry 20 evicts entry 0: the cursor falls off and jumps to 20
    assert pair.repairs == [20]
    pair.pump.flush()
    assert pair.gaps == [15]  # after [0, 5): the entries [5, 20) are skipped
    assert pair.applied_ids() == [f"r{i}" for i in range(5)] + [f"r{i}" for i in range(20, 30)]
    assert pair.link.connected and pair.link.cursor.acked == 30 and pair.link.gaps_sent == 1


# -- invalid events and several peers ----------------------------------------------------------------


def test_a_frame_with_an_invalid_event_applies_the_others_and_the_sender_hears_of_it():
    pair = Pair()
    pair.connect()
    pair.append(0, 1)
    pair.log.append_encoded(b'["load.stats.set","c","bad","10.0.0.1",true,null]')
    pair.append(1, 1)
    pair.settle()
    assert pair.applied_ids() == ["r0", "r1"]
    assert pair.receiver.rejected == 1 and pair.link.rejected == 1
    assert pair.link.cursor.acked == 3  # acknowledged all the same: resending would not help


def test_an_error_in_apply_frame_is_logged_and_does_not_stop_the_stream():
    pair = Pair()
    pair.receiver.apply_frame = lambda events: 1 / 0
    pair.connect()
    pair.append(0, 2)
    pair.settle()
    assert pair.receiver.apply_errors == 1 and pair.link.connected and pair.link.cursor.acked == 2


def test_a_slow_peer_does_not_hold_back_another():
    pair = Pair(window=1)
    other = ("127.0.0.3", 7071)
    frames = []
    pair.reactor.listenTCP(7071, ReceiverFactory("other", ("s3cret",), frames.append, pair.reactor))
    pair.sender.peers_changed({other}, set())
    first = pair.connect()
    second = pair.connect()  # to 7071
    pair.append(0, 3)
    pair.reactor.advance(0)
    second.flush()  # only the second peer answers
    pair.append(3, 3)
    pair.reactor.advance(0)
    second.flush()
    assert [len(f) for f in frames] == [3, 3]
    assert pair.sender.links[other].cursor.acked == 6 and pair.link.cursor.acked == 0
    first.flush()
    assert pair.applied_ids() == [f"r{i}" for i in range(6)]


def test_a_newer_connection_from_the_same_sender_supersedes_the_old_one():
    pair = Pair()
    pair.connect()
    pair.append(0, 2)
    old = pair.pump
    old.flush()
    # The sender saw the connection die; the receiver did not (no FIN arrived).
    pair.link._connection_lost(pair.link._connection, None)
    pair.retry()
    old.flush()
    assert old.serverIO.disconnecting  # the receiver closed the old one
    pair.append(2, 2)
    pair.pump.flush()
    assert pair.applied_ids() == ["r0", "r1", "r2", "r3"]


def test_a_peer_that_left_is_disconnected_and_forgotten():
    pair = Pair()
    pair.connect()
    pair.sender.peers_changed(set(), {PEER})
    pair.pump.flush()
    assert pair.sender.links == {} and pair.log.cursors == ()
    assert pair.receiver.streams == {}
    pair.reactor.advance(5)
    assert pair.completer.succeedOnce() is None  # no more attempts


def test_stopping_sends_what_is_pending_then_closes():
    pair = Pair()
    pair.connect()
    pair.append(0, 3)
    stopped = pair.sender.stopService()  # before the turn's flush
    pair.pump.flush()
    assert pair.applied_ids() == ["r0", "r1", "r2"]
    pair.settle()  # acknowledged after the receiver's delay
    pair.reactor.advance(0.01)  # the drain sees everything acknowledged
    pair.pump.flush()
    assert stopped.called and not pair.link.connected and pair.sender.links == {}


# -- real loopback TCP ----------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_thousands_of_events_over_loopback_tcp_leave_the_receiver_in_the_senders_state():
    """Two real endpoints on 127.0.0.1 in one process: a sender node's client
    mutations stream to a receiver node that applies them as a peer's."""
    sender_node = build_node(reactor)
    receiver_node = build_node(reactor)

    def apply_frame(events):
        for event_type, event in events:
            if event_type == EVENT_CACHE_SAVE:
                receiver_node.save_cache(event, None, ORIGIN_PEER)
            else:
                receiver_node.apply(event_type, event, None, ORIGIN_PEER)

    receiver = ReceiverFactory("127.0.0.1:receiver", ("k2", "k1"), apply_frame, reactor)
    port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(receiver)
    log = ReplicationLog(reactor)
    replicator = StreamReplicator(log, "127.0.0.1:sender", ("k1", "k2"), reactor,
                                  lambda peer: TCP4ClientEndpoint(reactor, peer[0], peer[1], timeout=2))
    sender_node.event_listeners.append(replicator.event_accepted)
    replicator.startService()
    peer = ("127.0.0.1", port.getHost().port)
    replicator.peers_changed({peer}, set())
    try:
        total = 0
        for turn in range(60):  # 60 reactor turns of mixed mutations
            for i in range(turn * 50, turn * 50 + 50):
                rid = f"req-{i}"
                sender_node.apply(EVENT_ADD, LoadAdd((f"cluster-{i % 3}", rid, f"10.0.{i % 4}.1", i, None)))
                total += 1
                if i % 3 == 0:
                    sender_node.apply(EVENT_PROMPT_DELETE, LoadDelete((rid, None)))
                    total += 1
                if i % 5 == 0:
                    sender_node.apply(EVENT_DELETE, LoadDelete((f"req-{i - 25}", None)))
                    total += 1
                if i % 50 == 0:
                    sender_node.save_cache(CacheSave((f"cluster-{i % 3}", [i, i + 1, i + 2], "10.0.0.1")))
                    total += 1
            yield deferLater(0)
        assert log.end == total and total > 3000
        link = replicator.links[peer]
        yield wait_for(lambda: link.cursor.acked == log.end)
        assert link.connects == 1 and link.repairs == 0 and link.rejected == 0
        assert receiver.events == total and receiver.rejected == 0
        # Batches grew with the load: far fewer frames than events.
        assert link.frames_sent < total / 10
        for name in sender_node.state.clusters:
            assert loads(receiver_node, name) == loads(sender_node, name)
        assert receiver_node.state.request_count == sender_node.state.request_count
        assert list(receiver_node.cache.iter_snapshot()) == list(sender_node.cache.iter_snapshot())
    finally:
        yield replicator.stopService()
        yield port.stopListening()
    assert not link.connected


def loads(node, cluster):
    """Every engine's counters; ``updated_time`` is each node's own clock."""
    return sorted((e["ip"], e["queued_req_num"], e["prompt_length"]) for e in node.state.cluster_load(cluster))


def deferLater(seconds):
    from twisted.internet import task
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def wait_for(condition, limit=30.0):
    """Polls ``condition`` each 10 ms; a safety net of ``limit`` seconds
    turns a hang into a failure (not a speed assertion)."""
    waited = 0.0
    while not condition():
        assert waited < limit, "condition not reached"
        yield deferLater(0.01)
        waited += 0.01


def test_a_peer_that_refuses_the_stream_after_the_handshake_is_dialled_with_growing_back_off():
    pair = Pair()
    pair.receiver.max_message_bytes = 10  # every frame is too big: the receiver refuses it and closes
    pair.connect()
    delays = []
    for attempt in range(4):
        pair.append(attempt, 1)
        pair.pump.flush()
        assert not pair.link.connected and "exceeds this node's limit of 10" in pair.link.last_error
        delays.append(min(c.getTime() for c in pair.reactor.getDelayedCalls()) - pair.reactor.seconds())
        pair.reactor.advance(delays[-1])
        pair.connect()
    assert delays == sorted(delays) and delays[-1] > delays[0]
