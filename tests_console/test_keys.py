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
