"""PeerDiscovery against a real DNS server on loopback (tests/dns_server.py).

The lookup loop is driven by a task.Clock, so every lookup happens when a test
asks for it; the lookups themselves go through the real thread pool and real
UDP to the server running in this reactor.
"""

import os
import sys
import threading

import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import task, utils
from twisted.logger import LogLevel, Logger, formatEvent

from dns_server import dns_server  # noqa: F401  (pytest fixture)
from metacenter.runtime import config
from metacenter.cluster.discovery import PeerDiscovery, format_peer, make_resolver_factory

NAME = "peers.metacenter.test"
PEER_PORT = 8080
INTERVAL = 5.0
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Harness:
    """A started PeerDiscovery with a fresh registry, a manual clock and a log
    and listener recorder."""

    def __init__(self, server, **kwargs):
        self.clock = task.Clock()
        self.registry = CollectorRegistry()
        self.log_events = []
        self.changes = []
        kwargs.setdefault("peer_port", PEER_PORT)
        kwargs.setdefault("lookup_timeout", 0.5)
        self.discovery = PeerDiscovery(
            kwargs.pop("domain", NAME),
            interval=INTERVAL,
            dns_server=(server.host, server.port) if server else None,
            clock=self.clock,
            registry=self.registry,
            logger=Logger(namespace="test.discovery", observer=self.log_events.append),
            **kwargs,
        )
        self.discovery.add_listener(self.record)

    def record(self, joined, left):
        self.changes.append((joined, left))

    def start(self):
        """Starts the service; the first lookup is then running."""
        self.discovery.startService()
        return self.discovery.lookup_now()

    def next_interval(self):
        """Lets the loop's next lookup run and waits for its answer."""
        self.clock.advance(INTERVAL)
        return self.discovery.lookup_now()

    def stop(self):
        if self.discovery.running:
            self.discovery.stopService()

    def sample(self, name, **labels):
        return self.registry.get_sample_value(name, labels)

    def messages(self, level=None):
        return [formatEvent(e) for e in self.log_events if level is None or e["log_level"] == level]


def peers(*hosts, port=PEER_PORT):
    return frozenset((h, port) for h in hosts)


@pytest_twisted.inlineCallbacks
def test_peers_join_and_leave_as_records_change(dns_server):
    dns_server.set_records(NAME, ["127.0.0.2", "127.0.0.3"])
    h = Harness(dns_server)
    try:
        found = yield h.start()
        assert found == peers("127.0.0.2", "127.0.0.3")
        assert h.discovery.peers == found
        assert h.changes == [(peers("127.0.0.2", "127.0.0.3"), frozenset())]

        dns_server.set_records(NAME, ["127.0.0.3", "127.0.0.4"])
        yield h.next_interval()
        assert h.discovery.peers == peers("127.0.0.3", "127.0.0.4")
        assert h.changes[-1] == (peers("127.0.0.4"), peers("127.0.0.2"))

        # An unchanged answer is not a change.
        yield h.next_interval()
        assert len(h.changes) == 2
        assert any("127.0.0.4:8080 joined" in m for m in h.messages(LogLevel.info))
        assert any("127.0.0.2:8080 left" in m for m in h.messages(LogLevel.info))
    finally:
        h.stop()


@pytest_twisted.inlineCallbacks
def test_own_addresses_are_excluded_and_static_peers_included(dns_server):
    dns_server.set_records(NAME, ["127.0.0.2", "127.0.0.3", "::1"])
    static = [("127.0.0.9", 9000), ("node-x.example", 8081)]
    h = Harness(dns_server, static_peers=static, own_addresses=["127.0.0.2", "0:0:0:0:0:0:0:1"])
    try:
        h.discovery.startService()
        # The static peers are there before any lookup answered.
        assert h.changes == [(frozenset(static), frozenset())]
        yield h.discovery.lookup_now()
        assert h.discovery.peers == frozenset(static) | peers("127.0.0.3")
        assert h.changes[-1] == (peers("127.0.0.3"), frozenset())
        assert h.sample("dns_lookup_hosts", domain=NAME, host="127.0.0.2") is None

        # Static peers stay whatever DNS says.
        dns_server.set_records(NAME, ["127.0.0.2"])
        yield h.next_interval()
        assert h.discovery.peers == frozenset(static)
    finally:
        h.stop()


@pytest_twisted.inlineCallbacks
def test_aaaa_records_are_peers_too(dns_server):
    dns_server.set_records(NAME, ["fd00:0:0::2", "127.0.0.2", "::1"])
    h = Harness(dns_server, own_addresses=["::1"])
    try:
        found = yield h.start()
        assert found == peers("fd00::2", "127.0.0.2")
        assert format_peer(("fd00::2", PEER_PORT)) == "[fd00::2]:8080"
        # A name with only AAAA records is an answer, not a failure.
        dns_server.set_records(NAME, ["fd00::3"])
        yield h.next_interval()
        assert h.discovery.peers == peers("fd00::3")
        assert h.sample("metacenter_dns_lookup_failures_total", domain=NAME) == 0
    finally:
        h.stop()


@pytest_twisted.inlineCallbacks
def test_a_stopped_dns_server_keeps_the_last_set(dns_server):
    dns_server.set_records(NAME, ["127.0.0.2", "127.0.0.3"])
    h = Harness(dns_server)
    try:
        yield h.start()
        yield dns_server.stop()

        yield h.next_interval()
        assert h.discovery.peers == peers("127.0.0.2", "127.0.0.3")
        assert len(h.changes) == 1
        assert h.sample("metacenter_dns_lookup_failures_total", domain=NAME) == 1
        assert h.sample("dns_lookup_hosts", domain=NAME, host="127.0.0.2") == 1
        warnings = h.messages(LogLevel.warn)
        assert len(warnings) == 1 and "keeping the 2 known peers" in warnings[0]

        # The loop is still alive after a failure.
        yield h.next_interval()
        assert h.sample("domain_requests_total", domain=NAME) == 3
        assert h.sample("metacenter_dns_lookup_failures_total", domain=NAME) == 2
    finally:
        h.stop()


@pytest_twisted.inlineCallbacks
def test_nxdomain_and_empty_answers_keep_the_last_set_and_lookups_recover(dns_server):
    dns_server.set_records(NAME, ["127.0.0.2"])
    h = Harness(dns_server)
    try:
        yield h.start()

        dns_server.remove(NAME)
        yield h.next_interval()
        assert h.discovery.peers == peers("127.0.0.2")
        assert "NXDOMAIN" in h.messages(LogLevel.warn)[-1]

        dns_server.set_records(NAME, [])
        yield h.next_interval()
        assert h.discovery.peers == peers("127.0.0.2")
        assert "no A or AAAA records" in h.messages(LogLevel.warn)[-1]
        assert len(h.changes) == 1

        dns_server.set_records(NAME, ["127.0.0.5"])
        yield h.next_interval()
        assert h.discovery.peers == peers("127.0.0.5")
        assert any("works again after 2 failed lookups" in m for m in h.messages(LogLevel.info))
    finally:
        h.stop()


@pytest_twisted.inlineCallbacks
def test_a_lasting_failure_is_logged_now_and_then_not_at_every_lookup(dns_server):
    h = Harness(dns_server, failure_log_interval=60.0)  # the name never exists
    try:
        yield h.start()
        for _ in range(3):
            yield h.next_interval()  # 5 s apart
        assert len(h.messages(LogLevel.warn)) == 1
        assert h.sample("metacenter_dns_lookup_failures_total", domain=NAME) == 4

        h.clock.advance(60.0)
        yield h.discovery.lookup_now()
        warnings = h.messages(LogLevel.warn)
        assert len(warnings) == 2
        assert "(3 similar failures not logged)" in warnings[1]
    finally:
        h.stop()


@pytest_twisted.inlineCallbacks
def test_metric_series_follow_the_peers(dns_server):
    dns_server.set_records(NAME, ["127.0.0.2", "127.0.0.3"])
    h = Harness(dns_server)
    try:
        assert h.sample("domain_requests_total", domain=NAME) == 0
        yield h.start()
        assert h.sample("dns_lookup_hosts", domain=NAME, host="127.0.0.2") == 1
        assert h.sample("dns_lookup_hosts", domain=NAME, host="127.0.0.3") == 1
        assert h.sample("domain_requests_total", domain=NAME) == 1

        dns_server.set_records(NAME, ["127.0.0.3"])
        yield h.next_interval()
        assert h.sample("dns_lookup_hosts", domain=NAME, host="127.0.0.2") is None
        assert h.sample("dns_lookup_hosts", domain=NAME, host="127.0.0.3") == 1
        assert h.sample("domain_requests_total", domain=NAME) == 2
        assert h.sample("metacenter_dns_lookup_failures_total", domain=NAME) == 0
    finally:
        h.stop()


@pytest_twisted.inlineCallbacks
def test_lookups_run_off_the_reactor_thread(dns_server):
    dns_server.set_records(NAME, ["127.0.0.2"])
    threads_used = []
    build = make_resolver_factory((dns_server.host, dns_server.port), 0.5)

    def recording_factory():
        threads_used.append(threading.current_thread())
        return build()

    h = Harness(dns_server, resolver_factory=recording_factory)
    try:
        yield h.start()
        assert h.discovery.peers == peers("127.0.0.2")
        assert threads_used and threading.main_thread() not in threads_used
    finally:
        h.stop()


@pytest_twisted.inlineCallbacks
def test_a_failing_listener_does_not_stop_the_others_or_the_loop(dns_server):
    dns_server.set_records(NAME, ["127.0.0.2"])
    h = Harness(dns_server)

    def broken(joined, left):
        raise RuntimeError("listener bug")

    h.discovery.remove_listener(h.record)
    h.discovery.add_listener(broken)
    h.discovery.add_listener(h.record)
    try:
        yield h.start()
        dns_server.set_records(NAME, ["127.0.0.3"])
        yield h.next_interval()
        assert [joined for joined, _ in h.changes] == [peers("127.0.0.2"), peers("127.0.0.3")]
        assert sum(1 for e in h.log_events if e.get("log_failure") is not None) == 2
    finally:
        h.stop()


@pytest_twisted.inlineCallbacks
def test_an_answer_arriving_after_stop_is_not_applied(dns_server):
    dns_server.set_records(NAME, ["127.0.0.2"])
    h = Harness(dns_server)
    h.discovery.startService()  # the first lookup is now running in a thread
    pending = h.discovery.lookup_now()
    h.discovery.stopService()
    yield pending
    assert h.discovery.peers == frozenset()
    assert h.changes == []


@pytest_twisted.inlineCallbacks
def test_without_a_name_only_static_peers_and_no_lookups(dns_server):
    h = Harness(dns_server, domain="", static_peers=[("127.0.0.7", 7000)])
    try:
        found = yield h.start()
        assert found == frozenset({("127.0.0.7", 7000)})
        h.clock.advance(INTERVAL * 3)
        assert dns_server.queries == []
    finally:
        h.stop()


def test_built_from_the_configuration():
    cfg = config.resolve(
        {"peers-dns": "peers.example", "peer": ["10.0.0.9:9000"], "advertise": "10.0.0.1", "dns-server": "127.0.0.1:5353"},
        {"REPLICA_CLIENT_TARGET_PORT": "8080", "REPLICA_DNS_LOOKUP_INTERVAL": "2s"},
    )
    discovery = PeerDiscovery.from_config(cfg, registry=CollectorRegistry(), clock=task.Clock())
    assert discovery.domain == "peers.example"
    assert discovery.peer_port == 8080
    assert discovery.interval == 2.0
    assert discovery.static_peers == frozenset({("10.0.0.9", 9000)})
    assert discovery.own_addresses == frozenset({"10.0.0.1"})
    resolver = discovery._resolver_factory()
    assert [(ns.address, ns.port) for ns in resolver.nameservers] == [("127.0.0.1", 5353)]


@pytest_twisted.inlineCallbacks
def test_a_separate_process_resolves_against_the_test_server(dns_server):
    # What a node started with --dns-server HOST:PORT does, in another process,
    # while this reactor keeps serving (the wait below does not block it).
    dns_server.set_records(NAME, ["127.0.0.2", "fd00::2"])
    script = (
        "import sys\n"
        "from metacenter.cluster.discovery import make_resolver_factory, resolve_addresses\n"
        "resolver = make_resolver_factory((sys.argv[1], int(sys.argv[2])), 2.0)()\n"
        "print(' '.join(sorted(resolve_addresses(resolver, sys.argv[3]))))\n"
    )
    out, err, code = yield utils.getProcessOutputAndValue(
        sys.executable, ["-c", script, dns_server.host, str(dns_server.port), NAME],
        env={"PYTHONPATH": REPO}, path=REPO,
    )
    assert code == 0, err.decode()
    assert out.split() == [b"127.0.0.2", b"fd00::2"]


@pytest_twisted.inlineCallbacks
def test_the_live_log_level_governs_discovery(dns_server):
    """Discovery logs through metacenter's level filter: after POST
    /log/level ERROR its warnings are dropped, after INFO they are back."""
    from twisted.logger import globalLogPublisher

    from harness import Harness as NodeHarness
    from metacenter.runtime import logs

    api = NodeHarness()
    discovery = PeerDiscovery(NAME, dns_server=(dns_server.host, dns_server.port), lookup_timeout=0.5,
                              clock=task.Clock(), registry=CollectorRegistry(), failure_log_interval=0.0)
    seen = []

    def observer(event):
        if event.get("log_namespace") == "metacenter.cluster.discovery" and event["log_level"] == LogLevel.warn:
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    try:
        response, _ = yield api.call("POST", "/log/level", {"LevelParam": "ERROR"})
        assert response.code == 200
        discovery.startService()  # the name does not exist: every lookup fails
        yield discovery.lookup_now()
        assert seen == []
        response, _ = yield api.call("POST", "/log/level", {"LevelParam": "INFO"})
        assert response.code == 200
        discovery._clock.advance(INTERVAL)
        yield discovery.lookup_now()
        assert len(seen) == 1 and "Peer lookup of peers.metacenter.test failed: NXDOMAIN" in seen[0]
    finally:
        globalLogPublisher.removeObserver(observer)
        discovery.stopService()
        logs.set_level("INFO")
