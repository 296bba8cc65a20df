"""Deterministic train/test splits.

Unlabelled: one permutation π of range(N) from a torch.Generator seeded by seed; the first
⌊f·N + ½⌋ positions of π are the test set (f = test_fraction), the rest the training set.
Labelled: the same within each class c, in increasing order of c, from one generator, with
⌊f·N_c + ½⌋ test examples per class — a stratified split, so both sets keep the class proportions.

Train and test are disjoint and together cover range(N); "all" is range(N). Indices are returned in
increasing order, so a split keeps the source's order and identical arguments give identical tensors.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

SPLITS = ("train", "test", "all")


def _test_count(size: int, test_fraction: float) -> int:
    return int(math.floor(test_fraction * size + 0.5))


def split_indices(n: int, split: str, *, labels: Optional[torch.Tensor] = None, seed: int = 0,
                  test_fraction: float = 0.2) -> torch.Tensor:
    """Sorted LongTensor of the indices in `split` of a dataset of n examples (labels (n,) to stratify)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "all":
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    groups = [torch.arange(n)] if labels is None else [
        torch.nonzero(labels == c).flatten() for c in torch.unique(labels).tolist()]
    is_test = torch.zeros(n, dtype=torch.bool)
    for members in groups:
        order = members[torch.randperm(len(members), generator=generator)]
        is_test[order[:_test_count(len(members), test_fraction)]] = True
    chosen = torch.nonzero(is_test if split == "test" else ~is_test).flatten()
    if len(chosen) == 0:
        raise ValueError(f"the {split} split of these {n} images is empty with test_fraction={test_fraction}; "
                         f"use split='all' or a test_fraction that leaves images on both sides")
    return chosen
