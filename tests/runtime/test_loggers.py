"""Every logger of the node honours the live level (POST /log/level)."""

import importlib
import pathlib
import pkgutil
import re

import pytest
from twisted.logger import Logger, globalLogPublisher

import metacenter
from metacenter.runtime import logs

PACKAGE = pathlib.Path(metacenter.__file__).parent
# The gateway-side client is a library: it logs through the stdlib's logging,
# under its user's configuration, not the node's.
NODE_PACKAGES = ("api", "cluster", "core", "runtime")


def node_modules():
    for package in NODE_PACKAGES:
        for info in pkgutil.iter_modules([str(PACKAGE / package)]):
            yield importlib.import_module(f"metacenter.{package}.{info.name}")


def module_loggers():
    found = [(module.__name__, name, value) for module in node_modules()
             for name, value in vars(module).items() if isinstance(value, Logger)]
    assert found, "no module-level loggers found: the scan is broken"
    return found


@pytest.mark.parametrize("module, name, log", module_loggers(), ids=lambda v: v if isinstance(v, str) else "")
def test_each_module_logger_follows_the_live_level(module, name, log):
    seen = []

    def observer(event):
        if event.get("probe") == module:
            seen.append(event["log_level"].name)

    globalLogPublisher.addObserver(observer)
    try:
        logs.set_level("WARN")
        log.info("probe", probe=module)
        log.warn("probe", probe=module)
        logs.set_level("DEBUG")
        log.debug("probe", probe=module)
    finally:
        globalLogPublisher.removeObserver(observer)
        logs.set_level("INFO")
    assert seen == ["warn", "debug"], f"{module}.{name}"


def test_no_module_builds_a_logger_around_the_level_filter():
    """Loggers kept on instances (discovery's, the sweeper's Periodic) are
    not module attributes: the source must build every one through
    ``logs.logger``, and nothing may use the legacy ``twisted.python.log``."""
    offenders = []
    for package in NODE_PACKAGES:
        for path in (PACKAGE / package).glob("*.py"):
            if path.name == "logs.py" and package == "runtime":
                continue
            text = path.read_text(encoding="utf-8")
            if re.search(r"\bLogger\(|twisted\.python import log\b|twisted\.python\.log\b", text):
                offenders.append(str(path.relative_to(PACKAGE)))
    assert offenders == []
