"""Key bindings move between screens and act, on fixed data (no node needed)
or against an address where no node listens."""

import pytest
from textual.widgets import DataTable

from console.app import ConsoleApp
from console.dialogs import HelpScreen, LogLevelDialog
from console.discovery import FixedTargets
from console.nodeclient import target_label
from console.screens import ClusterScreen, NodesScreen, OverviewScreen
from console.source import HttpSource
from fixed_data import NODE_A, NODE_B, fixed_app
from helpers import notifications, static_text, table_rows, wait_until
from nodeproc import free_port

pytestmark = pytest.mark.asyncio
SIZE = (130, 32)


async def test_screens_are_reached_with_their_keys_and_q_quits():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        assert isinstance(app.screen, OverviewScreen)
        await pilot.press("n")
        assert isinstance(app.screen, NodesScreen)
        await pilot.press("o")
        assert isinstance(app.screen, OverviewScreen)
        await pilot.press("enter")  # the busiest cluster is highlighted first
        assert isinstance(app.screen, ClusterScreen) and app.screen.cluster_name == "llama-3-70b"
        await pilot.press("n", "o")  # the cluster screen is kept under the overview mode
        assert isinstance(app.screen, ClusterScreen)
        await pilot.press("backspace")
        assert isinstance(app.screen, OverviewScreen)
        await pilot.press("down", "enter", "escape")
        assert isinstance(app.screen, OverviewScreen)

        for close in ("escape", "question_mark", "q"):
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            await pilot.press(close)  # q closes the help, it does not quit
            assert isinstance(app.screen, OverviewScreen)

        await pilot.press("l")
        assert isinstance(app.screen, LogLevelDialog) and app.screen.target == NODE_A  # the view node
        await pilot.press("escape")
        assert isinstance(app.screen, OverviewScreen)
        assert not app.state.actions  # cancelled: nothing sent

        await pilot.press("q")
    assert app.return_code == 0


async def test_enter_on_a_node_pins_the_view_to_it_and_again_unpins():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("n", "down", "enter")
        assert app.state.view_target() == NODE_B
        assert [key for key, row in table_rows(app.screen) if row["node"].endswith("◉")] == [NODE_B]
        assert f"overview pinned to {target_label(NODE_B)}" in static_text(app.screen, "#summary")
        await pilot.press("o")
        assert f"Data from {target_label(NODE_B)}" in static_text(app.screen, "#status")
        await pilot.press("n", "enter")
        assert app.state.view_target() == NODE_A


async def test_a_failed_log_level_change_is_reported():
    dead = f"http://127.0.0.1:{free_port()}"
    app = ConsoleApp(HttpSource(FixedTargets([dead]), timeout=2.0), interval=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("n")
        await wait_until(pilot, lambda: table_rows(app.screen)[0][1]["state"] == "down", "the node shown down")
        await pilot.press("l", "enter")
        await wait_until(pilot, lambda: app.state.actions, "the attempt's outcome")
        assert app.state.actions[-1][1] == f"log level INFO on {target_label(dead)} failed: connection refused"
        assert "failed: connection refused" in static_text(app.screen, "#actions")
        assert app.screen.query_one("#table", DataTable).row_count == 1  # still running, still showing


async def test_l_without_any_answering_node_says_so():
    dead = f"http://127.0.0.1:{free_port()}"
    app = ConsoleApp(HttpSource(FixedTargets([dead]), timeout=2.0), interval=0.2)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_until(pilot, lambda: dead in app.state.latest, "the first poll")
        await pilot.press("l")  # on the overview the target is the view node: there is none
        assert isinstance(app.screen, OverviewScreen)
        await wait_until(pilot, lambda: any("No node answers: there is no node to set the log level of" in text
                                            for text in notifications(app)), "the notification")


# -- 80x24: the smallest terminal the console is made for ---------------------

SMALL = (80, 24)


def footer_keys(app):
    """{key shown: FooterKey} of the footer on screen."""
    return {key.key_display: key for key in app.screen.query("FooterKey")}


async def test_at_80x24_the_footer_shows_help_and_quit():
    app = fixed_app(open_cluster="llama-3-70b")  # the screen with the most keys
    async with app.run_test(size=SMALL) as pilot:
        await pilot.pause()
        for screen_key in (None, "escape", "n"):
            if screen_key:
                await pilot.press(screen_key)
                await pilot.pause()
            await wait_until(pilot, lambda: all(footer_keys(app)[k].region.width for k in "?q"), "the footer")
            for shown in ("?", "q"):
                region = footer_keys(app)[shown].region
                assert region.right <= SMALL[0], (app.screen, shown, region)


def help_hint(app):
    hint = app.screen.query_one("#help-more")
    return static_text(app.screen, "#help-more") if hint.display else ""


async def test_at_80x24_the_help_scrolls_and_says_where_more_is():
    app = fixed_app()
    async with app.run_test(size=SMALL) as pilot:
        await pilot.press("question_mark")
        await pilot.pause()
        box = app.screen.query_one("#help-box")
        assert box.region.height <= SMALL[1]
        await wait_until(pilot, lambda: help_hint(app).startswith("▼ more below"), "the hint at the start")
        await pilot.press("end")
        await wait_until(pilot, lambda: help_hint(app).startswith("▲ more above"), "the hint at the end")
        await pilot.press("up")
        await wait_until(pilot, lambda: help_hint(app).startswith("▲▼ more above and below"), "the hint midway")

    app = fixed_app()
    async with app.run_test(size=(130, 50)) as pilot:
        await pilot.press("question_mark")
        await pilot.pause()
        assert help_hint(app) == ""  # it all fits: no hint


def shown_line(table, y):
    return table.render_line(y).text


async def test_left_right_scroll_sideways_and_the_name_column_stays():
    app = fixed_app()
    async with app.run_test(size=SMALL) as pilot:
        await pilot.pause()
        table = app.screen.query_one("#table", DataTable)
        assert "KV blocks" not in shown_line(table, 0)  # beyond the right edge
        await pilot.press(*["right"] * 20)
        await wait_until(pilot, lambda: "KV blocks" in shown_line(table, 0), "the table scrolled right")
        assert table.scroll_x > 0
        assert shown_line(table, 0).lstrip().startswith("Cluster")  # the name column stays
        assert shown_line(table, 1).lstrip().startswith("llama-3-70b")
        assert "Engines" not in shown_line(table, 0)  # what scrolled away
        await pilot.press(*["left"] * 20)
        await wait_until(pilot, lambda: table.scroll_x == 0, "back to the left edge")


# -- the log-level dialog opens on the node's current level -------------------


def highlighted_level(app):
    levels = app.screen.query_one("#levels")
    return levels.get_option_at_index(levels.highlighted).id


async def test_log_level_dialog_opens_on_the_level_the_node_reports():
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("n", "down", "l")  # node B reports DEBUG
        assert isinstance(app.screen, LogLevelDialog) and app.screen.target == NODE_B
        assert highlighted_level(app) == "DEBUG"
        assert static_text(app.screen, "#log-level-now") == "Now: DEBUG (as the node reports)"
        await pilot.press("escape", "up", "l")  # node A does not report its level
        assert app.screen.target == NODE_A
        assert highlighted_level(app) == "INFO"
        assert static_text(app.screen, "#log-level-now") == "Now: not reported by this node (INFO is the default)"


# -- plurals and an empty overview ---------------------------------------------


async def test_counts_read_right_in_the_singular():
    from console.model import Cluster, Engine, NodeSnapshot, Overview
    from fixed_data import NOW, FixedSource

    one = NodeSnapshot(NODE_A, NOW, 0.004, ready=True, overview=Overview(int(NOW * 1e9), (
        Cluster("solo", (Engine("10.0.0.1", 1, 5, int(NOW * 1e9)),)),)))
    app = ConsoleApp(FixedSource([one]), interval=None, clock=lambda: NOW)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.state.reachable_count() == 1, "the poll")
        await pilot.pause()
        assert static_text(app.screen, "#summary").startswith(
            "1 cluster · 1 engine · 1 request in flight · 5 B in prefill")
        assert "1/1 node answering · 1 node" in static_text(app.screen, "#status")
        await pilot.press("enter")
        assert static_text(app.screen, "#summary").startswith("1 engine · 1 request in flight")
        await pilot.press("n")
        assert static_text(app.screen, "#summary").startswith("1 node · 1 answering")


async def test_an_empty_overview_says_why():
    app = fixed_app(empty=True)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert table_rows(app.screen) == []
        assert (f"No clusters yet: {target_label(NODE_A)} answers but holds no load"
                in static_text(app.screen, "#summary"))

    dead = f"http://127.0.0.1:{free_port()}"
    app = ConsoleApp(HttpSource(FixedTargets([dead]), timeout=2.0), interval=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "No clusters to show: the node has not answered"
                         in static_text(app.screen, "#summary"), "the reason")
