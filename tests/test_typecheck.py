"""The type check of the packages (dynamo, frontend, router, workers, kvbm, serve, planner) and the
benchmark scripts, run as part of the test command: mypy with pyproject.toml's [tool.mypy]
configuration. About 50 s of CPU from a cold cache, a few seconds with .mypy_cache warm."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_mypy_passes_on_the_packages() -> None:
    if importlib.util.find_spec("mypy") is None:
        if os.environ.get("CI"):
            pytest.fail("mypy is not installed (it is in the test extras: scripts/setup.sh installs it)")
        pytest.skip("mypy is not installed (pip install -e '.[test]')")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--no-pretty"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=880,
    )
    assert result.returncode == 0, f"mypy found errors:\n{result.stdout}{result.stderr}"
