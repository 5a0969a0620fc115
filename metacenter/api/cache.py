"""Routes of the KV-cache index (docs/cache.md) and the routing score."""

from metacenter.api import bodies
from metacenter.api.bodies import spelled_ip
from metacenter.api.endpoint import endpoint, in_turns, joined_in_steps, json_object_steps
from metacenter.api.envelope import dumps
from metacenter.api.views import TURN_BUDGET
from metacenter.core.cache import IPS_MAX_ITEMS, PROMPT_HASH_MAX_ITEMS, TOPK_DEFAULT, TOPK_MAX
from metacenter.core.errors import InvalidInput
from metacenter.core.events import CacheSave
from metacenter.core.fields import int_field, is_uint64, json_type, required_string, uint64_list
from metacenter.core.fields import canonical_ip, check_length
from metacenter.core.scoring import score_engines_steps

# Addresses checked between two calls of ``spent()`` (the clock is read
# every 16 calls: every 64 addresses, ~0.3 ms).
IPS_PER_CHECK = 4
# A score answer of more rows than this is written in steps (~1 µs a row).
ROWS_IN_ONE_GO = 256

# Hashes checked between two calls of the step's ``spent()`` (the C-speed
# check of ``uint64_list``, ~40 ns a hash; the clock is read every 16 calls).
HASHES_PER_CHECK = 256


def _hash_list_steps(obj, allow_empty, spent):
    """``bodies.hash_list(obj, "prompt_hash", allow_empty)`` in steps: a
    generator returning the list, or raising the same InvalidInput."""
    value = obj.get("prompt_hash")
    if not isinstance(value, list) or not value or len(value) > PROMPT_HASH_MAX_ITEMS:
        return bodies.hash_list(obj, "prompt_hash", allow_empty)  # its reason, or [] when that is allowed
    for start in range(0, len(value), HASHES_PER_CHECK):
        chunk = value[start:start + HASHES_PER_CHECK]
        try:
            uint64_list(chunk, "prompt_hash", PROMPT_HASH_MAX_ITEMS)
        except InvalidInput:
            # uint64_list's reason, with the item's index in the whole array.
            for index, item in enumerate(chunk, start):
                if not is_uint64(item):
                    shown = item if type(item) in (int, float) else json_type(item)
                    raise InvalidInput(f"field 'prompt_hash' item {index} must be an unsigned 64-bit integer, "
                                       f"got {shown}") from None
            raise
        if spent():
            yield
    return value


def _ip_list_steps(obj, spent):
    """``bodies._ip_list(obj, "ips", canonical=False)`` (the same checks and
    reasons, in order) ``IPS_PER_CHECK`` addresses per call of ``spent()``:
    ~5 µs each, 10,000 took ~25 ms in one go."""
    value = obj.get("ips")
    if not isinstance(value, list) or len(value) > IPS_MAX_ITEMS:
        return bodies._ip_list(obj, "ips", canonical=False)  # None when absent, else its reason
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise InvalidInput(f"field 'ips' item {index} must be an IP address string, got {json_type(item)}")
        check_length(item, "ip", f"field 'ips' item {index}")
        try:
            canonical_ip(item)
        except ValueError:
            raise InvalidInput(f"field 'ips' item {index} must be an IPv4 or IPv6 address, got {item!r}") from None
        if not (index + 1) % IPS_PER_CHECK and spent():
            yield
    return list(value)


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
        obj = yield from json_object_steps(request, spent)
        # bodies.parse_cache_save's checks, in its order, the hashes a slice at a time.
        cluster = required_string(obj, "cluster")
        hashes = yield from _hash_list_steps(obj, False, spent)
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
        obj = yield from json_object_steps(request, spent)
        # bodies.parse_cache_query's checks, in its order.
        cluster = required_string(obj, "cluster")
        hashes = yield from _hash_list_steps(obj, True, spent)
        topk = int_field(obj, "topk", 1, TOPK_MAX, default=TOPK_DEFAULT)
        return {"locations": (yield from self.node.cache.query_steps(cluster, hashes, topk, spent))}

    @endpoint("/v1/route/score", ["POST"])
    def route_score(self, request, trace_id):
        """``{"cluster", "prompt_hash": [uint64, ...], "ips"?: [ip, ...]}`` ->
        the gateway's score of each engine, best first (``core.scoring``)."""
        return in_turns(self.node, lambda spent: self._score_steps(request, spent), self.step_budget)

    def _score_steps(self, request, spent):
        obj = yield from json_object_steps(request, spent)
        # bodies.parse_route_score's checks, in its order.
        cluster = required_string(obj, "cluster")
        hashes = yield from _hash_list_steps(obj, True, spent)
        ips = yield from _ip_list_steps(obj, spent)
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
