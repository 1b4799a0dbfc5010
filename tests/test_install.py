"""The install contract: nothing machine-local in the project metadata, and the Docker image is built
from the same lock (the fresh-machine install itself is proven by `.ci/run`)."""

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_lock_and_pyproject_name_only_the_registry() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "find-links" not in pyproject.get("tool", {}).get("uv", {})
    lock = (REPO / "uv.lock").read_text()
    sources = set(re.findall(r'source = \{ (\w+) = "([^"]+)"', lock))
    assert {kind for kind, _ in sources} <= {"registry", "editable", "virtual"}, sources
    assert {url for kind, url in sources if kind == "registry"} == {"https://pypi.org/simple"}
    torch = re.search(r'name = "torch"\nversion = "([^"]+)"', lock).group(1)
    assert "+cpu" not in torch  # the registry's CUDA build: uses a GPU where there is one


def test_dockerfile_installs_the_lock_on_a_cuda_base() -> None:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", dockerfile, re.M).group(1)
    assert base.startswith("nvidia/cuda:")
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", dockerfile, re.M)
    syncs = re.findall(r"uv sync[^\n]*", dockerfile)
    assert syncs and all("--frozen" in s for s in syncs)
    assert "COPY pyproject.toml uv.lock" in dockerfile and "/opt/" not in dockerfile.replace("/opt/python", "")
