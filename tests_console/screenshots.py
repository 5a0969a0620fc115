"""The documentation's screenshots: the screens the snapshot tests check
(``SCREENS``, fixed data, fixed clock) and the ``--once`` output. Regenerate
after a change of the looks:

    .venv/bin/python tests_console/screenshots.py

test_snapshots.py fails while a screen differs from its accepted snapshot,
test_docs.py while docs/console/*.svg differ from those snapshots.
"""

import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DOCS_DIR = os.path.join(REPO, "docs", "console")

if __name__ == "__main__":
    sys.path[:0] = [REPO, HERE]

from rich.console import Console  # noqa: E402
from textual._doc import take_svg_screenshot  # noqa: E402  (what snap_compare uses too)

from console.once import run_once  # noqa: E402
from fixed_data import NOW, FixedSource, fixed_app, node_snapshots  # noqa: E402

SIZE = (130, 32)
SMALL = (80, 24)  # the smallest terminal the console is made for
RIGHT_10 = ["right"] * 10  # scrolls the table sideways

# name -> (fixed_app arguments, keys pressed, terminal size); docs/console/NAME.svg
SCREENS = {
    "overview": ({}, [], SIZE),
    "overview-filtered": ({}, ["slash", "l", "l", "enter"], SIZE),
    "cluster": ({"open_cluster": "llama-3-70b"}, [], SIZE),
    "nodes": ({}, ["n"], SIZE),
    "nodes-disagreeing": ({"disagree": True}, ["n", "down"], SIZE),
    "outage": ({"outage_for": 42}, [], SIZE),
    "log-level": ({}, ["n", "down", "l"], SIZE),
    "help": ({}, ["question_mark"], (130, 50)),
    "empty": ({"empty": True}, [], SIZE),
    "narrow": ({}, RIGHT_10, SMALL),
}
# The screens at 80x24, checked by test_snapshots.py (not in the docs).
SMALL_SCREENS = {
    "overview": ({}, [], SMALL),
    "cluster": ({"open_cluster": "llama-3-70b"}, [], SMALL),
    "cluster-scrolled": ({"open_cluster": "llama-3-70b"}, RIGHT_10, SMALL),
    "nodes": ({}, ["n"], SMALL),
    "nodes-scrolled": ({}, ["n", *RIGHT_10], SMALL),
    "help": ({}, ["question_mark"], SMALL),
    "help-end": ({}, ["question_mark", "end"], SMALL),
    "log-level": ({}, ["n", "down", "l"], SMALL),
    "log-level-not-reported": ({}, ["l"], SMALL),
    "empty": ({"empty": True}, [], SMALL),
    "outage": ({"outage_for": 42}, [], SMALL),
}
ONCE = "once"


def screen_app(name, screens=SCREENS):
    arguments, press, size = screens[name]
    return fixed_app(**arguments), press, size


def render_screen(name):
    app, press, size = screen_app(name)
    return take_svg_screenshot(app=app, press=press, terminal_size=size)


def render_once():
    console = Console(record=True, width=130, force_terminal=True, color_system="truecolor", file=open(os.devnull, "w"))
    run_once(FixedSource(node_snapshots()), console=console, clock=lambda: NOW)
    return console.export_svg(title="metacenter-console --once")


def render(name):
    return render_once() if name == ONCE else render_screen(name)


def all_names():
    return [*SCREENS, ONCE]


def doc_path(name):
    return os.path.join(DOCS_DIR, f"{name}.svg")


def normalized(svg):
    """Without the random ids rich puts in every export."""
    return re.sub(r"\bterminal-\d+-", "terminal-", svg)


def main():
    os.makedirs(DOCS_DIR, exist_ok=True)
    for name in all_names():
        with open(doc_path(name), "w", encoding="utf-8") as f:
            f.write(normalized(render(name)))
        print("wrote", os.path.relpath(doc_path(name), REPO))


if __name__ == "__main__":
    main()
