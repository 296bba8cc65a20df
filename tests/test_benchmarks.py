"""Every benchmark script runs (tiny sizes, no result file), so `make bench` cannot rot unnoticed; in the
interpret tier the Triton rows run too (the interpreter stands in for the GPU), so that a GPU run of the
benchmarks does not first find a broken Triton row on the device's clock."""

import subprocess
import sys
from pathlib import Path

import pytest


SCRIPTS = sorted((Path(__file__).resolve().parent.parent / "benchmarks").glob("bench_*.py"))


@pytest.mark.cpu
@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_benchmark_runs_quick(script):
    stdout = run_quick(script)
    assert any(tag in stdout for tag in ("zigspark-reference", "sparse reference", "gather reference"))


def run_quick(script) -> str:
    """stdout of `script --quick --device cpu`, which must succeed."""
    result = subprocess.run([sys.executable, str(script), "--quick", "--device", "cpu"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# bench_e2e trains and samples whole models: minutes in the interpreter; its Triton paths are the ops' own.
INTERPRETED = [s for s in SCRIPTS if s.stem != "bench_e2e"]


@pytest.mark.interpret
@pytest.mark.parametrize("script", INTERPRETED, ids=[s.stem for s in INTERPRETED])
def test_benchmark_triton_rows_run_in_the_interpreter(script):
    stdout = run_quick(script)
    assert "triton" in stdout, stdout
