"""Pure-PyTorch implementations: the CPU default and the numerics oracle of every kernel."""

from .stat_topk import stat_topk_backward, stat_topk_forward, stat_topk_threshold

__all__ = ["stat_topk_forward", "stat_topk_backward", "stat_topk_threshold"]
