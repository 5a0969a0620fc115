"""Which peers this node replicates to: static ones plus the A/AAAA records of a
DNS name (a Kubernetes headless Service), resolved every interval.

A peer is a ``(host, port)`` tuple. Addresses found through DNS get the
configured peer port, the node's own addresses are left out, static peers are
always in the set. A lookup that fails for any reason keeps the last known set,
as the reference does: a flapping DNS server must not make a cluster forget its
members.

dnspython blocks, so every lookup runs in a thread (``run_in_thread``); the
answer is applied on the reactor thread.
"""

import ipaddress
import socket

import dns.exception
import dns.nameserver
import dns.resolver
from prometheus_client import REGISTRY, Counter, Gauge
from twisted.application.service import MultiService
from twisted.internet import defer, threads

from metacenter.runtime import logs
from metacenter.runtime.periodic import Periodic

DEFAULT_LOOKUP_TIMEOUT = 2.0  # seconds for a whole lookup; one try gets half of it
DEFAULT_FAILURE_LOG_INTERVAL = 60.0  # an ongoing failure is logged again at most this often


class LookupFailed(Exception):
    """A lookup that gave no usable answer; ``reason`` says why, for the log."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def format_peer(peer):
    """``("10.0.0.5", 80)`` -> ``"10.0.0.5:80"``, ``("fd00::5", 80)`` -> ``"[fd00::5]:80"``."""
    host, port = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalise_address(text):
    """One spelling per address, so that own addresses and answers compare equal."""
    return str(ipaddress.ip_address(text))


def make_resolver_factory(dns_server=None, lookup_timeout=DEFAULT_LOOKUP_TIMEOUT):
    """A callable building the dnspython Resolver of one lookup, in the lookup's
    thread: it reads /etc/resolv.conf (so a changed one is picked up) or, with
    ``dns_server`` = (host, port), asks only that server."""

    def system_resolver():
        resolver = dns.resolver.Resolver()
        resolver.lifetime = lookup_timeout
        resolver.timeout = lookup_timeout / 2
        return resolver

    def server_resolver():
        host, port = dns_server
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(address, port) for address in _server_addresses(host)]
        resolver.lifetime = lookup_timeout
        resolver.timeout = lookup_timeout / 2
        return resolver

    return server_resolver if dns_server else system_resolver


def _server_addresses(host):
    """dnspython wants a DNS server's IP address; --dns-server may name it."""
    try:
        return [normalise_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, 53, proto=socket.IPPROTO_UDP)
    except OSError as e:
        raise LookupFailed(f"cannot resolve the DNS server {host!r}: {e}") from None
    return sorted({info[4][0] for info in infos})


def resolve_addresses(resolver, domain):
    """Blocking: the set of addresses in ``domain``'s A and AAAA records.
    Raises LookupFailed (or a dnspython error) when there is no usable answer."""
    addresses = set()
    for record_type in ("A", "AAAA"):
        try:
            # search=True: a short name ("metacenter-headless") is completed with
            # the search domains of resolv.conf, as the reference's Go resolver does.
            answer = resolver.resolve(domain, record_type, search=True)
        except dns.resolver.NoAnswer:
            continue
        addresses.update(normalise_address(record.address) for record in answer)
    if not addresses:
        raise LookupFailed("no A or AAAA records")
    return frozenset(addresses)


def describe_failure(error):
    """A lookup's exception -> a short reason for the log."""
    if isinstance(error, LookupFailed):
        return error.reason
    if isinstance(error, dns.resolver.NXDOMAIN):
        return "NXDOMAIN (the name does not exist)"
    if isinstance(error, dns.exception.Timeout):
        return "timeout (no DNS server answered in time)"
    if isinstance(error, dns.resolver.NoNameservers):
        return "no DNS server gave a usable answer"
    if isinstance(error, dns.resolver.NoResolverConfiguration):
        return "no DNS resolver configured"
    return f"{type(error).__name__}: {error}"


class DiscoveryMetrics:
    """The reference's ``dns_lookup_hosts`` and ``domain_requests`` series,
    and ``metacenter_dns_lookup_failures_total``."""

    def __init__(self, registry=REGISTRY):
        self.hosts = Gauge(
            "dns_lookup_hosts", "1 for every peer found through the DNS name.", ["domain", "host"], registry=registry
        )
        self.requests = Counter("domain_requests", "DNS lookups of the peers' name.", ["domain"], registry=registry)
        self.failures = Counter(
            "metacenter_dns_lookup_failures", "DNS lookups of the peers' name that gave no usable answer.",
            ["domain"], registry=registry,
        )


class PeerDiscovery(MultiService):
    """``peers`` is the current frozenset of (host, port); ``add_listener(fn)``
    has ``fn(joined, left)`` (frozensets) called on the reactor thread after
    every change.

    The first change happens in ``startService``: the static peers join. Then the
    DNS name, if any, is resolved at once and every ``interval`` seconds
    (a ``Periodic`` child). Lookups take at most ``lookup_timeout`` seconds;
    a failing lookup is logged at once, and while it keeps failing the same
    way at most every ``failure_log_interval`` seconds. ``logger`` defaults
    to ``logs.logger("metacenter.cluster.discovery")``, so the live log level
    (``POST /log/level``) governs it.
    """

    name = "peer-discovery"

    def __init__(
        self,
        domain="",
        *,
        peer_port=80,
        static_peers=(),
        own_addresses=(),
        interval=5.0,
        dns_server=None,
        lookup_timeout=DEFAULT_LOOKUP_TIMEOUT,
        resolver_factory=None,
        clock=None,
        run_in_thread=None,
        registry=REGISTRY,
        logger=None,
        failure_log_interval=DEFAULT_FAILURE_LOG_INTERVAL,
    ):
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock
        self.domain = domain
        self.peer_port = peer_port
        self.static_peers = frozenset((host, int(port)) for host, port in static_peers)
        self.own_addresses = frozenset(normalise_address(a) for a in own_addresses)
        self.interval = interval
        self._resolver_factory = resolver_factory or make_resolver_factory(dns_server, lookup_timeout)
        self._clock = clock
        self._run_in_thread = run_in_thread or threads.deferToThread
        self._metrics = DiscoveryMetrics(registry)
        self.log = logger if logger is not None else logs.logger("metacenter.cluster.discovery")
        self._failure_log = logs.ThrottledLog(self.log, clock, failure_log_interval,
                                              suppressed_note=" ({suppressed} similar failures not logged)")

        self._peers = frozenset()
        self._dns_hosts = frozenset()  # addresses from the last good lookup, own ones excluded
        self._listeners = []
        self._in_flight = None
        self._waiters = []
        self._failing = False  # while lookups fail
        self._failures_in_a_row = 0
        if domain:
            # Export the series at 0 before the first lookup.
            self._metrics.requests.labels(domain)
            self._metrics.failures.labels(domain)
            # Detached: a stopping node does not wait for a lookup in its
            # thread (its answer is ignored); lookup_now never fails and
            # lookups never overlap.
            Periodic(interval, self.lookup_now, what="peer lookup", clock=clock, detached=True,
                     log=self.log).setServiceParent(self)

    @classmethod
    def from_config(cls, config, **kwargs):
        """Built from a ``metacenter.config.Config``; kwargs (clock, registry, ...) pass through."""
        return cls(
            config.peers_dns,
            peer_port=config.peer_port,
            static_peers=config.peer,
            own_addresses=config.advertise,
            interval=config.dns_interval,
            dns_server=config.dns_server,
            **kwargs,
        )

    @property
    def peers(self):
        """The current peers: a frozenset of (host, port)."""
        return self._peers

    def add_listener(self, listener):
        """``listener(joined, left)`` is called after every change."""
        self._listeners.append(listener)

    def remove_listener(self, listener):
        self._listeners.remove(listener)

    # -- service ------------------------------------------------------------------

    def startService(self):
        # The static peers join before the first lookup starts.
        self._publish(self.static_peers | self._dns_peers(self._dns_hosts), source="static")
        super().startService()

    # -- lookups ------------------------------------------------------------------

    def lookup_now(self):
        """Resolve the name now (or join the lookup already running). The
        Deferred fires with the peer set once the answer is applied; it never
        fails. Answers arriving while the service is stopped are not applied."""
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        if self._in_flight is None and self.domain:
            self._metrics.requests.labels(self.domain).inc()
            self._in_flight = self._run_in_thread(self._resolve_blocking)
            self._in_flight.addCallbacks(self._lookup_succeeded, self._lookup_failed)
            self._in_flight.addErrback(lambda failure: self.log.failure("Applying a peer lookup failed", failure))
            self._in_flight.addBoth(self._lookup_done)
        elif self._in_flight is None:
            self._lookup_done(None)
        return waiter

    def _resolve_blocking(self):
        return resolve_addresses(self._resolver_factory(), self.domain)

    def _lookup_succeeded(self, addresses):
        if not self.running:
            return
        if self._failing:
            self.log.info(
                "Peer lookup of {domain} works again after {failures} failed lookups",
                domain=self.domain, failures=self._failures_in_a_row,
            )
        self._failing = False
        self._failures_in_a_row = 0
        self._failure_log.reset(self.domain)
        hosts = frozenset(addresses - self.own_addresses)
        for host in hosts - self._dns_hosts:
            self._metrics.hosts.labels(self.domain, host).set(1)
        for host in self._dns_hosts - hosts:
            self._metrics.hosts.remove(self.domain, host)
        self._dns_hosts = hosts
        self._publish(self.static_peers | self._dns_peers(hosts), source="dns")

    def _lookup_failed(self, failure):
        if not self.running:
            return
        self._metrics.failures.labels(self.domain).inc()
        self._failures_in_a_row += 1
        self._failing = True
        reason = describe_failure(failure.value)
        fields = dict(domain=self.domain, reason=reason, peers=len(self._peers))
        message = "Peer lookup of {domain} failed: {reason}; keeping the {peers} known peers"
        # A new kind of failure is logged at once, the same one again only now and then.
        if failure.check(dns.exception.DNSException, LookupFailed, OSError):
            self._failure_log.emit(self.domain, reason, "warn", message, **fields)
        else:
            self._failure_log.emit(self.domain, reason, "failure", message, failure=failure, **fields)

    def _lookup_done(self, _):
        self._in_flight = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self._peers)

    # -- changes ------------------------------------------------------------------

    def _dns_peers(self, hosts):
        return frozenset((host, self.peer_port) for host in hosts)

    def _publish(self, peers, source):
        joined, left = peers - self._peers, self._peers - peers
        self._peers = peers
        if not joined and not left:
            return
        for peer in sorted(joined):
            self.log.info("Peer {peer} joined ({source})", peer=format_peer(peer), source=source, domain=self.domain)
        for peer in sorted(left):
            self.log.info("Peer {peer} left ({source})", peer=format_peer(peer), source=source, domain=self.domain)
        for listener in list(self._listeners):
            try:
                listener(frozenset(joined), frozenset(left))
            except Exception:
                self.log.failure("Peer listener {listener!r} failed", listener=listener)
