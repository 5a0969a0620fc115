"""``twistd metacenter``: options and the service tree of one node."""

import gc
import os

from twisted.application import strports
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.python import usage

from metacenter.runtime import config as config_module
from metacenter.runtime import logs
from metacenter.cluster.antientropy import AntiEntropy
from metacenter.api.server import MetacenterAPI
from metacenter.cluster.auth import PeerAuthenticator
from metacenter.cluster.discovery import PeerDiscovery
from metacenter.runtime.node import build_node
from metacenter.runtime.reactorlag import LagProbe
from metacenter.cluster.replication import PeerClient, Replicator, make_http_client
from metacenter.api.site import MetacenterSite
from metacenter.runtime.sweeper import Sweeper
from metacenter.runtime.turns import chunk_per_turn
from metacenter.cluster.warmstart import StallWatch, WarmStart


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

    def postOptions(self):
        given = {s.name: self.get(s.name) for s in config_module.SETTINGS}
        try:
            self.resolved = config_module.resolve(given, os.environ, self.get("config"))
        except config_module.ConfigError as e:
            raise usage.UsageError(str(e)) from None


def _add_repeatable(setting):
    def opt(self, value):
        self[setting.name].append(value)

    opt.__doc__ = setting.help
    return opt


for _setting in config_module.SETTINGS:
    if _setting.repeatable:
        setattr(Options, "opt_" + _setting.name.replace("-", "_"), _add_repeatable(_setting))


def _add_cluster_services(top, cfg, node, api, metrics, reactor):
    """Peers (discovery), their authentication, replication to them, the warm
    start from them and anti-entropy with them."""
    authenticator = PeerAuthenticator(cfg.cluster_secret)
    if authenticator.enabled:
        api.peer_auth = authenticator
    else:
        logs.logger("metacenter.runtime.tap").warn(
            "no cluster secret (--cluster-secret or METACENTER_CLUSTER_SECRET): replication and snapshot "
            "requests between nodes are not authenticated")
    discovery = PeerDiscovery.from_config(cfg, clock=reactor, registry=metrics.registry)
    http_client, pool = make_http_client(reactor, cfg.replica_dial_timeout, cfg.replica_max_idle_conns,
                                         cfg.replica_idle_conn_timeout, cfg.replica_keepalive_period)
    client = PeerClient(http_client, reactor, authenticator, cfg.replica_request_timeout, pool)
    replicator = Replicator(node, client, reactor, batch_size=cfg.replica_batch_size,
                            batch_interval=cfg.replica_batch_interval, queue_size=cfg.replica_queue_size,
                            max_batch_bytes=cfg.max_body, probe_interval=cfg.replica_probe_interval)
    discovery.add_listener(replicator.peers_changed)
    replicator.setServiceParent(top)
    discovery.setServiceParent(top)
    warm_start = WarmStart(node, client, discovery, reactor, timeout=cfg.warm_start_timeout,
                           before_resync=replicator.drain)
    warm_start.setServiceParent(top)
    anti_entropy = AntiEntropy(
        node, client, lambda: discovery.peers, reactor, interval=cfg.anti_entropy_interval, max_body=cfg.max_body,
        start_after=warm_start.when_done(),
        on_isolation=lambda since, seconds: warm_start.resync(since, f"no peer answered for {seconds:.0f} s"))
    anti_entropy.setServiceParent(top)
    StallWatch(reactor, anti_entropy.isolation_threshold,
               lambda since, seconds: warm_start.resync(since, f"this process did not run for {seconds:.0f} s")
               ).setServiceParent(top)


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    cfg = options.resolved if hasattr(options, "resolved") else options
    logs.set_level(cfg.log_level)

    node = build_node(reactor, request_expire=cfg.request_expire, tombstone_ttl=cfg.tombstone_ttl,
                      cache_engine_blocks=cfg.cache_engine_blocks, cache_ttl=cfg.cache_ttl,
                      cache_max_blocks=cfg.cache_max_blocks, advertise=",".join(cfg.advertise))
    node.cooperate = chunk_per_turn(reactor).cooperate
    state, metrics = node.state, node.metrics
    api = MetacenterAPI(node, metrics)

    top = MultiService()
    site = MetacenterSite(api.resource(), max_body=cfg.max_body, access_log=cfg.access_log, reactor=reactor,
                          metrics=metrics, request_deadline=cfg.request_deadline, idle_timeout=cfg.idle_timeout,
                          max_connections=cfg.max_connections)
    strports.service(cfg.listen, site, reactor=reactor).setServiceParent(top)
    LagProbe(reactor, lambda lag: metrics.reactor_lag.observe((), lag),
             interval=cfg.reactor_lag_interval).setServiceParent(top)

    sweeper = Sweeper(state, metrics, reactor, cache=node.cache)
    TimerService(cfg.gc_interval, sweeper.sweep).setServiceParent(top)

    _add_cluster_services(top, cfg, node, api, metrics, reactor)

    # Everything built so far lives as long as the process: move it out of the
    # cyclic collector's way, so full collections only walk what is new.
    gc.collect()
    gc.freeze()
    return top
