"""Where the nodes come from: a fixed list, or a DNS name (a Kubernetes
headless Service) whose A and AAAA records are looked up every interval."""

import dns.exception
import dns.nameserver
import dns.resolver

from metacenter.client.routing import Node, parse_node

DEFAULT_DNS_INTERVAL = 5.0  # seconds, the reference's REPLICA_DNS_LOOKUP_INTERVAL
DEFAULT_LOOKUP_TIMEOUT = 2.0  # seconds for one whole lookup


class DnsNodes:
    """The nodes are the addresses of ``name`` (A and AAAA), each on ``port``.

    ``server``: ask only this DNS server (``"10.0.0.53"``, ``"127.0.0.1:5353"``
    or ``(host, port)``) instead of the system's resolv.conf. The clients look
    the name up before their first call and again at most every ``interval``
    seconds; a lookup that fails keeps the last nodes (a flapping DNS server
    must not empty the client's node list).
    """

    def __init__(self, name, port, *, interval=DEFAULT_DNS_INTERVAL, server=None,
                 lookup_timeout=DEFAULT_LOOKUP_TIMEOUT, scheme="http"):
        if not isinstance(name, str) or not name:
            raise ValueError(f"the DNS name must be a non-empty string, got {name!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"port must be an integer in [1, 65535], got {port!r}")
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme must be http or https, got {scheme!r}")
        self.name = name
        self.port = port
        self.interval = interval
        self.lookup_timeout = lookup_timeout
        self.scheme = scheme
        self.server = _parse_server(server) if server is not None else None

    def resolver(self):
        resolver = dns.resolver.Resolver(configure=self.server is None)
        if self.server is not None:
            host, port = self.server
            resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)]
        resolver.lifetime = self.lookup_timeout
        resolver.timeout = self.lookup_timeout / 2
        return resolver

    def resolve(self):
        """Blocking: the nodes the name gives now. Raises ``LookupError``
        saying why when it gives none (NXDOMAIN, timeout, no records)."""
        resolver = self.resolver()
        addresses = set()
        try:
            for record_type in ("A", "AAAA"):
                try:
                    answer = resolver.resolve(self.name, record_type, search=True)
                except dns.resolver.NoAnswer:
                    continue
                addresses.update(record.address for record in answer)
        except dns.resolver.NXDOMAIN:
            raise LookupError(f"DNS lookup of {self.name}: the name does not exist") from None
        except dns.exception.Timeout:
            raise LookupError(f"DNS lookup of {self.name}: no DNS server answered in time") from None
        except dns.exception.DNSException as e:
            raise LookupError(f"DNS lookup of {self.name}: {type(e).__name__}: {e}") from None
        if not addresses:
            raise LookupError(f"DNS lookup of {self.name}: no A or AAAA records")
        return [parse_node(f"{self.scheme}://{_bracket(a)}:{self.port}") for a in addresses]

    def __repr__(self):
        return f"DnsNodes({self.name!r}, {self.port})"


def _bracket(address):
    return f"[{address}]" if ":" in address else address


def _parse_server(server):
    if isinstance(server, tuple):
        host, port = server
        return host, int(port)
    if not isinstance(server, str) or not server:
        raise ValueError(f"server must be 'host', 'host:port' or (host, port), got {server!r}")
    node = parse_node(server, default_port=53)
    return node.host, node.port


class NodeList:
    """The client's view of where its nodes come from: ``static`` (a list of
    ``Node``) or ``dns`` (a ``DnsNodes``), and when the next lookup is due."""

    def __init__(self, nodes):
        self.dns = None
        self.static = None
        self.next_lookup = 0.0
        self.last_error = None
        if isinstance(nodes, DnsNodes):
            self.dns = nodes
        else:
            if isinstance(nodes, (str, Node)):
                nodes = [nodes]
            self.static = [n if isinstance(n, Node) else parse_node(n) for n in nodes]

    def due(self, now):
        return self.dns is not None and now >= self.next_lookup

    def looked_up(self, now):
        self.next_lookup = now + self.dns.interval
