"""Issue 10 in the console: engine reset as an action with a confirmation
(on the cluster screen), and the gateway leases of the highlighted node on
the nodes screen. Against a real node, and on fixed data for the refusals."""

import json
import urllib.request

import pytest

from console.app import ConsoleApp
from console.dialogs import ConfirmDialog
from console.discovery import FixedTargets
from console.screens import ClusterScreen, NodesScreen
from console.source import HttpSource
from fixed_data import fixed_app
from helpers import static_text, table_rows, wait_until

pytestmark = pytest.mark.asyncio
SIZE = (130, 40)


def call(node, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(node.url + path, data=data, method=method)
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def console_for(*urls):
    return ConsoleApp(HttpSource(FixedTargets(list(urls)), timeout=2.0), interval=None)


def engines(node, cluster):
    return {e["ip"]: e["queued_req_num"] for e in call(node, "GET", f"/v1/load/stats?cluster={cluster}")["data"]}


async def test_reset_engine_asks_first_and_no_cancels(node):
    for i in range(2):
        call(node, "POST", "/v1/load/stats", {"cluster": "chat", "request_id": f"r{i}", "ip": "10.8.0.1"})
    app = console_for(node.url)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.state.reachable_count() == 1, "the node answers")
        await pilot.press("enter")
        assert isinstance(app.screen, ClusterScreen)
        await pilot.press("x")
        assert isinstance(app.screen, ConfirmDialog)
        assert "Reset engine 10.8.0.1 of chat?" in static_text(app.screen, "#confirm-question")
        await pilot.press("n")
        assert isinstance(app.screen, ClusterScreen)
        assert engines(node, "chat") == {"10.8.0.1": 2}  # cancelled: nothing sent
        await pilot.press("x", "escape")
        assert engines(node, "chat") == {"10.8.0.1": 2}

        await pilot.press("x", "y")
        await wait_until(pilot, lambda: app.state.actions, "the node's answer")
        assert app.state.actions[-1][1].endswith("released 2 requests and 0 cache blocks")
        assert engines(node, "chat") == {}
        await wait_until(pilot, lambda: table_rows(app.screen) == [], "the engine leaves the view")


async def test_the_nodes_screen_shows_the_highlighted_nodes_leases(node):
    call(node, "POST", "/v1/load/lease/keepalive", {"lease": "gateway-a", "ttl_ms": 60000})
    call(node, "POST", "/v1/load/stats", {"cluster": "chat", "request_id": "l1", "ip": "10.8.0.2",
                                          "lease": "gateway-a"})
    app = console_for(node.url)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("n")
        assert isinstance(app.screen, NodesScreen)
        await wait_until(pilot, lambda: "gateway-a" in static_text(app.screen, "#leases"), "the lease")
        text = static_text(app.screen, "#leases")
        assert text.startswith("Leases on ") and ": 1" in text.splitlines()[0]
        assert "gateway-a: 1 request, ends in " in text and "(ttl 60 s)" in text


async def test_a_failed_reset_is_reported_on_fixed_data():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("enter", "x")
        assert isinstance(app.screen, ConfirmDialog)
        await pilot.press("y")
        await wait_until(pilot, lambda: app.state.actions, "the failure")
        assert "failed: fixed data: no node to talk to" in app.state.actions[-1][1]
        await pilot.press("n")
        assert "Leases on " in static_text(app.screen, "#leases")  # fixed data: not reported
