"""The interactive console against real nodes (``twistd metacenter``
processes started by the tests), driven with Textual's Pilot."""

import asyncio
import socket

import pytest

from console.app import ConsoleApp
from console.discovery import DnsTargets, FixedTargets
from console.format import human_bytes
from console.model import LOG_LEVELS
from console.nodeclient import target_label
from console.screens import ClusterScreen, OverviewScreen
from console.source import HttpSource
from console.state import DOWN, NOT_READY, SLOW, UP
from helpers import call, static_text, table_row, table_rows, wait_until
from udp_dns import UdpDns

pytestmark = pytest.mark.asyncio

SIZE = (150, 40)


def console_for(*urls, timeout=2.0, interval=0.2):
    return ConsoleApp(HttpSource(FixedTargets(urls), timeout=timeout), interval=interval)


def keys(rows):
    return [key for key, _ in rows]


# (cluster, engine, request id, prompt bytes)
LOAD = [
    ("chat", "10.1.0.1", "c1", 1000), ("chat", "10.1.0.1", "c2", 2000), ("chat", "10.1.0.1", "c3", 3000),
    ("chat", "10.1.0.1", "c4", 4000), ("chat", "10.1.0.1", "c5", 5000), ("chat", "10.1.0.2", "c6", 600),
    ("chat", "10.1.0.3", "c7", 70_000),
    ("embed", "10.2.0.1", "e1", 100),
]


async def add_load(node, load=LOAD):
    for cluster, ip, request_id, prompt in load:
        await call(node, "POST", "/v1/load/stats",
                   {"cluster": cluster, "request_id": request_id, "ip": ip, "prompt_length": prompt})


async def test_overview_and_cluster_follow_the_load_of_a_real_node(node):
    app = console_for(node.url)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.state.health(node.url, app.clock()).state == UP, "the node to be up")
        assert isinstance(app.screen, OverviewScreen)
        assert table_rows(app.screen) == []

        await add_load(node)
        # c7 finished: its engine stays, idle, and prompt bytes went with it
        await call(node, "DELETE", "/v1/load/stats", {"request_id": "c7"})
        chat_prompt = 1000 + 2000 + 3000 + 4000 + 5000 + 600
        await wait_until(pilot, lambda: table_row(app.screen, "chat")["in_flight"] == "6", "chat's load")
        assert keys(table_rows(app.screen)) == ["chat", "embed"]  # busiest first
        chat = table_row(app.screen, "chat")
        shown = ("cluster", "engines", "in_flight", "prompt", "busiest", "idlest", "spread")
        assert {key: chat[key] for key in shown} == {
            "cluster": "chat", "engines": "3", "in_flight": "6", "prompt": human_bytes(chat_prompt),
            "busiest": "10.1.0.1 (5)", "idlest": "10.1.0.3 (0)", "spread": "5",
        }
        assert table_row(app.screen, "embed")["prompt"] == "100 B"
        assert "2 clusters · 4 engines · 7 requests in flight" in static_text(app.screen, "#summary")

        # the highlighted cluster opens with Enter
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ClusterScreen), "the cluster screen")
        engines = table_rows(app.screen)
        assert keys(engines) == ["10.1.0.1", "10.1.0.2", "10.1.0.3"]
        busiest, _, idle = (row for _, row in engines)
        assert (busiest["queued"], busiest["prompt"], busiest["mark"]) == ("5", human_bytes(15000), "▲ hot")
        assert (idle["queued"], idle["prompt"], idle["mark"]) == ("0", "0 B", "▽ idle")

        # r reverses the order, s moves the sort to the next column (prefill)
        await pilot.press("r")
        assert keys(table_rows(app.screen)) == ["10.1.0.3", "10.1.0.2", "10.1.0.1"]
        await pilot.press("s")
        assert keys(table_rows(app.screen)) == ["10.1.0.1", "10.1.0.2", "10.1.0.3"]
        assert [c.label.plain for c in app.screen.query_one("#table").ordered_columns][2] == "Prefill ▼"
        await pilot.press("r")
        assert keys(table_rows(app.screen)) == ["10.1.0.3", "10.1.0.2", "10.1.0.1"]

        # prefill done for everything: bytes go to zero, requests stay
        for _, _, request_id, _ in LOAD:
            await call(node, "DELETE", "/v1/load/prompt", {"request_id": request_id})
        await wait_until(pilot, lambda: table_row(app.screen, "10.1.0.1")["prompt"] == "0 B", "prompts gone")
        assert table_row(app.screen, "10.1.0.1")["queued"] == "5"

        # every request completed: back to zero everywhere
        for _, _, request_id, _ in LOAD:
            await call(node, "DELETE", "/v1/load/stats", {"request_id": request_id})
        await wait_until(pilot, lambda: all(r["queued"] == "0" for _, r in table_rows(app.screen)), "engines idle")
        assert all(r["mark"] == "" for _, r in table_rows(app.screen))  # nothing in flight: nobody hot or idle

        await pilot.press("escape")
        assert isinstance(app.screen, OverviewScreen)
        await wait_until(pilot, lambda: table_row(app.screen, "chat")["in_flight"] == "0", "overview at zero")
        for _, row in table_rows(app.screen):
            assert (row["in_flight"], row["prompt"], row["spread"]) == ("0", "0 B", "0")


async def test_filter_by_typing_and_sort_keys_on_the_overview(node):
    app = console_for(node.url)
    await add_load(node)
    await add_load(node, [("batch", "10.3.0.1", "b1", 900_000)])
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: len(table_rows(app.screen)) == 3, "three clusters")
        assert keys(table_rows(app.screen)) == ["chat", "batch", "embed"]  # by requests in flight; ties by name
        await pilot.press("s")  # prefill, largest first
        assert keys(table_rows(app.screen)) == ["batch", "chat", "embed"]
        await pilot.press("s", "s", "s")  # busiest, idlest, spread
        assert keys(table_rows(app.screen)) == ["chat", "batch", "embed"]
        await pilot.press("s")  # wraps around to the cluster name, A to Z
        assert keys(table_rows(app.screen)) == ["batch", "chat", "embed"]

        await pilot.press("slash", "e", "m")
        assert keys(table_rows(app.screen)) == ["embed"]
        assert "filter “em”: 1 of 3 shown" in static_text(app.screen, "#summary")
        await pilot.press("escape")  # leaves the filter box, the filter stays
        assert keys(table_rows(app.screen)) == ["embed"]
        await pilot.press("escape")  # clears it
        assert keys(table_rows(app.screen)) == ["batch", "chat", "embed"]


async def test_log_level_is_set_on_the_highlighted_node(start_node):
    first, second = start_node(), start_node()
    app = console_for(first.url, second.url)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("n")
        await wait_until(pilot, lambda: app.state.reachable_count() == 2, "both nodes up")
        await pilot.press("down", "l")
        assert target_label(second.url) in static_text(app.screen, "#log-level-box Static")
        await pilot.press("up", "enter")  # INFO is highlighted first; one up is DEBUG
        await wait_until(pilot, lambda: app.state.actions, "the node's answer")
        assert app.state.actions[-1][1] == (
            f"log level DEBUG on {target_label(second.url)}: log level updated successfully")
        assert "log level DEBUG" in static_text(app.screen, "#actions")

        # opened again, the dialog starts on the level the node now has
        await pilot.press("l")
        assert app.screen.query_one("#levels").highlighted == LOG_LEVELS.index("DEBUG")
        assert static_text(app.screen, "#log-level-now").startswith("Now: DEBUG")
        await pilot.press("escape", "up", "l")  # the first node: untouched
        assert app.screen.query_one("#levels").highlighted == LOG_LEVELS.index("INFO")


async def test_log_level_dialog_opens_on_a_level_set_elsewhere(node):
    """A level set by someone else (curl here) is the node's to report, in
    ``log_level`` of /v1/node/status."""
    status = (await call(node, "GET", "/v1/node/status"))["data"]
    if "log_level" not in status:
        pytest.skip("this node build does not report log_level in /v1/node/status (the console assumes INFO)")
    await call(node, "POST", "/log/level", {"LevelParam": "WARN"})
    app = console_for(node.url)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.state.log_level(node.url).level == "WARN", "the reported level")
        await pilot.press("l")
        assert app.screen.query_one("#levels").highlighted == LOG_LEVELS.index("WARN")
        assert static_text(app.screen, "#log-level-now") == "Now: WARN (as the node reports)"


def engines_of(app, cluster):
    snapshot, current = app.state.view_snapshot()
    found = snapshot.overview.cluster(cluster)
    return {e.ip: e.queued for e in found.engines}


async def test_nodes_agree_a_killed_node_shows_down_and_recovers(start_node):
    from nodeproc import free_port

    port_a, port_b = free_port(), free_port()
    node_a = start_node(port_a, "--peer", f"127.0.0.1:{port_b}")
    node_b = start_node(port_b, "--peer", f"127.0.0.1:{port_a}")
    app = console_for(node_a.url, node_b.url)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("n")
        await wait_until(pilot, lambda: app.state.reachable_count() == 2, "both nodes up")
        await add_load(node_a)
        # replicated to B: both report 8 requests and the same state digest
        await wait_until(pilot, lambda: all(table_row(app.screen, n.url)["requests"] == "8" for n in (node_a, node_b))
                         and app.state.agreement().agree, "replication and agreement")
        assert "All 2 nodes agree (state digests)" in static_text(app.screen, "#agreement")
        assert table_row(app.screen, node_a.url)["fingerprint"] == table_row(app.screen, node_b.url)["fingerprint"]
        assert keys(table_rows(app.screen, "#peers")) == [f"127.0.0.1:{port_b}"]  # A is highlighted

        node_a.kill()
        await wait_until(pilot, lambda: table_row(app.screen, node_a.url)["state"] == DOWN, "A shown down")
        assert "connection refused" in static_text(app.screen, "#problems")
        # the overview now comes from B, with the replicated load, and says so
        await pilot.press("o")
        await wait_until(pilot, lambda: app.state.view_target() == node_b.url, "B as the view node")
        assert engines_of(app, "chat") == {"10.1.0.1": 5, "10.1.0.2": 1, "10.1.0.3": 1}
        await wait_until(pilot, lambda: table_row(app.screen, "chat")["in_flight"] == "7", "chat from B")
        assert f"Data from {target_label(node_b.url)}" in static_text(app.screen, "#status")
        assert "1/2 nodes answering" in static_text(app.screen, "#status")

        node_b.kill()
        await wait_until(pilot, lambda: "NO NODE ANSWERS" in static_text(app.screen, "#status"), "the outage banner")
        assert table_row(app.screen, "chat")["in_flight"] == "7"  # last known numbers, marked as old

        start_node(port_a, "--peer", f"127.0.0.1:{port_b}")
        start_node(port_b, "--peer", f"127.0.0.1:{port_a}")
        await wait_until(pilot, lambda: app.state.reachable_count() == 2, "both nodes back")
        await pilot.press("n")
        # up, or "not ready" while a restarted node warms up; no longer down
        await wait_until(pilot, lambda: all(r["state"] in (UP, NOT_READY) for _, r in table_rows(app.screen)),
                         "both answering")
        await pilot.press("o")
        await wait_until(pilot, lambda: "Data from" in static_text(app.screen, "#status")
                         and "2/2 nodes answering" in static_text(app.screen, "#status"), "a normal status line")


async def test_a_node_that_never_answers_is_slow_then_down_while_the_rest_refresh(node):
    # accepts connections (the kernel does) but never answers a request
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    app = console_for(node.url, silent_url, timeout=4.0)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("n")
            await wait_until(pilot, lambda: table_row(app.screen, silent_url)["state"] == SLOW, "the silent node slow")
            assert "no answer for" in static_text(app.screen, "#problems")
            # meanwhile the UI answers keys and the other node's data keeps coming
            await add_load(node)
            await pilot.press("o")
            await wait_until(pilot, lambda: table_row(app.screen, "chat")["in_flight"] == "7", "the live node's load")
            await pilot.press("n")
            await wait_until(pilot, lambda: table_row(app.screen, silent_url)["state"] == DOWN, "the silent node down",
                             timeout=30)
            assert "timed out after 4s" in static_text(app.screen, "#problems")
            assert table_row(app.screen, node.url)["state"] == UP
    finally:
        silent.close()



async def test_kv_cache_figures_show_when_the_node_offers_them(node):
    status, _, answer = await asyncio.to_thread(node.call, "GET", "/v1/cache/stats")
    if status == 404:
        pytest.skip("this node build has no KV-cache index")
    app = console_for(node.url)
    await add_load(node)
    await call(node, "POST", "/v1/cache/save", {"cluster": "chat", "prompt_hash": [1, 2, 3], "ip": "10.1.0.1"})
    await call(node, "POST", "/v1/cache/save", {"cluster": "chat", "prompt_hash": [1, 2, 4, 5], "ip": "10.1.0.2"})
    expected = (await call(node, "GET", "/v1/cache/stats"))["data"]
    blocks = next(c["blocks"] for c in expected["clusters"] if c["cluster"] == "chat")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: table_row(app.screen, "chat")["kv_blocks"] == str(blocks), "chat's KV blocks")
        assert table_row(app.screen, "embed")["kv_blocks"] == "—"
        await pilot.press("enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ClusterScreen), "the cluster screen")
        assert f"KV cache: {blocks} blocks held by 2 engines" in static_text(app.screen, "#summary")


async def test_nodes_behind_a_dns_name_are_followed_as_records_change(node):
    server = UdpDns().start()
    try:
        server.set_records("nodes.test", ["127.0.0.1"])
        targets = DnsTargets("nodes.test", node.port, ("127.0.0.1", server.port), timeout=1.0)
        app = ConsoleApp(HttpSource(targets, timeout=2.0), interval=0.2, discover_every=0.3)
        other = f"http://127.0.0.2:{node.port}"
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("n")
            await wait_until(pilot, lambda: keys(table_rows(app.screen)) == [node.url], "the one node")
            server.set_records("nodes.test", ["127.0.0.2", "127.0.0.1"])
            await wait_until(pilot, lambda: keys(table_rows(app.screen)) == [node.url, other], "the second address")
            await wait_until(pilot, lambda: table_row(app.screen, other)["state"] == DOWN, "nobody on 127.0.0.2")
            # the name vanishes: the last known nodes stay, and the status line says why
            server.records.clear()
            await wait_until(pilot, lambda: "nodes.test has no A or AAAA records" in static_text(app.screen, "#status"),
                             "the lookup failure")
            assert keys(table_rows(app.screen)) == [node.url, other]
            server.set_records("nodes.test", ["127.0.0.1"])
            await wait_until(pilot, lambda: keys(table_rows(app.screen)) == [node.url], "the second one gone")
            assert "no A or AAAA records" not in static_text(app.screen, "#status")
    finally:
        server.stop()
