"""``Client``: the blocking client (stdlib http.client, keep-alive)."""

import http.client
import threading
import time

from metacenter.client import calls
from metacenter.client.base import (
    DEFAULT_COOLDOWN,
    DEFAULT_FAILURE_THRESHOLD,
    DEFAULT_TIMEOUT,
    DEFAULT_TRACKED_REQUESTS,
    ClientBase,
)

DEFAULT_IDLE_PER_NODE = 16  # kept-alive connections per node

# A kept-alive connection the node closed meanwhile fails like this on
# first use; it says nothing about the node, so the call is sent again on a
# new connection (every call is safe to repeat).
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class MonotonicClock:
    """``seconds()`` from time.monotonic: breakers must not jump with the wall clock."""

    @staticmethod
    def seconds():
        return time.monotonic()


class Client(ClientBase):
    """A blocking metacenter client; every method of ``calls.Methods``
    returns its value or raises ``MetacenterError``.

    ``nodes``: a list of ``"http://10.0.0.5:8080"`` / ``"10.0.0.5:8080"``
    strings, or ``DnsNodes(name, port)``. ``timeout``: seconds for each
    socket operation of a request (connect, send, each read), 0.1 like the Go
    gateway. ``failure_threshold`` consecutive failures open a node's circuit
    breaker for ``breaker_cooldown`` seconds. ``tracked_requests``: how many
    request_id -> node entries are kept for the deletes. ``clock``: an object
    with ``seconds()`` (tests pass a ``twisted.internet.task.Clock``).

    Thread-safe: connections are pooled per node (at most ``idle_per_node``
    kept idle). A DNS lookup, when due, runs in the calling thread.
    """

    def __init__(self, nodes, *, timeout=DEFAULT_TIMEOUT, failure_threshold=DEFAULT_FAILURE_THRESHOLD,
                 breaker_cooldown=DEFAULT_COOLDOWN, tracked_requests=DEFAULT_TRACKED_REQUESTS, clock=None,
                 idle_per_node=DEFAULT_IDLE_PER_NODE):
        super().__init__(nodes, clock or MonotonicClock(), timeout=timeout, failure_threshold=failure_threshold,
                         breaker_cooldown=breaker_cooldown, tracked_requests=tracked_requests)
        self._lock = threading.Lock()
        self._idle = {}  # node key -> [HTTPConnection], most recently used last
        self._idle_per_node = idle_per_node

    def close(self):
        """Close the kept-alive connections."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def refresh_nodes(self):
        """Look the DNS name up now (no-op for a fixed list); returns the node URLs."""
        if self._source.dns is not None:
            with self._lock:
                self._source.looked_up(self._clock.seconds())
            self._lookup()
        return self.nodes

    # -- the call loop -------------------------------------------------------

    def _run(self, call):
        if self._source.dns is not None:
            with self._lock:
                due = self._source.due(self._clock.seconds())
                if due:
                    # Claimed under the lock: one thread looks up, the others go on with the last nodes.
                    self._source.looked_up(self._clock.seconds())
            if due:
                self._lookup()
        with self._lock:
            targets, explicit = self._targets(call)
        attempts, last_error = [], None
        for node in targets:
            with self._lock:
                ticket = self._acquire(node, explicit)
            if ticket is None:
                attempts.append((node.url, "circuit breaker open"))
                continue
            try:
                status, body, trace_id = self._send(node, call)
            except (OSError, http.client.HTTPException) as e:
                with self._lock:
                    self._record(node, ticket, False, explicit)
                attempts.append((node.url, _describe(e)))
                continue
            except BaseException:  # KeyboardInterrupt and the like: not the node's doing
                with self._lock:
                    self._abandoned(node, ticket, explicit)
                raise
            try:
                outcome = calls.decode(call, node, status, body, trace_id)
            except Exception:
                with self._lock:
                    self._record(node, ticket, True, explicit)  # it answered: the call is what is wrong
                raise
            if isinstance(outcome, calls.NodeFailed):
                with self._lock:
                    self._record(node, ticket, False, explicit)
                attempts.append((node.url, outcome.description))
                last_error = outcome.error
                continue
            with self._lock:
                self._record(node, ticket, True, explicit)
                self._answered(call, node)
            return outcome.value
        raise self._no_node(attempts, last_error)

    def _lookup(self):
        try:
            result = self._source.dns.resolve()
        except LookupError as e:
            result = e
        with self._lock:
            self._looked_up(result)
            known = {node.key for node in self._router.nodes}
            gone = [key for key in self._idle if key not in known]
            closing = [c for key in gone for c in self._idle.pop(key)]
        for connection in closing:
            connection.close()

    def _send(self, node, call):
        """-> (HTTP status, body bytes, X-Trace-ID or None)."""
        connection, reused = self._take(node)
        try:
            return self._exchange(node, connection, call)
        except _STALE:
            connection.close()
            if not reused:
                raise
        except BaseException:
            connection.close()
            raise
        connection = self._connect(node)
        try:
            return self._exchange(node, connection, call)
        except BaseException:
            connection.close()
            raise

    def _exchange(self, node, connection, call):
        connection.request(call.method, call.path, body=call.body, headers=call.headers)
        response = connection.getresponse()
        body = response.read()
        trace_id = response.getheader("X-Trace-ID")
        if response.will_close:
            connection.close()
        else:
            self._give(node, connection)
        return response.status, body, trace_id

    def _connect(self, node):
        cls = http.client.HTTPSConnection if node.scheme == "https" else http.client.HTTPConnection
        return cls(node.host, node.port, timeout=self.timeout)

    def _take(self, node):
        with self._lock:
            idle = self._idle.get(node.key)
            if idle:
                return idle.pop(), True
        return self._connect(node), False

    def _give(self, node, connection):
        with self._lock:
            idle = self._idle.setdefault(node.key, [])
            if len(idle) < self._idle_per_node:
                idle.append(connection)
                return
        connection.close()


def _describe(error):
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
