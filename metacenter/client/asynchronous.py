"""``AsyncClient``: the Twisted client (twisted.web's Agent over a persistent
connection pool; treq's conveniences (URL objects, cookies, redirects) cost
about as much CPU per call as the rest of the call, and a gateway needs none).
"""

import treq
from twisted.internet import defer, threads
from twisted.internet.error import ConnectingCancelledError
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from metacenter.bodyproducer import BytesProducer
from metacenter.client import calls
from metacenter.client.base import (
    DEFAULT_COOLDOWN,
    DEFAULT_FAILURE_THRESHOLD,
    DEFAULT_TIMEOUT,
    DEFAULT_TRACKED_REQUESTS,
    ClientBase,
    log,
)

DEFAULT_PERSISTENT_PER_NODE = 16  # kept-alive connections per node

# Request headers by whether the call has a body (Agent copies nothing: shared).
_HEADERS = {True: Headers({k: [v] for k, v in calls.JSON_HEADERS.items()}),
            False: Headers({k: [v] for k, v in calls.GET_HEADERS.items()})}


class AsyncClient(ClientBase):
    """The same methods as ``Client``; each returns a Deferred of the value
    (failing with ``MetacenterError``). Nothing blocks the reactor: DNS
    lookups run in the reactor's thread pool.

    ``nodes``: a list of node strings or ``DnsNodes``. ``reactor``: the
    reactor (the global one when None). ``timeout``: seconds for a whole
    request, answer body included (0.1, the Go gateway's). ``clock``: what the
    breakers and DNS refreshes read ``seconds()`` from (the reactor when
    None; tests pass a ``task.Clock``). Call ``close()`` (a Deferred) to drop
    the kept-alive connections.
    """

    def __init__(self, nodes, reactor=None, *, timeout=DEFAULT_TIMEOUT, failure_threshold=DEFAULT_FAILURE_THRESHOLD,
                 breaker_cooldown=DEFAULT_COOLDOWN, tracked_requests=DEFAULT_TRACKED_REQUESTS, clock=None,
                 persistent_per_node=DEFAULT_PERSISTENT_PER_NODE):
        if reactor is None:
            from twisted.internet import reactor
        super().__init__(nodes, clock or reactor, timeout=timeout, failure_threshold=failure_threshold,
                         breaker_cooldown=breaker_cooldown, tracked_requests=tracked_requests)
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = persistent_per_node
        self._agent = Agent(reactor, pool=self._pool, connectTimeout=timeout)
        self._lookup = None  # the Deferred of the DNS lookup in flight
        self._lookup_waiters = []

    def close(self):
        """Drop the kept-alive connections; fires when they are closed."""
        return self._pool.closeCachedConnections()

    def refresh_nodes(self):
        """Look the DNS name up now (or join the lookup in flight); fires with
        the node URLs. Never fails: a failed lookup keeps the last nodes."""
        if self._source.dns is None:
            return defer.succeed(self.nodes)
        waiter = defer.Deferred()
        self._lookup_waiters.append(waiter)
        if self._lookup is None:
            self._source.looked_up(self._clock.seconds())
            self._lookup = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                                     self._source.dns.resolve)
            self._lookup.addErrback(lambda failure: failure.value if failure.check(LookupError) else failure)
            self._lookup.addCallback(self._looked_up)
            self._lookup.addErrback(lambda failure: log.error("applying a DNS lookup failed: %s",
                                                              failure.getTraceback()))
            self._lookup.addBoth(self._lookup_done)
        return waiter

    def _lookup_done(self, _):
        self._lookup = None
        waiters, self._lookup_waiters = self._lookup_waiters, []
        for waiter in waiters:
            waiter.callback(self.nodes)

    def _run(self, call):
        return defer.Deferred.fromCoroutine(self._execute(call))

    async def _execute(self, call):
        if self._source.dns is not None and self._source.due(self._clock.seconds()):
            refreshed = self.refresh_nodes()
            if not self._router.nodes:
                await refreshed  # the first lookup: nothing to call yet
        targets, explicit = self._targets(call)
        attempts, last_error = [], None
        for node in targets:
            ticket = self._acquire(node, explicit)
            if ticket is None:
                attempts.append((node.url, "circuit breaker open"))
                continue
            try:
                status, body, trace_id = await self._send(node, call)
            except defer.CancelledError:  # the caller cancelled the call: stop, blaming no node
                self._abandoned(node, ticket, explicit)
                raise
            except Exception as e:
                self._record(node, ticket, False, explicit)
                attempts.append((node.url, _describe(e)))
                continue
            try:
                outcome = calls.decode(call, node, status, body, trace_id)
            except Exception:
                self._record(node, ticket, True, explicit)  # it answered: the call is what is wrong
                raise
            if isinstance(outcome, calls.NodeFailed):
                self._record(node, ticket, False, explicit)
                attempts.append((node.url, outcome.description))
                last_error = outcome.error
                continue
            self._record(node, ticket, True, explicit)
            self._answered(call, node)
            return outcome.value
        raise self._no_node(attempts, last_error)

    def _send(self, node, call):
        body = None if call.body is None else BytesProducer(call.body)
        d = self._agent.request(call.method.encode("ascii"), (node.url + call.path).encode("ascii"),
                                _HEADERS[call.body is not None], body)

        def read(response):
            trace = response.headers.getRawHeaders(b"x-trace-id")
            return treq.content(response).addCallback(
                lambda body: (response.code, body, trace[0].decode("ascii", "replace") if trace else None))

        d.addCallback(read)
        # One deadline for the whole exchange: cancelling cancels whichever
        # step (connect, answer, body) is pending. The Agent reports a
        # cancellation in its own wrappers; ``settle`` says which it was.
        expired = []

        def expire():
            expired.append(True)
            d.cancel()

        timer = self._reactor.callLater(self.timeout, expire)

        def settle(result):
            if timer.active():
                timer.cancel()
            if isinstance(result, Failure) and _cancelled(result):
                if expired:
                    return Failure(defer.TimeoutError(f"no answer within {self.timeout} s"))
                return Failure(defer.CancelledError())
            return result

        return d.addBoth(settle)


def _cancelled(failure):
    if failure.check(defer.CancelledError, ConnectingCancelledError):
        return True
    reasons = getattr(failure.value, "reasons", None)
    return bool(reasons) and all(_cancelled(reason) for reason in reasons)


def _describe(error):
    if isinstance(error, defer.TimeoutError):
        return "timeout"
    text = str(error)
    name = type(error).__name__
    if name == "ConnectionRefusedError" or "Connection refused" in text:
        return "connection refused"
    return f"{name}: {text}" if text else name
