"""The HTTP API: Klein routes that translate HTTP to node calls and back.

Nothing here holds state or decides semantics; validation is in
``validation``, the envelope and error mapping in ``http``/``envelope``.
"""

import os

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import MethodNotAllowed, NotFound

from metacenter.api import envelope
from metacenter.runtime import logs
from metacenter.api import bodies
from metacenter.api.endpoint import PlainResponse, Raw, app, endpoint, log, read_json_object, respond
from metacenter.api.cache import CacheRoutes
from metacenter.api.replica import ReplicaRoutes
from metacenter.api.routing import RoutingResource
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
        return self._load_body(cluster)

    def _load_body(self, cluster):
        """The cluster's serialised engine list, rebuilt only after a change,
        and then only the fragments of the engines that changed (the gateway
        mix changes one engine between two reads of a cluster)."""
        if cluster.wire[0] == cluster.version:
            return cluster.wire[1]
        parts = []
        for engine in cluster.engines.values():
            wire = engine.wire
            if wire[0] != engine.version:
                wire = engine.wire = (engine.version, envelope.dumps(engine.as_dict()))
            parts.append(wire[1])
        body = Raw(b"[" + b",".join(parts) + b"]")
        cluster.wire = (cluster.version, body)
        return body

    @endpoint("/v1/load/overview", ["GET"])
    def load_overview(self, request, trace_id):
        return self.node.overview()


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
        return PlainResponse(generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST.encode("ascii"))

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
        return self.node.status()

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
