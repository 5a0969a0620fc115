"""The root resource: Klein's route table, served without Klein's per-request
cost for the routes that need no URL matching.

Klein (werkzeug routing, Deferred wrapping) costs more per request than the
whole of a bare twisted.web request. Every route here is a static path, so
this resource reads Klein's own table once, and dispatches an exact
(path, method) match straight to that route's endpoint: the same function
Klein would call, so behaviour is identical. Everything else (unknown paths,
wrong methods, any route with URL variables) goes through Klein.
"""

from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from metacenter.api import envelope
from metacenter.api.endpoint import respond


def static_routes(klein_app):
    """{path: {method: endpoint}} for the app's rules without variables."""
    table = {}
    for rule in klein_app.url_map.iter_rules():
        if rule.arguments:
            continue
        endpoint = klein_app.endpoints[rule.endpoint]
        methods = table.setdefault(rule.rule.encode("utf-8"), {})
        for method in rule.methods or ():
            methods[method.encode("ascii")] = endpoint
    return table


class RoutingResource(Resource):
    """The root resource of ``api`` (a ``MetacenterAPI``): exact (path,
    method) matches of its app's table straight to the endpoint, everything
    else through Klein."""

    isLeaf = True

    def __init__(self, api):
        super().__init__()
        self._api = api
        self._klein = api.app.resource()
        self._routes = static_routes(api.app)

    def render(self, request):
        methods = self._routes.get(request.path)
        if methods is not None:
            endpoint = methods.get(request.method)
            if endpoint is not None:
                result = endpoint(self._api, request)
                if isinstance(result, Deferred):
                    result.addCallback(_finish, request)
                    return NOT_DONE_YET
                return result
        try:
            unquote_to_bytes(request.path).decode("utf-8")
        except UnicodeDecodeError:
            # Klein would answer this with its own HTML page.
            return respond(self._api, request, "unmatched",
                           envelope.not_found("no route for a path that is not UTF-8 once percent-decoded"))
        return self._klein.render(request)


def _finish(body, request):
    if not request._disconnected:
        request.write(body)
        request.finish()
