"""Routes of the KV-cache index (docs/cache.md) and the routing score."""

from metacenter.api import bodies
from metacenter.api.bodies import spelled_ip
from metacenter.api.endpoint import endpoint, in_turns, joined_in_steps
from metacenter.api.envelope import dumps
from metacenter.api.views import TURN_BUDGET
from metacenter.core.cache import TOPK_DEFAULT, TOPK_MAX
from metacenter.core.events import CacheSave
from metacenter.core.fields import int_field, required_string
from metacenter.core.scoring import score_engines_steps

# A score answer of more rows than this is written in steps (~1 µs a row).
ROWS_IN_ONE_GO = 256


class CacheRoutes:
    """With ``MetacenterAPI`` (``node``). A save, query or score with many
    hashes works in steps of ``step_budget`` seconds over reactor turns
    (``endpoint.in_turns``); a small one is answered in its own turn."""

    step_budget = TURN_BUDGET

    @endpoint("/v1/cache/save", ["POST"])
    def cache_save(self, request, trace_id):
        """Engine ``ip`` now holds the KV cache of every prefix of the
        prompt: ``{"cluster", "ip", "prompt_hash": [uint64, ...]}`` (non-empty,
        first block first) -> data null; replicated to the peers."""
        return in_turns(self.node, lambda spent: self._save_steps(request, trace_id, spent),
                        self.step_budget)

    def _save_steps(self, request, trace_id, spent):
        obj = yield from bodies.json_object_steps(request.content.read(), spent)
        # bodies.parse_cache_save's checks, in its order, the hashes a slice at a time.
        cluster = required_string(obj, "cluster")
        hashes = yield from bodies.hash_list_steps(obj, False, spent)
        event = CacheSave((cluster, hashes, spelled_ip(obj, "ip")))
        yield from self.node.save_cache_steps(event, trace_id, spent)
        return None

    @endpoint("/v1/cache/query", ["POST"])
    def cache_query(self, request, trace_id):
        """``{"cluster", "prompt_hash": [uint64, ...], "topk"?: 1..1000
        (default 10)}`` -> ``{"locations": [{"ip", "length": leading blocks
        held}]}``, longest first, ties by ip. A long prompt is walked over
        several turns: saves arriving meanwhile may or may not be seen
        (acceptable: the index is advisory)."""
        return in_turns(self.node, lambda spent: self._query_steps(request, spent), self.step_budget)

    def _query_steps(self, request, spent):
        obj = yield from bodies.json_object_steps(request.content.read(), spent)
        # bodies.parse_cache_query's checks, in its order.
        cluster = required_string(obj, "cluster")
        hashes = yield from bodies.hash_list_steps(obj, True, spent)
        topk = int_field(obj, "topk", 1, TOPK_MAX, default=TOPK_DEFAULT)
        return {"locations": (yield from self.node.cache.query_steps(cluster, hashes, topk, spent))}

    @endpoint("/v1/route/score", ["POST"])
    def route_score(self, request, trace_id):
        """``{"cluster", "prompt_hash": [uint64, ...], "ips"?: [ip, ...]}`` ->
        the gateway's score of each engine, best first (``core.scoring``)."""
        return in_turns(self.node, lambda spent: self._score_steps(request, spent), self.step_budget)

    def _score_steps(self, request, spent):
        obj = yield from bodies.json_object_steps(request.content.read(), spent)
        # bodies.parse_route_score's checks, in its order.
        cluster = required_string(obj, "cluster")
        hashes = yield from bodies.hash_list_steps(obj, True, spent)
        ips = yield from bodies.ip_list_steps(obj, "ips", spent)
        lengths = yield from self.node.cache.match_steps(cluster, hashes, "ip", spent)
        scored = yield from score_engines_steps(self.node.state.cluster_load(cluster), lengths, len(hashes), ips,
                                                spent)
        if len(scored) <= ROWS_IN_ONE_GO:
            return scored
        # As envelope.dumps(scored) writes it, a group of rows per step, never joined.
        return (yield from joined_in_steps(b"[", (dumps(row) for row in scored), b"]", spent))

    @endpoint("/v1/cache/stats", ["GET"])
    def cache_stats(self, request, trace_id):
        """-> ``{"blocks", "engines", "bytes_estimate", "clusters": [{"cluster",
        "blocks", "engines"}]}``: the index's size, per cluster by name."""
        index = self.node.cache
        blocks = index.blocks_by_cluster()
        engines = index.engines_by_cluster()
        return {
            "blocks": index.block_count,
            "engines": index.engine_count,
            "bytes_estimate": index.approx_bytes(),
            "clusters": [{"cluster": name, "blocks": blocks.get(name, 0), "engines": engines.get(name, 0)}
                         for name in sorted(set(blocks) | set(engines))],
        }
