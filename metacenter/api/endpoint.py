"""What every route shares: the ``endpoint`` decorator, the only place where
results and errors become responses, and body reading.

``endpoint`` only marks a method; ``register_routes`` puts every marked
method of an API class on that class's own Klein app (``api.server``), so
there is no module-global app. A route is ``fn(self, request, trace_id)``;
what every route needs (413 for an oversized body, the trace id, metrics,
the error mapping) and what some need (the peer signature, readiness, an
NDJSON stream) is done here, once.

The API object a route belongs to provides ``node``, ``metrics``,
``peer_auth`` (a ``cluster.auth.PeerAuthenticator`` or None) and
``refused_peers`` (a ``runtime.logs.ThrottledLog``).
"""

import functools
from itertools import chain
from time import perf_counter

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from metacenter.api import envelope
from metacenter.api.bodies import parse_json_object
from metacenter.cluster.auth import Unauthorized
from metacenter.cluster.snapshot import ChunkProducer
from metacenter.jsonsteps import Budget, steps
from metacenter.runtime.logs import logger
from metacenter.runtime.turns import run

log = logger("metacenter.api.endpoint")
# Refused peer requests are logged where replication logs its own trouble.
peer_log = logger("metacenter.replica")

_TRACE_HEADER = b"traceid"
_JSON = envelope.JSON_CONTENT_TYPE
_NDJSON = b"application/x-ndjson"
# A refused peer request is logged at most this often (seconds): a node
# with the wrong secret retries every batch.
REFUSED_PEER_LOG_INTERVAL = 60.0


class Raw(bytes):
    """A route result that is already serialised JSON for ``data``."""


class Pieces:
    """A big route result kept as the pieces it was built in (``api.views``),
    never joined: ``pieces`` is a list of bytes. With ``content_type`` None
    they are the serialised JSON of ``data`` (written inside the envelope:
    its prefix, the pieces, its suffix); else a body outside the envelope of
    that Content-Type (bytes), as ``PlainResponse``.

    A join of a multi-MB body, the envelope's copy of it and the transport's
    copy of everything written at once each cost ~1 ms per MB of reactor
    time; written piece by piece under the connection's back-pressure, no
    copy is larger than a piece plus the transport's buffer."""

    __slots__ = ("pieces", "content_type")

    def __init__(self, pieces, content_type=None):
        self.pieces = pieces
        self.content_type = content_type


# Bodies up to this size are joined and written in one go (a copy of 256 KiB
# takes ~50 µs; one Content-Length answer, as before); larger ones in pieces.
JOIN_AT_MOST = 256 * 1024


class _PiecesWriter:
    """Writes ``pieces`` (a list of bytes) to ``request`` as a streaming
    producer: as many as the connection takes until the transport asks it to
    pause (its buffer holds 64 KiB), the rest when it drains. ``start()``
    returns a Deferred that fires with ``b""`` (the rest of the body, for the
    resource) once every piece is written or the client went away."""

    def __init__(self, request, pieces):
        self._request = request
        self._pieces = pieces
        self._next = 0
        self._paused = False
        self.done = Deferred()

    def start(self):
        self._request.registerProducer(self, True)
        self._write()
        return self.done

    def _write(self):
        pieces, write = self._pieces, self._request.write
        while self._next < len(pieces):
            piece = pieces[self._next]
            self._next += 1
            if piece:
                write(piece)  # may call pauseProducing (or stopProducing) at once
            if self._paused or self.done.called:
                return
        self._request.unregisterProducer()
        self._pieces = None
        self.done.callback(b"")

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        if self._paused and not self.done.called:
            self._paused = False
            self._write()

    def stopProducing(self):
        if not self.done.called:  # the client went away: nothing more to write
            self._pieces = None
            self.done.callback(b"")


def _write_pieces(request, pieces):
    """The body of ``pieces`` (a list of bytes): joined if small, else
    written in pieces with its Content-Length (a Deferred firing with b"")."""
    size = sum(map(len, pieces))
    # Also for a small body answered in a later turn (a Deferred's result),
    # which twisted.web would otherwise send chunked.
    request.setHeader(b"Content-Length", b"%d" % size)
    if size <= JOIN_AT_MOST:
        return b"".join(pieces)
    return _PiecesWriter(request, pieces).start()


class PlainResponse:
    """A route result outside the envelope (/metrics, /openapi.json): the
    body (bytes), its Content-Type (bytes) and the status."""

    __slots__ = ("body", "content_type", "status")

    def __init__(self, body, content_type, status=200):
        self.body = body
        self.content_type = content_type
        self.status = status


def trace_id_of(request):
    """The request's ``TraceId`` header (the gateway's), else a new UUID4."""
    value = request.requestHeaders.getRawHeaders(_TRACE_HEADER)
    if value and value[0]:
        try:
            return value[0].decode("utf-8")
        except UnicodeDecodeError:
            pass
    return envelope.new_trace_id()


def read_json_object(request):
    """The request body as a JSON object (any Content-Type: gateways send
    DELETE bodies without one); a 400 ``ApiError`` saying why otherwise."""
    return parse_json_object(request.content.read())


def joined_in_steps(opening, parts, closing, spent):
    """A JSON array or object written as ``Pieces`` over steps: ``opening``
    (``b"["`` or ``b"{"``), the already encoded ``parts`` (an iterable of
    bytes) separated by commas, ``closing``. A generator for ``in_turns``:
    it yields whenever ``spent()`` is true after a part, each step's parts
    joined into one piece (never the whole body), and returns the Pieces."""
    pieces, group = [opening], []
    for part in parts:
        group.append(part)
        if spent():
            pieces += (b",".join(group), b",")
            group = []
            yield
    if group:
        pieces.append(b",".join(group))
    elif len(pieces) > 1:
        pieces.pop()  # the separator after the last group
    pieces.append(closing)
    return Pieces(pieces)


def in_turns(node, work, step_budget):
    """Runs ``work(spent)`` (a generator over a request's work, which yields
    when ``spent()`` says a step's time is up, or a Deferred to wait for)
    one step per reactor turn through ``node.cooperate`` (looked up only
    when a second step is needed),
    each step given ``step_budget`` seconds (``jsonsteps.Budget``): the
    first in the request's own turn. -> its return value at once if one step
    was enough (a small body: no extra turn, no Deferred), else a Deferred of
    it (failing with what it raised)."""
    budget = Budget(step_budget)
    gen = work(budget.spent)
    try:
        first = next(gen)
    except StopIteration as done:
        return done.value
    result = []
    turns = chain((first,), steps(gen, budget, result))
    return run(node.cooperate, turns).addCallback(lambda _: result[0])


_METHODS = frozenset((b"GET", b"POST", b"DELETE", b"PUT", b"PATCH", b"HEAD", b"OPTIONS"))


def method_label(request):
    """The request's method, bounded (a label value must not be client-chosen)."""
    return request.method.decode("ascii") if request.method in _METHODS else "OTHER"


def respond(api, request, url, result, started=None):
    """Write ``result`` for a request no ``endpoint`` handled (404, 405)."""
    return _write(api, request, trace_id_of(request), url, method_label(request),
                  perf_counter() if started is None else started, result)


def _write(api, request, trace_id, url, method, started, result):
    if isinstance(result, PlainResponse):
        request.setResponseCode(result.status)
        request.setHeader(b"Content-Type", result.content_type)
        api.metrics.observe_http(url, method, result.status, perf_counter() - started)
        return result.body
    if isinstance(result, Pieces) and result.content_type is not None:
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", result.content_type)
        api.metrics.observe_http(url, method, 200, perf_counter() - started)
        return _write_pieces(request, result.pieces)
    request.setHeader(b"Content-Type", _JSON)
    request.setHeader(b"X-Trace-ID", trace_id.encode("utf-8"))
    if isinstance(result, envelope.ApiError):
        status = result.status
        for name, value in result.headers.items():
            request.setHeader(name, value)
        body = envelope.error_body(result, trace_id)
    else:
        status = 200
        try:
            if isinstance(result, Pieces):
                body = envelope.ok_parts(result.pieces, trace_id)
            elif isinstance(result, Raw):
                # A big cached body (a cluster of thousands of engines) is not copied into the envelope.
                body = envelope.ok_parts([result], trace_id) if len(result) > JOIN_AT_MOST else \
                    envelope.ok_body_raw(result, trace_id)
            else:
                body = envelope.ok_body(result, trace_id)
        except Exception as e:  # a value JSON cannot carry: our bug, still in the envelope
            error = _as_error(e, request, url)
            status = error.status
            body = envelope.error_body(error, trace_id)
    request.setResponseCode(status)
    api.metrics.observe_http(url, method, status, perf_counter() - started)
    return _write_pieces(request, body) if isinstance(body, list) else body


def _as_error(failure_or_exc, request, url):
    """The ``ApiError`` answering an exception or a Failure; anything the
    envelope does not know is a bug: logged, answered 500."""
    exc = failure_or_exc.value if isinstance(failure_or_exc, Failure) else failure_or_exc
    error = envelope.error_for(exc)
    if error is not None:
        return error
    log.failure("unhandled error in {method} {url}",
                failure_or_exc if isinstance(failure_or_exc, Failure) else Failure(exc),
                method=request.method.decode("ascii", "replace"), url=url)
    return envelope.internal()


# -- the checks an endpoint's options add -------------------------------------------


def _check_peer(api, request):
    """With a cluster secret, only a request signed with it passes (the
    signature covers the body, so it is read here and rewound for the
    route); ``auth.Unauthorized`` otherwise, logged at most once a minute."""
    authenticator = api.peer_auth
    if authenticator is None:
        return
    content = request.content
    body = content.read()
    content.seek(0)
    try:
        authenticator.check(request, body)
    except Unauthorized as e:
        client = request.getClientAddress()
        # One key, no reason: a wrong secret, a replay or a forger alike get
        # one line a minute, however they vary their attempts.
        api.refused_peers.emit("peer", None, "warn", "refused a peer request from {client} to {path}: {refusal}",
                               client=getattr(client, "host", "?"), path=request.path.decode("utf-8", "replace"),
                               refusal=e.reason)
        raise


def _check_ready(api, request):
    # A node still warming up has a partial state: a starting peer asks
    # someone else, and anti-entropy waits.
    node = api.node
    if not node.ready:
        raise envelope.unavailable(node.not_ready_reason or "warm start in progress")


# -- the decorator ---------------------------------------------------------------------


class Route:
    """What ``endpoint`` records on a handler (as ``handler.route``) for
    ``register_routes``, and for tests that compare routes with the document."""

    __slots__ = ("url", "methods", "peer", "ready", "stream")

    def __init__(self, url, methods, peer, ready, stream):
        self.url = url
        self.methods = tuple(methods)
        self.peer = peer
        self.ready = ready
        self.stream = stream


def endpoint(url, methods, *, peer=False, ready=False, stream=False):
    """Mark ``fn(self, request, trace_id)`` as the route for ``url`` and
    ``methods`` (``url`` is also the metrics label).

    Its result (data, ``Raw`` data, ``Pieces``, a ``PlainResponse``, or a
    Deferred of one) or its exception (``ApiError``, ``InvalidInput`` -> 400,
    ``auth.Unauthorized`` -> 401, anything else -> a logged 500) becomes the
    response. Before it runs: 413 for a body over the site's limit; with
    ``peer``, 401 unless the request carries a valid peer signature (when
    the node has a cluster secret); with ``ready``, 503 while the node is
    not ready. With ``stream``, ``fn`` returns an iterable of bytes chunks,
    written as ``application/x-ndjson`` under the connection's
    back-pressure; its first chunk is taken before anything is written, so
    an error up to there is an ordinary envelope answer, and one after it
    breaks the connection (the client sees no "end" line).
    """
    checks = tuple(check for check, wanted in ((_check_peer, peer), (_check_ready, ready)) if wanted)
    # A stream's label is the request's method, as for a 404 (HEAD on a GET route).
    method = None if stream else methods[0]

    def decorate(fn):
        def handler(self, request, **kwargs):
            started = perf_counter()
            trace_id = trace_id_of(request)
            try:
                if getattr(request, "body_too_large", False):
                    raise envelope.too_large(request.max_body)
                for check in checks:  # none on the gateway's routes
                    check(self, request)
                result = fn(self, request, trace_id, **kwargs)
                if stream:
                    return _start_stream(self, request, trace_id, url, started, result)
            except Exception as e:
                result = _as_error(e, request, url)
            label = method or method_label(request)
            if isinstance(result, Deferred):
                result.addErrback(_as_error, request, url)
                result.addCallback(lambda r: _write(self, request, trace_id, url, label, started, r))
                return result
            return _write(self, request, trace_id, url, label, started, result)

        functools.update_wrapper(handler, fn)
        handler.route = Route(url, methods, peer, ready, stream)
        return handler

    return decorate


def _start_stream(api, request, trace_id, url, started, chunks):
    """Write ``chunks`` (an iterable of bytes) as NDJSON. The first chunk is
    taken before any byte is written: an error up to there propagates to
    ``endpoint``, which answers it in the envelope."""
    chunks = iter(chunks)
    first = next(chunks, b"")
    method = method_label(request)
    request.setHeader(b"Content-Type", _NDJSON)
    request.setHeader(b"X-Trace-ID", trace_id.encode("utf-8"))
    done = ChunkProducer(request, chain((first,), chunks), api.node.cooperate).start()

    # Everything is written: the Deferred's result is the (empty) rest of
    # the body, which the resource writes before it finishes the request.
    def finished(result):
        api.metrics.observe_http(url, method, 200, perf_counter() - started)
        return b""

    def failed(failure):
        log.failure("streaming {url} failed", failure, url=url)
        # The client sees a broken stream without its "end" line, never a
        # complete-looking partial one.
        transport = getattr(request.channel, "transport", None)
        if transport is not None:
            transport.abortConnection()
        return b""

    return done.addCallbacks(finished, failed)


def routes_of(cls):
    """(name, handler) of every ``endpoint`` method of ``cls``, its own and
    its bases', in definition order (``handler.route`` is its ``Route``)."""
    seen = set()
    for klass in cls.__mro__:
        for name, value in vars(klass).items():
            if isinstance(getattr(value, "route", None), Route) and name not in seen:
                seen.add(name)
                yield name, value


def register_routes(cls):
    """Class decorator: every ``endpoint`` method of ``cls`` on ``cls.app``
    (a ``klein.Klein``)."""
    for name, handler in routes_of(cls):
        cls.app.route(handler.route.url, methods=list(handler.route.methods), endpoint=name)(handler)
    return cls
