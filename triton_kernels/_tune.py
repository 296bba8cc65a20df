"""Block sizes for the Triton kernels: time the candidates once per shape bucket and keep the fastest.

A launcher lists its candidate `Blocks`, the hand-picked one first, and calls
`launch(name, key, candidates, run)`, where run(blocks) launches the kernel with those blocks. The first time
a (name, key) is seen on a GPU, every candidate is timed with triton.testing.do_bench, and the fastest is
remembered for the process. A candidate that fails (does not fit the device, or timing runs out of memory)
counts as infinitely slow; if all do, the first runs untimed and nothing is remembered. The launcher rounds the
key, for example sequence lengths to powers of two, so a training loop tunes once and a new length in the same
range reuses the choice.

The first candidate runs, with nothing timed:
  - in the Triton interpreter, where timing means nothing;
  - with ZIGSPARK_AUTOTUNE=0. The test tiers set this, because tuning every test shape would compile every
    candidate for every shape;
  - while a CUDA graph is being captured, where synchronising to time would break the capture (a bucket
    tuned before the capture keeps its tile).
`pinned(name, blocks)` forces one candidate. Tests use it to check each candidate against the reference.

Choices can be carried between processes: `tiles()` is the table of what this process tuned (and loaded),
`use_tiles(table)` makes later calls take those tiles without timing, even with tuning off, and
ZIGSPARK_TUNED_TILES=path.json (written by `save_tiles`) loads a table at the first launch. Timing differs
from process to process, so without this two DDP ranks or two runs can pick different tiles, and results
that differ in the last bits. The table leaves out the device index: one tuned on cuda:0 serves every rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from typing import Callable, Mapping, NamedTuple, Sequence

import torch

from .. import backends

ENV = "ZIGSPARK_AUTOTUNE"
TILES_ENV = "ZIGSPARK_TUNED_TILES"


class Blocks(NamedTuple):
    block_m: int      # query rows per tile
    block_n: int      # key rows per tile
    num_warps: int
    num_stages: int = 3


_best: dict[tuple, Blocks] = {}
_pinned: dict[str, Blocks] = {}
_loaded: dict[str, Blocks] = {}      # label (the key without the device) -> tile, from use_tiles
_env_loaded = False


def enabled() -> bool:
    return os.environ.get(ENV, "1") not in ("", "0") and not backends.triton_interpreting()


def bucket(n: int) -> int:
    """n rounded up to a power of two: the part of a size that a tuning key keeps."""
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def fit(candidates: Sequence[Blocks], seqlen_m: int, seqlen_n: int) -> list[Blocks]:
    """The candidates with tiles no longer than the sequences need (but at least 16, tl.dot's smallest
    operand), in order, without repeats."""
    cap_m, cap_n = max(16, bucket(seqlen_m)), max(16, bucket(seqlen_n))
    fitted = [b._replace(block_m=min(b.block_m, cap_m), block_n=min(b.block_n, cap_n)) for b in candidates]
    return list(dict.fromkeys(fitted))


def launch(name: str, key: tuple, candidates: Sequence[Blocks], run: Callable[[Blocks], None],
           device: torch.device) -> Blocks:
    """Run `run` with the best candidate for (name, device, key); returns the Blocks it ran with."""
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        blocks = _pick(name, (name, str(device), *key), candidates, run, device)
        run(blocks)
    return blocks


def _pick(name, full_key, candidates, run, device) -> Blocks:
    if name in _pinned:
        return _pinned[name]
    _load_env_once()
    loaded = _loaded.get(_label(full_key))
    if loaded in candidates:   # a tile this version no longer lists is passed over, and tuning decides
        return loaded
    if len(candidates) == 1 or not enabled():
        return candidates[0]
    if full_key in _best:
        return _best[full_key]
    if _capturing(device):   # what eager calls would take; timing would break the capture
        return candidates[0]
    timings = {b: _time(run, b) for b in candidates}
    blocks = min(timings, key=timings.get)
    if math.isinf(timings[blocks]):
        # nothing could be timed (out of memory for do_bench's buffers, say): the hand-picked tile, untimed,
        # and not remembered, so a later call tries again; if it cannot run either, its own error is raised
        return candidates[0]
    _best[full_key] = blocks
    return blocks


def _spell(b: Blocks) -> str:
    return f"{b.block_m}x{b.block_n} w{b.num_warps} s{b.num_stages}"


_SPELLING = re.compile(r"(\d+)x(\d+) w(\d+) s(\d+)")


def _label(full_key: tuple) -> str:
    name, _device, *key = full_key
    return " ".join(map(str, (name, *key)))


def chosen() -> dict[str, str]:
    """What tuning picked in this process, readable: {"name device key...": "BLOCK_M×BLOCK_N w.. s.."}."""
    return {" ".join(map(str, k)): _spell(b) for k, b in _best.items()}


def tiles() -> dict[str, str]:
    """The tiles this process runs per kernel and shape bucket, tuned or loaded, keyed without the device:
    {"attention.fwd torch.bfloat16 128 4096 4096 64 False": "64x64 w4 s3", ...}; `use_tiles` takes it."""
    table = {label: _spell(b) for label, b in _loaded.items()}
    table.update({_label(k): _spell(b) for k, b in _best.items()})
    return table


def use_tiles(table: Mapping[str, str]) -> None:
    """Run the tiles of `table` (from `tiles()`, in this or another process) from now on, without timing."""
    parsed = {}
    for label, spelled in table.items():
        match = _SPELLING.fullmatch(str(spelled))
        if match is None:
            raise ValueError(f"tuned tile {spelled!r} for {label!r} is not spelled 'MxN wW sS' (e.g. '64x64 w4 s3'); "
                             "pass the table that zigspark.tuning.tiles() returns")
        parsed[str(label)] = Blocks(*map(int, match.groups()))
    _loaded.update(parsed)


def save_tiles(path: str) -> None:
    """Write `tiles()` to a JSON file that `load_tiles` or ZIGSPARK_TUNED_TILES=path reads back."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    with open(path, "w") as f:
        json.dump({"device": device, "tiles": tiles()}, f, indent=1, sort_keys=True)


def load_tiles(path: str) -> None:
    """`use_tiles` on the table in a file written by `save_tiles`."""
    try:
        with open(path) as f:
            saved = json.load(f)
        table = saved["tiles"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read tuned tiles from {path!r} ({e}); write the file with "
                         "zigspark.tuning.save_tiles(path)") from e
    use_tiles(table)


def _load_env_once() -> None:
    global _env_loaded
    if not _env_loaded:
        _env_loaded = True
        path = os.environ.get(TILES_ENV)
        if path:
            load_tiles(path)


@contextlib.contextmanager
def pinned(name: str, blocks: Blocks):
    """Launch kernel `name` with `blocks` inside the block, tuned or not."""
    before = _pinned.get(name)
    _pinned[name] = blocks
    try:
        yield
    finally:
        if before is None:
            del _pinned[name]
        else:
            _pinned[name] = before


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _time(run: Callable[[Blocks], None], blocks: Blocks) -> float:
    """Median milliseconds of run(blocks); inf when the candidate fails in any way (does not compile, does not
    fit the device, or timing runs out of memory): tuning must never fail a call that the first tile serves."""
    import triton.testing

    try:
        return float(triton.testing.do_bench(lambda: run(blocks), warmup=5, rep=20, return_mode="median"))
    except Exception:  # noqa: BLE001
        return math.inf
