"""``twistd metacenter``: options and the service tree of one node.

The tree (a ``MultiService``): the HTTP listener; the expiry sweep
(``Periodic``); peer discovery (with its lookup timer); replication; warm
start; anti-entropy (its rounds timer starts after the warm start); the
stall watch. The node and its collaborators are built first, in one call
(``build_node``).
"""

import gc
import os
import re
import socket
import sys

from prometheus_client import CollectorRegistry
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.python import usage

from metacenter.api.server import MetacenterAPI
from metacenter.api.site import MetacenterSite, url_limit
from metacenter.cluster.antientropy import AntiEntropy
from metacenter.cluster.auth import PeerAuthenticator, PeerVerdicts
from metacenter.cluster.discovery import PeerDiscovery
from metacenter.cluster.replication import PeerClient, Replicator, StreamOrHttp, make_http_client
from metacenter.cluster.warmstart import StallWatch, WarmStart
from metacenter.core import fields
from metacenter.core.limits import CountLimits
from metacenter.cluster.stream import ReceiverFactory, StreamListener, StreamReplicator
from metacenter.core.replog import ReplicationLog
from metacenter.runtime import config as config_module
from metacenter.runtime import logs
from metacenter.runtime.gcpolicy import GROWTH_CHECK_INTERVAL, GcPolicy
from metacenter.runtime.node import Readiness, build_node
from metacenter.runtime.periodic import Periodic
from metacenter.runtime.reactorlag import LagProbe
from metacenter.runtime.sweeper import LEASE_INTERVAL, Sweeper
from metacenter.runtime.turns import chunk_per_turn


class Options(usage.Options):
    """Generated from ``config.SETTINGS``: each setting is an option; values
    given here win over the environment and the config file."""

    synopsis = "[options]"
    longdesc = ("Runs one metacenter node. Every option can also be set in the environment "
                "(see docs/configuration.md) or in a TOML file given with --config.")
    optParameters = [["config", "c", None, "TOML config file."]] + [
        [s.name, None, None, s.help + (f" [default: {s.default}]" if s.default not in (None, "", ()) else "")]
        for s in config_module.SETTINGS if not s.flag and not s.repeatable
    ]
    optFlags = [[s.name, None, s.help] for s in config_module.SETTINGS if s.flag]

    def __init__(self):
        super().__init__()
        for s in config_module.SETTINGS:
            if s.repeatable:
                self[s.name] = []

    def parseOptions(self, options=None):
        """Parses, resolves and checks every setting. Under twistd a bad one
        ends the process with one line on stderr and exit status 2; used on
        its own (self.parent is None) it raises ``usage.UsageError``."""
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            # twistd prints its whole usage (~60 lines) before a UsageError's
            # message; the one line naming the option is what an operator needs.
            sys.stderr.write(f"twistd metacenter: {e} (see: twistd metacenter --help)\n")
            sys.stderr.flush()
            raise SystemExit(2) from None

    def parseArgs(self, *args):
        if args:
            raise usage.UsageError(f"unexpected argument {args[0]!r}: every setting is an option (--name value)")

    def postOptions(self):
        given = {s.name: self.get(s.name) for s in config_module.SETTINGS}
        try:
            self.resolved = config_module.resolve(given, os.environ, self.get("config"))
        except config_module.ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self.resolved.log_format == "json" and self.parent is not None:
            self._log_as_json(self.parent)

    def _log_as_json(self, twistd_options):
        # twistd builds its log observer after parsing the options, from its
        # --logger factory: ours, unless the operator chose one there.
        taken = [f"--{name}" for name in ("logger", "syslog") if twistd_options.get(name)]
        if taken:
            raise usage.UsageError(f"--log-format json: twistd's {' and '.join(taken)} also chooses the log "
                                   "format; give one or the other")
        logs.log_as_json(twistd_options)


def _add_repeatable(setting):
    def opt(self, value):
        self[setting.name].append(value)

    opt.__doc__ = setting.help
    return opt


for _setting in config_module.SETTINGS:
    if _setting.repeatable:
        setattr(Options, "opt_" + _setting.name.replace("-", "_"), _add_repeatable(_setting))


def _peer_client(cfg, reactor, verdicts):
    """The transport to peers, signing requests when a cluster secret is set
    and telling ``verdicts`` whether each peer accepts the signature."""
    authenticator = PeerAuthenticator(cfg.cluster_secret, verdicts=verdicts)
    if not authenticator.enabled:
        logs.logger("metacenter.runtime.tap").warn(
            "no cluster secret (--cluster-secret or METACENTER_CLUSTER_SECRET): replication and snapshot "
            "requests between nodes are not authenticated")
    http_client, pool = make_http_client(reactor, cfg.replica_dial_timeout, cfg.replica_max_idle_conns,
                                         cfg.replica_idle_conn_timeout, cfg.replica_keepalive_period)
    client = PeerClient(http_client, reactor, authenticator, cfg.replica_request_timeout, pool)
    return client, authenticator


def _replication_listen(cfg):
    """``--replication-listen`` as a server endpoint string; ``auto``: TCP on
    the interface of ``--listen``, on a port the system picks."""
    if cfg.replication_listen != "auto":
        return cfg.replication_listen
    interface = re.search(r"(?:^|:)interface=((?:\\:|[^:])+)", cfg.listen)
    return "tcp:0" + (f":interface={interface.group(1)}" if interface else "")


class _Streams:
    """The stream side of a node: its log, the sender and the receiver."""

    def __init__(self, cfg, reactor, node_id, secrets, registry):
        self.log = ReplicationLog(reactor, capacity=cfg.replication_log_capacity)
        self.anti_entropy = None  # set once built: repairs go through it
        self.lag = None  # the sender's ack-lag histogram, set with the metrics
        self.replicator = None  # the StreamOrHttp, which also feeds the HTTP replication series
        self.sender = StreamReplicator(self.log, node_id, secrets, reactor, None, window=cfg.replication_window,
                                       on_repair=self._repair, on_ack=self._acked)
        self.receiver = None
        self.listener = None

    def listen(self, cfg, reactor, node_id, secrets, apply_frame, apply_lag=None):
        observe = (lambda seconds: apply_lag.observe((), seconds)) if apply_lag is not None else None
        self.receiver = ReceiverFactory(node_id, secrets, apply_frame, reactor, own_log_id=self.log.log_id,
                                        on_gap=self._gap, ack_delay=cfg.replication_ack_delay, observe_lag=observe)
        self.listener = StreamListener(serverFromString(reactor, _replication_listen(cfg)), self.receiver)

    def _repair(self, link, skipped):
        if self.anti_entropy is not None and self.anti_entropy.running:
            self.anti_entropy.exchange(link.peer)

    def _gap(self, peer_node, log_id, skipped):
        if self.anti_entropy is not None and self.anti_entropy.running:
            self.anti_entropy.round()

    def _acked(self, link, events, lag_seconds):
        if self.lag is not None:
            self.lag.observe((link.name,), lag_seconds)
        if self.replicator is not None:
            self.replicator.stream_acked(link, events, lag_seconds)

    def status(self):
        """``/v1/node/status``'s ``stream``: where peers connect, this node's
        log, and the streams it receives; None while not listening."""
        if self.listener is None or self.listener.port is None:
            return None
        return {"port": self.listener.port, "log": self.log.log_id, "open": self.listener.opened,
                "receiving": self.receiver.status()}


def _add_cluster_services(top, cfg, node, replicator, client, reactor, verdicts, streams=None):
    """Peers (discovery), replication to them, the warm start from them,
    anti-entropy with them and the stall watch, as children of ``top``."""
    discovery = PeerDiscovery.from_config(cfg, clock=reactor, registry=node.metrics.registry)
    discovery.add_listener(replicator.peers_changed)
    discovery.add_listener(verdicts.peers_changed)
    replicator.setServiceParent(top)
    discovery.setServiceParent(top)
    warm_start = WarmStart(node, client, discovery, reactor, timeout=cfg.warm_start_timeout,
                           before_resync=replicator.drain,
                           on_position=streams.receiver.set_applied if streams is not None else None)
    warm_start.setServiceParent(top)
    if streams is not None:
        # Streams start only once the snapshot's log position is recorded.
        streams.listener.setServiceParent(top)
        warm_start.when_done().addBoth(streams.listener.open)
    anti_entropy = AntiEntropy(
        node, client, lambda: discovery.peers, reactor, interval=cfg.anti_entropy_interval, max_body=cfg.max_body,
        start_after=warm_start.when_done(),
        on_isolation=lambda since, seconds: warm_start.resync(since, f"no peer answered for {seconds:.0f} s"))
    anti_entropy.setServiceParent(top)
    if streams is not None:
        streams.anti_entropy = anti_entropy
    StallWatch(reactor, anti_entropy.isolation_threshold,
               lambda since, seconds: warm_start.resync(since, f"this process did not run for {seconds:.0f} s")
               ).setServiceParent(top)
    return warm_start


class ListenFailed(Exception):
    """The API's endpoint cannot listen; the message is the one line to print."""


def _print_listen_failure(previous_hook):
    def hook(kind, value, traceback):
        if isinstance(value, ListenFailed):
            sys.__stderr__.write(f"{value}\n")
            sys.__stderr__.flush()
        else:
            previous_hook(kind, value, traceback)

    return hook


class APIListener(StreamServerEndpointService):
    """The API's listening port (``--listen``). A port that cannot be opened
    (in use, not permitted) stops twistd with one line such as ``cannot
    listen on 127.0.0.1:8080: address already in use (set --listen)``
    instead of a traceback."""

    _raiseSynchronously = True  # as strports.service: fail at start, not later in the log

    def __init__(self, description, factory, reactor):
        super().__init__(serverFromString(reactor, description), factory)

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            if isinstance(e.port, str):  # a UNIX socket's path
                address = e.port
            else:
                address = f"{e.interface or '0.0.0.0'}:{e.port}"
            # twistd reports an error at start (the daemon's status pipe, the
            # pid file) and re-raises it; the hook prints this one instead of
            # the traceback the interpreter would print on the way out.
            sys.excepthook = _print_listen_failure(sys.excepthook)
            raise ListenFailed(f"cannot listen on {address}: {reason.lower()} (set --listen)") from None


def makeService(options, reactor=None):
    """The service tree of one node from parsed ``Options`` (or a resolved
    ``config.Config``)."""
    if reactor is None:
        from twisted.internet import reactor
    cfg = options.resolved if hasattr(options, "resolved") else options
    logs.set_level(cfg.log_level)

    # The replicator is the node's peer-status source and event listener,
    # so it is built first, on the registry the node's metrics will use.
    registry = CollectorRegistry(auto_describe=True)
    readiness = Readiness()
    verdicts = PeerVerdicts(readiness, reactor, registry=registry)
    client, authenticator = _peer_client(cfg, reactor, verdicts)
    replicator = Replicator(client, reactor, registry=registry, batch_size=cfg.replica_batch_size,
                            batch_interval=cfg.replica_batch_interval, queue_size=cfg.replica_queue_size,
                            max_batch_bytes=cfg.max_body, probe_interval=cfg.replica_probe_interval)
    streams = None
    advertise = ",".join(cfg.advertise)
    if cfg.replication_listen != "none":
        # How this node names itself in stream handshakes (logs, status).
        node_id = advertise or f"{socket.gethostname()}:{os.getpid()}"
        secrets = cfg.cluster_secret  # every secret: the first signs, any verifies (rotation)
        streams = _Streams(cfg, reactor, node_id, secrets, registry)
        replicator = StreamOrHttp(streams.sender, replicator, client, reactor, port=cfg.replication_port,
                                  probe_interval=cfg.replica_probe_interval)
        streams.sender.connect = replicator.endpoint(reactor, cfg.replica_dial_timeout)
        streams.sender.on_failure = replicator.on_stream_failure
        streams.replicator = replicator
    node = build_node(reactor, request_expire=cfg.request_expire, tombstone_ttl=cfg.tombstone_ttl,
                      cache_engine_blocks=cfg.cache_engine_blocks, cache_ttl=cfg.cache_ttl,
                      cache_max_blocks=cfg.cache_max_blocks, advertise=advertise,
                      registry=registry, readiness=readiness, cooperate=chunk_per_turn(reactor).cooperate,
                      peer_status=replicator.peer_status, listeners=[replicator.event_accepted],
                      lease_ttl=cfg.lease_ttl,
                      count_limits=CountLimits(max_clusters=cfg.max_clusters,
                                               max_engines_per_cluster=cfg.max_engines_per_cluster,
                                               max_engines=cfg.max_engines, max_requests=cfg.max_requests,
                                               max_leases=cfg.max_leases),
                      replication=streams.status if streams is not None else None,
                      log_position=streams.log.position if streams is not None else None)
    fields.set_max_lengths({"request_id": cfg.max_request_id_length, "cluster": cfg.max_cluster_length,
                            "ip": cfg.max_ip_length, "lease": cfg.max_lease_length},
                           on_too_long=node.field_too_long)
    if streams is not None:
        streams.lag, apply_lag = node.metrics.stream_metrics(streams, replicator)
        streams.listen(cfg, reactor, node_id, secrets, node.apply_frame, apply_lag)
    api = MetacenterAPI(node, node.metrics, peer_auth=authenticator if authenticator.enabled else None)

    top = MultiService()
    site = MetacenterSite(api.resource(), max_body=cfg.max_body, access_log=cfg.access_log, reactor=reactor,
                          metrics=node.metrics, request_deadline=cfg.request_deadline, idle_timeout=cfg.idle_timeout,
                          max_connections=cfg.max_connections, max_url=url_limit(cfg.max_cluster_length))
    APIListener(cfg.listen, site, reactor).setServiceParent(top)
    LagProbe(reactor, lambda lag: node.metrics.reactor_lag.observe((), lag),
             interval=cfg.reactor_lag_interval).setServiceParent(top)

    sweeper = Sweeper(node.state, node.metrics, node.cooperate, cache=node.cache)
    Periodic(cfg.gc_interval, sweeper.sweep, what="expiry sweep", clock=reactor,
             log=logs.logger("metacenter.runtime.sweeper")).setServiceParent(top)

    # Gateway leases end on each node from the replicated keepalives.
    Periodic(LEASE_INTERVAL, node.lease_timer.run, what="lease expiry", clock=reactor,
             log=logs.logger("metacenter.runtime.sweeper")).setServiceParent(top)

    warm_start = _add_cluster_services(top, cfg, node, replicator, client, reactor, verdicts, streams)

    # Long-lived objects out of the cyclic collector's full walks
    # (runtime/gcpolicy.py): what is built so far, the state a warm start
    # imports, then every --gc-freeze-interval what survived since.
    state = node.state
    gc_policy = GcPolicy(size=lambda: len(state.clusters) + state.engine_count + state.lease_count)
    gc_policy.observe_to(node.metrics).install()
    warm_start.when_done().addBoth(lambda result: gc_policy.freeze("warm start") or result)
    if cfg.gc_freeze_interval > 0:
        Periodic(cfg.gc_freeze_interval, gc_policy.freeze, what="gc freeze", clock=reactor, now=False,
                 log=logs.logger("metacenter.runtime.gcpolicy")).setServiceParent(top)
        Periodic(GROWTH_CHECK_INTERVAL, gc_policy.freeze_if_grown, what="gc growth check", clock=reactor,
                 now=False, log=logs.logger("metacenter.runtime.gcpolicy")).setServiceParent(top)
    gc.collect()  # a small process yet: the one full collection it needs
    gc_policy.freeze("start")
    return top
