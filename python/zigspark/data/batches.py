"""A deterministic, resumable, infinite stream of minibatch indices.

The stream is the concatenation of one random permutation of range(n) per epoch,

    stream = π₀ ‖ π₁ ‖ π₂ ‖ …,      π_e = randperm(n, generator seeded by derive_seed(seed, e)),

and global step s takes the batch_size consecutive positions p = s·B, …, s·B + B − 1 of it; position p
belongs to epoch e = p // n at offset p mod n. Every epoch therefore visits every example exactly once, no
example is dropped when B does not divide n, and B may exceed n. A batch that straddles an epoch boundary
takes the tail of π_e and the head of π_{e+1}.

batch_indices is a pure function of (n, batch_size, step, seed): a training run resumed at step s draws
exactly the batches that an uninterrupted run would have drawn, with no iterator state to checkpoint
beyond the step counter.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import torch

from ..validation import check_int
from ._seeds import derive_seed



@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    # Cached because consecutive steps reuse one epoch's permutation; callers only index it (a copy).
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return torch.randperm(n, generator=generator)


def batch_indices(n: int, batch_size: int, step: int, seed: int = 0) -> torch.Tensor:
    """Indices of the minibatch of global step `step` (see the module docstring for the stream).

    Args:
        n: dataset size (>= 1).
        batch_size: examples per batch (>= 1; may exceed n).
        step: global step (>= 0), counted from the start of training.
        seed: seed of the stream (any int >= 0).

    Returns:
        LongTensor (batch_size,) on the CPU with values in [0, n).

    Example:
        >>> idx = batch_indices(1797, 64, step=1000, seed=0)
        >>> x, y = data.images[idx], data.labels[idx]
    """
    check_int("n", n, 1)
    check_int("batch_size", batch_size, 1)
    check_int("step", step, 0)
    check_int("seed", seed, 0)
    start = step * batch_size
    first_epoch, offset = divmod(start, n)
    last_epoch = (start + batch_size - 1) // n
    stream = torch.cat([_epoch_permutation(n, seed, e) for e in range(first_epoch, last_epoch + 1)])
    return stream[offset:offset + batch_size].clone()


def batch_stream(n: int, batch_size: int, seed: int = 0, start_step: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """Endless (step, indices) pairs from `start_step` on: batch_indices(n, batch_size, step, seed) in turn."""
    check_int("start_step", start_step, 0)
    step = start_step
    while True:
        yield step, batch_indices(n, batch_size, step, seed)
        step += 1
