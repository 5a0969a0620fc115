"""The HTTP server side of twisted.web: a Request that refuses oversized bodies
without buffering them, and the Site that uses it."""

from io import BytesIO

from twisted.web import server


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


class MetacenterSite(server.Site):
    """The node's ``Site``: requests are ``BoundedRequest``s limited to
    ``max_body`` bytes; the access log only with ``access_log``; no
    tracebacks in answers."""

    def __init__(self, resource, max_body, access_log=False, **kwargs):
        # Bodies are JSON whatever their Content-Type says; Twisted's default
        # parse of every POST's Content-Type for HTML forms (with the email
        # package) costs more than the rest of an add.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kwargs)
        limit = max_body

        class _Request(BoundedRequest):
            max_body = limit

        self.requestFactory = _Request
        self._access_log = access_log
        self.displayTracebacks = False

    def log(self, request):
        if self._access_log:
            super().log(request)
