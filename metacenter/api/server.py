"""The HTTP API: Klein routes that translate HTTP to node calls and back.

Nothing here holds state or decides semantics; validation is in
``validation``, the envelope and error mapping in ``http``/``envelope``.
"""

import os

from werkzeug.exceptions import MethodNotAllowed, NotFound

from metacenter.api import envelope
from metacenter.runtime import logs
from metacenter.api import bodies
from metacenter.api.endpoint import PlainResponse, Raw, app, endpoint, log, read_json_object, respond
from metacenter.api.cache import CacheRoutes
from metacenter.api.replica import ReplicaRoutes
from metacenter.api.routing import RoutingResource
from metacenter.api.views import Views, cluster_engines
from metacenter.core.events import EVENT_ADD, EVENT_DELETE, EVENT_PROMPT_DELETE, ORIGIN_CLIENT

OPENAPI_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "openapi.json")


class LoadRoutes:
    """WIRE.md section 2."""

    @endpoint("/v1/load/stats", ["POST"])
    def load_add(self, request, trace_id):
        event = bodies.load_add(read_json_object(request))
        self.node.apply(EVENT_ADD, event, trace_id, ORIGIN_CLIENT)
        return None

    @endpoint("/v1/load/stats", ["DELETE"])
    def load_delete(self, request, trace_id):
        event = bodies.load_delete(read_json_object(request))
        self.node.apply(EVENT_DELETE, event, trace_id, ORIGIN_CLIENT)
        return None

    @endpoint("/v1/load/prompt", ["DELETE"])
    def load_prompt_delete(self, request, trace_id):
        event = bodies.load_delete(read_json_object(request))
        self.node.apply(EVENT_PROMPT_DELETE, event, trace_id, ORIGIN_CLIENT)
        return None

    @endpoint("/v1/load/stats", ["GET"])
    def load_query(self, request, trace_id):
        name = bodies.cluster_query(request.args)
        cluster = self.node.state.clusters.get(name)
        if cluster is None:
            return Raw(b"[]")
        # Cached until the cluster changes; then only the changed engines are
        # serialised again (the gateway mix changes one between two reads).
        return cluster_engines(cluster)

    @endpoint("/v1/load/overview", ["GET"])
    def load_overview(self, request, trace_id):
        return self.views.overview.get()


class OperationsRoutes:
    """WIRE.md section 3, health and self-description."""

    @endpoint("/log/level", ["POST"])
    def log_level(self, request, trace_id):
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
        return self.views.metrics.get()

    @endpoint("/livez", ["GET"])
    def livez(self, request, trace_id):
        return "alive"

    @endpoint("/readyz", ["GET"])
    def readyz(self, request, trace_id):
        if not self.node.ready:
            raise envelope.unavailable(self.node.not_ready_reason or "not ready")
        return "ready"

    @endpoint("/v1/node/status", ["GET"])
    def node_status(self, request, trace_id):
        return self.views.status.get()

    @endpoint("/openapi.json", ["GET"])
    def openapi(self, request, trace_id):
        return PlainResponse(self._openapi_document(), b"application/json; charset=utf-8")

    def _openapi_document(self):
        if self._openapi is None:
            with open(OPENAPI_PATH, "rb") as f:
                self._openapi = f.read()
        return self._openapi


class MetacenterAPI(LoadRoutes, OperationsRoutes, ReplicaRoutes, CacheRoutes):
    app = app

    def __init__(self, node, metrics):
        self.node = node
        self.metrics = metrics
        self._openapi = None
        # Bodies over the whole state, built in slices of bounded reactor time.
        self.views = Views(node, metrics)

    def resource(self):
        return RoutingResource(self)

    # Unknown paths and wrong methods answer in the envelope too.
    @app.handle_errors(NotFound)
    def _not_found(self, request, failure):
        path = request.path.decode("utf-8", "replace")
        return respond(self, request, "unmatched", envelope.not_found(f"no route for {path}"))

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self, request, failure):
        return respond(self, request, "unmatched", envelope.method_not_allowed(failure.value.valid_methods or []))
