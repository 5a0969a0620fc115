"""Which nodes to watch: fixed URLs, or every address behind a DNS name
(the headless Service the nodes themselves use to find their peers)."""

import ipaddress
import socket

import dns.exception
import dns.rdatatype
import dns.resolver

from console.nodeclient import normalize_target


class DiscoveryError(Exception):
    pass


def parse_server(text):
    """``HOST[:PORT]`` or ``[V6]:PORT`` -> (host, port); port 53 by default."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, "53"
    try:
        ipaddress.ip_address(host)
        port = int(port)
    except ValueError:
        raise ValueError(f"--dns-server wants IP[:PORT], got {text!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"--dns-server port out of range: {text!r}")
    return host, port


def _url(address, port):
    host = f"[{address}]" if ":" in address else address
    return normalize_target(f"http://{host}:{port}")


def _sorted_addresses(addresses):
    return sorted(set(addresses), key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a)))


class DnsTargets:
    """Resolves ``name`` to one URL per A/AAAA address, sorted so the node list
    (and the default view node) stays put between lookups."""

    def __init__(self, name, port, server=None, timeout=2.0):
        self.name = name
        self.port = port
        self.server = server  # (host, port) or None for the system resolver
        self.timeout = timeout

    def describe(self):
        via = f" via {self.server[0]}:{self.server[1]}" if self.server else ""
        return f"dns {self.name}:{self.port}{via}"

    def resolve(self):
        addresses = self._with_dnspython() if self.server else self._with_system()
        if not addresses:
            raise DiscoveryError(f"{self.name} has no A or AAAA records")
        return [_url(a, self.port) for a in _sorted_addresses(addresses)]

    def _with_system(self):
        try:
            infos = socket.getaddrinfo(self.name, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise DiscoveryError(f"cannot resolve {self.name}: {exc.strerror or exc}") from None
        return [info[4][0].split("%")[0] for info in infos]

    def _with_dnspython(self):
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self.server[0]]
        resolver.port = self.server[1]
        resolver.lifetime = self.timeout
        addresses, failures = [], []
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                answer = resolver.resolve(self.name, rdtype, search=False)
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except dns.exception.DNSException as exc:
                failures.append(f"{dns.rdatatype.to_text(rdtype)}: {exc}")
                continue
            addresses.extend(record.address for record in answer)
        if not addresses and failures:
            raise DiscoveryError(f"cannot resolve {self.name}: {'; '.join(failures)}")
        return addresses


class FixedTargets:
    def __init__(self, urls):
        self.urls = [normalize_target(u) for u in urls]

    def describe(self):
        return f"{len(self.urls)} node{'s' if len(self.urls) != 1 else ''}"

    def resolve(self):
        return list(self.urls)
