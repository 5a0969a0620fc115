"""Routes of the KV-cache index (WIRE.md section 5) and the routing score."""

from metacenter.api import bodies
from metacenter.api.endpoint import endpoint, read_json_object
from metacenter.core.events import ORIGIN_CLIENT
from metacenter.core.scoring import score_engines


class CacheRoutes:
    @endpoint("/v1/cache/save", ["POST"])
    def cache_save(self, request, trace_id):
        event = bodies.parse_cache_save(read_json_object(request))
        self.node.save_cache(event, trace_id, ORIGIN_CLIENT)
        return None

    @endpoint("/v1/cache/query", ["POST"])
    def cache_query(self, request, trace_id):
        cluster, hashes, topk = bodies.parse_cache_query(read_json_object(request))
        return {"locations": self.node.cache.query(cluster, hashes, topk)}

    @endpoint("/v1/route/score", ["POST"])
    def route_score(self, request, trace_id):
        cluster, hashes, ips = bodies.parse_route_score(read_json_object(request))
        lengths = self.node.cache.match_lengths(cluster, hashes)
        return score_engines(self.node.state.cluster_load(cluster), lengths, len(hashes), ips)

    @endpoint("/v1/cache/stats", ["GET"])
    def cache_stats(self, request, trace_id):
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
