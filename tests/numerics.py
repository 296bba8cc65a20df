"""The numerics rule (flash-attention's), used by every kernel test.

A kernel output in dtype T is compared with the reference run in float64. Its largest error must be at
most `factor` times the largest error of the *same reference run in T* (2 for outputs, 3 for gradients),
plus a small floor for outputs that the low-precision reference happens to get exactly right.
"""

import torch

FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.numel() == 0:
        return 0.0
    worst = 0.0
    a, b = a.reshape(-1), b.reshape(-1)
    for start in range(0, a.numel(), _CHUNK):  # in slices: float64 copies of a multi-GB output would not fit
        diff = (a[start:start + _CHUNK].double() - b[start:start + _CHUNK].double()).abs()
        assert not torch.isnan(diff).any(), "NaN in the output: an element was not written, or overflowed"
        worst = max(worst, diff.max().item())
    return worst


_CHUNK = 1 << 26


def assert_by_rule(out, ref64, ref_lowp, *, factor=2.0, what="output", rel_floor=0.0):
    """`rel_floor` scales the floor with the output's magnitude, for long reductions (scans) where the
    kernel and the reference associate the same float32 sums differently."""
    err = max_abs_err(out, ref64)
    ref_err = max_abs_err(ref_lowp, ref64)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    bound = factor * ref_err + max(FLOOR[ref_lowp.dtype], rel_floor * scale)
    assert err <= bound, (f"{what}: max error {err:.3e} > {factor} x reference's own {ref_err:.3e} + floor "
                          f"(= {bound:.3e}) in {ref_lowp.dtype}")
    return err, ref_err
