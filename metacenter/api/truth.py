"""Routes of issue 10, the load's truth in real time (docs/truth.md): engine
reset, gateway leases, refresh and pick-and-book. Conditional adds go
through ``POST /v1/load/stats`` (``api.load``)."""

from metacenter.api import bodies
from metacenter.api.endpoint import endpoint, read_json_object
from metacenter.core.events import (EVENT_ENGINE_RESET, EVENT_LEASE_KEEPALIVE, EVENT_LEASE_REVOKE, EVENT_REFRESH,
                                    ORIGIN_CLIENT)


class TruthRoutes:
    """With ``MetacenterAPI`` (``node``)."""

    @endpoint("/v1/load/engine", ["DELETE"])
    def engine_reset(self, request, trace_id):
        """Engine ``ip`` restarted: ``{"cluster", "ip"}`` -> ``{"released_requests":
        int, "cache_blocks": int}``; its in-flight requests are released as if
        deleted and its KV-cache blocks dropped (zeros for an unknown engine).
        Replicated to our peers."""
        event = bodies.engine_reset(read_json_object(request))
        released, blocks = self.node.run(EVENT_ENGINE_RESET, event, trace_id, ORIGIN_CLIENT)
        return {"released_requests": released, "cache_blocks": blocks}

    @endpoint("/v1/load/lease/keepalive", ["POST"])
    def lease_keepalive(self, request, trace_id):
        """Create or renew a gateway's lease: ``{"lease": 1-128 characters,
        "ttl_ms"?: int in [1000, 300000] (default --lease-ttl)}`` ->
        ``{"lease", "ttl_ms", "requests": in flight under it}``. Replicated
        with the resolved ttl_ms."""
        event = bodies.lease_keepalive(read_json_object(request))
        return self.node.run(EVENT_LEASE_KEEPALIVE, event, trace_id, ORIGIN_CLIENT)

    @endpoint("/v1/load/lease", ["DELETE"])
    def lease_revoke(self, request, trace_id):
        """A gateway's clean shutdown: ``{"lease"}`` -> ``{"released_requests":
        int}``, every request added under the lease released (0 for a lease
        not alive). Replicated."""
        event = bodies.lease_revoke(read_json_object(request))
        return {"released_requests": self.node.run(EVENT_LEASE_REVOKE, event, trace_id, ORIGIN_CLIENT)}

    @endpoint("/v1/load/leases", ["GET"])
    def leases(self, request, trace_id):
        """-> ``[{"lease", "ttl_ms", "expires_in_ms", "requests"}]``, the leases
        alive on this node, by name. O(leases): there is one per gateway
        instance."""
        return self.node.state.leases()

    @endpoint("/v1/load/refresh", ["POST"])
    def refresh(self, request, trace_id):
        """``{"request_ids": [str, ...]}`` (at most 10,000) -> ``{"refreshed":
        int}``: each known in-flight request's expiry clock restarts now;
        unknown ids are ignored. Replicated."""
        event = bodies.refresh(read_json_object(request))
        return {"refreshed": self.node.run(EVENT_REFRESH, event, trace_id, ORIGIN_CLIENT)}

    @endpoint("/v1/route/pick", ["POST"])
    def route_pick(self, request, trace_id):
        """Pick-and-book: ``{"cluster", "request_id", "prompt_length"?,
        "prompt_tokens"?, "prompt_hash"?, "ips"?, "lease"?}`` -> ``{"ip",
        "score", "cache_length", "queued_req_num"}``; the request is booked on
        that engine in the same step (a retry books nothing and answers the
        same ip). 404 with no candidate (pass ``ips``), 409 for a request that
        already finished."""
        return self.node.pick(bodies.route_pick(read_json_object(request)), trace_id)
