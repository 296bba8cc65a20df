"""Packaging: the built wheel installs into a fresh virtual environment and every module imports from
it; setup.py's CUDA switches behave as documented."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cpu, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def _source_modules() -> list:
    """Every module of the source tree, so the wheel is checked to carry (and import) all of them."""
    names = []
    trees = ((ROOT / "python" / "zigspark", "zigspark"), (ROOT / "triton_kernels", "zigspark.triton_kernels"))
    for root, package in trees:
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join((package, *parts)))
    return names


MODULES = _source_modules()


def _copy_source(dst: Path) -> Path:
    """A clean copy of the source tree (no build outputs), so the test never touches the checkout."""
    ignore = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                    ".pytest_cache", ".hypothesis", "demo-output")
    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


def _fresh_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    python = path / "bin" / "python"
    # torch, triton and numpy come from the test environment (no download): its site-packages is added as
    # a plain path, after the venv's own, so the wheel's zigspark is the one that imports.
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _import_everything(python: Path, cwd: Path, extra: str) -> str:
    """Import every module with the venv's python, check it is the venv's zigspark, run `extra`."""
    code = ("import importlib, sys, torch, zigspark\n"
            f"for m in {MODULES!r}: importlib.import_module(m)\n"
            "assert zigspark.__file__.startswith(sys.prefix), zigspark.__file__\n" + extra)
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_wheel_installs_in_fresh_venv_and_imports_every_module(tmp_path):
    src = _copy_source(tmp_path / "src")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(src)], check=True, capture_output=True)
    (wheel,) = wheels.glob("zigspark-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "zigspark/triton_kernels/stat_topk.py" in names and "zigspark/auto_backends.json" in names
    has_nvcc = shutil.which("nvcc") is not None
    assert any(n.startswith("zigspark/_C") for n in names) == has_nvcc, names

    python = _fresh_venv(tmp_path / "venv")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    out = _import_everything(python, tmp_path, "zigspark.stat_topk(torch.randn(2, 64), 5)\n"
                                                "print(zigspark._cuda.is_built())")
    assert out.strip() == str(has_nvcc)
    cli = subprocess.run([str(tmp_path / "venv" / "bin" / "zigspark"), "env"], capture_output=True, text=True)
    assert cli.returncode == 0 and "stat_topk" in cli.stdout, cli.stderr


def test_pure_python_install_without_cuda(tmp_path):
    """`pip install .` with ZIGSPARK_CUDA=0: everything imports, and backend='cuda' says how to get it."""
    src = _copy_source(tmp_path / "src")
    python = _fresh_venv(tmp_path / "venv")
    env = {**os.environ, "ZIGSPARK_CUDA": "0"}
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", str(src)],
                   check=True, capture_output=True, env=env)
    out = _import_everything(python, tmp_path, "assert not zigspark._cuda.is_built()\n"
                                                "try:\n"
                                                "    zigspark.stat_topk(torch.randn(2, 8), 2, backend='cuda')\n"
                                                "except zigspark.BackendUnavailableError as e:\n"
                                                "    print(e)\n")
    assert "zigspark._C is not built" in out and "ZIGSPARK_CUDA=1 pip install" in out, out


def _setup_py(src: Path, env_overrides: dict):
    env = {**os.environ, **env_overrides}
    return subprocess.run([sys.executable, "setup.py", "--version"], cwd=src, env=env, capture_output=True,
                          text=True)


def test_cuda_switches(tmp_path):
    src = _copy_source(tmp_path / "src")
    no_cuda = {"CUDA_HOME": str(tmp_path / "no-cuda-here"), "PATH": "/usr/bin:/bin"}
    forced = _setup_py(src, {**no_cuda, "ZIGSPARK_CUDA": "1"})
    assert forced.returncode != 0
    assert "ZIGSPARK_CUDA=1 but nvcc was not found" in forced.stderr and "ZIGSPARK_CUDA=0" in forced.stderr
    auto = _setup_py(src, {**no_cuda, "ZIGSPARK_CUDA": "auto"})
    assert auto.returncode == 0, auto.stderr
    notes = [line for line in auto.stdout.splitlines() if line.startswith("zigspark:")]
    assert len(notes) == 1 and "nvcc not found, installing without the CUDA extension" in notes[0], auto.stdout
    off = _setup_py(src, {"ZIGSPARK_CUDA": "0"})
    assert off.returncode == 0 and "ZIGSPARK_CUDA=0" in off.stdout
    bad = _setup_py(src, {"ZIGSPARK_CUDA": "maybe"})
    assert bad.returncode != 0 and "must be auto, 1 or 0" in bad.stderr


def test_arch_list_parsing():
    # Only the helpers above the build class: executing all of setup.py would call setup().
    namespace = {"__file__": str(ROOT / "setup.py")}
    text = (ROOT / "setup.py").read_text().split("class BuildCudaExt")[0]
    exec(compile(text, "setup.py", "exec"), namespace)
    flags, names = namespace["parse_archs"]("8.0+PTX;9.0a")
    assert names == ["sm_80", "compute_80", "sm_90a"]
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags
    assert namespace["parse_archs"]("sm_86")[1] == ["sm_86"]
