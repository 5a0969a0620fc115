"""The client's exceptions."""


class MetacenterError(Exception):
    """A node refused the call, or no node could answer it.

    ``status``: the HTTP status (None when no node answered);
    ``code``, ``message``, ``reason``: the envelope's ``error`` fields (code
    40001400 invalid input, 40001404 not found, 40001409 conflict, ...);
    ``data``: the envelope's ``data`` (a 409 carries the engine's current row);
    ``trace_id``: the trace id of the answer; ``node``: the base URL of the
    node that answered.
    """

    def __init__(self, reason, *, status=None, code=None, message=None, data=None, trace_id=None, node=None):
        super().__init__(reason)
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason
        self.data = data
        self.trace_id = trace_id
        self.node = node

    def __str__(self):
        where = f" from {self.node}" if self.node else ""
        status = f"HTTP {self.status}, " if self.status is not None else ""
        code = f"code {self.code}, " if self.code is not None else ""
        trace = f", trace id {self.trace_id}" if self.trace_id else ""
        return f"{status}{code}{self.reason}{where}{trace}"


class NodeUnavailable(MetacenterError):
    """Every node tried failed (connection refused or reset, timeout, 5xx), or
    none was available (no nodes known, every circuit breaker open).
    ``attempts`` lists ``(node URL, what happened)`` in the order tried; the
    other fields describe the last answer when the last failure was a 5xx."""

    def __init__(self, reason, attempts=(), **fields):
        super().__init__(reason, **fields)
        self.attempts = list(attempts)
