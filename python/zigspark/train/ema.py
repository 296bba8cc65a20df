"""Exponential moving average of a model's weights (Polyak averaging), the weights generators sample with.

    θ̄ ← d_n · θ̄ + (1 − d_n) · θ            after the n-th optimiser step (n = 1, 2, …)
    d_n = min(decay, (1 + n) / (10 + n))    with warmup;  d_n = decay without

The warmup keeps the average from being dominated by the random initial weights during the first steps
(d_1 ≈ 0.18, d_10 = 0.55, d_100 ≈ 0.93, reaching 0.999 near n = 9,000). Floating-point parameters are
averaged; buffers (and integer tensors) are copied as they are. The average keeps the model's state_dict
names, so `model.load_state_dict(ema.state_dict())` — or ema.copy_to(model) — gives the averaged model.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .distributed import unwrap_model


class EMA:
    """EMA of `model`'s weights.

    Args:
        model: the module being trained (DDP-wrapped is fine); the average starts as a copy of its weights.
        decay: the long-run decay d in [0, 1) (0.999 ≈ an average over the last ~1,000 steps).
        warmup: use d_n = min(decay, (1 + n)/(10 + n)) (see the module docstring).

    Example:
        >>> ema = EMA(model, decay=0.999)
        >>> loss.backward(); optimizer.step(); ema.update()
        >>> ema.copy_to(sampling_model)
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}; 0.999 is a common choice")
        self.model = model
        self.decay, self.warmup, self.num_updates = float(decay), bool(warmup), 0
        module = unwrap_model(model)
        self._averaged = {name for name, p in module.named_parameters() if p.is_floating_point()}
        self.shadow: Dict[str, torch.Tensor] = {
            name: t.detach().clone() for name, t in module.state_dict().items()}

    def current_decay(self, num_updates: Optional[int] = None) -> float:
        """d_n for the n-th update (default: the next one)."""
        n = self.num_updates + 1 if num_updates is None else num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: Optional[nn.Module] = None) -> None:
        """Fold the current weights of `model` (default: the tracked model) into the average."""
        decay = self.current_decay()
        for name, t in unwrap_model(model if model is not None else self.model).state_dict().items():
            if name in self._averaged:
                self.shadow[name].lerp_(t.detach(), 1.0 - decay)
            else:
                self.shadow[name].copy_(t)
        self.num_updates += 1

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The averaged weights, with the model's state_dict names (what ema.safetensors stores)."""
        return dict(self.shadow)

    def load_state_dict(self, state: Dict[str, torch.Tensor], num_updates: Optional[int] = None) -> None:
        """Restore the average (and the update count, which drives the warmup)."""
        missing, unexpected = self.shadow.keys() - state.keys(), state.keys() - self.shadow.keys()
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        with torch.no_grad():
            for name, t in state.items():
                self.shadow[name].copy_(t)
        if num_updates is not None:
            self.num_updates = int(num_updates)

    def extra_state(self) -> dict:
        """JSON-able counters to checkpoint next to the weights."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates}

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the averaged weights into `model` (same architecture); returns it."""
        unwrap_model(model).load_state_dict(self.shadow)
        return model
