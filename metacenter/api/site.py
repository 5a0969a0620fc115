"""The HTTP server side of twisted.web: the Site, its channel (connection)
and its Request, with the node's limits on clients.

- Bodies: at most ``max_body`` bytes are kept. A body whose Content-Length
  already says more is answered 413 at once, before any of it is read and
  without "100 Continue"; a chunked body found too big as it streams in is
  dropped as it arrives and answered 413 when it ends.
- Slow clients: a request whose headers and body have not all arrived
  ``request_deadline`` seconds after its first byte is dropped (Twisted's own
  idle timer restarts on every byte, so a client sending one byte a minute
  would hold a connection for ever).
- Idle connections: kept ``idle_timeout`` seconds, longer than the Go
  gateway's 5-minute idle pool, so the node never closes a connection the
  gateway is about to reuse.
- At most ``max_connections`` are open; one more is answered 503 in the
  envelope and closed.
- HEAD is answered like GET without a body, and without Twisted's warning
  in the log for every HEAD.
- URLs: a request line of up to ``max_url`` bytes is read (``url_limit``:
  enough for the longest cluster name a client may write, percent-encoded
  at worst, so whatever can be written can be read); a longer one is
  answered 414 in the envelope, headers over their allowance 431 (Twisted
  would close the connection, or answer a bare 400).
"""

from io import BytesIO

from twisted.internet.protocol import Protocol
from twisted.web import http, server

from metacenter.api import envelope
from metacenter.runtime.logs import ThrottledLog, logger

log = logger("metacenter.api.site")

# Twisted's own limit on a request line and on all of a request's headers.
DEFAULT_MAX_URL = 16384
# Bytes of headers allowed besides the request line.
HEADERS_ALLOWANCE = 16384
# What a request line holds besides the cluster name: the method, the path
# "/v1/load/stats?cluster=", other query parameters, " HTTP/1.1".
_URL_OVERHEAD = 1024
# A character is at most 4 bytes of UTF-8, each percent-encoded as 3 ("%F0").
_ENCODED_BYTES_PER_CHARACTER = 12


def url_limit(max_cluster_length):
    """The longest request line (bytes) to accept when cluster names may be
    ``max_cluster_length`` characters long: the GET of the longest name,
    every character percent-encoded UTF-8 of 4 bytes, with room to spare;
    never below Twisted's 16,384."""
    return max(DEFAULT_MAX_URL, _ENCODED_BYTES_PER_CHARACTER * max_cluster_length + _URL_OVERHEAD)


_REASON_PHRASES = {431: b"Request Header Fields Too Large"}  # not in Twisted's table


def _raw_error(error):
    """A whole HTTP/1.1 answer (bytes) with ``error`` (an ``ApiError``) in
    the envelope, closing the connection: for answers given before any
    Request exists."""
    trace_id = envelope.new_trace_id()
    body = envelope.error_body(error, trace_id)
    reason = _REASON_PHRASES.get(error.status) or http.RESPONSES.get(error.status, b"Error")
    return (b"HTTP/1.1 %d %s\r\nContent-Type: " % (error.status, reason) + envelope.JSON_CONTENT_TYPE +
            b"\r\nContent-Length: %d\r\nConnection: close\r\nX-Trace-ID: %s\r\n\r\n" % (
                len(body), trace_id.encode("ascii")) + body)


# The envelope's codes of these answers (the reference's pattern: 400XX + status).
CODE_URL_TOO_LONG = 40001414
CODE_HEADERS_TOO_LARGE = 40001431


# After a refusal the node closes its side and waits this long before it
# drops the connection: a client still sending its request then reads the
# answer instead of a reset (closing with unread data sends a TCP RST).
LINGER_SECONDS = 1.0


class BoundedRequest(server.Request):
    """Keeps at most ``max_body`` bytes of a body; a bigger one (declared by
    Content-Length, or found while a chunked body streams in) is dropped as it
    arrives and flagged, so the route answers 413 without holding it."""

    max_body = 65536

    def gotLength(self, length):
        self.body_too_large = length is not None and length > self.max_body
        self._body_received = 0
        self.content = BytesIO()

    def handleContentChunk(self, data):
        if self.body_too_large:
            return
        self._body_received += len(data)
        if self._body_received > self.max_body:
            self.body_too_large = True
            self.content = BytesIO()
            return
        self.content.write(data)

    def render(self, resrc):
        if self.method != b"HEAD":
            return super().render(resrc)
        # Our routes answer HEAD as GET (werkzeug adds HEAD to every GET
        # route); Twisted would drop the body with a warning in the log for
        # every HEAD. Same answer here (headers, Content-Length), quietly.
        body = resrc.render(self)
        if body is server.NOT_DONE_YET:
            return  # the body written later is dropped by Request.write for HEAD
        self.setHeader(b"Content-Length", b"%d" % (len(body),))
        self.write(b"")
        self.finish()


def _linger_close(transport, call_later):
    """Close the write side now (the answer already written goes first) and
    the connection ``LINGER_SECONDS`` later; the unread rest is never read."""
    try:
        transport.loseWriteConnection()
    except (AttributeError, NotImplementedError):  # transports without half-close (TLS, tests)
        transport.loseConnection()
        return None
    return call_later(LINGER_SECONDS, transport.abortConnection)


class MetacenterChannel(http.HTTPChannel):
    """One client connection (see the module docstring for its limits)."""

    _deadline_call = None
    _linger_call = None
    _refused_body = False

    def connectionMade(self):
        super().connectionMade()
        self.MAX_LENGTH = self.site.max_url  # one line: the request line is the longest
        self.totalHeadersSize = self.site.max_url + HEADERS_ALLOWANCE
        self.site.connection_opened()

    def lineLengthExceeded(self, line):
        # Twisted would just close the connection.
        if getattr(self, "_HTTPChannel__first_line", 0):
            self.site.url_too_long()
            self._answer_and_close(envelope.ApiError(
                414, CODE_URL_TOO_LONG, "URI too long",
                f"the request line is longer than {self.site.max_url} bytes; it follows the longest cluster name "
                f"(--max-cluster-length)"))
        else:
            self._headers_too_large()

    def lineReceived(self, line):
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._headers_too_large()  # Twisted would answer a bare 400
            return
        super().lineReceived(line)

    def _respondToBadRequestAndDisconnect(self):
        # Twisted's bare "400 Bad Request" (no body) for framing it cannot
        # read: a bad request line or header line, a Content-Length that is
        # not one non-negative integer, one beside chunked encoding, a bad
        # chunk. The client gets the reason in the envelope instead.
        self.transport.write(_raw_error(envelope.invalid(
            "the request is not valid HTTP/1.1: its request line, a header line, Content-Length or chunked "
            "encoding could not be read; expected 'METHOD /path HTTP/1.1', 'Name: value' headers and at most one "
            "non-negative Content-Length or chunked encoding")))
        self.loseConnection()

    def _headers_too_large(self):
        self._answer_and_close(envelope.ApiError(
            431, CODE_HEADERS_TOO_LARGE, "Request header fields too large",
            f"the request line and headers exceed {self.totalHeadersSize} bytes"))

    def _answer_and_close(self, error):
        """Answer ``error`` before a Request exists, then stop reading (the
        rest of the request is never parsed) and close."""
        self.dataReceived = self.lineReceived = lambda *args: None
        self.transport.write(_raw_error(error))
        self.persistent = False
        self._linger_call = _linger_close(self.transport, self.callLater)

    def connectionLost(self, reason):
        for name in ("_deadline_call", "_linger_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        super().connectionLost(reason)
        self.site.connection_closed()

    def dataReceived(self, data):
        if self._refused_body:
            return  # the rest of a refused body: dropped unread
        # The first byte of a request starts its deadline (bytes arriving
        # while a request is handled belong to the next one, whose deadline
        # starts when they are parsed, after the answer).
        if self._deadline_call is None and not self._handlingRequest and data:
            self._deadline_call = self.callLater(self.site.request_deadline, self._too_slow)
        super().dataReceived(data)

    def allContentReceived(self):
        if self._deadline_call is not None:
            if self._deadline_call.active():
                self._deadline_call.cancel()
            self._deadline_call = None
        super().allContentReceived()

    def _too_slow(self):
        self._deadline_call = None
        self.site.dropped("slow_request", self.transport.getPeer())
        # Nothing was answered yet and nothing will be: no reason to linger.
        self.transport.abortConnection()

    def timeoutConnection(self):
        self.site.dropped("idle", None)
        super().timeoutConnection()

    def allHeadersReceived(self):
        request = self.requests[-1]
        declared = self.length
        if declared is None or declared <= request.max_body:
            return super().allHeadersReceived()
        # Declared too big: answered now, in the envelope, through the route
        # (it sees body_too_large and answers 413). No "100 Continue" (the
        # client is told not to send the body), none of it is read, and the
        # connection closes after the answer, since the body would otherwise
        # be taken for the next request.
        self.persistent = False
        request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        request.gotLength(declared)
        self._transferDecoder = None
        self.length = 0  # HTTPChannel.lineReceived: no body to wait for, the request is complete
        self._refused_body = True

    def loseConnection(self):
        if not self._refused_body:
            return super().loseConnection()
        self._networkProducer.unregisterProducer()
        self._linger_call = _linger_close(self.transport, self.callLater)
        return None


class _Refused(Protocol):
    """A connection over ``max_connections``: a 503 in the envelope, then closed."""

    def __init__(self, answer, call_later):
        self._answer = answer
        self._call_later = call_later
        self._linger = None

    def connectionMade(self):
        self.transport.write(self._answer())
        self._linger = _linger_close(self.transport, self._call_later)

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        if self._linger is not None and self._linger.active():
            self._linger.cancel()


class MetacenterSite(server.Site):
    """``max_body`` bytes per body; ``request_deadline`` seconds for a
    request's headers and body to arrive; ``idle_timeout`` seconds an idle
    connection is kept; ``max_connections`` open at most; ``max_url`` bytes
    of request line at most (``url_limit``). ``metrics`` (a
    ``runtime.metrics.Metrics``, or None) counts connections, refusals and
    drops."""

    protocol = MetacenterChannel

    def __init__(self, resource, max_body, access_log=False, metrics=None, request_deadline=30.0,
                 idle_timeout=360.0, max_connections=10000, max_url=DEFAULT_MAX_URL, **kwargs):
        # Bodies are JSON whatever their Content-Type says; Twisted's default
        # parse of every POST's Content-Type for HTML forms (with the email
        # package) costs more than the rest of an add.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        kwargs["timeout"] = idle_timeout
        super().__init__(resource, **kwargs)
        limit = max_body

        class _Request(BoundedRequest):
            max_body = limit

        self.requestFactory = _Request
        self._access_log = access_log
        self.displayTracebacks = False
        self.request_deadline = request_deadline
        self.max_connections = max_connections
        self.max_url = max_url
        self.open_connections = 0
        self._metrics = metrics
        self._throttled = ThrottledLog(log, self.reactor, 60.0)

    def log(self, request):
        if self._access_log:
            super().log(request)

    def buildProtocol(self, addr):
        if self.open_connections >= self.max_connections:
            if self._metrics is not None:
                self._metrics.http_refused.inc(())
            self._throttled.emit("refused", None, "warn",
                                 "refusing HTTP connections: {limit} are open (--max-connections)",
                                 limit=self.max_connections)
            return _Refused(self._refusal, self.reactor.callLater)
        return super().buildProtocol(addr)

    def _refusal(self):
        return _raw_error(envelope.unavailable(
            f"too many open connections: at most {self.max_connections} (--max-connections)"))

    def url_too_long(self):
        """A request line over ``max_url`` was answered 414."""
        if self._metrics is not None:
            self._metrics.limit_refusals.inc(("url_length",))
        self._throttled.emit("url_length", None, "info",
                             "refused a request line longer than {limit} bytes", limit=self.max_url)

    def connection_opened(self):
        self.open_connections += 1
        if self._metrics is not None:
            self._metrics.http_connections_open = self.open_connections

    def connection_closed(self):
        self.open_connections -= 1
        if self._metrics is not None:
            self._metrics.http_connections_open = self.open_connections

    def dropped(self, reason, peer):
        """A connection the node closed: ``reason`` is slow_request or idle."""
        if self._metrics is not None:
            self._metrics.http_dropped.inc((reason,))
        if reason == "slow_request":
            self._throttled.emit(reason, None, "info",
                                 "dropped a client whose request did not arrive within {deadline:g} s "
                                 "(--request-deadline), e.g. {peer}", deadline=self.request_deadline, peer=str(peer))
