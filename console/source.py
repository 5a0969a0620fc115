"""The console's only way to the nodes: poll one node into a ``NodeSnapshot``,
list the nodes, change a log level. The app takes any object with these
methods, which is how tests feed it fixed data."""

import time

from console.model import LOG_LEVELS, BadResponse, NodeSnapshot, NodeStatus, Overview, parse_cache_stats
from console.nodeclient import NodeApiError, NodeClient, NodeUnreachable

__all__ = ["LOG_LEVELS", "HttpSource"]


class HttpSource:
    def __init__(self, targets, timeout=2.0, clock=time.time):
        self.targets = targets  # FixedTargets or DnsTargets
        self.timeout = timeout
        self.clock = clock

    def describe(self):
        return self.targets.describe()

    def discover(self):
        """Node URLs; raises ``DiscoveryError`` when DNS fails."""
        return self.targets.resolve()

    def fetch(self, target):
        """Never raises: whatever goes wrong ends up in the snapshot."""
        client = NodeClient(target, self.timeout)
        started = time.monotonic()
        # One deadline for the whole poll, so a slow node is reported within
        # ``timeout`` however many calls the poll makes.
        deadline = started + self.timeout
        try:
            fields = self._read(client, deadline)
        except (NodeUnreachable, NodeApiError, BadResponse) as exc:
            fields = {"error": str(exc)}
        return NodeSnapshot(
            target=target, fetched_at=self.clock(), latency=time.monotonic() - started, **fields
        )

    def _read(self, client, deadline):
        overview = Overview.parse(client.get("/v1/load/overview", deadline))
        fields = {"overview": overview}
        notes = []

        ready_status, _ = client.request("GET", "/readyz", deadline=deadline)
        fields["ready"] = ready_status == 200

        try:
            fields["status"] = NodeStatus.parse(client.get("/v1/node/status", deadline))
        except (NodeApiError, BadResponse) as exc:
            fields["status_error"] = f"node status: {exc}"

        try:
            fields["cache"] = parse_cache_stats(client.get("/v1/cache/stats", deadline))
        except NodeApiError as exc:
            if exc.http_status != 404:  # 404: this node has no KV-cache index
                notes.append(f"cache stats: {exc}")
        except BadResponse as exc:
            notes.append(f"cache stats: {exc}")
        try:
            leases = client.get("/v1/load/leases", deadline)
            if not isinstance(leases, list) or not all(isinstance(x, dict) for x in leases):
                raise BadResponse("GET /v1/load/leases: expected a list of objects")
            fields["leases"] = tuple(leases)
        except NodeApiError as exc:
            if exc.http_status != 404:  # 404: a node from before issue 10
                notes.append(f"leases: {exc}")
        except BadResponse as exc:
            notes.append(f"leases: {exc}")
        fields["notes"] = tuple(notes)
        return fields

    def set_log_level(self, target, level):
        """Returns the node's answer text; raises on failure."""
        return NodeClient(target, self.timeout).set_log_level(level)

    def reset_engine(self, target, cluster, ip):
        """Engine reset on ``target`` (replicated by it). Returns the answer
        as text; raises on failure."""
        data = NodeClient(target, self.timeout).reset_engine(cluster, ip)
        return f"released {data['released_requests']} requests and {data['cache_blocks']} cache blocks"
