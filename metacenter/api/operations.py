"""Operations routes: the log level (the reference's wire), metrics, health,
the node's status and the API's own description."""

import os


from metacenter.api import bodies, envelope
from metacenter.api.endpoint import PlainResponse, endpoint, log, read_json_object
from metacenter.runtime import logs

OPENAPI_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "openapi.json")


class OperationsRoutes:
    """With ``MetacenterAPI`` (``node``, ``metrics``)."""

    _openapi = None  # the document's bytes, read on first use

    @endpoint("/log/level", ["POST"])
    def log_level(self, request, trace_id):
        """``{"LevelParam": "TRACE"|"DEBUG"|"INFO"|"WARN"|"ERROR"|"FATAL"}``
        -> "log level updated successfully"; the level applies at once to
        every ``logs.logger``. 400 with the reference's reason otherwise."""
        try:
            body = read_json_object(request)
        except envelope.ApiError:
            raise envelope.invalid(bodies.LOG_LEVEL_REASON) from None
        level = bodies.log_level(body)
        logs.set_level(level)
        log.info("log level set to {new_level}", new_level=level)
        return "log level updated successfully"

    @endpoint("/metrics", ["GET"])
    def metrics(self, request, trace_id):
        """The node's Prometheus series (text exposition format, outside the
        envelope); see docs/metrics.md."""
        return self.views.metrics.get()

    @endpoint("/livez", ["GET"])
    def livez(self, request, trace_id):
        """-> "alive" while the process serves HTTP."""
        return "alive"

    @endpoint("/readyz", ["GET"])
    def readyz(self, request, trace_id):
        """-> "ready", or 503 with the reason (e.g. the warm start) while the
        node must not take traffic."""
        if not self.node.ready:
            raise envelope.unavailable(self.node.not_ready_reason or "not ready")
        return "ready"

    @endpoint("/v1/node/status", ["GET"])
    def node_status(self, request, trace_id):
        """The node's version, readiness, sizes, peers and per-cluster
        digests (``Node.status``)."""
        return self.views.status.get()

    @endpoint("/openapi.json", ["GET"])
    def openapi(self, request, trace_id):
        """This API's OpenAPI 3.1 document (``metacenter/openapi.json``),
        outside the envelope."""
        if self._openapi is None:
            with open(OPENAPI_PATH, "rb") as f:
                self._openapi = f.read()
        return PlainResponse(self._openapi, b"application/json; charset=utf-8")
