"""Every screen on fixed data with a fixed clock (see fixed_data.py), compared
with the accepted SVG under __snapshots__. After an intended change of the
looks: ``pytest tests_console --snapshot-update``, review the new files, and
regenerate the documentation's copies with ``tests_console/screenshots.py``."""

import pytest

from fixed_data import fixed_app
from screenshots import SCREENS, SIZE, SMALL_SCREENS, screen_app


@pytest.mark.parametrize("name", list(SCREENS))
def test_screen(snap_compare, name):
    """The screens shown in docs/console.md."""
    app, press, size = screen_app(name)
    assert snap_compare(app, press=press, terminal_size=size)


@pytest.mark.parametrize("name", list(SMALL_SCREENS))
def test_screen_at_80x24(snap_compare, name):
    """Every screen in the smallest terminal the console is made for: the
    footer keeps ? and q, the help scrolls and says so, the name column stays
    while the table scrolls sideways."""
    app, press, size = screen_app(name, SMALL_SCREENS)
    assert snap_compare(app, press=press, terminal_size=size)


def test_overview_sorted_by_prefill_ascending(snap_compare):
    assert snap_compare(fixed_app(), press=["s", "r"], terminal_size=SIZE)


def test_cluster_opened_from_the_overview(snap_compare):
    assert snap_compare(fixed_app(), press=["down", "enter"], terminal_size=SIZE)
