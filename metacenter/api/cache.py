"""Routes of the KV-cache index (docs/cache.md) and the routing score."""

from metacenter.api import bodies
from metacenter.api.endpoint import endpoint, read_json_object
from metacenter.core.events import ORIGIN_CLIENT
from metacenter.core.scoring import score_engines


class CacheRoutes:
    """With ``MetacenterAPI`` (``node``)."""

    @endpoint("/v1/cache/save", ["POST"])
    def cache_save(self, request, trace_id):
        """Engine ``ip`` now holds the KV cache of every prefix of the
        prompt: ``{"cluster", "ip", "prompt_hash": [uint64, ...]}`` (non-empty,
        first block first) -> data null; replicated to the peers."""
        event = bodies.parse_cache_save(read_json_object(request))
        self.node.save_cache(event, trace_id, ORIGIN_CLIENT)
        return None

    @endpoint("/v1/cache/query", ["POST"])
    def cache_query(self, request, trace_id):
        """``{"cluster", "prompt_hash": [uint64, ...], "topk"?: 1..1000
        (default 10)}`` -> ``{"locations": [{"ip", "length": leading blocks
        held}]}``, longest first, ties by ip."""
        cluster, hashes, topk = bodies.parse_cache_query(read_json_object(request))
        return {"locations": self.node.cache.query(cluster, hashes, topk)}

    @endpoint("/v1/route/score", ["POST"])
    def route_score(self, request, trace_id):
        """``{"cluster", "prompt_hash": [uint64, ...], "ips"?: [ip, ...]}`` ->
        the gateway's score of each engine, best first (``core.scoring``)."""
        cluster, hashes, ips = bodies.parse_route_score(read_json_object(request))
        lengths = self.node.cache.match_lengths(cluster, hashes)
        return score_engines(self.node.state.cluster_load(cluster), lengths, len(hashes), ips)

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
