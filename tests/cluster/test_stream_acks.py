"""Stream version 2: lazy cumulative acknowledgements, the byte window,
resuming after frames were applied but not acknowledged, the apply lag, and
talking to the previous release's stream (version 1) in both directions;
in memory (MemoryReactorClock, iosim, StringTransport)."""

import hashlib
import hmac
import json
import math
import os
import struct

import pytest
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import Int32StringReceiver

from metacenter.cluster import stream
from metacenter.cluster.stream import ReceiverFactory
from metacenter.core.replog import encode_event
from test_stream import Pair, Wire, _message, add, frame_of

SECRET = b"s3cret"


def ids(frames):
    return [event.request_id for frame in frames for _, event in frame]


# -- lazy acknowledgements ---------------------------------------------------------------------


def test_the_receiver_holds_its_ack_until_the_delay_passes_and_then_covers_every_frame():
    pair = Pair()
    pair.connect()
    for turn in range(3):  # three frames, in three turns within the delay
        pair.append(10 * turn, 2)
        pair.reactor.advance(0)
        pair.pump.flush()
        pair.reactor.advance(0.002)
    assert ids(pair.frames) == ["r0", "r1", "r10", "r11", "r20", "r21"]
    assert pair.link.acks == 0 and pair.link.cursor.acked == 0 and pair.receiver.acks == 0
    assert pair.link.window_in_use() == 3
    pair.reactor.advance(stream.ACK_DELAY - 0.006 - 1e-6)  # just before the delay since the first frame
    pair.pump.flush()
    assert pair.link.acks == 0
    pair.reactor.advance(2e-6)
    pair.pump.flush()
    assert pair.link.acks == 1 and pair.receiver.acks == 1  # one ack for the three frames
    assert pair.link.cursor.acked == 6 and pair.link.window_in_use() == 0
    pair.reactor.advance(1)
    pair.pump.flush()
    assert pair.link.acks == 1  # nothing unacknowledged: no timer, no ack


def test_the_receiver_acks_at_once_when_half_the_frame_window_is_unacknowledged():
    pair = Pair(window=8, max_frame_events=1)  # asks for an ack every 4 frames
    pair.connect()
    pair.append(0, 3)
    pair.reactor.advance(0)
    pair.pump.flush()
    assert pair.link.acks == 0  # 3 frames: below half the window
    pair.append(3, 1)
    pair.reactor.advance(0)
    pair.pump.flush()  # the 4th frame: acknowledged without waiting for the delay
    assert pair.link.acks == 1 and pair.link.cursor.acked == 4
    # The pending delay was cancelled with the ack: it fires nothing later.
    pair.reactor.advance(stream.ACK_DELAY)
    pair.pump.flush()
    assert pair.link.acks == 1


def test_a_full_byte_window_is_acknowledged_at_half_and_never_waits_for_the_delay():
    entry = len(encode_event(*add(10)))  # every entry below has this size
    pair = Pair(window=1000, max_frame_events=1, window_bytes=4 * entry)
    pair.connect()
    pair.append(10, 40)
    pair.reactor.advance(0)
    assert pair.link.frames_sent == 4  # the byte window is full
    pair.pump.flush()  # no clock advance: the acks at half the window move it
    assert ids(pair.frames) == [f"r{i}" for i in range(10, 50)]
    assert pair.link.cursor.acked == 40 and pair.link.frames_sent == 40
    assert 0 < pair.link.acks < 40


def test_an_ack_delay_of_zero_acknowledges_every_network_read():
    pair = Pair()
    pair.receiver.ack_delay = 0
    pair.connect()
    pair.append(0, 2)
    pair.reactor.advance(0)
    pair.pump.flush()
    assert pair.link.acks == 1 and pair.link.cursor.acked == 2


# -- resuming with frames applied but not acknowledged -----------------------------------------


def test_frames_applied_but_not_yet_acknowledged_are_not_applied_again_after_a_reconnect():
    pair = Pair(max_frame_events=3)
    pair.connect()
    pair.append(0, 9)
    pair.reactor.advance(0)
    pair.pump.flush()  # three frames applied; their ack waits for the delay ...
    assert ids(pair.frames) == [f"r{i}" for i in range(9)]
    assert pair.link.cursor.acked == 0 and pair.receiver.applied[pair.log.log_id] == 9
    pair.cut(lose_in_flight=True)  # ... and the connection breaks before it
    pair.reactor.advance(stream.ACK_DELAY)  # the receiver's timer went with its connection
    pair.append(9, 3)
    pair.retry()
    assert pair.link.resumes == 1 and pair.link.repairs == 0 and pair.gaps == []
    pair.settle()
    assert ids(pair.frames) == [f"r{i}" for i in range(12)]  # each once, in order
    assert pair.link.cursor.acked == 12


# -- the apply lag ------------------------------------------------------------------------------


def test_each_frame_reports_the_time_since_its_oldest_entry_was_appended():
    pair = Pair()
    pair.append(0, 1)
    pair.reactor.advance(0.003)
    pair.append(1, 1)
    pair.reactor.advance(0.002)
    pair.connect()  # one frame [0, 2): its oldest entry was appended 5 ms ago
    assert len(pair.frames) == 1 and pair.lags == [pytest.approx(0.005)]
    pair.append(2, 1)
    pair.reactor.advance(0)
    pair.reactor.advance(0.001)  # on the wire for 1 ms
    pair.pump.flush()
    assert pair.lags[1:] == [pytest.approx(0.001)]


def _wired(pair):
    wire = Wire(pair)
    wire.to_receiver()
    wire.to_sender()
    wire.to_receiver()
    wire.to_sender()
    return wire


@pytest.mark.parametrize("sent_at, observed", [
    (1e12, [0.0]),  # the sender's clock is ahead: skew, counted as 0
    (math.nan, []),
    (-math.inf, []),
])
def test_a_frame_time_from_a_skewed_or_broken_clock_is_not_counted_as_lag(sent_at, observed):
    pair = Pair()
    wire = _wired(pair)
    payload = frame_of(encode_event(*add(0)))
    wire.receiver.dataReceived(_message(stream._FRAME_TIMED.pack(b"F", 0, 1, sent_at) + payload))
    assert ids(pair.frames) == ["r0"] and pair.lags == observed


# -- the previous release (stream version 1) ---------------------------------------------------


def v1_proof(role, sender_nonce, receiver_nonce, sender, receiver, log_id, value):
    """The previous release's proof, written out here so a change to this
    release's cannot go unnoticed."""
    message = b"\n".join([b"metacenter-stream-v1", role, sender_nonce.encode(), receiver_nonce.encode(),
                          sender.encode(), receiver.encode(), log_id.encode(), str(value).encode()])
    return hmac.new(SECRET, message, hashlib.sha256).hexdigest()


class V1Receiver(Int32StringReceiver):
    """The previous release's receiver as it behaves on the wire: a hello
    must say ``"v": 1``, frames have the 13-byte header without a time, one
    ack per network read."""

    MAX_LENGTH = 2**24

    def __init__(self):
        self.state, self.frames, self.ack_due = "hello", [], None

    def dataReceived(self, data):
        self.ack_due = None
        super().dataReceived(data)
        if self.ack_due is not None:
            self.transport.write(struct.pack(">IcQ", 9, b"A", self.ack_due))

    def stringReceived(self, message):
        kind, body = message[:1], message[1:]
        if kind == b"H" and self.state == "hello":
            self.hello = json.loads(body)
            if self.hello.get("v") != 1:
                self.sendString(b"E" + f"hello: unsupported stream version {self.hello.get('v')!r}, "
                                f"this node speaks 1".encode())
                self.transport.loseConnection()
                return
            self.nonce = os.urandom(16).hex()
            h = self.hello
            self.sendString(b"C" + json.dumps({"v": 1, "node": "old-node", "nonce": self.nonce, "applied": None,
                                               "proof": v1_proof(b"receiver", h["nonce"], self.nonce, h["node"],
                                                                 "old-node", h["log"], None)}).encode())
            self.state = "proof"
        elif kind == b"P" and self.state == "proof":
            answer, h = json.loads(body), self.hello
            assert answer["proof"] == v1_proof(b"sender", h["nonce"], self.nonce, h["node"], "old-node", h["log"],
                                               answer["start"])
            self.state = "streaming"
            self.transport.write(struct.pack(">IcQ", 9, b"A", answer["start"]))
        elif kind == b"F" and self.state == "streaming":
            _, start, count = struct.unpack_from(">cQI", message)
            entries = json.loads(message[13:])
            assert len(entries) == count
            self.frames.append(entries)
            self.ack_due = start + count
        else:
            raise AssertionError(f"unexpected {kind!r} in {self.state}")


class V1Sender(Int32StringReceiver):
    """The previous release's sender on the wire: a hello with only
    ``"v": 1``, a challenge must say ``"v": 1``, untimed frames."""

    MAX_LENGTH = 2**24
    LOG = "ab" * 16

    def __init__(self):
        self.state, self.acks, self.error = "challenge", [], None
        self.nonce = os.urandom(16).hex()

    def connectionMade(self):
        self.sendString(b"H" + json.dumps({"v": 1, "node": "old-sender", "log": self.LOG,
                                           "nonce": self.nonce}).encode())

    def stringReceived(self, message):
        kind, body = message[:1], message[1:]
        if kind == b"C" and self.state == "challenge":
            challenge = json.loads(body)
            assert challenge["v"] == 1, challenge  # the previous release refuses anything else
            assert challenge["proof"] == v1_proof(b"receiver", self.nonce, challenge["nonce"], "old-sender",
                                                  challenge["node"], self.LOG, challenge["applied"])
            self.start = challenge["applied"] or 0
            self.sendString(b"P" + json.dumps({"proof": v1_proof(b"sender", self.nonce, challenge["nonce"],
                                                                 "old-sender", challenge["node"], self.LOG,
                                                                 self.start), "start": self.start}).encode())
            self.state = "welcome"
        elif kind == b"A":
            self.acks.append(struct.unpack(">Q", body)[0])
            self.state = "streaming"
        elif kind == b"E":
            self.error = body.decode()
        else:
            raise AssertionError(f"unexpected {kind!r} in {self.state}")

    def send_frame(self, start, *events):
        self.sendString(struct.pack(">cQI", b"F", start, len(events))
                        + frame_of(*(encode_event(*e) for e in events)))


def shuttle(a, a_transport, b, b_transport):
    """Moves bytes both ways between two protocols on StringTransports until
    neither has anything to say."""
    while a_transport.value() or b_transport.value():
        data = a_transport.value()
        a_transport.clear()
        if data:
            b.dataReceived(data)
        data = b_transport.value()
        b_transport.clear()
        if data:
            a.dataReceived(data)


def test_this_sender_streams_version_1_to_a_previous_release_receiver():
    pair = Pair()
    sender = stream.SenderProtocol(pair.link)
    pair.link._connection = sender
    old = V1Receiver()
    sender_transport, old_transport = StringTransport(), StringTransport()
    old.makeConnection(old_transport)
    sender.makeConnection(sender_transport)
    shuttle(sender, sender_transport, old, old_transport)
    assert old.hello["v"] == 1 and old.hello["max_v"] == stream.VERSION
    assert sender.version == 1 and pair.link.connected and pair.link.status()["version"] == 1
    pair.append(0, 3)
    pair.reactor.advance(0)
    shuttle(sender, sender_transport, old, old_transport)
    assert [[e[2] for e in f] for f in old.frames] == [["r0", "r1", "r2"]]
    assert pair.link.cursor.acked == 3  # the old receiver's ack per read


def test_a_previous_release_sender_streams_version_1_to_this_receiver():
    pair = Pair()
    receiver = pair.receiver.buildProtocol(None)
    old = V1Sender()
    receiver_transport, old_transport = StringTransport(), StringTransport()
    receiver.makeConnection(receiver_transport)
    old.makeConnection(old_transport)
    shuttle(old, old_transport, receiver, receiver_transport)
    assert old.state == "streaming" and old.acks == [0] and receiver.version == 1
    old.send_frame(0, add(0), add(1))
    old.send_frame(2, add(2))
    shuttle(old, old_transport, receiver, receiver_transport)
    assert ids(pair.frames) == ["r0", "r1", "r2"]
    assert old.acks == [0, 3]  # at once, once per read: what a window of 4 needs
    assert pair.lags == []  # version 1 frames carry no time
    assert receiver._ack_timer is None  # no delayed ack for a version 1 sender


def test_a_sender_of_only_an_unknown_version_is_refused_with_the_reason_and_counted_as_a_failure():
    """What a future release would meet here, and what this release meets
    at a receiver that speaks neither version: the refusal reaches the
    sender's link as a failure (``StreamOrHttp`` falls back to HTTP after
    repeated ones)."""
    pair = Pair()
    receiver = pair.receiver.buildProtocol(None)
    transport = StringTransport()
    receiver.makeConnection(transport)
    receiver.dataReceived(_message(b"H" + json.dumps({"v": 3, "max_v": 3, "node": "future", "log": "0" * 32,
                                                      "nonce": "1" * 32}).encode()))
    assert b"unsupported stream version 3..3, this node speaks 1..2" in transport.value()
    assert transport.disconnecting and pair.receiver.handshake_failures == 1

    failures = []
    pair.sender.on_failure = lambda link, reason: failures.append(reason)
    sender = stream.SenderProtocol(pair.link)
    pair.link._connection = sender
    sender_transport = StringTransport()
    sender.makeConnection(sender_transport)
    sender.dataReceived(_message(b"C" + json.dumps({"v": 3, "node": "future", "nonce": "2" * 32,
                                                    "applied": None, "proof": ""}).encode()))
    assert sender.state == "closed" and b"unsupported stream version 3" in sender_transport.value()
    sender.connectionLost(None)
    assert pair.link.failures == 1 and "unsupported stream version 3" in pair.link.last_error
    assert failures == [pair.link.last_error]


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("given, expected", [("0", 0.0), ("5ms", 0.005), ("1s", 1.0)])
def test_the_ack_delay_setting_takes_durations_up_to_a_second(given, expected):
    from metacenter.runtime.config import resolve
    assert resolve({"replication-ack-delay": given}, {}).replication_ack_delay == expected
    assert resolve({}, {"METACENTER_REPLICATION_ACK_DELAY": given}).replication_ack_delay == expected


@pytest.mark.parametrize("given", ["2s", "-1ms", "soon"])
def test_an_ack_delay_a_sender_would_time_out_on_is_refused_naming_the_setting(given):
    from metacenter.runtime.config import ConfigError, resolve
    with pytest.raises(ConfigError, match="--replication-ack-delay"):
        resolve({"replication-ack-delay": given}, {})


def test_the_defaults_give_a_window_the_ack_delay_never_holds_up():
    from metacenter.runtime.config import resolve
    cfg = resolve({}, {})
    assert cfg.replication_window == stream.WINDOW == 64 and cfg.replication_ack_delay == stream.ACK_DELAY
