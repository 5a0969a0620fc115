"""Authentication of requests between nodes (replication, snapshots) with a
shared cluster secret.

The sender signs, the receiver verifies:

    X-Metacenter-Timestamp: <milliseconds since the epoch>
    X-Metacenter-Signature: hex HMAC-SHA256(secret,
        "metacenter-peer-v1\\n" METHOD "\\n" TARGET "\\n" TIMESTAMP "\\n" hex SHA-256(body))

TARGET is the request target as sent on the request line: the path and the
query string ("/v1/replica/event", "/v1/snapshot?cluster=a"), so a query cannot
be altered either. A request is accepted if its signature matches and its
timestamp is within ``window`` seconds of the receiver's clock, either way.

Secret rotation: a node may hold several secrets. The first signs; a request
signed with any of them is accepted (see docs/deployment.md for the steps).

No replay cache: inside the window a captured request can be sent again, but
every replicated event is idempotent (a known request_id changes nothing, a
repeated delete finds a tombstone or nothing) and a snapshot read changes no
state, so a replay gains nothing that the window does not already bound.
"""

import hashlib
import hmac
import json
import re
import time

from prometheus_client import Gauge

from metacenter.cluster.discovery import format_peer
from metacenter.runtime import logs

TIMESTAMP_HEADER = "X-Metacenter-Timestamp"
SIGNATURE_HEADER = "X-Metacenter-Signature"
DEFAULT_WINDOW = 30.0  # seconds; covers clock skew between nodes plus a retry
LOG_INTERVAL = 60.0  # seconds between two log lines about peers refusing this node

_DOMAIN = b"metacenter-peer-v1"
_TIMESTAMP = re.compile(r"\d{1,16}")
_SIGNATURE = re.compile(r"[0-9a-fA-F]{64}")


class Unauthorized(Exception):
    """A peer request that is not authentic. ``reason`` says why in one
    sentence; the API answers it as 401 (code 40101001) in the envelope."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def _bytes(value):
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _key(secret):
    key = _bytes(secret)
    if not key:
        raise ValueError("the cluster secret is empty; peer authentication is off")
    return key


def _keys(secrets):
    """One secret (str or bytes) or a sequence of them -> a tuple of keys."""
    if isinstance(secrets, (str, bytes)):
        secrets = (secrets,)
    keys = tuple(_key(s) for s in secrets)
    if not keys:
        raise ValueError("no cluster secret; peer authentication is off")
    return keys


def _signature(key, method, path, timestamp, body):
    message = b"\n".join([
        _DOMAIN,
        _bytes(method).upper(),
        _bytes(path),
        timestamp.encode("ascii"),
        hashlib.sha256(_bytes(body or b"")).hexdigest().encode("ascii"),
    ])
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(secret, method, path, body, now):
    """The headers authenticating a request, signed with ``secret``
    (or the first of a sequence of secrets); ``now`` in seconds since the epoch."""
    timestamp = str(int(now * 1000))
    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: _signature(_keys(secret)[0], method, path, timestamp, body)}


def _header(headers, name):
    """One header value as str from twisted's Headers or a mapping (any case,
    str or bytes keys, a value or a list of values); None when absent."""
    if hasattr(headers, "getRawHeaders"):
        values = headers.getRawHeaders(name)
    else:
        wanted = name.lower()
        values = None
        for key, value in headers.items():
            key = key.decode("latin-1") if isinstance(key, bytes) else key
            if key.lower() == wanted:
                values = value if isinstance(value, (list, tuple)) else [value]
                break
    if not values:
        return None
    values = [v.decode("latin-1") if isinstance(v, bytes) else v for v in values]
    if len(values) > 1:
        raise Unauthorized(f"more than one {name} header")
    return values[0].strip()


def verify(secret, method, path, body, headers, now, window=DEFAULT_WINDOW):
    """Returns None for a request signed with ``secret`` (or any of a
    sequence of secrets) and fresh, raises ``Unauthorized`` otherwise
    (``ValueError`` without a secret)."""
    keys = _keys(secret)
    timestamp = _header(headers, TIMESTAMP_HEADER)
    signature = _header(headers, SIGNATURE_HEADER)
    if signature is None:
        raise Unauthorized(f"missing {SIGNATURE_HEADER} header: this node requires signed peer requests")
    if timestamp is None:
        raise Unauthorized(f"missing {TIMESTAMP_HEADER} header")
    if not _TIMESTAMP.fullmatch(timestamp):
        raise Unauthorized(f"malformed {TIMESTAMP_HEADER} header: expected milliseconds since the epoch")
    if not _SIGNATURE.fullmatch(signature):
        raise Unauthorized(f"malformed {SIGNATURE_HEADER} header: expected 64 hex digits")
    given = signature.lower().encode("ascii")
    # Every secret is tried, so the time taken does not tell which one matched.
    matches = [hmac.compare_digest(_signature(key, method, path, timestamp, body).encode("ascii"), given)
               for key in keys]
    if not any(matches):
        raise Unauthorized("bad signature: wrong cluster secret, or the request was altered")
    # Checked after the signature, so only an authentic request is told about
    # its clock: a replay or a node whose clock is off.
    skew = now - int(timestamp) / 1000
    if skew > window:
        raise Unauthorized(f"timestamp outside the validity window: {skew:.1f} s old, at most {window:g} s accepted")
    if skew < -window:
        raise Unauthorized(
            f"timestamp outside the validity window: {-skew:.1f} s in the future, at most {window:g} s accepted")


def verify_request(secret, request, body, now, window=DEFAULT_WINDOW):
    """``verify`` for a twisted.web request, whose ``uri`` is the target as sent."""
    verify(secret, request.method, request.uri, body, request.requestHeaders, now, window)


class PeerAuthenticator:
    """The cluster secrets and a clock in one object; does nothing without a
    secret, so callers need not test whether authentication is on.

    ``secrets``: one secret or a sequence (rotation: the first signs, any
    verifies). ``verdicts``: a ``PeerVerdicts`` told of every peer's answer
    (``answered``), or None.
    """

    def __init__(self, secrets, clock=None, window=DEFAULT_WINDOW, verdicts=None):
        if isinstance(secrets, (str, bytes)):
            secrets = (secrets,) if secrets else ()
        self.secrets = tuple(secrets or ())
        self._now = clock.seconds if clock is not None else time.time
        self.window = window
        self.verdicts = verdicts

    @property
    def enabled(self):
        return bool(self.secrets)

    def headers(self, method, path, body):
        """Headers to add to an outgoing peer request ({} without a secret)."""
        if not self.enabled:
            return {}
        return sign(self.secrets, method, path, body, self._now())

    def check(self, request, body):
        """Raises ``Unauthorized`` unless the incoming request is authentic."""
        if self.enabled:
            verify_request(self.secrets, request, body, self._now(), self.window)

    def answered(self, peer, status, content):
        """A peer answered one of our requests with HTTP ``status`` (and body
        ``content``, bytes or None): passed on to ``verdicts``."""
        if self.verdicts is not None:
            self.verdicts.answered(peer, status, content)


def _refusal_reason(content):
    """The reason of a 401 in the envelope, else a generic one."""
    try:
        reason = json.loads(content)["error"]["reason"]
    except Exception:  # a body that is not our envelope: a proxy, another server
        return "HTTP 401"
    return str(reason)[:200]


class PeerVerdicts:
    """Which peers accept this node's signature, from their answers: a 401
    refuses it, any other answer accepts it. While at least one peer refuses
    and none accepts, the node is not ready (``readiness`` held with cause
    ``"peer-auth"``; its state would be whatever arrived unauthenticated or
    nothing), an error is logged at most once per ``log_interval`` seconds,
    and the gauge ``metacenter_peer_auth_refused`` counts the refusing peers.
    One accepting peer makes the node ready again. Peers that never answered
    (unreachable) do not count; a peer that left is forgotten
    (``peers_changed``, a discovery listener).

    ``answered`` costs O(1) for a peer whose verdict did not change (every
    replication batch passes here).
    """

    CAUSE = "peer-auth"

    def __init__(self, readiness, clock, registry=None, log=None, log_interval=LOG_INTERVAL):
        self._readiness = readiness
        self._refused = {}  # peer -> the peer's reason
        self._accepted = set()
        self._held = False
        self._log = log if log is not None else logs.logger("metacenter.cluster.auth")
        self._throttled = logs.ThrottledLog(self._log, clock, log_interval,
                                            suppressed_note=" ({suppressed} refusals since not logged)")
        self.gauge = Gauge("metacenter_peer_auth_refused",
                           "Peers whose last answer refused this node's signature (HTTP 401).", registry=registry)

    @property
    def refused(self):
        """{peer: reason} of the peers refusing this node's signature."""
        return dict(self._refused)

    def answered(self, peer, status, content=None):
        if status == 401:
            self._accepted.discard(peer)
            self._refused[peer] = _refusal_reason(content)
        elif peer in self._accepted:
            return
        else:
            self._accepted.add(peer)
            self._refused.pop(peer, None)
        self._update()

    def peers_changed(self, joined, left):
        """Discovery listener: forgets the verdicts of peers that left."""
        for peer in left:
            self._accepted.discard(peer)
            self._refused.pop(peer, None)
        if left:
            self._update()

    def _update(self):
        self.gauge.set(len(self._refused))
        if self._refused and not self._accepted:
            peer, reason = next(iter(self._refused.items()))
            count = len(self._refused)
            why = (f"every peer that answered refuses this node's signature ({count} peer{'s' if count != 1 else ''}"
                   f"; {format_peer(peer)}: {reason}): check --cluster-secret")
            self._readiness.hold(why, cause=self.CAUSE)
            self._held = True
            self._throttled.emit(self.CAUSE, "refused", "error", "not ready: {why}", why=why, refusing=count)
        elif self._held:
            self._held = False
            self._readiness.release(cause=self.CAUSE)
            self._throttled.reset(self.CAUSE)
            accepting = sorted(format_peer(p) for p in self._accepted)
            self._log.info("a peer accepts this node's signature again ({peers}): no longer held back",
                           peers=", ".join(accepting))

