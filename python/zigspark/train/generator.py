"""Training a generator by flow matching with the linear interpolant (rectified flow; ZigMa's objective).

    x₀ ~ data,   ε ~ N(0, I),   t ~ U(0, 1)          (or logit-normal: t = sigmoid(n), n ~ N(0, 1))
    x_t = (1 − t)·x₀ + t·ε,     v* = dx_t/dt = ε − x₀
    L(θ) = mean over the batch and pixels of (v_θ(x_t, t, y′) − v*)²

where y′ is the label, replaced by the null class with probability `model.class_dropout` (classifier-free
guidance needs the model to know the unconditional field too). AdamW with an optional linear warm-up of the
learning rate, gradient-norm clipping, an EMA of the weights (the weights one samples with), bf16 autocast
on CUDA (the loss itself in float32).

Determinism and resume. Step s (0-based) trains on zigspark.data.batch_indices(N, B, s, seed), a pure
function of s. t, ε and the label dropout of every step are drawn, in that order, for the whole global batch
from one torch.Generator on the training device whose state is checkpointed with the weights, the optimiser
state and the EMA. A run resumed from a checkpoint at step s therefore continues the exact loss trajectory
of an uninterrupted run (bitwise on the CPU; the test checks it). Under DDP every rank draws the same global
t and ε and keeps its slice, so the trajectory does not depend on the number of processes.

Divergence. Losses stay on the device and are read every `log_every` steps and before every checkpoint; a
non-finite loss (or weights) stops training with TrainingDiverged naming the first bad step. A checkpoint
is written only after its losses and weights have been checked, so the last good one is never overwritten.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from .ema import EMA
from .progress import ProgressLine, format_duration
from ..validation import check_int

TIME_SAMPLINGS = ("uniform", "logit_normal")
AMP_MODES = (None, "none", "bf16")


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/inf; the message names the step and the last good checkpoint."""

    def __init__(self, message: str, step: int, last_good_step: Optional[int]):
        super().__init__(message)
        self.step, self.last_good_step = step, last_good_step


@dataclass
class TrainResult:
    """What train_generator returns.

    losses: the loss of every step from step 1 (including steps done before a resume), global-batch mean.
    step: steps done in total. start_step: where this call started (0, or the step resumed from).
    seconds / images_per_s: wall time and throughput of this call's steps. model / ema: the trained model
    (unwrapped from DDP) and its EMA. out_dir: where the checkpoint is (None without one).
    """

    losses: List[float]
    step: int
    start_step: int
    seconds: float
    images_per_s: float
    model: nn.Module
    ema: EMA
    out_dir: Optional[Path] = None
    config: Dict[str, Any] = field(default_factory=dict)



def _check_float(name: str, value, minimum: float, *, inclusive: bool = True, maximum: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (not inclusive and value == minimum) or value > maximum:
        bound = f"{'>=' if inclusive else '>'} {minimum}" + (f" and <= {maximum}" if maximum < math.inf else "")
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


def _noise_seed(seed: int) -> int:
    # A stream of its own, unrelated to the data order drawn from the same user seed.
    digest = hashlib.sha256(f"zigspark/train/noise/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _resolve_device(device, ctx: distributed.DistContext) -> torch.device:
    if ctx.distributed:
        if device is not None and torch.device(device).type != ctx.device.type:
            raise ValueError(f"device={device!r} but the process group drives {ctx.device.type}; "
                             f"pass the same --device to every rank")
        return ctx.device
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use device='cpu'")
    return device


def _resolve_amp(amp, device: torch.device) -> Optional[str]:
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    if amp is None:
        return "bf16" if device.type == "cuda" else None
    if amp == "none":
        return None
    if device.type != "cuda":
        raise ValueError(f"amp='bf16' autocasts on CUDA only; on {device.type} use amp=None")
    return amp


def _weights_finite(model: nn.Module) -> bool:
    flags = [p.detach().isfinite().all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def _describe(model: nn.Module) -> str:
    params = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__} ({params / 1e6:.3f}M parameters)" if params >= 1e5 else \
        f"{type(model).__name__} ({params:,} parameters)"


def _model_config_differences(saved: Optional[dict], current: Optional[dict]) -> List[str]:
    """'field: checkpoint A, now B' for every architecture field that differs."""
    # The backend only says where the kernels run, not what the model is: a CPU run may resume on a GPU.
    saved, current = saved or {}, current or {}
    keys = sorted((set(saved) | set(current)) - {"backend"})
    return [f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def _resume(out_dir: Path, device: torch.device, model: nn.Module, model_class: str, model_config, training: dict,
            optimizer, ema: EMA, noise: torch.Generator, seed: int, say) -> tuple:
    """Load the checkpoint in out_dir into the model, optimiser, EMA and noise generator, after checking
    that it is the same model and the same data order; returns (steps done, their losses)."""
    ck = load_checkpoint(out_dir, map_location=device)
    differences = _model_config_differences(ck.config.get("model"), model_config)
    if differences or ck.config.get("model_class") != model_class:
        raise ValueError(f"{out_dir} holds a checkpoint of a different model ({ck.config.get('model_class')}; "
                         f"{'; '.join(differences) or 'same fields'}); use a new --out directory, or the same "
                         f"model configuration to resume")
    saved_training = ck.config.get("training", {})
    for key in ("batch_size", "seed", "time_sampling"):
        if saved_training.get(key) != training[key]:
            raise ValueError(f"{out_dir} was trained with {key}={saved_training.get(key)!r}, now {key}="
                             f"{training[key]!r}; resuming needs the same {key} (the data order and noise "
                             f"depend on it), or use a new --out directory")
    model.load_state_dict(ck.model_state)
    if ck.optimizer_state is not None:
        optimizer.load_state_dict(ck.optimizer_state)
    if ck.ema_state is not None:
        ema.load_state_dict(ck.ema_state, ck.state.get("ema", {}).get("num_updates"))
    start_step = int(ck.state.get("step", 0))
    losses = torch.as_tensor(ck.state.get("losses", []), dtype=torch.float64).tolist()[:start_step]
    rng = ck.state.get("noise_rng")
    if rng is not None and ck.state.get("noise_device") == device.type:
        noise.set_state(rng)
    else:       # a generator's state does not carry over between device types: a fresh, seeded stream
        noise.manual_seed(_noise_seed(seed) + start_step)
        if say:
            say(f"note: the checkpoint's noise stream was drawn on {ck.state.get('noise_device')}; "
                f"continuing on {device.type} with a fresh stream (the loss trajectory will differ)")
    if say:
        say(f"resuming from step {start_step} in {ck.path}")
    return start_step, losses


def flow_matching_batch(x0_all: torch.Tensor, labels_all: Optional[torch.Tensor], idx: torch.Tensor,
                        noise: torch.Generator, *, time_sampling: str = "uniform", drop_labels=None,
                        mine: slice = slice(None)):
    """One step's training pair: (x_t, t, y, target) for the rows `mine` of the global batch `idx`.

    t, ε and the label dropout are drawn for the whole global batch, in that order, from `noise` (on the
    training device), so every DDP rank draws the same numbers and keeps its slice.
    x0_all (N, ...) and labels_all (N,) may live on the host or on the device; the outputs are on the device.
    """
    device, batch = noise.device, idx.numel()
    t = (torch.rand(batch, generator=noise, device=device) if time_sampling == "uniform"
         else torch.sigmoid(torch.randn(batch, generator=noise, device=device)))
    eps = torch.randn((batch, *x0_all.shape[1:]), generator=noise, device=device)
    y = None
    if labels_all is not None:
        y = labels_all[idx.to(labels_all.device)].to(device)
        if drop_labels is not None:
            y = drop_labels(y, generator=noise)
        y = y[mine]
    x0 = x0_all[idx[mine].to(x0_all.device)].to(device, non_blocking=True)
    t, eps = t[mine], eps[mine]
    t_ = t.view(-1, *[1] * (x0.dim() - 1))
    return (1 - t_) * x0 + t_ * eps, t, y, eps - x0


def train_generator(data, model: nn.Module, *, steps: int, batch_size: int = 128, lr: float = 1e-3,
                    weight_decay: float = 0.0, warmup_steps: int = 0, ema_decay: float = 0.999,
                    grad_clip: Optional[float] = 1.0, seed: int = 0, time_sampling: str = "uniform",
                    out_dir=None, checkpoint_every: int = 500, log_every: int = 50, device=None, amp=None,
                    progress: Optional[Callable[[str], None]] = print,
                    run_config: Optional[Dict[str, Any]] = None) -> TrainResult:
    """Train `model` as a flow-matching velocity field on `data` for `steps` steps in total.

    Args:
        data: a zigspark.data.ImageSet (or anything with `.images` (N, C, H, W) — (N, T, C, H, W) clips for
            ZigMaVideo — in [−1, 1] and `.labels` (N,) long or None).
        model: forward(x (B, C, H, W), t (B,), y (B,) or None) → v (B, C, H, W), e.g. zigspark.models.ZigMa.
            Class-conditional when `model.num_classes` > 0 (then data.labels are required); `drop_labels`
            and `config` are used when present.
        steps: total number of optimiser steps; a resumed run continues up to it.
        batch_size: the global batch B (split evenly over DDP ranks).
        lr, weight_decay, warmup_steps: AdamW; the learning rate ramps linearly over `warmup_steps` steps.
        ema_decay: decay of the weight EMA (with warm-up, see zigspark.train.ema).
        grad_clip: max global gradient norm (None or 0: no clipping).
        seed: seeds the data order and the noise; the model's initialisation is the caller's business.
        time_sampling: "uniform" (t ~ U(0, 1)) or "logit_normal" (t = sigmoid(N(0, 1)), SD3's choice).
        out_dir: checkpoint directory; if it already holds a checkpoint, training resumes from it.
        checkpoint_every: write a checkpoint every this many steps (and always after the last step).
        log_every: read the losses and print a progress line every this many steps.
        device: "cpu", "cuda", "cuda:1" or None (CUDA when available; under torchrun cuda:LOCAL_RANK).
        amp: None (bf16 autocast on CUDA, off on the CPU), "bf16" or "none".
        progress: called with each progress line (rank 0 only); None for silence.
        run_config: extra JSON-able entries stored under "run" in config.json (e.g. the data arguments).

    Returns:
        TrainResult (losses per step, final step, throughput, the model and its EMA).

    Raises:
        TrainingDiverged: the loss or the weights became non-finite (the last good checkpoint is kept).
        ValueError / TypeError: a bad argument, or out_dir holds an incompatible checkpoint.
    """
    steps = check_int("steps", steps, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    warmup_steps = check_int("warmup_steps", warmup_steps, 0)
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, 1)
    log_every = check_int("log_every", log_every, 1)
    seed = check_int("seed", seed, 0)
    lr = _check_float("lr", lr, 0.0, inclusive=False)
    weight_decay = _check_float("weight_decay", weight_decay, 0.0)
    ema_decay = _check_float("ema_decay", ema_decay, 0.0, maximum=1.0)
    grad_clip = _check_float("grad_clip", grad_clip or 0.0, 0.0) or None
    if time_sampling not in TIME_SAMPLINGS:
        raise ValueError(f"time_sampling must be one of {TIME_SAMPLINGS}, got {time_sampling!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    images, labels = getattr(data, "images", None), getattr(data, "labels", None)
    if not isinstance(images, torch.Tensor) or images.dim() not in (4, 5) or images.shape[0] == 0:
        raise ValueError("data must have .images, a non-empty float tensor (N, C, H, W) in [-1, 1] (or "
                         "(N, T, C, H, W) clips for ZigMaVideo), e.g. zigspark.data.load_images('digits')")
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes and labels is None:
        raise ValueError(f"the model is class-conditional (num_classes={num_classes}) but the data has no labels; "
                         f"build an unconditional model (num_classes=0, --no-class-cond) or use labelled data")
    if not num_classes:
        labels = None

    ctx = distributed.current_context()
    device = _resolve_device(device, ctx)
    amp = _resolve_amp(amp, device)
    if batch_size % ctx.world_size:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of processes "
                         f"({ctx.world_size}): each rank takes batch_size / world_size images")
    say = progress if ctx.is_main else None
    out_dir = Path(out_dir) if out_dir is not None else None

    from ..data import batch_indices      # the data package imports optional libraries lazily; keep it cheap

    model = model.to(device)
    # DDP broadcasts rank 0's weights here, before the EMA copies them: every replica starts identical.
    net = distributed.wrap_model(model, ctx)
    model_config = getattr(model, "config", None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                  fused=device.type == "cuda")
    ema = EMA(model, decay=ema_decay)
    noise = torch.Generator(device=device).manual_seed(_noise_seed(seed))
    losses: List[float] = []
    start_step = 0
    training = {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                "warmup_steps": warmup_steps, "ema_decay": ema_decay, "grad_clip": grad_clip, "seed": seed,
                "time_sampling": time_sampling, "amp": amp, "world_size": ctx.world_size}
    config = {"kind": "generator", "model_class": type(model).__name__, "model": model_config,
              "training": training,
              "data": {"name": getattr(data, "name", None), "num_images": int(images.shape[0]),
                       "shape": list(images.shape[1:]), "num_classes": int(getattr(data, "num_classes", 0) or 0),
                       "class_names": getattr(data, "class_names", None)},
              "run": dict(run_config or {})}

    resume = distributed.broadcast_flag(out_dir is not None and has_checkpoint(out_dir), ctx)
    if resume:
        if not has_checkpoint(out_dir):
            raise RuntimeError(f"rank {ctx.rank} cannot see the checkpoint in {out_dir} that rank 0 resumes from; "
                               f"every rank must share the --out filesystem")
        start_step, losses = _resume(out_dir, device, model, type(model).__name__, model_config, training,
                                     optimizer, ema, noise, seed, say)
    for group in optimizer.param_groups:          # the caller's values win over the checkpoint's
        group["weight_decay"] = weight_decay

    if say:
        classes = f", {num_classes} classes + null" if num_classes else ", unconditional"
        say(f"training {_describe(model)} on {config['data']['name'] or 'data'} ({images.shape[0]} images "
            f"{'x'.join(map(str, images.shape[1:]))}{classes}) for {steps} steps, batch {batch_size}"
            f"{f' ({batch_size // ctx.world_size} per rank x {ctx.world_size})' if ctx.distributed else ''}, "
            f"lr {lr:g}, on {device}{', bf16 autocast' if amp else ''}")
    if start_step >= steps:
        if say:
            say(f"already trained to step {start_step} >= steps={steps}; nothing to do")
        return TrainResult(losses, start_step, start_step, 0.0, 0.0, model, ema, out_dir, config)

    # Small datasets live on the device; large ones are indexed on the host and copied per batch.
    if device.type != "cpu" and images.element_size() * images.numel() <= 1 << 30:
        images = images.to(device)
        labels = labels.to(device) if labels is not None else None
    per_rank = batch_size // ctx.world_size
    mine = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
    net.train()
    drop_labels = getattr(model, "drop_labels", None)
    line = ProgressLine(steps, batch_size, say, start_step=start_step)
    pending: List[torch.Tensor] = []
    window: List[float] = []
    last_good = start_step if resume else None
    t_start = time.perf_counter()

    def read_losses(step_done: int) -> None:
        """Move the pending losses to the host; stop at the first non-finite one."""
        values = torch.stack(pending).tolist() if pending else []
        pending.clear()
        first = step_done - len(values) + 1
        for k, value in enumerate(values):
            if not math.isfinite(value):
                _diverged(f"loss is {value} at step {first + k}", first + k)
        losses.extend(values)
        window.extend(values)

    def _diverged(what: str, step_no: int):
        kept = (f"the last good checkpoint (step {last_good}) is kept in {out_dir}" if last_good is not None
                else "no checkpoint had been written yet" if out_dir is not None else "no out_dir was given")
        raise TrainingDiverged(f"{what}; {kept}; lower the learning rate (now {lr:g}), keep gradient clipping on "
                               f"(now {grad_clip}), or check the data for NaN/inf", step_no, last_good)

    for step in range(start_step, steps):
        step_no = step + 1
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step_no / warmup_steps) if warmup_steps else lr
        x_t, t, y, target = flow_matching_batch(images, labels, batch_indices(images.shape[0], batch_size, step, seed),
                                                noise, time_sampling=time_sampling, drop_labels=drop_labels,
                                                mine=mine)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
            v = net(x_t, t, y)
        loss = F.mse_loss(v.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        ema.update()
        pending.append(distributed.all_reduce_mean(loss.detach(), ctx))

        checkpoint_due = out_dir is not None and (step_no % checkpoint_every == 0 or step_no == steps)
        if step_no % log_every == 0 or step_no == steps or checkpoint_due:
            read_losses(step_no)
            if step_no % log_every == 0 or step_no == steps:
                line.report(step_no, sum(window) / len(window))
                window.clear()
        if checkpoint_due:
            if not _weights_finite(model):
                _diverged(f"the weights became non-finite after step {step_no}", step_no)
            if ctx.is_main:
                save_checkpoint(out_dir, model=model, config=config, ema=ema, optimizer=optimizer,
                                state={"step": step_no, "last_loss": losses[-1], "noise_rng": noise.get_state(),
                                       "noise_device": device.type, "ema": ema.extra_state(),
                                       # float64 holds the float32 losses exactly; a tensor stays out of state.json
                                       "losses": torch.tensor(losses, dtype=torch.float64)})
            last_good = step_no

    seconds = time.perf_counter() - t_start
    done = steps - start_step
    images_per_s = done * batch_size / max(seconds, 1e-9)
    if say:
        say(f"trained {done} steps in {format_duration(seconds)} ({images_per_s:.1f} img/s, "
            f"{seconds / done:.3f} s/step); final loss {losses[-1]:.4f}"
            + (f"; checkpoint in {out_dir}" if out_dir is not None else ""))
    return TrainResult(losses, steps, start_step, seconds, images_per_s, model, ema, out_dir, config)
