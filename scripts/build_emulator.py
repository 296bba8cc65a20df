"""Build zigspark._C_emulated: the CUDA kernels of csrc/ compiled as host C++ against csrc/emulate, for the
`emulate` test tier on machines without a GPU (see csrc/emulate/emulator.h for what that can and cannot show).

Every csrc/**/*.cu is copied with two rewrites that host C++ cannot express otherwise,
    kernel<<<grid, block, smem, stream>>>(args)     ->  ::emu::launch(kernel, grid, block, smem, stream)(args)
    extern __shared__ T name[];                      ->  T* name = (T*)::emu::dynamic_shared_memory();
and compiled with g++ with the emulator force-included; csrc/bindings.cpp is compiled unchanged as the module
_C_emulated. The result is cached under build/emulate/<hash of sources and flags>/.

    python scripts/build_emulator.py      # builds (if needed) and prints the module's path (nothing, and
                                          # exit 0, where there are no CUDA headers to build against)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
MODULE = "_C_emulated"

LAUNCH = re.compile(r"\b([A-Za-z_]\w*(?:\s*<[^;{}<>]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\s*\[\s*\]\s*;")


def rewrite(source: str) -> str:
    source = LAUNCH.sub(lambda m: f"::emu::launch({m.group(1)}, {m.group(2)})(", source)
    return DYNAMIC_SHARED.sub(
        lambda m: f"{m.group(1)}* {m.group(2)} = static_cast<{m.group(1)}*>(::emu::dynamic_shared_memory());", source)


def cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (for cuda_fp16.h & co.), or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for home in filter(None, candidates):
        include = Path(home) / "include"
        if (include / "cuda_fp16.h").exists():
            return include
    return None


def _flags(include: Path) -> list[str]:
    import pybind11

    return ["-std=c++17", "-O1", "-fPIC", "-fvisibility=hidden", "-Wno-unknown-pragmas", "-Wno-attributes",
            f"-I{CSRC}", f"-I{include}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
            '-DZIGSPARK_ARCHS="emulated"', f"-DZIGSPARK_MODULE_NAME={MODULE}"]


def build(out_root: Path | None = None, jobs: int | None = None, quiet: bool = False) -> Path:
    """Builds the module if its cached copy is missing or stale; returns the path of the .so."""
    include = cuda_include()
    if include is None:
        raise FileNotFoundError("no CUDA toolkit headers (cuda_fp16.h) found: set CUDA_HOME or put nvcc on PATH")
    compiler = os.environ.get("CXX", "g++")
    flags = _flags(include)
    sources = sorted(CSRC.rglob("*.cu")) + [CSRC / "bindings.cpp", CSRC / "emulate" / "emulator.cpp"]
    headers = sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh"))
    digest = hashlib.sha256(" ".join([compiler, *flags, sys.version]).encode())
    for path in sources + headers:
        digest.update(path.relative_to(CSRC).as_posix().encode() + b"\0" + path.read_bytes())
    out = (out_root or ROOT / "build" / "emulate") / digest.hexdigest()[:16]
    target = out / (MODULE + sysconfig.get_config_var("EXT_SUFFIX"))
    if target.exists():
        return target
    (out / "src").mkdir(parents=True, exist_ok=True)

    def compile_one(src: Path) -> Path:
        name = src.relative_to(CSRC).as_posix().replace("/", "__")
        if src.suffix == ".cu":
            text = f'#line 1 "{src.relative_to(ROOT).as_posix()}"\n' + rewrite(src.read_text())
            src = out / "src" / (name + ".cpp")
            src.write_text(text)
        obj = out / (name + ".o")
        cmd = [compiler, *flags, "-include", str(CSRC / "emulate" / "emulator.h"), "-c", str(src), "-o", str(obj)]
        if not quiet:
            print("zigspark emulator: compiling", name, file=sys.stderr, flush=True)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"emulator build failed on {src}:\n{' '.join(cmd)}\n{result.stdout}{result.stderr}")
        return obj

    jobs = jobs or int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        objects = list(pool.map(compile_one, sources))
    partial = target.with_suffix(".partial")
    cmd = [compiler, "-shared", "-o", str(partial), *map(str, objects)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"emulator link failed:\n{' '.join(cmd)}\n{result.stdout}{result.stderr}")
    partial.rename(target)  # atomic: a concurrent reader sees the whole module or none
    return target


if __name__ == "__main__":
    if cuda_include() is None:  # like the build tier without nvcc: the emulate tier then skips, saying why
        print("zigspark emulator: no CUDA toolkit headers here, not built", file=sys.stderr)
        sys.exit(0)
    print(build())
