"""Docs generated from the code stay in sync with it."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import gen_config_docs  # noqa: E402


def test_configuration_table_is_current():
    with open(gen_config_docs.DOC, encoding="utf-8") as f:
        text = f.read()
    assert gen_config_docs.render(text) == text, "run: python tools/gen_config_docs.py"


def test_every_setting_is_an_option_of_twistd_metacenter():
    from metacenter.runtime.config import SETTINGS
    from metacenter.runtime.tap import Options

    options = Options()
    help_text = str(options)
    for s in SETTINGS:
        assert f"--{s.name}" in help_text
