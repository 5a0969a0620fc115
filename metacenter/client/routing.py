"""How a client chooses a node: the Go gateway's rules, as pure code both
clients share (no I/O; time comes from an injected ``clock.seconds()``).

- The nodes are sorted by their ``host:port`` string (byte order, as Go's
  ``sort.Strings``); nodes whose circuit breaker is open are left out.
- A call about cluster C goes to node ``fnv32a(C) % len(healthy)`` of that
  list, so every call about one cluster lands on one node while it is
  healthy; on failure the next nodes of the list are tried in turn (failover).
- Each node has a circuit breaker: ``failure_threshold`` consecutive failures
  open it; after ``cooldown`` seconds one trial request is let through
  (half-open); its success closes the breaker, its failure opens it again.
- A delete goes first to the node that took the request's add, when this
  client sent that add (a bounded map ``request_id -> node``).
"""

import ipaddress
from collections import OrderedDict
from urllib.parse import urlsplit

FNV32_OFFSET = 2166136261
FNV32_PRIME = 16777619

DEFAULT_FAILURE_THRESHOLD = 10  # the Go gateway's
DEFAULT_COOLDOWN = 5.0  # seconds an open breaker waits before its trial request
DEFAULT_TRACKED_REQUESTS = 100_000  # request_id -> node entries kept for deletes

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


def fnv32a(text):
    """FNV-1a, 32 bits, of ``text`` (str, UTF-8 encoded, or bytes) -> int in [0, 2**32)."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    h = FNV32_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV32_PRIME) & 0xFFFFFFFF
    return h


class Node:
    """One metacenter node: ``key`` is ``host:port`` (``[v6]:port``), the
    string the ring sorts; ``url`` is its base URL."""

    __slots__ = ("scheme", "host", "port", "key", "url")

    def __init__(self, scheme, host, port):
        self.scheme = scheme
        self.host = host
        self.port = port
        bracketed = f"[{host}]" if ":" in host else host
        self.key = f"{bracketed}:{port}"
        self.url = f"{scheme}://{self.key}"

    def __eq__(self, other):
        return isinstance(other, Node) and (self.scheme, self.key) == (other.scheme, other.key)

    def __hash__(self):
        return hash(self.key)

    def __repr__(self):
        return f"Node({self.url!r})"


def parse_node(text, default_port=80):
    """``"http://127.0.0.2:8080"``, ``"127.0.0.2:8080"``, ``"[::1]:8080"`` or
    ``"host"`` (port ``default_port``) -> ``Node``. An IP address is written in
    its standard form. Raises ValueError naming what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a node must be a non-empty string like 'http://10.0.0.5:8080', got {text!r}")
    raw = text.strip()
    split = urlsplit(raw if "://" in raw else "http://" + raw)
    if split.scheme not in ("http", "https"):
        raise ValueError(f"node {text!r}: the scheme must be http or https")
    if split.path not in ("", "/") or split.query or split.fragment or split.username:
        raise ValueError(f"node {text!r}: give only scheme, host and port")
    try:
        port = split.port
    except ValueError:
        raise ValueError(f"node {text!r}: the port must be an integer in [1, 65535]") from None
    host = split.hostname
    if not host:
        raise ValueError(f"node {text!r}: no host")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        pass  # a host name; resolved by the system when connecting
    return Node(split.scheme, host, port or default_port)


class Breaker:
    """One node's circuit breaker.

    ``acquire()`` before a request: None when the breaker refuses it, else a
    ticket to hand back with ``record(ticket, ok)``. A ticket carries the
    breaker's generation, which changes on every state change, so a late
    answer to a request sent before the breaker opened (or closed) counts for
    nothing: only the trial's answer decides a half-open breaker.
    """

    __slots__ = ("_clock", "threshold", "cooldown", "state", "failures", "opened_at", "generation")

    def __init__(self, clock, threshold=DEFAULT_FAILURE_THRESHOLD, cooldown=DEFAULT_COOLDOWN):
        if threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, got {threshold!r}")
        if cooldown < 0:
            raise ValueError(f"cooldown must be >= 0 seconds, got {cooldown!r}")
        self._clock = clock
        self.threshold = threshold
        self.cooldown = cooldown
        self.state = CLOSED
        self.failures = 0  # consecutive, while closed
        self.opened_at = None
        self.generation = 0

    def available(self):
        """Whether a request may be sent now (without claiming the trial)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return self._clock.seconds() >= self.opened_at + self.cooldown
        return False  # half-open: the trial request is in flight

    def acquire(self):
        if self.state == CLOSED:
            return self.generation
        if self.state == OPEN and self._clock.seconds() >= self.opened_at + self.cooldown:
            self._enter(HALF_OPEN)
            return self.generation
        return None

    def record(self, ticket, ok):
        """The answer to the request of ``ticket``; returns the new state when
        it changed the state (for the log), else None."""
        if ticket != self.generation:
            return None
        if ok:
            self.failures = 0
            if self.state == HALF_OPEN:
                return self._enter(CLOSED)
            return None
        if self.state == HALF_OPEN:
            return self._enter(OPEN)
        self.failures += 1
        if self.failures >= self.threshold:
            return self._enter(OPEN)
        return None

    def release(self, ticket):
        """The request of ``ticket`` was abandoned without an answer (the
        caller cancelled it): an abandoned trial gives the next request the
        chance, so a half-open breaker is never stuck waiting."""
        if ticket == self.generation and self.state == HALF_OPEN:
            opened_at = self.opened_at
            self._enter(OPEN)
            self.opened_at = opened_at

    def _enter(self, state):
        self.state = state
        self.generation += 1
        self.failures = 0
        if state == OPEN:
            self.opened_at = self._clock.seconds()
        return state


class Router:
    """The node list, one breaker per node and the request -> node map.

    ``order(key, request_id=None)`` lists the nodes to try, best first;
    ``acquire``/``record`` wrap each attempt; ``placed``/``forget`` keep the
    map. Not thread-safe: the blocking client holds a lock around it.
    """

    def __init__(self, clock, *, failure_threshold=DEFAULT_FAILURE_THRESHOLD, cooldown=DEFAULT_COOLDOWN,
                 tracked_requests=DEFAULT_TRACKED_REQUESTS):
        if tracked_requests < 0:
            raise ValueError(f"tracked_requests must be >= 0, got {tracked_requests!r}")
        self._clock = clock
        self._threshold = failure_threshold
        self._cooldown = cooldown
        Breaker(clock, failure_threshold, cooldown)  # check the settings now, not at the first node
        self._tracked = tracked_requests
        self._nodes = ()  # sorted by key
        self._by_key = {}
        self._breakers = {}
        self._placed = OrderedDict()  # request_id -> (node key, cluster), oldest first

    @property
    def nodes(self):
        """The nodes, sorted by key."""
        return self._nodes

    def set_nodes(self, nodes):
        """Replace the node list; a node that stays keeps its breaker."""
        unique = {node.key: node for node in nodes}
        self._nodes = tuple(unique[key] for key in sorted(unique))
        self._by_key = unique
        self._breakers = {key: self._breakers.get(key) or Breaker(self._clock, self._threshold, self._cooldown)
                          for key in unique}

    def breaker(self, node):
        return self._breakers.get(node.key)

    def states(self):
        """{node key: "closed" | "open" | "half-open"}."""
        return {key: breaker.state for key, breaker in self._breakers.items()}

    def order(self, key, request_id=None):
        """The nodes to try for a call routed by ``key`` (a cluster name),
        in order: the node that took ``request_id``'s add if known and
        available, then the ring from ``fnv32a(key) % len(healthy)``."""
        healthy = [node for node in self._nodes if self._breakers[node.key].available()]
        if not healthy:
            return []
        if request_id is not None and request_id in self._placed:
            node_key, cluster = self._placed[request_id]
            key = cluster  # a delete follows its request's cluster when the node is gone
            first = self._by_key.get(node_key)
            if first is not None and first in healthy:
                start = fnv32a(key) % len(healthy)
                ring = healthy[start:] + healthy[:start]
                return [first] + [node for node in ring if node is not first]
        start = fnv32a(key) % len(healthy)
        return healthy[start:] + healthy[:start]

    def acquire(self, node):
        breaker = self._breakers.get(node.key)
        return breaker.acquire() if breaker is not None else None

    def record(self, node, ticket, ok):
        """Returns the breaker's new state when this answer changed it."""
        breaker = self._breakers.get(node.key)
        return breaker.record(ticket, ok) if breaker is not None else None

    def release(self, node, ticket):
        breaker = self._breakers.get(node.key)
        if breaker is not None:
            breaker.release(ticket)

    def placed(self, request_id, node, cluster):
        """``node`` took the add of ``request_id``."""
        if not self._tracked:
            return
        self._placed[request_id] = (node.key, cluster)
        self._placed.move_to_end(request_id)
        if len(self._placed) > self._tracked:
            self._placed.popitem(last=False)

    def placement(self, request_id):
        """The node key that took ``request_id``'s add, or None."""
        entry = self._placed.get(request_id)
        return entry[0] if entry else None

    def forget(self, request_id):
        self._placed.pop(request_id, None)

    @property
    def tracked(self):
        return len(self._placed)
