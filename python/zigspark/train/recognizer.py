"""Training the ViT recognizer: cross-entropy with AdamW on every token (the pruning is training-free).

For a minibatch (x_b, y_b) of global step s (zigspark.data.batch_indices, so a run is a pure function of
its seed), with every image shifted by (dy, dx) ∈ {−shift..shift}² (edge pixels replicated):

    L = −(1/B) Σ_b log softmax(f_θ(shift(x_b)))_{y_b}                         (optionally label-smoothed)
    θ ← AdamW(θ, ∇L, lr_s),   lr_s = lr · min(1, (s+1)/warmup) · ½(1 + cos(π·s/steps))   ("cosine")
                                 lr_s = lr · min(1, (s+1)/warmup)                           ("constant")

The shifts are the light augmentation: a digit moved by a pixel is the same digit, and a ViT on pixels has
no translation invariance of its own (their effect alone was not measured).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..data import ImageSet, batch_indices
from ..data._seeds import derive_seed
from .progress import ProgressLine

KIND = "recognizer"  # config.json["kind"] of a recognizer checkpoint
# What trains zigspark.models.recognizer.DIGITS_CONFIG on digits within the demo's time (issue #8 report:
# about 65 s on the 2-core CPU); all but steps are also train_recognizer's defaults.
DIGITS_TRAINING = dict(steps=600, batch_size=64, lr=3e-3, weight_decay=0.05, shift=1)
_SHIFT_STREAM = 0x5817  # keeps the shift generators' seeds apart from the batch permutations' (seed, epoch)


@dataclass
class RecognizerTrainResult:
    """steps run, wall-clock seconds of the loop, mean loss per logging window, train accuracy (all tokens,
    no augmentation) at the end, and the checkpoint directory if one was written."""

    steps: int
    seconds: float
    losses: list = field(default_factory=list)
    train_accuracy: float = float("nan")
    checkpoint: Optional[str] = None


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by its own (dy, dx) ∈ {−shift..shift}², edges replicated. (B, C, H, W) → same."""
    if shift == 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (2, batch), generator=generator).to(images.device)
    rows = offsets[0][:, None] + torch.arange(height, device=images.device)           # (B, H)
    cols = offsets[1][:, None] + torch.arange(width, device=images.device)            # (B, W)
    b = torch.arange(batch, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def learning_rate(step: int, steps: int, lr: float, warmup: int, schedule: str) -> float:
    """lr_s of the module docstring."""
    ramp = min(1.0, (step + 1) / max(1, warmup))
    if schedule == "constant":
        return lr * ramp
    return lr * ramp * 0.5 * (1.0 + math.cos(math.pi * step / max(1, steps)))


def _check_data(data, model) -> None:
    if not isinstance(data, ImageSet):
        raise TypeError(f"data must be a zigspark.data.ImageSet (from zigspark.data.load_images), got "
                        f"{type(data).__name__}")
    if data.labels is None:
        raise ValueError(f"data {data.name!r} has no labels; the recognizer needs a labelled data set "
                         "(e.g. 'digits', 'faces', or a folder with one subfolder per class)")
    if data.num_classes != model.num_classes:
        raise ValueError(f"data has {data.num_classes} classes but the model was built for {model.num_classes}; "
                         f"build it with num_classes={data.num_classes}")


def train_recognizer(data: ImageSet, model, *, steps: Optional[int] = None, epochs: Optional[float] = None,
                     batch_size: int = 64, lr: float = 3e-3, weight_decay: float = 0.05,
                     schedule: str = "cosine", warmup: int = 20, shift: int = 1, label_smoothing: float = 0.0,
                     seed: int = 0, device=None, log_every: int = 50,
                     progress: Optional[Callable[[str], None]] = print,
                     out_dir=None, run_config: Optional[dict] = None) -> RecognizerTrainResult:
    """Train `model` (a zigspark.models.Recognizer) in place on a labelled ImageSet.

    Args:
        data: ImageSet with images (N, C, H, W) matching the model and labels (N,).
        steps / epochs: length of the run (give one; epochs → ceil(epochs·N / batch_size) steps).
        batch_size, lr, weight_decay: AdamW's minibatch, peak learning rate and decoupled weight decay.
        schedule: "cosine" (to 0 at the end) or "constant", both after a linear warmup of `warmup` steps.
        shift: maximum random shift in pixels (0: no augmentation).  label_smoothing: of the cross-entropy.
        seed: fixes the initialisation-independent randomness (batches, shifts).  device: where to train
            (default: the model's device).
        log_every: steps between progress lines (printed through `progress`; None: silent).
        out_dir: if given, save a checkpoint there at the end (zigspark.train.checkpoint; config.json has
            {"kind": "recognizer", "model": model.config, "data": data.name, "train": {...}, "run": run_config}).
        run_config: JSON-able facts for whoever reloads the checkpoint (the CLI stores the data source,
            resolution and split seed there).

    Returns:
        RecognizerTrainResult (steps, seconds, losses per window, train accuracy, checkpoint).
    """
    _check_data(data, model)
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps= or epochs= (the length of the run)")
    if epochs is not None:
        if not epochs > 0:
            raise ValueError(f"epochs must be > 0, got {epochs}")
        steps = math.ceil(epochs * len(data) / batch_size)
    for name, value, minimum in (("steps", steps, 1), ("batch_size", batch_size, 1), ("shift", shift, 0),
                                 ("warmup", warmup, 0), ("log_every", log_every, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).train()
    images, labels = data.images.to(device), data.labels.to(device)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "pos_embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    line = ProgressLine(steps, batch_size, progress)
    losses, window = [], []
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup, schedule)
        idx = batch_indices(len(data), batch_size, step, seed).to(device)
        generator = torch.Generator().manual_seed(derive_seed(seed, _SHIFT_STREAM, step))
        x = random_shift(images[idx], shift, generator)
        loss = F.cross_entropy(model(x), labels[idx], label_smoothing=label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss.item()} at step {step}; lower lr (now {lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            losses.append(sum(window) / len(window))
            line.report(step + 1, losses[-1])
            window = []
    seconds = time.perf_counter() - start

    from ..evaluation.recognizer_eval import accuracy

    train_acc = accuracy(model, images, labels, device=device)
    result = RecognizerTrainResult(steps=steps, seconds=seconds, losses=losses, train_accuracy=train_acc)
    if progress is not None:
        progress(f"trained {steps} steps in {seconds:.1f} s; train accuracy {train_acc:.4f}")
    if out_dir is not None:
        from .checkpoint import save_checkpoint

        hyper = dict(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule,
                     warmup=warmup, shift=shift, label_smoothing=label_smoothing, seed=seed)
        save_checkpoint(out_dir, model=model,
                        config={"kind": KIND, "model": model.config, "data": data.name, "train": hyper,
                                "run": dict(run_config or {})},
                        optimizer=optimizer,
                        state={"step": steps, "seconds": seconds, "losses": losses, "train_accuracy": train_acc})
        result.checkpoint = str(out_dir)
    return result


def load_recognizer(directory, device="cpu", backend: Optional[str] = None, return_config: bool = False):
    """The Recognizer saved by train_recognizer(out_dir=directory), in eval mode on `device` (with its ops'
    backend replaced by `backend` if given) [, and the checkpoint's config.json dict]."""
    from ..models.recognizer import Recognizer
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(directory, map_location=device)
    if ckpt.config.get("kind") != KIND or "model" not in ckpt.config:
        raise ValueError(f"{directory} holds a checkpoint, but not a recognizer's (config.json kind = "
                         f"{ckpt.config.get('kind')!r}); train one with `zigspark train-recognizer --out DIR`")
    config = dict(ckpt.config["model"])
    if backend is not None:
        config["backend"] = backend
    model = Recognizer(**config)
    model.load_state_dict(ckpt.model_state)
    model = model.to(device).eval()
    return (model, ckpt.config) if return_config else model
