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


# -- one place for performance figures ------------------------------------------

import glob  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

import gen_perf_docs  # noqa: E402

DOCS = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
READMES = [os.path.join(REPO, "README.md"), os.path.join(REPO, "README_zh.md")]


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_performance_results_are_generated_from_bench_results_json():
    text = read(gen_perf_docs.DOC)
    assert gen_perf_docs.render(text, gen_perf_docs.load_results()) == text, "run: python tools/gen_perf_docs.py"


# A measured figure: a latency, a rate, a percentile with its value.
FIGURE = re.compile(r"\d[\d,.]*\s?(µs|req/s|events/s|ops/s)\b|\b(p50|p90|p99|median)\s+\d")


@pytest.mark.parametrize("path", [p for p in DOCS + READMES if not p.endswith("performance.md")],
                         ids=os.path.basename)
def test_measured_figures_live_only_in_performance_md(path):
    found = [m.group(0) for m in FIGURE.finditer(read(path))]
    assert not found, f"{os.path.basename(path)} repeats measured figures {found}: link to docs/performance.md"


# -- self-contained docs ------------------------------------------------------

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
MD_NAME = re.compile(r"\b[\w.-]+\.md\b")


def _doc_params():
    for path in DOCS + READMES:
        yield pytest.param(path, id=os.path.basename(path))


@pytest.mark.parametrize("path", list(_doc_params()))
def test_docs_refer_only_to_files_in_the_repository(path):
    text = read(path)
    here = os.path.dirname(path)
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # a URL, not a file
            continue
        resolved = os.path.normpath(os.path.join(here, target))
        assert resolved.startswith(REPO + os.sep) and os.path.exists(resolved), f"link to {target}"
    repo_md = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "**", "*.md"), recursive=True)}
    for name in MD_NAME.findall(text):
        assert name in repo_md, f"{os.path.basename(path)} cites {name}, which is not in the repository"
    assert "/work/" not in text


# -- names that must match deploy/kubernetes -------------------------------------


def manifest_names():
    names, services = set(), set()
    for path in glob.glob(os.path.join(REPO, "deploy", "kubernetes", "*.yaml")):
        for doc in yaml.safe_load_all(read(path)):
            if doc and "metadata" in doc:
                names.add(doc["metadata"]["name"])
                if doc["kind"] == "Service":
                    services.add(doc["metadata"]["name"])
    return names, services


@pytest.mark.parametrize("path", DOCS + READMES, ids=os.path.basename)
def test_service_and_resource_names_match_the_manifests(path):
    names, services = manifest_names()
    text = read(path)
    for host in re.findall(r"([a-z0-9-]+)\.[A-Za-z0-9-]+\.svc\.cluster\.local", text):
        assert host in services, f"{os.path.basename(path)}: no Service {host!r} in deploy/kubernetes"
    # Other metacenter-* words: a manifest's resource, the console's command,
    # or the signature scheme's name.
    allowed = names | {"metacenter-console", "metacenter-peer-v1"}
    for word in re.findall(r"(?<![\w/.-])metacenter-[a-z0-9-]*[a-z0-9]", text):
        assert word in allowed, f"{os.path.basename(path)}: {word!r} is not a name in deploy/kubernetes"


# -- README_zh.md keeps in step with README.md -------------------------------------

FENCED = re.compile(r"^```[^\n]*\n.*?^```$", re.S | re.M)


def test_readme_zh_has_every_command_block_of_readme():
    english, chinese = read(READMES[0]), read(READMES[1])
    blocks = FENCED.findall(english)
    assert len(blocks) >= 4
    missing = [b.splitlines()[1] for b in blocks if b not in chinese]
    assert not missing, f"README_zh.md lacks (or differs in) the blocks starting {missing}"
