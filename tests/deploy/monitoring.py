"""The PromQL expressions of deploy/grafana/metacenter.json and
deploy/prometheus/alerts.yaml, and the metric names they use."""

import json
import os
import re

import promql_parser
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARD = os.path.join(REPO, "deploy", "grafana", "metacenter.json")
RULES = os.path.join(REPO, "deploy", "prometheus", "alerts.yaml")

# Grafana's variables, replaced by values Prometheus accepts: the interval by a
# few scrapes of the tests' 1 s interval, the job by the tests' job name.
GRAFANA_VARIABLES = {"$__rate_interval": "15s", "$job": "metacenter", "$cluster": ".*"}
# Series Prometheus adds to every target itself: never on a node's /metrics.
PROMETHEUS_SERIES = {"up"}
_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*\w+\)$")


def _panels(panels):
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def dashboard_expressions():
    """(where, PromQL) for every panel target and every query variable."""
    with open(DASHBOARD, encoding="utf-8") as f:
        dash = json.load(f)
    out = []
    for p in _panels(dash["panels"]):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            m = _LABEL_VALUES.match(v["definition"])
            assert m, f"variable {v['name']}: expected label_values(SELECTOR, LABEL), got {v['definition']!r}"
            out.append((f"variable {v['name']}", m.group(1)))
    return out


def rule_expressions():
    with open(RULES, encoding="utf-8") as f:
        rules = yaml.safe_load(f)
    return [(f"rule {r.get('alert') or r.get('record')}", r["expr"])
            for group in rules["groups"] for r in group["rules"]]


def all_expressions():
    return dashboard_expressions() + rule_expressions()


def substitute(expr):
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    return expr


def selectors(expr):
    """{metric name: label names it is matched on} for every series an
    expression selects (parsed, not grepped)."""
    names = {}

    def walk(node):
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr!r}"
            names.setdefault(node.name, set()).update(m.name for m in node.matchers.matchers)
            return
        for attr in ("lhs", "rhs", "expr", "param", "args", "vector_selector"):
            child = getattr(node, attr, None)
            for c in child if isinstance(child, list) else [child]:
                if c is not None:
                    walk(c)

    walk(promql_parser.parse(substitute(expr)))
    return names
