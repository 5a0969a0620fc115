"""What every route shares: the one Klein app, the ``endpoint`` decorator
that maps results and errors to the envelope (the only place that does), and
body reading.

Route sets live in their own modules as mixin classes decorated with this
``app``; ``api.MetacenterAPI`` combines them.
"""

import functools
from time import perf_counter

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from metacenter.api import envelope
from metacenter.core.errors import InvalidInput
from metacenter.runtime.logs import logger
from metacenter.api.bodies import parse_json_object

app = Klein()
log = logger("metacenter.api.endpoint")

_TRACE_HEADER = b"traceid"
_JSON = envelope.JSON_CONTENT_TYPE


class Raw(bytes):
    """A route result that is already serialised JSON for ``data``."""


class PlainResponse:
    """A route result outside the envelope (/metrics)."""

    __slots__ = ("body", "content_type", "status")

    def __init__(self, body, content_type, status=200):
        self.body = body
        self.content_type = content_type
        self.status = status


def trace_id_of(request):
    value = request.requestHeaders.getRawHeaders(_TRACE_HEADER)
    if value and value[0]:
        try:
            return value[0].decode("utf-8")
        except UnicodeDecodeError:
            pass
    return envelope.new_trace_id()


def read_json_object(request):
    """The request body as a JSON object (any Content-Type: gateways send
    DELETE bodies without one)."""
    return parse_json_object(request.content.read())


_METHODS = frozenset((b"GET", b"POST", b"DELETE", b"PUT", b"PATCH", b"HEAD", b"OPTIONS"))


def method_label(request):
    """The request's method, bounded (a label value must not be client-chosen)."""
    return request.method.decode("ascii") if request.method in _METHODS else "OTHER"


def respond(api, request, url, result, started=None):
    """Write ``result`` for a request no ``endpoint`` handled (404, 405)."""
    return _write(api, request, trace_id_of(request), url, method_label(request),
                  perf_counter() if started is None else started, result)


def _write(api, request, trace_id, url, method, started, result):
    if isinstance(result, InvalidInput):
        result = envelope.invalid(result.reason)
    if isinstance(result, PlainResponse):
        request.setResponseCode(result.status)
        request.setHeader(b"Content-Type", result.content_type)
        api.metrics.observe_http(url, method, result.status, perf_counter() - started)
        return result.body
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
            body = envelope.ok_body_raw(result, trace_id) if isinstance(result, Raw) else \
                envelope.ok_body(result, trace_id)
        except Exception as e:  # a value JSON cannot carry: our bug, still in the envelope
            error = _as_error(e, request, url)
            status = error.status
            body = envelope.error_body(error, trace_id)
    request.setResponseCode(status)
    api.metrics.observe_http(url, method, status, perf_counter() - started)
    return body


def _as_error(failure_or_exc, request, url):
    exc = failure_or_exc.value if isinstance(failure_or_exc, Failure) else failure_or_exc
    if isinstance(exc, envelope.ApiError):
        return exc
    if isinstance(exc, InvalidInput):
        return envelope.invalid(exc.reason)
    log.failure("unhandled error in {method} {url}",
                failure_or_exc if isinstance(failure_or_exc, Failure) else Failure(exc),
                method=request.method.decode("ascii", "replace"), url=url)
    return envelope.internal()


def endpoint(url, methods):
    """Register ``fn(self, request, trace_id)`` on ``app`` for ``url``; its
    result (data, ``Raw`` data, a ``PlainResponse`` or a Deferred of one) or
    its ``ApiError`` becomes the response. ``url`` is also the metrics label."""

    def decorate(fn):
        method_label = methods[0]

        @app.route(url, methods=list(methods))
        @functools.wraps(fn)
        def handler(self, request, **kwargs):
            started = perf_counter()
            trace_id = trace_id_of(request)
            try:
                if getattr(request, "body_too_large", False):
                    raise envelope.too_large(request.max_body)
                result = fn(self, request, trace_id, **kwargs)
            except Exception as e:
                result = _as_error(e, request, url)
            if isinstance(result, Deferred):
                result.addErrback(_as_error, request, url)
                result.addCallback(lambda r: _write(self, request, trace_id, url, method_label, started, r))
                return result
            return _write(self, request, trace_id, url, method_label, started, result)

        return handler

    return decorate
