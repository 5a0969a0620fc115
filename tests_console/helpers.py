"""Reading what the console shows, and waiting for it, in Pilot tests."""

import asyncio
import time

from rich.text import Text
from textual.widgets import DataTable, Static


def cell_text(cell):
    return cell.plain if isinstance(cell, Text) else str(cell)


def table_rows(screen, selector="#table"):
    """The table as shown, top to bottom: [(row key, {column key: text})]."""
    table = screen.query_one(selector, DataTable)
    columns = [c.key.value for c in table.ordered_columns]
    return [
        (row.key.value, dict(zip(columns, (cell_text(c) for c in table.get_row(row.key)))))
        for row in table.ordered_rows
    ]


def table_row(screen, key, selector="#table"):
    return dict(table_rows(screen, selector))[key]


def static_text(screen, selector):
    return cell_text(screen.query_one(selector, Static).content)


def notifications(app):
    """The texts of the notifications (toasts) on screen."""
    return [str(toast.render()) for toast in app.screen.query("Toast")]


async def wait_until(pilot, predicate, what, timeout=20.0):
    """Lets the app run until ``predicate()`` holds; fails after ``timeout``
    (generous: this is about correctness, not speed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (LookupError, AttributeError):
            pass  # the widget or row is not there yet
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


async def call(node, method, path, body=None):
    """A blocking call to the node, off the event loop so the app keeps running."""
    status, _, payload = await asyncio.to_thread(node.call, method, path, body)
    assert status == 200, (method, path, body, payload)
    return payload
