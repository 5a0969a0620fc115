"""Replication sender: every accepted client mutation goes to every peer.

Per peer, events wait in a bounded queue and leave in batches (POST
/v1/replica/batch) as soon as a batch holds ``batch_size`` events, or
``batch_interval`` after the previous batch left: an event after a quiet spell
goes at once, under load a batch leaves every interval, and no event waits
longer than that. One batch per peer is in flight at a time, so a slow peer
simply gets bigger batches. Each peer has its own queue, timers
and requests: a slow or dead peer delays nobody else, and the client's request
only appends to the queues. A full queue drops its oldest events (counted);
anti-entropy repairs what a peer missed.

A peer that answers the batch endpoint with 404/405 is a node of the reference
implementation: it gets the reference's single events (POST /v1/replica/event,
``Event-Type`` header, the original request as body, 2 attempts) and is asked
for batches again every ``probe_interval``.

``PeerClient`` is the transport shared with warm start and anti-entropy:
persistent connections, the reference's dial and request timeouts, and a
signature on every request when a cluster secret is set.
"""

import json
import socket
import uuid
from collections import deque
from time import perf_counter

import treq
from prometheus_client import Counter, Gauge, Histogram
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from metacenter.bodyproducer import BytesProducer
from metacenter.cluster.discovery import format_peer
from metacenter.cluster.stream import decode_entries
from metacenter.core.events import (EVENT_ADD, EVENT_CACHE_SAVE, EVENT_ENGINE_RESET, EVENT_LEASE_KEEPALIVE,
                                    EVENT_LEASE_REVOKE, EVENT_REFRESH, LOAD_EVENT_TYPES)
from metacenter.runtime.logs import ThrottledLog, logger

log = logger("metacenter.cluster.replication")

MODE_BATCH = "batch"
MODE_SINGLE = "single"
BATCH_PATH = "/v1/replica/batch"
EVENT_PATH = "/v1/replica/event"
# Every route a peer signs and checks begins so (api/replica.py).
PEER_ROUTES = "/v1/replica/"

SEND_ATTEMPTS = 2  # the reference's, per request
BACKOFF_FIRST = 0.05  # seconds before sending again to a peer after a failed request
BACKOFF_MAX = 1.0
SINGLE_CONCURRENCY = 16  # single events in flight per peer
FAILURE_LOG_INTERVAL = 30.0  # an ongoing failure is logged again at most this often
DRAIN_TIMEOUT = 2.0  # seconds a stopping node spends sending what is queued

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


# -- transport -----------------------------------------------------------------


def event_body(event_type, event):
    """The JSON object a replicated event carries (the original request, with
    its timestamp), as the reference sends it."""
    if event_type == EVENT_CACHE_SAVE:
        cluster, hashes, ip = event
        return {"cluster": cluster, "prompt_hash": hashes, "ip": ip}
    if event_type == EVENT_ADD:
        body = {"cluster": event.cluster, "request_id": event.request_id, "ip": event.ip,
                "prompt_length": event.prompt_length, "timestamp": event.timestamp}
        # Ours only when set, so an add without them is the reference's body.
        if event.prompt_tokens:
            body["prompt_tokens"] = event.prompt_tokens
        if event.lease is not None:
            body["lease"] = event.lease
        return body
    if event_type == EVENT_ENGINE_RESET:
        return {"cluster": event.cluster, "ip": event.ip}
    if event_type == EVENT_LEASE_KEEPALIVE:
        return {"lease": event.lease, "ttl_ms": event.ttl_ms}
    if event_type == EVENT_LEASE_REVOKE:
        return {"lease": event.lease}
    if event_type == EVENT_REFRESH:
        return {"request_ids": list(event.request_ids)}
    return {"request_id": event.request_id, "timestamp": event.timestamp}


class _KeepAliveEndpoint:
    def __init__(self, endpoint, period):
        self._endpoint = endpoint
        self._period = period

    def connect(self, protocol_factory):
        return self._endpoint.connect(protocol_factory).addCallback(self._keepalive)

    def _keepalive(self, protocol):
        # A peer that vanished without a FIN (a node lost with its machine)
        # is noticed by the kernel instead of holding a pooled connection.
        transport = protocol.transport
        try:
            transport.setTcpKeepAlive(True)
            handle = transport.getHandle()
            period = max(1, int(self._period))
            if hasattr(socket, "TCP_KEEPIDLE"):
                handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, period)
                handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, period)
        except (AttributeError, OSError):
            pass
        return protocol


@implementer(IAgentEndpointFactory)
class PeerEndpoints:
    """Plain TCP to a peer with the dial timeout and TCP keepalive."""

    def __init__(self, reactor, dial_timeout, keepalive_period):
        self._reactor = reactor
        self._dial_timeout = dial_timeout
        self._keepalive_period = keepalive_period

    def endpointForURI(self, uri):
        host = uri.host.decode("ascii").strip("[]")  # an IPv6 literal comes bracketed
        endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._dial_timeout)
        return _KeepAliveEndpoint(endpoint, self._keepalive_period)


class _QuietPool(HTTPConnectionPool):
    """Does not log every new connection to a peer."""

    class _factory(HTTPConnectionPool._factory):
        noisy = False


def make_http_client(reactor, dial_timeout=0.5, max_idle_conns=100, idle_conn_timeout=90.0,
                     keepalive_period=30.0):
    """A treq HTTPClient over a persistent connection pool; returns (client, pool)."""
    pool = _QuietPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_idle_conns
    pool.cachedConnectionTimeout = idle_conn_timeout
    agent = Agent.usingEndpointFactory(reactor, PeerEndpoints(reactor, dial_timeout, keepalive_period), pool=pool)
    return HTTPClient(agent, data_to_body_producer=BytesProducer), pool


class PeerClient:
    """Requests to peers: signed when the authenticator has a secret, each
    bounded by a timeout (seconds of ``clock``) that covers connecting,
    sending and reading.

    ``http_client`` is anything with treq's ``request(method, url, data=,
    headers=, allow_redirects=, unbuffered=)``: ``make_http_client``'s in a
    process, treq's ``StubTreq`` over another node's API resource in tests.
    ``pool`` (optional) is closed by ``close()``.
    """

    def __init__(self, http_client, clock, authenticator=None, request_timeout=1.0, pool=None):
        self._http = http_client
        self.clock = clock
        self._auth = authenticator
        self.request_timeout = request_timeout
        self._pool = pool

    def _headers(self, method, path, body, extra):
        headers = {"Content-Type": ["application/json"]}
        if extra:
            headers.update({name: [value] for name, value in extra.items()})
        if self._auth is not None:
            headers.update({name: [value] for name, value in self._auth.headers(method, path, body).items()})
        return headers

    def _send(self, method, peer, path, body, headers):
        return self._http.request(
            method, "http://" + format_peer(peer) + path, data=body or None,
            headers=self._headers(method, path, body, headers), allow_redirects=False, unbuffered=True)

    def _answered(self, peer, path, status, content):
        # Every answer of a signed peer route tells whether the peer accepts
        # this node's signature (a 401 refuses it): the node is not ready while
        # every peer refuses. Other routes (the status probe) check nothing.
        if self._auth is not None and path.startswith(PEER_ROUTES):
            self._auth.answered(peer, status, content)
        return status, content

    def request(self, method, peer, path, body=b"", headers=None, timeout=None):
        """Deferred (status code, body bytes)."""
        d = self._send(method, peer, path, body, headers)
        d.addCallback(lambda response: treq.content(response).addCallback(
            lambda content: self._answered(peer, path, response.code, content)))
        return d.addTimeout(timeout or self.request_timeout, self.clock)

    def stream(self, method, peer, path, body=b"", on_line=None, timeout=None, headers=None, answer_timeout=None):
        """Reads a newline-delimited response as it arrives: ``on_line(bytes)``
        for every line (a few hundred per network read, so one reactor turn
        never handles more than one read). Deferred (status code, non-stream
        body or None); cancelling it, or the timeout, closes the connection.
        The answer must begin within ``answer_timeout`` (default: the request
        timeout; a paused peer that accepts connections but never answers
        costs no more than that), the whole stream within ``timeout``."""
        d = self._send(method, peer, path, body, headers)
        d.addTimeout(min(answer_timeout or self.request_timeout, timeout or self.request_timeout), self.clock)

        def got_response(response):
            if response.code != 200:
                return treq.content(response).addCallback(
                    lambda content: self._answered(peer, path, response.code, content))
            self._answered(peer, path, 200, None)
            reader = LineReader(on_line)
            response.deliverBody(reader)
            return reader.done.addCallback(lambda _: (200, None))

        d.addCallback(got_response)
        return d.addTimeout(timeout or self.request_timeout, self.clock)

    def close(self):
        return self._pool.closeCachedConnections() if self._pool is not None else defer.succeed(None)


class LineReader:
    """An IProtocol for ``deliverBody`` splitting the body into lines."""

    def __init__(self, on_line):
        self._on_line = on_line
        self._buffer = b""
        self._transport = None
        self.done = defer.Deferred(self._cancel)

    def makeConnection(self, transport):
        self._transport = transport

    def dataReceived(self, data):
        if self.done.called:
            return
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        on_line = self._on_line
        try:
            for line in lines:
                if line:
                    on_line(line)
        except Exception:
            self._abort(Failure())

    def connectionLost(self, reason):
        if self.done.called:
            return
        if reason.check(ResponseDone):
            if self._buffer.strip():
                try:
                    self._on_line(self._buffer)
                except Exception:
                    self.done.errback(Failure())
                    return
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _abort(self, failure):
        self.done.errback(failure)
        if self._transport is not None:
            self._transport.stopProducing()

    def _cancel(self, _):
        if self._transport is not None:
            self._transport.stopProducing()


class SendFailed(Exception):
    """No usable answer after every attempt; ``reason`` for the log."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def describe_error(failure):
    """A request's Failure -> a short reason for the log ("timed out", or
    the exception's type and message)."""
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return "timed out"
    error = failure.value
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


# -- metrics ---------------------------------------------------------------------


class ReplicationMetrics:
    """The ``metacenter_replication_*`` series, labelled by peer;
    ``forget(peer)`` drops a peer's series when it leaves."""

    def __init__(self, registry):
        self.registry = r = registry
        self.queue_depth = Gauge("metacenter_replication_queue_depth", "Events waiting to be sent to a peer.",
                                 ["peer"], registry=r)
        self.sent = Counter("metacenter_replication_events_sent", "Events a peer acknowledged.", ["peer"], registry=r)
        self.failed = Counter(
            "metacenter_replication_events_failed",
            "Events of requests to a peer that failed (queued again, unless the peer rejected them).",
            ["peer"], registry=r)
        self.dropped = Counter(
            "metacenter_replication_events_dropped",
            "Events discarded unsent (queue full, or the peer left); anti-entropy repairs them.", ["peer"], registry=r)
        self.batch_size = Histogram("metacenter_replication_batch_size_events", "Events per replication request.",
                                    ["peer"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.send_seconds = Histogram(
            "metacenter_replication_send_duration_seconds", "Replication request round trip, retries included.",
            ["peer"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r)
        self.lag = Histogram(
            "metacenter_replication_lag_seconds",
            "Per event, from being queued for a peer to the peer's acknowledgement of having applied it.",
            ["peer"], buckets=(0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1,
                               0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.batch_mode = Gauge("metacenter_replication_peer_batch_mode",
                                "1 while a peer takes batches, 0 while it gets single events (a reference node).",
                                ["peer"], registry=r)
        self._all = (self.queue_depth, self.sent, self.failed, self.dropped, self.batch_size, self.send_seconds,
                     self.lag, self.batch_mode)

    def forget(self, peer_name):
        for metric in self._all:
            try:
                metric.remove(peer_name)
            except KeyError:
                pass


# -- sender ----------------------------------------------------------------------


class PeerLink:
    """One peer: its queue, its mode, its requests in flight."""

    def __init__(self, peer, replicator):
        self.peer = peer
        self.name = format_peer(peer)
        self._r = replicator
        self._clock = replicator.clock
        self.queue = deque()  # (event_type, event, trace_id, enqueued_at)
        self.mode = MODE_BATCH
        self.probe_at = None  # single mode: when to try a batch again
        self.max_batch_bytes = replicator.max_batch_bytes
        self._in_flight = {}  # request token -> enqueue time of its oldest event
        self._next_token = 0
        self.failures_in_a_row = 0
        self.resume_at = 0.0
        self._wakeup = None
        self._last_batch_at = float("-inf")  # when the previous batch left
        self.sent = self.failed = self.dropped = 0
        self.closed = False
        self.draining = False
        m = replicator.metrics
        self._m_sent = m.sent.labels(self.name)
        self._m_failed = m.failed.labels(self.name)
        self._m_dropped = m.dropped.labels(self.name)
        self._m_batch_size = m.batch_size.labels(self.name)
        self._m_send_seconds = m.send_seconds.labels(self.name)
        self._m_lag = m.lag.labels(self.name)
        self._m_mode = m.batch_mode.labels(self.name)
        self._m_mode.set(1)
        m.queue_depth.labels(self.name).set_function(lambda: len(self.queue))

    # -- queue -------------------------------------------------------------------

    def enqueue(self, item):
        """Queues ``(event_type, event, trace_id, enqueued_at)``, dropping the
        oldest event if the queue is full, and schedules a send."""
        queue = self.queue
        if len(queue) >= self._r.queue_size:
            queue.popleft()
            self._count_dropped(1)
        queue.append(item)
        if self._wakeup is None:
            if self.mode == MODE_BATCH and len(queue) < self._r.batch_size:
                self._schedule(self._last_batch_at + self._r.batch_interval - item[3])
            else:
                self._schedule(0)
        elif len(queue) == self._r.batch_size:
            self._schedule(0)  # full: no need to wait for the timer

    def _schedule(self, delay):
        """Pump after ``delay`` unless a pump is already due no later."""
        if self.closed:
            return
        wakeup = self._wakeup
        if wakeup is not None:
            if wakeup.getTime() <= self._clock.seconds() + delay:
                return
            wakeup.cancel()
        self._wakeup = self._clock.callLater(max(delay, 0), self._pump)

    def _pump(self):
        self._wakeup = None
        try:
            self._pump_queue()
        except Exception:
            log.failure("replication to {peer} failed to send", peer=self.name)
            self._back_off()
            self._schedule(BACKOFF_MAX)

    def _pump_queue(self):
        queue = self.queue
        if self.closed or not queue:
            return
        now = self._clock.seconds()
        if now < self.resume_at:
            self._schedule(self.resume_at - now)
            return
        probing = self.mode == MODE_SINGLE and now >= self.probe_at
        if self.mode == MODE_SINGLE and not probing:
            while queue and len(self._in_flight) < SINGLE_CONCURRENCY:
                self._send_single(queue.popleft())
            return
        if self._in_flight:
            return  # the answer pumps again
        wait = self._last_batch_at + self._r.batch_interval - now
        if len(queue) < self._r.batch_size and wait > 0 and not probing and not self.draining:
            self._schedule(wait)
            return
        self._send_batch()

    def _requeue(self, items):
        """Put unsent events back in front, oldest first; what no longer fits
        is dropped (oldest first, like an overflow)."""
        room = self._r.queue_size - len(self.queue)
        if room < len(items):
            self._count_dropped(len(items) - max(room, 0))
            items = items[len(items) - max(room, 0):]
        self.queue.extendleft(reversed(items))

    def _count_dropped(self, n):
        self.dropped += n
        self._m_dropped.inc(n)

    def _track(self, oldest):
        self._next_token += 1
        self._in_flight[self._next_token] = oldest
        return self._next_token

    # -- batches -----------------------------------------------------------------

    def _send_batch(self):
        queue = self.queue
        limit = self._r.batch_size
        budget = self.max_batch_bytes - 16
        items, parts = [], []
        while queue and len(items) < limit:
            event_type, event, trace_id, _ = queue[0]
            part = _encode({"type": event_type, "trace_id": trace_id, "body": event_body(event_type, event)})
            part = part.encode("utf-8")
            if items and len(part) + 1 > budget:
                break
            budget -= len(part) + 1
            items.append(queue.popleft())
            parts.append(part)
        body = b'{"events":[' + b",".join(parts) + b"]}"
        self._last_batch_at = self._clock.seconds()
        token = self._track(items[0][3])
        started = perf_counter()
        d = self._post(BATCH_PATH, body, {"TraceId": str(uuid.uuid4())})
        d.addBoth(self._batch_answered, items, token, started)

    def _batch_answered(self, result, items, token, started):
        self._in_flight.pop(token, None)
        if self.closed:
            return
        n = len(items)
        if isinstance(result, Failure):
            self._failed(items, describe_error(result) if not result.check(SendFailed) else result.value.reason)
        else:
            status, content = result
            if status == 200:
                self._delivered(items, started)
                self._note_rejected(content)
                if self.mode == MODE_SINGLE:
                    log.info("peer {peer} takes batches again", peer=self.name)
                    self._set_mode(MODE_BATCH)
            elif status in (404, 405):
                if self.mode == MODE_BATCH:
                    log.info("peer {peer} has no batch endpoint (HTTP {status}; a reference node?): "
                             "sending single events, asking again in {probe:g} s",
                             peer=self.name, status=status, probe=self._r.probe_interval)
                self._set_mode(MODE_SINGLE)
                self.probe_at = self._clock.seconds() + self._r.probe_interval
                self._requeue(items)
            elif status == 413 and n > 1:
                self.max_batch_bytes = max(1024, self.max_batch_bytes // 2)
                log.warn("peer {peer} refused a batch of {count} events as too large; batches now up to {limit} bytes",
                         peer=self.name, count=n, limit=self.max_batch_bytes)
                self._requeue(items)
            elif status == 401:
                self._failed(items, "HTTP 401: the peer refused our signature (a different cluster secret?)")
            else:
                self._rejected(items, status, content)
        self._pump()

    def _note_rejected(self, content):
        try:
            rejected = json.loads(content)["data"]["rejected"]
        except (ValueError, KeyError, TypeError):
            return
        if rejected:
            self.failed += len(rejected)
            self._m_failed.inc(len(rejected))
            log.warn("peer {peer} rejected {count} replicated events, first: {first}",
                     peer=self.name, count=len(rejected), first=rejected[0])

    # -- single events (the reference protocol) --------------------------------------

    def _send_single(self, item):
        event_type, event, trace_id, enqueued = item
        if event_type not in LOAD_EVENT_TYPES:
            return  # a KV-cache save: the reference protocol has no such event
        token = self._track(enqueued)
        body = _encode(event_body(event_type, event)).encode("utf-8")
        headers = {"Event-Type": event_type, "TraceId": trace_id or str(uuid.uuid4())}
        started = perf_counter()
        d = self._post(EVENT_PATH, body, headers)
        d.addBoth(self._single_answered, item, token, started)

    def _single_answered(self, result, item, token, started):
        self._in_flight.pop(token, None)
        if self.closed:
            return
        if isinstance(result, Failure):
            self._failed([item], describe_error(result) if not result.check(SendFailed) else result.value.reason)
        else:
            status, content = result
            if status == 200:
                self._delivered([item], started)
            elif status == 401:
                self._failed([item], "HTTP 401: the peer refused our signature (a different cluster secret?)")
            else:
                self._rejected([item], status, content)
        self._pump()

    # -- outcomes ----------------------------------------------------------------

    @defer.inlineCallbacks
    def _post(self, path, body, headers):
        """(status, body) of the first attempt that got an answer below 500."""
        reason = None
        for _ in range(SEND_ATTEMPTS):
            try:
                status, content = yield self._r.client.request("POST", self.peer, path, body, headers)
            except Exception:
                reason = describe_error(Failure())
                continue
            if status >= 500:
                reason = f"HTTP {status}"
                continue
            return status, content
        raise SendFailed(reason)

    def _delivered(self, items, started):
        n = len(items)
        self.sent += n
        self._m_sent.inc(n)
        self._m_batch_size.observe(n)
        self._m_send_seconds.observe(perf_counter() - started)
        now = self._clock.seconds()
        observe = self._m_lag.observe
        for item in items:
            observe(now - item[3])
        if self.failures_in_a_row:
            log.info("replication to {peer} works again after {failures} failed requests",
                     peer=self.name, failures=self.failures_in_a_row)
            self.failures_in_a_row = 0
            self._r.failure_log.reset(self.name)
        self.resume_at = 0.0

    def _failed(self, items, reason):
        """The peer did not answer (or refused us): keep the events, wait."""
        self.failed += len(items)
        self._m_failed.inc(len(items))
        self._requeue(items)
        self._back_off()
        # Throttled whatever the reason: a peer that is down fails in
        # changing ways (refused, timed out, 503) and is one condition.
        self._r.failure_log.emit(
            self.name, None, "warn",
            "replication to {peer} failing ({reason}); {queued} events queued, retrying with back-off",
            peer=self.name, reason=reason, queued=len(self.queue), failures=self.failures_in_a_row)

    def _back_off(self):
        self.failures_in_a_row += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(self.failures_in_a_row - 1, 16))
        self.resume_at = self._clock.seconds() + delay

    def _rejected(self, items, status, content):
        """The peer answered and refused the events: sending them again would
        not help."""
        self.failed += len(items)
        self._m_failed.inc(len(items))
        log.error("peer {peer} refused {count} replicated events with HTTP {status}: {body}",
                  peer=self.name, count=len(items), status=status,
                  body=(content or b"")[:300].decode("utf-8", "replace"))

    def _set_mode(self, mode):
        self.mode = mode
        self._m_mode.set(1 if mode == MODE_BATCH else 0)

    # -- status ------------------------------------------------------------------

    def drain(self):
        """Send everything now, without waiting for batches to fill."""
        self.draining = True
        self._schedule(0)

    @property
    def busy(self):
        return bool(self.queue or self._in_flight)

    def lag_seconds(self):
        """Age of the oldest event not yet acknowledged by the peer."""
        oldest = [self.queue[0][3]] if self.queue else []
        oldest.extend(self._in_flight.values())
        if not oldest:
            return 0.0
        return max(0.0, self._clock.seconds() - min(oldest))

    def status(self):
        """The peer's replication status for ``GET /status``: mode, queue
        depth, sent/failed/dropped counts, lag in ms."""
        return {"peer": self.name, "mode": self.mode, "queue_depth": len(self.queue), "sent": self.sent,
                "failed": self.failed, "dropped": self.dropped, "lag_ms": round(self.lag_seconds() * 1000, 3)}

    def close(self):
        """The peer left: its pending events are of no use to anyone."""
        self.closed = True
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        if self.queue:
            self._count_dropped(len(self.queue))
            self.queue.clear()
        self._r.metrics.forget(self.name)
        self._r.failure_log.reset(self.name)


class Replicator(Service):
    """Fans accepted client mutations out to the peers: ``event_accepted`` is
    a node event listener (``Node(listeners=...)``), ``peers_changed`` a
    ``PeerDiscovery`` listener, ``peer_status`` the node's peer-status source.

    ``client`` is a ``PeerClient``; ``registry`` takes the
    ``metacenter_replication_*`` series. Batches hold up to ``batch_size``
    events and ``max_batch_bytes`` bytes and leave ``batch_interval`` seconds
    apart at most; each peer queues up to ``queue_size`` events; a reference
    peer is asked for batches again every ``probe_interval`` seconds.
    """

    name = "replication"

    def __init__(self, client, clock, *, registry, batch_size=128, batch_interval=0.005, queue_size=100000,
                 max_batch_bytes=65536, probe_interval=60.0):
        self.client = client
        self.clock = clock
        self.batch_size = batch_size
        self.batch_interval = batch_interval
        self.queue_size = queue_size
        self.max_batch_bytes = max_batch_bytes
        self.probe_interval = probe_interval
        self.metrics = ReplicationMetrics(registry)
        self.failure_log = ThrottledLog(log, clock, FAILURE_LOG_INTERVAL)
        self.links = {}  # (host, port) -> PeerLink
        self._link_list = ()

    def peers_changed(self, joined, left):
        """A ``PeerDiscovery`` listener: links for new peers, and the queues
        and series of peers that left are dropped."""
        for peer in left:
            link = self.links.pop(peer, None)
            if link is not None:
                link.close()
        for peer in joined:
            if peer not in self.links:
                self.links[peer] = PeerLink(peer, self)
        self._link_list = tuple(self.links.values())

    def event_accepted(self, event_type, event, trace_id):
        """A node event listener: the hot path, so it only queues."""
        links = self._link_list
        if links:
            item = (event_type, event, trace_id, self.clock.seconds())
            for link in links:
                link.enqueue(item)

    @defer.inlineCallbacks
    def drain(self, timeout=DRAIN_TIMEOUT):
        """Send every queued event now; fires when all peers acknowledged
        them, or after ``timeout`` seconds."""
        deadline = self.clock.seconds() + timeout
        for link in self._link_list:
            link.drain()
        while any(link.busy for link in self._link_list) and self.clock.seconds() < deadline:
            yield task.deferLater(self.clock, 0.01, lambda: None)
        for link in self._link_list:
            link.draining = False

    def peer_status(self):
        """One ``PeerLink.status()`` dict per peer, sorted by peer."""
        return [self.links[peer].status() for peer in sorted(self.links)]

    @defer.inlineCallbacks
    def stopService(self):
        """Sends what is queued before the node exits (a rolling update loses
        no event it acknowledged), for at most ``DRAIN_TIMEOUT`` seconds: a
        dead peer's queue is dropped, anti-entropy repairs it."""
        super().stopService()
        yield self.drain()
        left = sum(len(link.queue) for link in self._link_list)
        if left:
            log.warn("stopping with {events} events not replicated (peers not answering)", events=left)
        for link in self._link_list:
            link.close()
        self.links = {}
        self._link_list = ()
        yield self.client.close()


# -- stream or HTTP, per peer ------------------------------------------------------

MODE_STREAM = "stream"
STATUS_PATH = "/v1/node/status"

STATUS_RETRY = 1.0  # seconds before asking an unreachable peer again whether it streams
FALLBACK_FAILURES = 3  # failed stream connections before asking the peer whether it still streams
# Failed stream connections to a peer after its status answered with an open
# stream on the same port, before it is taken to be unreachable there (a
# firewall, a wrong --replication-port) and goes to HTTP until the next probe.
UNREACHABLE_FAILURES = 6
RETIRE_CHECK = 0.5  # seconds between checks whether a retired HTTP link has sent what it held


def stream_port(content):
    """The replication port a peer reports in its ``GET /v1/node/status``
    answer (``data.stream.port``), or None (no stream: an older version, a
    reference node, a node with ``--replication-listen none``)."""
    info = stream_info(content)
    return info[0] if info is not None else None


def stream_info(content):
    """``(port, open)`` from a peer's ``GET /v1/node/status`` answer, or
    None without a stream; ``open`` is False while the peer is warming up
    (its listener closes connections until then)."""
    try:
        stream = json.loads(content)["data"]["stream"]
        port = stream["port"]
    except (ValueError, KeyError, TypeError):
        return None
    if type(port) is not int or not 0 < port < 65536:
        return None
    return port, stream.get("open") is not False


class _PeerEndpoint:
    """A client endpoint to a peer's replication port, resolved at each
    connect (a peer restarted on another port is dialled there)."""

    def __init__(self, reactor, host, port_of, timeout):
        self._reactor, self._host, self._port_of, self._timeout = reactor, host, port_of, timeout

    def connect(self, factory):
        return HostnameEndpoint(self._reactor, self._host, self._port_of(), timeout=self._timeout).connect(factory)


class StreamOrHttp(Service):
    """Replication to every peer, over its stream where the peer has one,
    else over today's HTTP (batches, or a reference node's single events).

    ``stream`` is a ``stream.StreamReplicator`` over this node's log, ``http``
    a ``Replicator``, ``client`` the ``PeerClient`` that asks a peer's
    ``GET /v1/node/status`` whether and where it streams. ``port`` (the
    ``--replication-port``) overrides the port peers report.

    A peer starts on HTTP; as soon as its status reports a stream port it
    moves to the stream (from the log's end then: its HTTP link sends what it
    queued before and is retired). A streaming peer whose connections fail
    ``FALLBACK_FAILURES`` times is asked again: if it answers without a
    stream (rolled back to an older version), or with an open stream on the
    same port that failed ``UNREACHABLE_FAILURES`` more times since it was
    first seen open (a firewall, a wrong ``--replication-port``), the entries it has not acknowledged are decoded from the
    log into its HTTP link and it goes back to HTTP; a peer that does not
    answer at all is down, and its cursor waits in the log. An HTTP peer is asked again every ``probe_interval``
    seconds.

    ``event_accepted``, ``peers_changed``, ``peer_status`` and ``drain`` are
    those of the two replicators together.
    """

    name = "replication"

    def __init__(self, stream, http, client, clock, *, port=None, probe_interval=60.0):
        self.stream = stream
        self.http = http
        self.client = client
        self.clock = clock
        self.port = port
        self.probe_interval = probe_interval
        self.modes = {}  # peer -> MODE_STREAM or MODE_BATCH (HTTP, whatever its link's mode)
        self.ports = {}  # peer -> the replication port it reported
        self._fed = ()  # HTTP links that get new events
        self._probes = {}  # peer -> DelayedCall or Deferred of the next/current status request
        self._checking = set()  # streaming peers being asked whether they still stream
        self._open_seen = {}  # peer -> (port, its link's failures) when first seen open on that port
        self._series = {}  # stream peer name -> its metacenter_replication_* children
        self.fallbacks = 0  # times a streaming peer went back to HTTP
        self.upgrades = 0  # times an HTTP peer moved to the stream

    # -- hooks -------------------------------------------------------------------

    def endpoint(self, reactor, dial_timeout):
        """The ``connect(peer)`` for the StreamReplicator."""
        return lambda peer: _PeerEndpoint(reactor, peer[0], lambda: self.port or self.ports[peer], dial_timeout)

    def event_accepted(self, event_type, event, trace_id):
        """A node event listener: one append to the log (every streaming
        peer's), and the HTTP peers' queues. A node that knows no peer keeps
        no log (a lone node would hold up to the log's capacity for nobody);
        a peer that comes later starts at the log's end, and a node that took
        a snapshot of it before it was known is repaired (anti-entropy)."""
        if self.modes:
            self.stream.log.append(event_type, event)
        fed = self._fed
        if fed:
            item = (event_type, event, trace_id, self.clock.seconds())
            for link in fed:
                link.enqueue(item)

    def peers_changed(self, joined, left):
        for peer in left:
            mode = self.modes.pop(peer, None)
            self.ports.pop(peer, None)
            self._open_seen.pop(peer, None)
            if self._series.pop(format_peer(peer), None) is not None:
                self.http.metrics.forget(format_peer(peer))
            self._cancel_probe(peer)
            if mode == MODE_STREAM:
                self.stream.peers_changed((), (peer,))
            if peer in self.http.links:
                self.http.peers_changed((), (peer,))
        for peer in joined:
            if peer in self.modes:
                continue
            self.modes[peer] = MODE_BATCH
            self.http.peers_changed((peer,), ())
            if self.running:
                self._probe(peer)
        self._refeed()

    def stream_acked(self, link, events, lag_seconds):
        """``StreamReplicator(on_ack=)``: a stream peer's acknowledgement also
        feeds the ``metacenter_replication_*`` series (events sent, lag,
        "batch" size, queue depth) that dashboards and alerts read, whatever
        carries the events. Once per acknowledgement, not per event."""
        children = self._series.get(link.name)
        if children is None:
            children = self._stream_series(link.name)
        sent, lag, batch_size = children
        sent.inc(events)
        lag.observe(lag_seconds)
        batch_size.observe(events)

    def _stream_series(self, name):
        m = self.http.metrics
        # The series of a streaming peer exist like an HTTP peer's (a stream
        # drops nothing; a peer that fell behind counts as a repair instead).
        m.failed.labels(name)
        m.dropped.labels(name)
        m.batch_mode.labels(name).set(1)
        # Read when scraped: a peer that stopped acknowledging shows a growing queue.
        m.queue_depth.labels(name).set_function(lambda: self._stream_lag(name))
        children = self._series[name] = (m.sent.labels(name), m.lag.labels(name), m.batch_size.labels(name))
        return children

    def _stream_lag(self, name):
        for link in self.stream.links.values():
            if link.name == name:
                return link.lag_events()
        return 0

    def on_stream_failure(self, link, reason):
        """``StreamReplicator(on_failure=)``: after repeated failures, ask the
        peer whether it still has a stream."""
        peer = link.peer
        if link.failures >= FALLBACK_FAILURES and peer not in self._checking and self.modes.get(peer) == MODE_STREAM:
            self._checking.add(peer)
            d = self.client.request("GET", peer, STATUS_PATH)
            d.addBoth(self._checked, peer, link)
            d.addErrback(lambda f: log.failure("moving {peer} back to HTTP replication failed", f,
                                               peer=format_peer(peer)))

    # -- probing -------------------------------------------------------------------

    def _refeed(self):
        links = self.http.links
        self._fed = tuple(links[p] for p, mode in self.modes.items() if mode == MODE_BATCH and p in links)

    def _cancel_probe(self, peer):
        pending = self._probes.pop(peer, None)
        if isinstance(pending, defer.Deferred):
            pending.cancel()
        elif pending is not None and pending.active():
            pending.cancel()

    def _schedule_probe(self, peer, delay):
        self._cancel_probe(peer)
        self._probes[peer] = self.clock.callLater(delay, self._probe, peer)

    def _probe(self, peer):
        self._probes.pop(peer, None)
        if peer not in self.modes or not self.running:
            return
        try:
            d = self._probes[peer] = self.client.request("GET", peer, STATUS_PATH)
        except Exception:
            log.failure("asking {peer} for its replication stream failed", peer=format_peer(peer))
            self._schedule_probe(peer, self.probe_interval)
            return
        d.addBoth(self._probed, peer)
        d.addErrback(lambda f: log.failure("switching {peer} to its replication stream failed", f,
                                           peer=format_peer(peer)))

    def _probed(self, result, peer):
        if self._probes.get(peer) is not None and isinstance(self._probes[peer], defer.Deferred):
            del self._probes[peer]
        if isinstance(result, Failure):
            if result.check(defer.CancelledError) or peer not in self.modes:
                return
            # Down or starting: ask again soon (its HTTP link queues meanwhile).
            self._schedule_probe(peer, STATUS_RETRY)
            return
        if self.modes.get(peer) != MODE_BATCH:
            return
        status, content = result
        port = stream_port(content) if status == 200 else None
        if port is None:
            self._schedule_probe(peer, self.probe_interval)
            return
        self._to_stream(peer, port)

    def _to_stream(self, peer, port):
        self.ports[peer] = port
        self.modes[peer] = MODE_STREAM
        self.upgrades += 1
        log.info("peer {peer} has a replication stream (port {port}): streaming to it",
                 peer=format_peer(peer), port=self.port or port)
        self.stream.peers_changed((peer,), ())
        self._refeed()
        self._retire(peer)

    def _retire(self, peer):
        """The HTTP link of a peer now streaming goes once it sent what it held."""
        try:
            self._retire_now(peer)
        except Exception:
            log.failure("retiring the HTTP replication link of {peer} failed", peer=format_peer(peer))

    def _retire_now(self, peer):
        link = self.http.links.get(peer)
        if link is None or self.modes.get(peer) != MODE_STREAM:
            return
        if link.busy and self.running:
            self._probes[peer] = self.clock.callLater(RETIRE_CHECK, self._retire, peer)
            return
        self._probes.pop(peer, None)
        self.http.peers_changed((), (peer,))  # forgets the peer's series: made again for its stream
        self._stream_series(format_peer(peer))

    def _checked(self, result, peer, link):
        self._checking.discard(peer)
        if isinstance(result, Failure) or self.modes.get(peer) != MODE_STREAM:
            return  # down: its cursor waits in the log
        status, content = result
        info = stream_info(content) if status == 200 else None
        if info is None:
            self._to_http(peer, link, f"it has no replication stream any more (HTTP {status} on its status)")
            return
        port, is_open = info
        self.ports[peer] = port  # the next attempt dials it
        seen = self._open_seen.get(peer)
        if not is_open:
            self._open_seen.pop(peer, None)  # warming up: its listener turns connections away for now
        elif seen is None or seen[0] != port or link.failures < seen[1]:
            # Only failures from now on count: earlier ones may have been
            # against a process that was down, warming up, or on another port.
            self._open_seen[peer] = (port, link.failures)
        elif link.failures - seen[1] >= UNREACHABLE_FAILURES:
            self._to_http(peer, link, f"its replication stream does not work from here ({link.last_error})")

    def _to_http(self, peer, link, why):
        """Back to HTTP, taking along what the peer has not acknowledged."""
        log_ = self.stream.log
        cursor = link.cursor
        start = max(cursor.acked, log_.base, log_.end - self.http.queue_size)
        entries = log_.entries(start, log_.end)
        events, _, _ = decode_entries(b"[" + b",".join(entries) + b"]", len(entries))
        self.fallbacks += 1
        log.warn("peer {peer}: {why}; back to HTTP replication with the {count} events it had not "
                 "acknowledged, asking again in {probe:g} s", peer=format_peer(peer), why=why, count=len(events),
                 probe=self.probe_interval)
        self.modes[peer] = MODE_BATCH
        self.ports.pop(peer, None)
        self._open_seen.pop(peer, None)
        if self._series.pop(format_peer(peer), None) is not None:
            self.http.metrics.forget(format_peer(peer))  # its HTTP link makes them again
        self.stream.peers_changed((), (peer,))
        self._cancel_probe(peer)
        if peer not in self.http.links:
            self.http.peers_changed((peer,), ())
        http_link = self.http.links[peer]
        now = self.clock.seconds()
        for event_type, event in events:
            http_link.enqueue((event_type, event, None, now))
        self._refeed()
        self._schedule_probe(peer, self.probe_interval)

    # -- service -------------------------------------------------------------------

    def startService(self):
        super().startService()
        self.stream.startService()
        self.http.startService()
        for peer in list(self.modes):
            self._probe(peer)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        for peer in list(self._probes):
            self._cancel_probe(peer)
        yield defer.gatherResults([defer.maybeDeferred(self.stream.stopService),
                                   defer.maybeDeferred(self.http.stopService)])

    def drain(self, timeout=DRAIN_TIMEOUT):
        """Both replicators send what they hold; fires when done or after ``timeout`` s."""
        return defer.gatherResults([self.stream.drain(timeout), self.http.drain(timeout)])

    def peer_status(self):
        """One dict per peer, sorted by peer: its stream's status (mode
        "stream") or its HTTP link's (mode "batch" or "single")."""
        out = []
        for peer in sorted(self.modes):
            link = self.stream.links.get(peer) if self.modes[peer] == MODE_STREAM else None
            if link is None:
                link = self.http.links.get(peer)
            if link is not None:
                out.append(link.status())
        return out
