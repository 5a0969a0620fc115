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

No replay cache: inside the window a captured request can be sent again, but
every replicated event is idempotent (a known request_id changes nothing, a
repeated delete finds a tombstone or nothing) and a snapshot read changes no
state, so a replay gains nothing that the window does not already bound.
"""

import hashlib
import hmac
import re
import time

from metacenter.api.envelope import unauthorized

TIMESTAMP_HEADER = "X-Metacenter-Timestamp"
SIGNATURE_HEADER = "X-Metacenter-Signature"
DEFAULT_WINDOW = 30.0  # seconds; covers clock skew between nodes plus a retry

_DOMAIN = b"metacenter-peer-v1"
_TIMESTAMP = re.compile(r"\d{1,16}")
_SIGNATURE = re.compile(r"[0-9a-fA-F]{64}")


def _bytes(value):
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _key(secret):
    key = _bytes(secret)
    if not key:
        raise ValueError("the cluster secret is empty; peer authentication is off")
    return key


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
    """The headers authenticating a request; ``now`` in seconds since the epoch."""
    timestamp = str(int(now * 1000))
    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: _signature(_key(secret), method, path, timestamp, body)}


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
        raise unauthorized(f"more than one {name} header")
    return values[0].strip()


def verify(secret, method, path, body, headers, now, window=DEFAULT_WINDOW):
    """Returns None for an authentic request, raises
    ``metacenter.envelope.unauthorized`` (401, 40101001) otherwise."""
    key = _key(secret)
    timestamp = _header(headers, TIMESTAMP_HEADER)
    signature = _header(headers, SIGNATURE_HEADER)
    if signature is None:
        raise unauthorized(f"missing {SIGNATURE_HEADER} header: this node requires signed peer requests")
    if timestamp is None:
        raise unauthorized(f"missing {TIMESTAMP_HEADER} header")
    if not _TIMESTAMP.fullmatch(timestamp):
        raise unauthorized(f"malformed {TIMESTAMP_HEADER} header: expected milliseconds since the epoch")
    if not _SIGNATURE.fullmatch(signature):
        raise unauthorized(f"malformed {SIGNATURE_HEADER} header: expected 64 hex digits")
    expected = _signature(key, method, path, timestamp, body)
    if not hmac.compare_digest(expected.encode("ascii"), signature.lower().encode("ascii")):
        raise unauthorized("bad signature: wrong cluster secret, or the request was altered")
    # Checked after the signature, so only an authentic request is told about
    # its clock: a replay or a node whose clock is off.
    skew = now - int(timestamp) / 1000
    if skew > window:
        raise unauthorized(f"timestamp outside the validity window: {skew:.1f} s old, at most {window:g} s accepted")
    if skew < -window:
        raise unauthorized(
            f"timestamp outside the validity window: {-skew:.1f} s in the future, at most {window:g} s accepted")


def verify_request(secret, request, body, now, window=DEFAULT_WINDOW):
    """``verify`` for a twisted.web request, whose ``uri`` is the target as sent."""
    verify(secret, request.method, request.uri, body, request.requestHeaders, now, window)


class PeerAuthenticator:
    """The cluster secret and a clock in one object; does nothing without a
    secret, so callers need not test whether authentication is on."""

    def __init__(self, secret, clock=None, window=DEFAULT_WINDOW):
        self._secret = secret
        self._now = clock.seconds if clock is not None else time.time
        self.window = window

    @property
    def enabled(self):
        return bool(self._secret)

    def headers(self, method, path, body):
        """Headers to add to an outgoing peer request ({} without a secret)."""
        if not self.enabled:
            return {}
        return sign(self._secret, method, path, body, self._now())

    def check(self, request, body):
        """Raises ``unauthorized`` unless the incoming request is authentic."""
        if self.enabled:
            verify_request(self._secret, request, body, self._now(), self.window)
