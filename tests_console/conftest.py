"""Console tests run in their own pytest process (asyncio and Textual, no
Twisted reactor). Real nodes come from the node tests' ``tests/nodeproc.py``."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for path in (REPO, os.path.join(REPO, "tests"), HERE):
    if path not in sys.path:
        sys.path.insert(0, path)


import tempfile  # noqa: E402  (after the sys.path set-up above)

import pytest  # noqa: E402

from nodeproc import NodeProcess  # noqa: E402


def pytest_configure(config):
    # pytest-textual-snapshot writes its diff report into the working
    # directory by default; keep the tree clean (the path is printed on failure).
    if config.getoption("--snapshot-report", None) == "snapshot_report.html":
        config.option.snapshot_report = os.path.join(tempfile.gettempdir(), "metacenter-console-snapshot-report.html")


@pytest.fixture
def start_node():
    """``start_node(port=None, *args)`` starts a real node; every node started
    is stopped (or killed) at the end of the test."""
    started = []

    def start(port=None, *args):
        node = NodeProcess("127.0.0.1", port, *args).start()
        started.append(node)
        return node

    yield start
    for node in started:
        try:
            node.stop()
        except Exception:
            node.kill()


@pytest.fixture
def node(start_node):
    return start_node()
