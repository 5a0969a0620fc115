"""The gateway's load routes (the reference's wire, docs/api.md): four calls
per inference request, the hot path of the node."""

from metacenter.api import bodies
from metacenter.api.endpoint import Raw, endpoint, read_json_object
from metacenter.core.events import EVENT_ADD, EVENT_DELETE, EVENT_PROMPT_DELETE, ORIGIN_CLIENT


class LoadRoutes:
    """With ``MetacenterAPI`` (``node``, ``load_bodies``, ``views``)."""

    @endpoint("/v1/load/stats", ["POST"])
    def load_add(self, request, trace_id):
        """A request was routed to an engine: ``{"cluster", "request_id",
        "ip", "prompt_length"?: bytes, "timestamp"?: ns, "prompt_tokens"?,
        "lease"?, "if_updated_time"?: ns}`` -> data null. A duplicate is
        accepted and changes nothing; 400 naming the field; 409 (code
        40001409, the engine's current row in data) when ``if_updated_time``
        is not the engine's ``updated_time``."""
        event = bodies.load_add(read_json_object(request))
        self.node.apply(EVENT_ADD, event, trace_id, ORIGIN_CLIENT)
        return None

    @endpoint("/v1/load/stats", ["DELETE"])
    def load_delete(self, request, trace_id):
        """The request completed: ``{"request_id", "timestamp"?}`` (other
        fields ignored) -> data null. A delete may come before its add."""
        event = bodies.load_delete(read_json_object(request))
        self.node.apply(EVENT_DELETE, event, trace_id, ORIGIN_CLIENT)
        return None

    @endpoint("/v1/load/prompt", ["DELETE"])
    def load_prompt_delete(self, request, trace_id):
        """The first token came: the prompt's bytes leave the engine's
        prefill load, once. Body as for ``DELETE /v1/load/stats``."""
        event = bodies.load_delete(read_json_object(request))
        self.node.apply(EVENT_PROMPT_DELETE, event, trace_id, ORIGIN_CLIENT)
        return None

    @endpoint("/v1/load/stats", ["GET"])
    def load_query(self, request, trace_id):
        """``?cluster=NAME`` -> [{"ip", "queued_req_num", "prompt_length":
        bytes, "updated_time": ns, "prefill_req_num", "prefill_tokens",
        "queued_tokens"}] (counters saturated at 2^31-1) ([] for an unknown cluster); 400 without
        ``cluster``. Served from ``LoadResponseCache``."""
        cluster = self.node.state.clusters.get(bodies.cluster_query(request.args))
        if cluster is None:
            return Raw(b"[]")
        return self.load_bodies.body(cluster)

    @endpoint("/v1/load/overview", ["GET"])
    def load_overview(self, request, trace_id):
        """Every cluster's engines at once (the console): ``{"time": ns,
        "clusters": [{"cluster", "engines": [as in GET /v1/load/stats]}]}``."""
        return self.views.overview.get()
