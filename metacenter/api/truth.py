"""Routes of issue 10, the load's truth in real time (docs/truth.md): engine
reset, gateway leases, refresh and pick-and-book. Conditional adds go
through ``POST /v1/load/stats`` (``api.load``)."""

from metacenter.api import bodies
from metacenter.api.endpoint import endpoint, in_turns, read_json_object
from metacenter.api.views import TURN_BUDGET
from metacenter.core.events import EVENT_ENGINE_RESET, EVENT_LEASE_KEEPALIVE, EVENT_LEASE_REVOKE, ORIGIN_CLIENT
from metacenter.core.leases import REFRESH_MAX_ITEMS

# Ids checked between two calls of the step's ``spent()`` (which reads the
# clock every 16 calls: every 128 ids, ~0.2 ms).
IDS_PER_CHECK = 8


class TruthRoutes:
    """With ``MetacenterAPI`` (``node``). A refresh works in steps of
    ``step_budget`` seconds over reactor turns (``endpoint.in_turns``)."""

    step_budget = TURN_BUDGET

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
        return in_turns(self.node, lambda spent: self._refresh_steps(request, trace_id, spent),
                        self.step_budget)

    def _refresh_steps(self, request, trace_id, spent):
        # 10,000 ids took ~30 ms in one go (each is deleted and re-inserted
        # in the expiry order): read, checked and applied in steps instead,
        # each step's ids replicated as a refresh of their own.
        obj = yield from bodies.json_object_steps(request.content.read(), spent)
        ids = obj.get("request_ids")
        if not isinstance(ids, list) or len(ids) > REFRESH_MAX_ITEMS:
            bodies.refresh(obj)  # raises its reason
        for start in range(0, len(ids), IDS_PER_CHECK):
            bodies.check_request_ids(ids[start:start + IDS_PER_CHECK], start)
            if spent():
                yield
        refreshed = yield from self.node.refresh_steps(ids, trace_id, spent)
        return {"refreshed": refreshed}

    @endpoint("/v1/route/pick", ["POST"])
    def route_pick(self, request, trace_id):
        """Pick-and-book: ``{"cluster", "request_id", "prompt_length"?,
        "prompt_tokens"?, "prompt_hash"?, "ips"?, "lease"?}`` -> ``{"ip",
        "score", "cache_length", "queued_req_num"}``; the request is booked on
        that engine in the same step (a retry books nothing and answers the
        same ip). 404 with no candidate (pass ``ips``), 409 for a request that
        already finished."""
        return self.node.pick(bodies.route_pick(read_json_object(request)), trace_id)
