"""``MetacenterAPI``: every route group on one Klein app that belongs to the
class (no module-global app; Klein binds it to each instance, as in Klein's
"non-global state" documentation and Tahoe-LAFS's storage server).

Nothing here holds state of the load table or decides semantics: request
bodies become core events in ``bodies``, results and errors become responses
in ``endpoint``/``envelope``.
"""

from klein import Klein
from twisted.internet.defer import DeferredLock
from werkzeug.exceptions import MethodNotAllowed, NotFound

from metacenter.api import envelope
from metacenter.api.cache import CacheRoutes
from metacenter.api.endpoint import REFUSED_PEER_LOG_INTERVAL, peer_log, register_routes, respond
from metacenter.api.load import LoadRoutes
from metacenter.api.operations import OPENAPI_PATH, OperationsRoutes  # noqa: F401 (OPENAPI_PATH: its home)
from metacenter.api.replica import ReplicaRoutes
from metacenter.api.response_cache import LoadResponseCache
from metacenter.api.routing import RoutingResource
from metacenter.api.truth import TruthRoutes
from metacenter.runtime.logs import ThrottledLog
from metacenter.api.views import Views


@register_routes
class MetacenterAPI(LoadRoutes, TruthRoutes, CacheRoutes, ReplicaRoutes, OperationsRoutes):
    """The HTTP API of one node.

    ``node``: a ``runtime.node.Node``; ``metrics``: its ``Metrics``;
    ``peer_auth``: a ``cluster.auth.PeerAuthenticator`` that the peer routes
    require, or None (no cluster secret: peer requests are not checked).
    ``resource()`` is what the site serves.
    """

    app = Klein()

    def __init__(self, node, metrics, peer_auth=None):
        self.node = node
        self.metrics = metrics
        self.peer_auth = peer_auth
        self.refused_peers = ThrottledLog(peer_log, node.clock, REFUSED_PEER_LOG_INTERVAL)
        self.load_bodies = LoadResponseCache(node.state)
        # Bodies over the whole state, built in slices of bounded reactor time.
        self.views = Views(node, metrics, self.load_bodies)
        # Peer batches are applied one after the other, in arrival order (api.replica).
        self.replica_batches = DeferredLock()

    def resource(self):
        """The root resource: ``RoutingResource`` over this app."""
        return RoutingResource(self)

    # Unknown paths and wrong methods answer in the envelope too.
    @app.handle_errors(NotFound)
    def _not_found(self, request, failure):
        path = request.path.decode("utf-8", "replace")
        return respond(self, request, "unmatched", envelope.not_found(f"no route for {path}"))

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self, request, failure):
        return respond(self, request, "unmatched", envelope.method_not_allowed(failure.value.valid_methods or []))
