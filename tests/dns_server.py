"""A real, mutable DNS server on loopback for tests (twisted.names).

    server = DnsServer.start()             # 127.0.0.1, a free port, UDP and TCP
    server.set_records("peers.test", ["127.0.0.2", "::2"])   # A and AAAA
    server.set_records("peers.test", [])   # the name exists, no records (NOERROR, empty answer)
    server.remove("peers.test")            # NXDOMAIN
    yield server.stop()

It runs in the reactor of the test process, so it answers only while that
reactor runs: use it from pytest-twisted tests that wait with Deferreds (for
instance on a ``deferToThread`` lookup), never with ``time.sleep``. Nodes running
as separate processes resolve against it with ``--dns-server 127.0.0.1:PORT``
(``server.address``); while the test blocks the reactor (a blocking HTTP call,
``NodeProcess.start``), their lookups time out and succeed again afterwards.

``dns_server`` is a pytest fixture: ``from dns_server import dns_server``.
"""

import ipaddress

import pytest_twisted
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.names import dns, server
from twisted.names.common import ResolverBase
from twisted.names.error import AuthoritativeDomainError

RECORD_TTL = 1  # seconds; answers must not outlive a set_records in any cache


def _key(name):
    if isinstance(name, bytes):
        name = name.decode("ascii")
    return name.lower().rstrip(".")


class MutableAuthority(ResolverBase):
    """Authoritative for the names it holds; NXDOMAIN for every other name."""

    def __init__(self):
        super().__init__()
        self._addresses = {}  # name -> list of ipaddress objects
        self.queries = []  # (name, type) as received, to assert that lookups happened

    def set_records(self, name, addresses):
        self._addresses[_key(name)] = [ipaddress.ip_address(a) for a in addresses]

    def remove(self, name):
        self._addresses.pop(_key(name), None)

    def _lookup(self, name, cls, type, timeout):
        key = _key(name)
        self.queries.append((key, type))
        if key not in self._addresses:
            return defer.fail(AuthoritativeDomainError(name))
        answers = []
        for address in self._addresses[key]:
            if type == dns.A and address.version == 4:
                payload = dns.Record_A(str(address), ttl=RECORD_TTL)
            elif type == dns.AAAA and address.version == 6:
                payload = dns.Record_AAAA(str(address), ttl=RECORD_TTL)
            else:
                continue
            answers.append(dns.RRHeader(name=name, type=type, cls=cls, ttl=RECORD_TTL, payload=payload, auth=True))
        # A known name without records of this type: NOERROR with an empty answer.
        return defer.succeed((answers, [], []))


class DnsServer:
    def __init__(self, authority, udp_port, tcp_port):
        self.authority = authority
        self._udp_port = udp_port
        self._tcp_port = tcp_port
        self.host = udp_port.getHost().host
        self.port = udp_port.getHost().port

    @classmethod
    def start(cls, reactor=None, interface="127.0.0.1", attempts=20):
        """Listen on a free port, the same number for UDP and TCP (a DNS client
        falls back to TCP on the same port when an answer is truncated)."""
        if reactor is None:
            from twisted.internet import reactor
        authority = MutableAuthority()
        factory = server.DNSServerFactory(authorities=[authority])
        for _ in range(attempts):
            udp_port = reactor.listenUDP(0, dns.DNSDatagramProtocol(controller=factory), interface=interface)
            try:
                tcp_port = reactor.listenTCP(udp_port.getHost().port, factory, interface=interface)
            except CannotListenError:
                udp_port.stopListening()  # the TCP twin is taken; try another number
                continue
            return cls(authority, udp_port, tcp_port)
        raise RuntimeError(f"no port free for both UDP and TCP on {interface} after {attempts} attempts")

    @property
    def address(self):
        """HOST:PORT, the value of a node's --dns-server."""
        return f"{self.host}:{self.port}"

    def set_records(self, name, addresses):
        self.authority.set_records(name, addresses)

    def remove(self, name):
        self.authority.remove(name)

    @property
    def queries(self):
        return self.authority.queries

    def stop(self):
        """Stops listening; the Deferred fires once both ports are closed.
        Safe to call twice."""
        ports, self._udp_port, self._tcp_port = [self._udp_port, self._tcp_port], None, None
        return defer.gatherResults(
            [defer.maybeDeferred(p.stopListening) for p in ports if p is not None], consumeErrors=True
        )


@pytest_twisted.async_yield_fixture
async def dns_server():
    running = DnsServer.start()
    yield running
    await running.stop()
