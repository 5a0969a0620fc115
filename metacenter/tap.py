"""``twistd metacenter``: options and the service tree of one node."""

import gc
import os
import sys

from twisted.application import strports
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.python import usage

from metacenter import config as config_module
from metacenter import logs
from metacenter.api import MetacenterAPI
from metacenter.metrics import Metrics
from metacenter.node import Node
from metacenter.site import MetacenterSite
from metacenter.state import LoadState
from metacenter.sweeper import Sweeper


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


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    cfg = options.resolved if hasattr(options, "resolved") else options
    logs.set_level(cfg.log_level)

    state = LoadState(reactor, request_expire=cfg.request_expire, tombstone_ttl=cfg.tombstone_ttl)
    metrics = Metrics(state)
    node = Node(state, reactor, metrics, advertise=",".join(cfg.advertise))
    api = MetacenterAPI(node, metrics)

    top = MultiService()
    site = MetacenterSite(api.resource(), max_body=cfg.max_body, access_log=cfg.access_log, reactor=reactor)
    strports.service(cfg.listen, site, reactor=reactor).setServiceParent(top)

    sweeper = Sweeper(state, metrics, reactor)
    TimerService(cfg.gc_interval, sweeper.sweep).setServiceParent(top)

    # Everything built so far lives as long as the process: move it out of the
    # cyclic collector's way, so full collections only walk what is new.
    gc.collect()
    gc.freeze()
    top.api = api
    top.node = node
    return top
