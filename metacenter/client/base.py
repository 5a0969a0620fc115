"""What both clients do around the transport: which nodes to try for a
call, what an answer does to the breakers and the request map, and the error
when every node failed."""

import logging

from metacenter.client import calls
from metacenter.client.errors import NodeUnavailable
from metacenter.client.nodes import NodeList
from metacenter.client.routing import (
    CLOSED,
    DEFAULT_COOLDOWN,
    DEFAULT_FAILURE_THRESHOLD,
    DEFAULT_TRACKED_REQUESTS,
    OPEN,
    Node,
    Router,
    parse_node,
)

DEFAULT_TIMEOUT = 0.1  # seconds per request, the Go gateway's

log = logging.getLogger("metacenter.client")


class ClientBase(calls.Methods):
    def __init__(self, nodes, clock, *, timeout, failure_threshold, breaker_cooldown, tracked_requests):
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = timeout
        self._clock = clock
        self._router = Router(clock, failure_threshold=failure_threshold, cooldown=breaker_cooldown,
                              tracked_requests=tracked_requests)
        self._source = NodeList(nodes)
        if self._source.static is not None:
            self._router.set_nodes(self._source.static)

    # -- introspection -------------------------------------------------------

    @property
    def nodes(self):
        """The base URLs of the known nodes, in ring order (sorted by host:port)."""
        return [node.url for node in self._router.nodes]

    def breakers(self):
        """{node URL: "closed" | "open" | "half-open"}."""
        states = self._router.states()
        return {node.url: states[node.key] for node in self._router.nodes}

    def node_for(self, cluster):
        """The base URL of the node that calls about ``cluster`` go to now
        (None when no node is available)."""
        order = self._router.order(cluster)
        return order[0].url if order else None

    def placement(self, request_id):
        """The base URL of the node that took ``request_id``'s add or pick,
        while the client remembers it (until its delete_request)."""
        key = self._router.placement(request_id)
        for node in self._router.nodes:
            if node.key == key:
                return node.url
        return None

    # -- one call ------------------------------------------------------------

    def _targets(self, call):
        """(nodes to try in order, explicit): an explicit node is asked
        directly, bypassing the ring and its breaker."""
        if call.node is not None:
            node = call.node if isinstance(call.node, Node) else parse_node(call.node)
            return [node], True
        return self._router.order(call.key, call.follow), False

    def _acquire(self, node, explicit):
        return 0 if explicit else self._router.acquire(node)

    def _record(self, node, ticket, ok, explicit):
        if explicit:
            return
        state = self._router.record(node, ticket, ok)
        if state == OPEN:
            log.warning("metacenter node %s: circuit breaker open after failures; retried in %.1f s",
                        node.url, self._router.breaker(node).cooldown)
        elif state == CLOSED:
            log.info("metacenter node %s: circuit breaker closed, the node answers again", node.url)

    def _abandoned(self, node, ticket, explicit):
        if not explicit:
            self._router.release(node, ticket)

    def _answered(self, call, node):
        if call.place is not None:
            request_id, cluster = call.place
            if isinstance(request_id, str):
                self._router.placed(request_id, node, cluster if isinstance(cluster, str) else "")
        if call.forget is not None:
            self._router.forget(call.forget)

    def _no_node(self, attempts, last_error):
        if not attempts and self._source.last_error:
            return NodeUnavailable(f"no metacenter node is known: {self._source.last_error}")
        if not attempts and self._router.nodes:
            return NodeUnavailable("no metacenter node available: every node's circuit breaker is open",
                                   [(node.url, "circuit breaker open") for node in self._router.nodes])
        # Nodes left out for an open breaker belong in the story too.
        tried = {url for url, _ in attempts}
        skipped = [(node.url, "circuit breaker open") for node in self._router.nodes
                   if node.url not in tried and not self._router.breaker(node).available()]
        return calls.exhausted(attempts + skipped, last_error)

    def _looked_up(self, result):
        """Apply a DNS lookup's result: a list of nodes, or the LookupError."""
        if isinstance(result, LookupError):
            if self._source.last_error != str(result):
                log.warning("%s; keeping the %d known nodes", result, len(self._router.nodes))
            self._source.last_error = str(result)
            return
        if self._source.last_error:
            log.info("DNS lookup of %s works again", self._source.dns.name)
        self._source.last_error = None
        self._router.set_nodes(result)


__all__ = ["ClientBase", "DEFAULT_TIMEOUT", "DEFAULT_FAILURE_THRESHOLD", "DEFAULT_COOLDOWN",
           "DEFAULT_TRACKED_REQUESTS"]
