"""Every benchmark script runs (tiny sizes, no result file), so `make bench` cannot rot unnoticed."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu

SCRIPTS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_benchmark_runs_quick(script):
    result = subprocess.run([sys.executable, str(script), "--quick", "--device", "cpu"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(tag in result.stdout for tag in ("zigspark-reference", "sparse reference", "gather reference"))
