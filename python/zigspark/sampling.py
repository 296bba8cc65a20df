"""ODE sampling of flow-matching models (the house convention: x_t = (1 − t)·x₀ + t·ε, v = ε − x₀).

Samples solve dx/dt = v(x, t, y) from t = 1, x ~ N(0, I), down to t = 0 on the uniform grid
t_i = 1 − i/steps, i = 0..steps, with h = t_{i+1} − t_i = −1/steps:

    Euler (1st order):  x_{i+1} = x_i + h·v(x_i, t_i)
    Heun  (2nd order):  x̃ = x_i + h·v(x_i, t_i),   x_{i+1} = x_i + h/2·(v(x_i, t_i) + v(x̃, t_{i+1}))

Heun is used on every step, the last one included: unlike a diffusion denoiser at σ = 0, the flow
matching velocity is defined at t = 0 (it is E[ε − x₀ | x₀ = x]), so the last corrector is valid and keeps
the global error O(h²) — 2·steps model evaluations in all.

Classifier-free guidance with scale s:  v = v(x, t, ∅) + s·(v(x, t, y) − v(x, t, ∅)), where ∅ is the null
class (label num_classes); the conditional and null halves run as one batch of 2B. s = 1 is plain
conditional sampling (one forward of B).

Determinism: the noise of all `num` samples (and random labels) come from one torch.Generator seeded by
`seed`, drawn on the CPU before batching, so a seed gives the same samples whatever batch_size or device
(up to the device's float arithmetic).
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional

import torch

from .validation import check_int

SOLVERS = ("euler", "heun")


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def resolve_labels(labels, num: int, num_classes: int, generator: torch.Generator) -> Optional[torch.Tensor]:
    """labels argument → (num,) LongTensor on the CPU, or None for an unconditional model.

    None: uniformly random classes for a conditional model (drawn from `generator`), None for an
    unconditional one. An int: that class for every sample (num_classes = the null class, i.e.
    unconditional samples of a conditional model). A tensor or sequence: one label per sample.
    """
    if num_classes == 0:
        if labels is not None:
            raise ValueError("labels were given but the model is unconditional (num_classes=0); pass labels=None")
        return None
    if labels is None:
        return torch.randint(0, num_classes, (num,), generator=generator)
    if isinstance(labels, numbers.Integral) and not isinstance(labels, bool):
        labels = torch.full((num,), int(labels), dtype=torch.long)
    elif isinstance(labels, (list, tuple)):
        labels = torch.tensor(labels, dtype=torch.long)
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        raise TypeError(f"labels must be None, an int or a LongTensor of length num={num}, got "
                        f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    labels = labels.detach().to("cpu", torch.long).reshape(-1)
    if labels.numel() != num:
        raise ValueError(f"labels must hold one label per sample: expected {num}, got {labels.numel()}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1} (or {num_classes} for the null class), got "
                         f"values in {int(labels.min())}..{int(labels.max())}")
    return labels


def guided_velocity(model, x: torch.Tensor, t: float, y: Optional[torch.Tensor], cfg_scale: float,
                    null_class: int) -> torch.Tensor:
    """v(x, t, y), or v_null + cfg_scale·(v_y − v_null) with both halves in one forward. x: (B, *sample_shape)."""
    batch = x.shape[0]
    # float32 times even for a bf16 model (bf16 cannot tell t = 0.95 from 0.953); float64 for a float64 model
    times = torch.full((batch,), t, device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if y is None or cfg_scale == 1.0:
        return model(x, times, y)
    null = torch.full_like(y, null_class)
    v_cond, v_null = model(torch.cat([x, x]), torch.cat([times, times]), torch.cat([y, null])).chunk(2)
    return v_null + cfg_scale * (v_cond - v_null)


def _check_arguments(model, num, steps, solver, cfg_scale, batch_size):
    for name, value, minimum in (("num", num, 0), ("steps", steps, 1), ("batch_size", batch_size, 1)):
        check_int(name, value, minimum)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, numbers.Real):
        raise TypeError(f"cfg_scale must be a number, got {type(cfg_scale).__name__}")
    for attribute in ("sample_shape", "num_classes"):
        if not hasattr(model, attribute):
            raise TypeError(f"model must expose `{attribute}` (as zigspark.models.ZigMa does); "
                            f"{type(model).__name__} has none")
    if cfg_scale != 1.0 and model.num_classes == 0:
        raise ValueError(f"cfg_scale={cfg_scale} needs a class-conditional model; this one is unconditional "
                         f"(num_classes=0): use cfg_scale=1.0")


@torch.no_grad()
def sample(model, num: int, *, steps: int = 20, solver: str = "euler", cfg_scale: float = 1.0, labels=None,
           seed: int = 0, batch_size: int = 256, device=None,
           progress: Optional[Callable[[int, int], None]] = None, return_labels: bool = False):
    """Draw `num` samples from a flow-matching model by integrating dx/dt = v from t = 1 to t = 0.

    Args:
        model: v(x (B, *sample_shape), t (B,), y (B,) or None) with attributes `sample_shape` and
            `num_classes` (zigspark.models.ZigMa / ZigMaVideo). Run in eval mode (restored afterwards).
        num: number of samples.
        steps: solver steps (Heun evaluates the model twice per step).
        solver: "euler" or "heun".
        cfg_scale: classifier-free guidance scale s (1 = none); needs a conditional model.
        labels: None (random classes for a conditional model, none for an unconditional one), an int (every
            sample; num_classes = the null class), or a LongTensor / list of length num.
        seed: seeds the noise and random labels (same seed → same samples, whatever batch_size).
        batch_size: samples per model call (a guided call runs 2·batch_size).
        device: where to run (default: the model's device).
        progress: called as progress(done, total) after each solver step of each batch.
        return_labels: also return the labels used ((num,) long, or None).

    Returns:
        (num, *sample_shape) float tensor on `device`, clamped to [-1, 1] (and the labels if asked).
    """
    _check_arguments(model, num, steps, solver, cfg_scale, batch_size)
    device = torch.device(device) if device is not None else _model_device(model)
    dtype = _model_dtype(model)
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((num, *model.sample_shape), generator=generator)
    labels = resolve_labels(labels, num, model.num_classes, generator)

    grid = [1.0 - i / steps for i in range(steps + 1)]
    batches = -(-num // batch_size)
    total, done = steps * batches, 0
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, num, batch_size):
            x = noise[start:start + batch_size].to(device=device, dtype=dtype)
            y = None if labels is None else labels[start:start + batch_size].to(device)
            velocity = lambda x_, t_: guided_velocity(model, x_, t_, y, cfg_scale, model.num_classes)  # noqa: E731
            for t_now, t_next in zip(grid[:-1], grid[1:]):
                h = t_next - t_now
                v = velocity(x, t_now).to(dtype)
                if solver == "euler":
                    x = x + h * v
                else:
                    v_next = velocity(x + h * v, t_next).to(dtype)
                    x = x + (0.5 * h) * (v + v_next)
                done += 1
                if progress is not None:
                    progress(done, total)
            out.append(x.clamp(-1.0, 1.0))
    finally:
        model.train(was_training)
    images = torch.cat(out) if out else noise.to(device=device, dtype=dtype)
    return (images, labels) if return_labels else images


def save_samples(images: torch.Tensor, out_path_png, labels: Optional[torch.Tensor] = None):
    """Write (N, C, H, W) samples in [-1, 1] as a PNG grid (zigspark.data.save_image_grid); returns the path.
    With labels, the samples are grouped by class, one class per row when every class has the same count."""
    from .data import save_image_grid

    nrow = None
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1).cpu()
        order = torch.sort(labels, stable=True).indices
        images = images[order.to(images.device)]
        counts = torch.bincount(labels).tolist()
        present = [c for c in counts if c]
        if present and all(c == present[0] for c in present):
            nrow = present[0]
    return save_image_grid(images, out_path_png, nrow=nrow)
