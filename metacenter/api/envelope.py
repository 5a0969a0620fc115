"""The response envelope and the API's errors: one place for both.

    {"status": "OK"|"ERROR", "error": null|{"code","message","reason"},
     "data": ..., "trace_id": ...}

The format and the codes are the reference service's (docs/api.md). Layers
below the API raise their own errors (the core's ``InvalidInput``, the peer
check's ``auth.Unauthorized``); ``error_for`` maps them to ``ApiError`` here,
and ``api.endpoint`` is the only caller that turns one into a response.
"""

import json
from random import getrandbits

from metacenter.cluster.auth import Unauthorized
from metacenter.core.errors import Conflict, InvalidInput, NotFound
from metacenter.core.limits import LimitReached

JSON_CONTENT_TYPE = b"application/json; charset=utf-8"

CODE_INVALID = 40001400
CODE_NOT_FOUND = 40001404
CODE_METHOD = 40001405
CODE_CONFLICT = 40001409
CODE_TOO_LARGE = 40001413
CODE_LIMIT = 42901429
CODE_UNAUTHORIZED = 40101001
CODE_UNAVAILABLE = 50301503
CODE_INTERNAL = 50001000

MSG_INVALID = "Invalid input parameters"
MSG_INVALID_JSON = "Invalid input parameters: invalid JSON format"

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


class ApiError(Exception):
    """An answer other than OK. Raised anywhere below a route; mapped to the
    envelope in exactly one place (``api.endpoint``)."""

    def __init__(self, status, code, message, reason, headers=None, data=None):
        super().__init__(reason)
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason
        self.headers = headers or {}
        # What the client needs to decide again (a 409's current row); the
        # envelope's ``data``, null for every other error.
        self.data = data


def invalid(reason):
    return ApiError(400, CODE_INVALID, MSG_INVALID, reason)


def invalid_json(reason):
    return ApiError(400, CODE_INVALID, MSG_INVALID_JSON, reason)


def not_found(reason):
    return ApiError(404, CODE_NOT_FOUND, "Resource not found", reason)


def conflict(reason, data=None):
    """409, code 40001409: a conditional change whose condition no longer
    holds; ``data`` is what the client needs to decide again."""
    return ApiError(409, CODE_CONFLICT, "Conflict", reason, data=data)


def method_not_allowed(allowed):
    allowed = sorted(allowed)
    return ApiError(405, CODE_METHOD, "Method not allowed",
                    f"allowed methods: {', '.join(allowed)}", headers={b"Allow": ", ".join(allowed).encode()})


def too_large(limit):
    return ApiError(413, CODE_TOO_LARGE, "Request body too large",
                    f"the request body exceeds the limit of {limit} bytes")


def limit_reached(reason):
    """A count limit of the node reached (``core.limits``); the reason names
    the limit and the setting that raises it."""
    return ApiError(429, CODE_LIMIT, "Limit reached", reason)


def unauthorized(reason):
    return ApiError(401, CODE_UNAUTHORIZED, "Authentication failed", reason)


def unavailable(reason):
    return ApiError(503, CODE_UNAVAILABLE, "Service unavailable", reason)


def internal():
    return ApiError(500, CODE_INTERNAL, "Internal error", "an unexpected error occurred; see the node's log")


def error_for(exc):
    """The ``ApiError`` answering ``exc``: itself, a 400 for the core's
    ``InvalidInput``, a 409 with its data for the core's ``Conflict``, a 404
    for its ``NotFound``, a 401 for a refused peer signature, a 429 for a
    count limit reached (``LimitReached``); None for anything else (a bug:
    the caller logs it and answers ``internal()``)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidInput):
        return invalid(exc.reason)
    if isinstance(exc, Conflict):
        return conflict(exc.reason, exc.data)
    if isinstance(exc, NotFound):
        return not_found(exc.reason)
    if isinstance(exc, Unauthorized):
        return unauthorized(exc.reason)
    if isinstance(exc, LimitReached):
        return limit_reached(exc.reason)
    return None


_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_trace_id():
    """A random UUID4 string. Trace ids need to be unique, not secret, so the
    fast PRNG will do (uuid.uuid4() reads os.urandom: 3x the cost per request)."""
    h = "%032x" % ((getrandbits(128) & _UUID4_CLEAR) | _UUID4_SET)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def ok_body(data, trace_id):
    """An OK envelope around ``data`` (any JSON value), as UTF-8 bytes."""
    return _dumps({"status": "OK", "error": None, "data": data, "trace_id": trace_id}).encode("utf-8")


def ok_body_raw(data_json, trace_id):
    """An OK envelope around data already serialised (cached GET bodies)."""
    return b'{"status":"OK","error":null,"data":' + data_json + b',"trace_id":' + \
        _dumps(trace_id).encode("utf-8") + b"}"


def ok_parts(data_pieces, trace_id):
    """An OK envelope around data already serialised in pieces (a list of
    bytes whose concatenation is the JSON of ``data``), as a list of bytes
    whose concatenation is ``ok_body_raw`` of it: nothing is copied."""
    return [b'{"status":"OK","error":null,"data":', *data_pieces,
            b',"trace_id":' + _dumps(trace_id).encode("utf-8") + b"}"]


def error_body(error, trace_id):
    """The ERROR envelope of an ``ApiError``, as UTF-8 bytes."""
    return _dumps({
        "status": "ERROR",
        "error": {"code": error.code, "message": error.message, "reason": error.reason},
        "data": error.data,
        "trace_id": trace_id,
    }).encode("utf-8")


def dumps(value):
    """Compact JSON (UTF-8 bytes), the encoding of every body we write."""
    return _dumps(value).encode("utf-8")
