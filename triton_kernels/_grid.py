"""Launch grids larger than CUDA allows in one launch.

The attention kernels put batch·heads on the grid's second axis, which CUDA caps at 65535 programs (the
first axis takes 2³¹ − 1). Batches with more programs than that launch once per slice of the batch; the
kernels address everything through batch strides (and lse-like outputs, (batch, heads, seqlen)
contiguous, through views of the slice), so a slice is a smaller call of the same kernel.
"""

from __future__ import annotations

GRID_Y_MAX = 65535


def batch_slices(batch: int, per_sample: int) -> list[tuple[slice, int]]:
    """(slice of range(batch), its programs on grid axis 1): at most GRID_Y_MAX // per_sample samples a
    slice, one slice when the batch fits."""
    if per_sample > GRID_Y_MAX:
        raise ValueError(f"{per_sample} heads is more than the {GRID_Y_MAX} the Triton kernels can launch for one "
                         "sample; use fewer heads (or backend='reference')")
    step = GRID_Y_MAX // max(1, per_sample)
    return [(slice(start, min(batch, start + step)), (min(batch, start + step) - start) * per_sample)
            for start in range(0, max(batch, 1), step)]


def split_range(total: int, splits: int, step: int) -> tuple[int, int]:
    """(size, count): about `splits` pieces of range(total) in whole multiples of `step`, recounted so that
    no piece is empty (the last may be short)."""
    if splits < 1 or total < 1 or step < 1:
        raise ValueError(f"need total >= 1, splits >= 1 and step >= 1, got total={total}, splits={splits}, "
                         f"step={step}")
    def cdiv(a, b):
        return -(-a // b)

    size = cdiv(cdiv(total, splits), step) * step
    return size, cdiv(total, size)
