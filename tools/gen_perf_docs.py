"""Regenerate the results block of docs/performance.md (between its
bench:results markers) from docs/bench-results.json, the one place the
benchmark's figures live. `make bench` writes both; after editing the JSON or
the report code, run `python tools/gen_perf_docs.py`. tests/test_docs.py fails
when the committed block is stale."""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.report import END, START, header, table  # noqa: E402

DOC = os.path.join(REPO, "docs", "performance.md")
RESULTS = os.path.join(REPO, "docs", "bench-results.json")


def render(text, results):
    """``text`` with its results block rebuilt from ``results`` (as bench.report
    writes it after a run)."""
    block = f"{START}\n{header(results)}\n\n{table(results)}{END}"
    return text[:text.index(START)] + block + text[text.index(END) + len(END):]


def load_results():
    with open(RESULTS, encoding="utf-8") as f:
        return json.load(f)


if __name__ == "__main__":
    with open(DOC, encoding="utf-8") as f:
        current = f.read()
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(render(current, load_results()))
