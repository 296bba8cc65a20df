"""Build zigspark: a pure-Python package plus the optional CUDA extension ``zigspark._C``.

The extension is deliberately torch-ABI-independent: the ``.cu`` files include only CUDA headers, the
pybind11 binding takes raw device pointers, and cudart is linked statically. One ``_C`` therefore serves
every torch version of a given Python and CUDA major, and a torch upgrade never causes ``undefined symbol``.

Switches (environment variables):
  ZIGSPARK_CUDA        auto (default) | 1 | 0   build the extension if nvcc is found | always | never
  ZIGSPARK_CUDA_ARCHS  ';'-separated, e.g. "8.0+PTX;9.0a" (default). "+PTX" also embeds PTX for that
                       architecture so that newer GPUs can JIT it.
  MAX_JOBS             parallel nvcc processes (default: number of CPUs)
  CUDA_HOME            CUDA toolkit root (default: found from nvcc on PATH, then /usr/local/cuda)
"""

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
DEFAULT_ARCHS = "8.0+PTX;9.0a"


def _version() -> str:
    text = (ROOT / "python" / "zigspark" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def _cuda_mode() -> str:
    mode = os.environ.get("ZIGSPARK_CUDA", "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        sys.exit(f"zigspark: ZIGSPARK_CUDA must be auto, 1 or 0, got {mode!r}")
    return mode


def _find_cuda_home():
    """Return (cuda_home, nvcc) or (None, None). An explicit CUDA_HOME/CUDA_PATH is the only place looked."""
    explicit = [os.environ[v] for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    if explicit:
        candidates = [Path(explicit[0])]
    else:
        candidates = [Path("/usr/local/cuda")]
        nvcc_on_path = shutil.which("nvcc")
        if nvcc_on_path:
            candidates.insert(0, Path(nvcc_on_path).resolve().parent.parent)
    for home in candidates:
        nvcc = home / "bin" / "nvcc"
        if nvcc.exists() and (home / "include" / "cuda_runtime_api.h").exists():
            return home, nvcc
    return None, None


def parse_archs(spec: str):
    """'8.0+PTX;9.0a' -> nvcc -gencode flags and the names reported by zigspark._C.compiled_archs()."""
    flags, names = [], []
    for item in filter(None, (s.strip() for s in spec.replace(",", ";").split(";"))):
        ptx = item.upper().endswith("+PTX")
        item = item[:-4] if ptx else item
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d)([af]?)", item)
        if not m:
            sys.exit(f"zigspark: cannot parse ZIGSPARK_CUDA_ARCHS entry {item!r}; use e.g. '8.0;9.0a+PTX'")
        num = m.group(1) + m.group(2)
        suffix = m.group(3)
        flags.append(f"-gencode=arch=compute_{num}{suffix},code=sm_{num}{suffix}")
        names.append(f"sm_{num}{suffix}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num}{suffix},code=compute_{num}{suffix}")
            names.append(f"compute_{num}{suffix}")
    if not flags:
        sys.exit("zigspark: ZIGSPARK_CUDA_ARCHS is empty")
    return flags, names


class BuildCudaExt(build_ext):
    """Compile csrc/**/*.cu with nvcc, then let setuptools compile the pybind11 binding and link."""

    def build_extension(self, ext):
        cuda_home, nvcc = _find_cuda_home()
        arch_flags, arch_names = parse_archs(os.environ.get("ZIGSPARK_CUDA_ARCHS", DEFAULT_ARCHS))
        tmp = Path(self.build_temp) / "cuda"
        tmp.mkdir(parents=True, exist_ok=True)
        cu_files = sorted((ROOT / "csrc").rglob("*.cu"))
        common = [
            str(nvcc), "-c", "-O3", "-std=c++17", "-Xcompiler", "-fPIC",  # no fast-math: statistics round correctly
            f"-I{ROOT / 'csrc'}", "-lineinfo", *arch_flags,
        ]

        def compile_one(src: Path) -> str:
            obj = tmp / (src.relative_to(ROOT / "csrc").as_posix().replace("/", "__") + ".o")
            if obj.exists() and obj.stat().st_mtime > max(
                p.stat().st_mtime for p in [src, *(ROOT / "csrc").rglob("*.h*")]
            ):
                return str(obj)
            cmd = [*common, str(src), "-o", str(obj)]
            print("zigspark: nvcc", src.relative_to(ROOT), flush=True)
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src}:\n{' '.join(cmd)}\n{result.stdout}{result.stderr}")
            return str(obj)

        jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            objects = list(pool.map(compile_one, cu_files))

        ext.extra_objects = objects
        ext.include_dirs += [str(ROOT / "csrc"), str(cuda_home / "include")]
        ext.library_dirs += [str(cuda_home / "lib64"), str(cuda_home / "lib")]
        # Static cudart: no libcudart.so to find at run time, and no clash with torch's own copy.
        ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
        ext.define_macros += [("ZIGSPARK_ARCHS", '"' + ";".join(arch_names) + '"')]
        super().build_extension(ext)


def _extensions():
    mode = _cuda_mode()
    if mode == "0":
        print("zigspark: ZIGSPARK_CUDA=0, installing the pure-Python package (Triton and reference backends)")
        return [], {}
    cuda_home, _ = _find_cuda_home()
    if cuda_home is None:
        if mode == "1":
            sys.exit(
                "zigspark: ZIGSPARK_CUDA=1 but nvcc was not found (looked at $CUDA_HOME, $CUDA_PATH, nvcc on PATH, "
                "/usr/local/cuda). Install the CUDA toolkit or set CUDA_HOME, or build without the extension "
                "with ZIGSPARK_CUDA=0."
            )
        print("zigspark: nvcc not found, installing without the CUDA extension (Triton and reference backends); "
              "set CUDA_HOME to build it")
        return [], {}
    import pybind11

    ext = Extension(
        "zigspark._C",
        sources=["csrc/bindings.cpp"],
        include_dirs=[pybind11.get_include()],
        language="c++",
        extra_compile_args=["-O2", "-std=c++17", "-fvisibility=hidden"],
    )
    return [ext], {"build_ext": BuildCudaExt}


ext_modules, cmdclass = _extensions()

setup(
    name="zigspark",
    version=_version(),
    description="Fused GPU kernels for PyTorch: zigzag selective scan, statistical top-k, flash attention, token pruning",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # every package under python/ (models, data, train, ... included) plus the Triton kernels
    packages=find_packages("python") + ["zigspark.triton_kernels"],
    package_dir={"zigspark": "python/zigspark", "zigspark.triton_kernels": "triton_kernels"},
    package_data={"zigspark": ["auto_backends.json"]},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["zigspark=zigspark.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
