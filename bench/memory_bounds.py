"""Bytes per item of what the bounds limit, at the longest lengths allowed
(docs/deployment.md, "Memory sizing"):

    .venv/bin/python -m bench.memory_bounds          # a table
    .venv/bin/python -m bench.memory_bounds --json

Each figure is tracemalloc's traced bytes over N items added to a node built
as a process builds it (``build_node``: load table, metrics), divided by N:

- in-flight request: a 256-character request_id on a known engine;
- tombstone: a delete of an unknown 256-character request_id;
- engine: a new 39-character IPv6 engine in a known cluster, with its first request;
- cluster: a new 256-character cluster with one engine and one request.

The engine and cluster figures include the request that creates them.
Strings are fresh objects, as the JSON decoder makes them.
"""

import argparse
import gc
import json
import os
import sys
import tracemalloc

if __package__ in (None, ""):  # path form: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock  # noqa: E402

from metacenter.runtime.node import build_node  # noqa: E402

START = 1_700_000_000.0


def _text(prefix, index, length):
    head = f"{prefix}{index}-"
    return head + "x" * (length - len(head))


def _ipv6(index):
    # Canonical, 39 characters: the longest an engine ip is kept as.
    return "fd00:1234:5678:9abc:def0:%04x:%04x:%04x" % (index >> 32 & 0xFFFF, index >> 16 & 0xFFFF, index & 0xFFFF)


def per_item(count, setup, make):
    gc.collect()
    clock = Clock()
    clock.advance(START)
    node = build_node(clock)
    setup(node.state)
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    for i in range(count):
        make(node.state, i)
    gc.collect()
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return (after - before) / count


def measure(count):
    known = ("fd00::1", _text("cluster", 0, 256))

    def setup(state):
        state.add(known[1], _text("seed", 0, 256), known[0])

    return {
        "count": count,
        "request": per_item(count, setup, lambda s, i: s.add(known[1], _text("r", i, 256), known[0], 1000)),
        "tombstone": per_item(count, setup, lambda s, i: s.delete(_text("t", i, 256))),
        "engine": per_item(count, setup, lambda s, i: s.add(known[1], _text("r", i, 256), _ipv6(i), 1000)),
        "cluster": per_item(count, setup, lambda s, i: s.add(_text("c", i, 256), _text("r", i, 256), "fd00::2", 1000)),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args.count)
    if args.json:
        print(json.dumps(result))
        return
    for key in ("request", "tombstone", "engine", "cluster"):
        print(f"{key:>10}: {result[key]:7.0f} bytes each (traced, over {args.count:,})")


if __name__ == "__main__":
    main()
