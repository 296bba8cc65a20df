"""Ahead-of-time compiles of the Triton kernels for Hopper (sm_90a), on a machine without a GPU.

Triton's interpreter runs a kernel's Python, not its compile: whether a tile lowers for the target, how many
registers it takes, whether ptxas spills and how much shared memory it asks for only show when it is
compiled for real. `compiling()` replaces the launch of every Triton kernel by that compile: Triton's own
binder specialises the arguments (pointer dtypes and alignment, integer specialisation, constexprs) exactly as
a launch would, its CUDA backend compiles for the target, ptxas reports registers and spills, and nothing
runs. Inside the block the ops take CPU tensors with backend="triton" and tuning on, so each op's own launch
logic picks the configurations (every tuning candidate is compiled); their outputs are unwritten memory.

The compiles are what an H100/H200 with the same Triton would build: Triton compiles with its bundled ptxas
there too.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
import time
from dataclasses import dataclass, field

import pytest

from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile, make_backend
from triton.runtime import jit

from zigspark import backends
from zigspark.triton_kernels import _tune

HOPPER = GPUTarget("cuda", 90, 32)
# Dynamic shared memory one block may use on sm_90 (227 KiB): a tile asking for more cannot launch.
HOPPER_SHARED_BYTES = 232448


@dataclass(frozen=True)
class Compiled:
    kernel: str
    config: str          # constexprs, warps and stages
    registers: int
    spill_bytes: int     # ptxas spill stores, bytes per thread
    shared_bytes: int
    seconds: float

    def __str__(self):
        return (f"{self.kernel} [{self.config}]: {self.registers} registers, {self.spill_bytes} B spilled, "
                f"{self.shared_bytes} B shared, {self.seconds:.1f} s")


@dataclass
class Record:
    compiled: dict[tuple, Compiled] = field(default_factory=dict)
    failed: dict[tuple, str] = field(default_factory=dict)

    def kernels(self) -> set[str]:
        return {c.kernel for c in self.compiled.values()}


def _ptxas_usage(log: str) -> tuple[int, int]:
    """(registers, spill-store bytes) from the ptxas -v log of one compile (one kernel)."""
    registers = re.search(r"Used (\d+) registers", log)
    if registers is None:
        raise AssertionError(f"no ptxas resource line in the log:\n{log}")
    spills = re.search(r"(\d+) bytes spill stores", log)
    return int(registers.group(1)), int(spills.group(1)) if spills else 0


def _describe(fn, constexprs: dict, options) -> str:
    """The constexprs by name (integers of value 1 are among them: Triton specialises those), warps, stages."""
    values = {fn.arg_names[path[0]]: value for path, value in constexprs.items()}
    names = " ".join(f"{name}={values[name]}" for name in fn.arg_names if name in values)
    return f"{names} warps={options.num_warps} stages={options.num_stages}"


@contextlib.contextmanager
def compiling(target: GPUTarget = HOPPER):
    """Inside the block, launching a Triton kernel compiles it for `target` instead (once per specialisation)
    and records it in the yielded Record; a compile error is recorded, not raised."""
    record = Record()
    backend = make_backend(target)
    binders: dict[int, object] = {}

    def compile_launch(fn, *args, grid, warmup, **kwargs):
        kwargs.setdefault("debug", False)
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = binders.setdefault(id(fn), jit.create_function_from_signature(fn.signature, fn.params, backend))
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        key = (fn.__name__, str(signature), str(sorted(constexprs.items(), key=str)), str(attrs),
               options.num_warps, options.num_stages)
        if key in record.compiled or key in record.failed:
            return None
        config = _describe(fn, constexprs, options)
        start, log = time.perf_counter(), io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                kernel = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                        options=options.__dict__)
            registers, spills = _ptxas_usage(log.getvalue())
        except Exception as error:  # noqa: BLE001  (recorded: the test reports every failing compile)
            record.failed[key] = f"{fn.__name__} [{config}]: {type(error).__name__}: {error}"[:4000]
            return None
        record.compiled[key] = Compiled(fn.__name__, config, registers, spills, kernel.metadata.shared,
                                        time.perf_counter() - start)
        return None

    with tempfile.TemporaryDirectory(prefix="zigspark-aot-") as cache, pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_CACHE_DIR", cache)                  # a fresh cache, so ptxas runs (and logs)
        patch.setenv("TRITON_DUMP_PTXAS_LOG", "1")               # for every compile
        patch.setattr(jit.JITFunction, "run", compile_launch)
        patch.setattr(backends, "_triton_reason", lambda device: None)  # CPU tensors stand in for CUDA ones
        patch.setattr(_tune, "enabled", lambda: True)            # every tuning candidate is compiled ...
        patch.setattr(_tune, "_time", lambda run, blocks: (run(blocks), 1.0)[1])  # ... and none is timed
        patch.setattr(_tune, "_best", {})
        yield record
