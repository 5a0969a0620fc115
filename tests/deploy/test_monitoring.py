"""deploy/grafana/metacenter.json and deploy/prometheus/alerts.yaml, checked by
real parts: a PromQL parser from PyPI, two real nodes' /metrics under load, and,
where Prometheus is installed, `promtool check rules` and a real Prometheus
scraping the nodes and evaluating every expression."""

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import yaml

from live_cluster import LiveCluster
from monitoring import PROMETHEUS_SERIES, RULES, all_expressions, dashboard_expressions, selectors, substitute
from nodeproc import free_port

EXPRESSIONS = all_expressions()
IDS = [where for where, _ in EXPRESSIONS]
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"job", "instance"}
INSTALL_HINT = ("install Prometheus to run it: apt-get install -y --no-install-recommends prometheus "
                "(.ci/run does)")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LiveCluster.start(str(tmp_path_factory.mktemp("live")))
    yield c
    c.stop()


def test_the_dashboard_and_the_rules_have_expressions():
    assert len(dashboard_expressions()) >= 20
    with open(RULES, encoding="utf-8") as f:
        alerts = [r["alert"] for g in yaml.safe_load(f)["groups"] for r in g["rules"]]
    for wanted in ("MetacenterNodeDown", "MetacenterNodesDisagree", "MetacenterReplicationFailing",
                   "MetacenterReplicationLagging", "MetacenterRequestsExpiring"):
        assert wanted in alerts


@pytest.mark.parametrize("where,expr", EXPRESSIONS, ids=IDS)
def test_expression_parses(where, expr):
    assert selectors(expr), f"{where}: selects no series"


@pytest.mark.parametrize("where,expr", EXPRESSIONS, ids=IDS)
def test_every_series_and_label_exists_on_a_real_node(cluster, where, expr):
    for name, labels in selectors(expr).items():
        if name in PROMETHEUS_SERIES:
            continue
        assert name in cluster.series, f"{where}: {name} is not on a node's /metrics"
        unknown = labels - TARGET_LABELS - cluster.series[name]
        assert not unknown, f"{where}: {name} has no label {sorted(unknown)} (it has {sorted(cluster.series[name])})"


def test_promtool_accepts_the_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found; " + INSTALL_HINT)
    result = subprocess.run([promtool, "check", "rules", RULES], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def _get_json(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def _query(base, expr):
    try:
        return _get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    except urllib.error.HTTPError as e:  # 400/422 carry the error in the body
        return json.load(e)


def _wait(predicate, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def prometheus(cluster, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not found; " + INSTALL_HINT)
    directory = tmp_path_factory.mktemp("prometheus")
    targets = [f"{n.host}:{n.port}" for n in cluster.nodes]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [RULES],
        "scrape_configs": [{"job_name": "metacenter", "static_configs": [{"targets": targets}]}],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(directory / "prometheus.log", "wb")
    process = subprocess.Popen(
        [binary, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, cwd=str(directory))
    base = f"http://127.0.0.1:{port}"
    try:
        # Three scrapes of each node: enough samples for every rate().
        _wait(lambda: _query(base, "min(count_over_time(up[1m])) >= 3 and min(up) == 1")["data"]["result"],
              "three scrapes of both nodes")
        yield base
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def test_prometheus_scrapes_both_nodes(prometheus, cluster):
    result = _query(prometheus, substitute('sum(metacenter_node_alive{job=~"$job"})'))
    assert result["status"] == "success"
    assert float(result["data"]["result"][0]["value"][1]) == len(cluster.nodes)


@pytest.mark.parametrize("where,expr", EXPRESSIONS, ids=IDS)
def test_prometheus_evaluates(prometheus, where, expr):
    result = _query(prometheus, substitute(expr))
    assert result["status"] == "success", f"{where}: {result.get('error')}"
    assert not result.get("warnings"), f"{where}: {result['warnings']}"


def test_prometheus_runs_every_alert_rule_without_error(prometheus):
    def evaluated():
        groups = _get_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules and all(r.get("lastEvaluation", "").startswith("20") and
                             not r["lastEvaluation"].startswith("0001") for r in rules)

    _wait(evaluated, "every rule evaluated once")
    groups = _get_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len([e for e in EXPRESSIONS if e[0].startswith("rule ")])
    for r in rules:
        assert r["health"] == "ok", f"{r['name']}: {r.get('lastError')}"
