"""The core is the pure domain: it must not import the reactor, the web
framework, the HTTP client or the metrics library, directly or through
another metacenter module."""

import ast
import os
import subprocess
import sys

CORE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "metacenter", "core")
FORBIDDEN = ("twisted", "klein", "treq", "prometheus_client", "werkzeug", "zope")


def imported_modules(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_core_modules_import_nothing_outside_the_core_and_stdlib():
    offenders = []
    for name in sorted(os.listdir(CORE)):
        if not name.endswith(".py"):
            continue
        for module in imported_modules(os.path.join(CORE, name)):
            top = module.split(".")[0]
            if top in FORBIDDEN or (top == "metacenter" and not module.startswith("metacenter.core")):
                offenders.append(f"{name}: {module}")
    assert offenders == []


def test_importing_the_core_loads_no_forbidden_package():
    # A fresh interpreter: what importing every core module pulls in, transitively.
    modules = [f"metacenter.core.{n[:-3]}" for n in sorted(os.listdir(CORE)) if n.endswith(".py")]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules) +
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(CORE)))
    assert out.stdout.strip() == "[]"


def test_the_check_would_catch_an_offender(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from twisted.internet import reactor\nimport metacenter.api.envelope\n")
    found = list(imported_modules(str(bad)))
    assert found == ["twisted.internet", "metacenter.api.envelope"]
