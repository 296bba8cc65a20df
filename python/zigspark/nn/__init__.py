"""torch.nn modules built on zigspark's ops."""

from .zigzag_mamba import ZigzagMamba

__all__ = ["ZigzagMamba"]
