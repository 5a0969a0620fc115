"""docs/console.md explains every key and option, and its screenshots are
what the console renders today."""

import os
import re

import pytest

from console.app import ConsoleApp
from console.cli import build_parser
from console.dialogs import key_name
from screenshots import ONCE, REPO, SCREENS, all_names, doc_path, normalized, render

SNAPSHOTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__snapshots__", "test_snapshots")

DOC_PATH = os.path.join(REPO, "docs", "console.md")


@pytest.fixture(scope="module")
def doc():
    with open(DOC_PATH, encoding="utf-8") as f:
        return f.read()


def test_every_key_is_explained(doc):
    for title, bindings, extra_keys in ConsoleApp.help_sections():
        for binding in bindings:
            for key in key_name(binding).split():
                assert f"`{key}`" in doc, f"key {key} ({title}: {binding.description}) is not in docs/console.md"


def test_every_option_is_explained(doc):
    for action in build_parser()._actions:
        for option in action.option_strings:
            assert f"`{option}" in doc, f"option {option} is not in docs/console.md"


def test_every_screenshot_is_shown_and_every_shown_one_exists(doc):
    shown = set(re.findall(r"\]\(console/([\w.-]+)\.svg\)", doc))
    assert shown == set(all_names())
    for name in shown:
        assert os.path.exists(doc_path(name)), name


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("name", list(SCREENS))
def test_screen_screenshot_is_the_accepted_snapshot(name):
    # test_snapshots.py checks the snapshot against what the console renders now
    snapshot = read(os.path.join(SNAPSHOTS_DIR, f"test_screen[{name}].svg"))
    assert read(doc_path(name)) == normalized(snapshot), (
        f"docs/console/{name}.svg is out of date: run .venv/bin/python tests_console/screenshots.py")


def test_once_screenshot_is_current():
    assert read(doc_path(ONCE)) == normalized(render(ONCE)), (
        "docs/console/once.svg is out of date: run .venv/bin/python tests_console/screenshots.py")


def test_the_documented_json_schema_is_the_one_the_console_follows(doc):
    import json

    from console.report import JSON_SCHEMA

    block = re.search(r"<summary>JSON Schema</summary>\s*```json\n(.*?)\n```", doc, re.S)
    assert block, "docs/console.md has no JSON Schema block"
    assert json.loads(block.group(1)) == JSON_SCHEMA, "docs/console.md's JSON Schema differs from console/report.py"
    for field in JSON_SCHEMA["properties"]:
        assert f"| `{field}` |" in doc, f"top-level field {field} is not in the table of docs/console.md"
