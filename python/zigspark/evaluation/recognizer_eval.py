"""Accuracy and throughput of the recognizer when HiPrune (or a baseline) prunes its tokens.

For a token budget k of the N patch tokens and a strategy S ∈ {hiprune, attention, random}:

    accuracy(k, S) = (1/M) Σ_m [argmax f(x_m; keep=k, strategy=S) = y_m]         over the M test images
    images_per_s   = M / (wall-clock seconds of the whole pass, after one untimed warm-up batch)

At k = N every strategy keeps every token, so one pass serves all of them. The random baseline is averaged
over `random_trials` independent draws (seeds seed, seed+1, ...), so one lucky draw does not decide the
comparison.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..ops.token_prune import STRATEGIES


def model_device(model, device=None) -> torch.device:
    """`device` if given, else where the model's first parameter (or buffer) lives, else the CPU."""
    if device is not None:
        return torch.device(device)
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def in_batches(model, images: torch.Tensor, fn, *, batch_size: int, device=None):
    """torch.cat of fn(batch on the model's device), moved to the CPU, over consecutive batches of images,
    with the model in eval mode (its mode is restored afterwards); None for no images."""
    device = model_device(model, device)
    was_training = model.training
    model.eval()
    try:
        outs = [fn(images[i:i + batch_size].to(device)).cpu() for i in range(0, images.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else None


@torch.no_grad()
def predict(model, images: torch.Tensor, *, keep=None, strategy: str = "hiprune", batch_size: int = 256,
            device=None, seed: int = 0) -> torch.Tensor:
    """Predicted classes (M,) int64 on the CPU of images (M, C, H, W), in batches, model in eval mode."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (M, C, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    generator = torch.Generator().manual_seed(seed) if strategy == "random" else None
    preds = in_batches(model, images, lambda batch: model(batch, keep=keep, strategy=strategy, generator=generator)
                       .argmax(1), batch_size=batch_size, device=device)
    return preds if preds is not None else torch.empty(0, dtype=torch.long)


def accuracy(model, images: torch.Tensor, labels: torch.Tensor, *, keep=None, strategy: str = "hiprune",
             batch_size: int = 256, device=None, seed: int = 0) -> float:
    """Share of images (M, C, H, W) whose predicted class equals labels (M,)."""
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},) to match images, got {tuple(labels.shape)}")
    preds = predict(model, images, keep=keep, strategy=strategy, batch_size=batch_size, device=device, seed=seed)
    return (preds == labels.cpu()).float().mean().item()


def _timed_accuracy(model, data, keep, strategy, batch_size, device, seed):
    model(data.images[:batch_size].to(device), keep=keep, strategy=strategy,
          generator=torch.Generator().manual_seed(seed))                      # warm-up, untimed
    start = time.perf_counter()
    acc = accuracy(model, data.images, data.labels, keep=keep, strategy=strategy, batch_size=batch_size,
                   device=device, seed=seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return acc, time.perf_counter() - start


@torch.no_grad()
def evaluate_pruning(model, data, keeps=(1.0, 1 / 3, 1 / 9), strategies=STRATEGIES, *, batch_size: int = 256,
                     device=None, seed: int = 0, random_trials: int = 3, progress=None) -> list:
    """Accuracy and throughput per (budget, strategy) on a labelled ImageSet.

    Args:
        model: a zigspark.models.Recognizer.  data: labelled ImageSet (usually the test split).
        keeps: budgets, each a ratio in (0, 1] or a token count (see Recognizer.num_kept).
        strategies: any of "hiprune", "attention", "random".
        random_trials: draws averaged for "random".  progress: callable for one line per row, or None.

    Returns:
        list of {"keep", "tokens", "strategy", "accuracy", "images_per_s"} (+ "trials" for random), in the
        order keeps × strategies.
    """
    if data.labels is None:
        raise ValueError(f"data {data.name!r} has no labels; evaluate on a labelled split (e.g. split='test')")
    for strategy in strategies:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategies must be among {STRATEGIES}, got {strategy!r}")
    if isinstance(random_trials, bool) or not isinstance(random_trials, int) or random_trials < 1:
        raise ValueError(f"random_trials must be a positive int, got {random_trials!r}")
    device = model_device(model, device)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for keep in keeps:
            tokens = model.num_kept(keep)
            dense = None
            for strategy in strategies:
                if tokens == model.num_tokens:          # nothing pruned: the strategies coincide
                    dense = dense or _timed_accuracy(model, data, keep, strategy, batch_size, device, seed)
                    acc, seconds, trials = dense[0], dense[1], 1
                else:
                    trials = random_trials if strategy == "random" else 1
                    runs = [_timed_accuracy(model, data, keep, strategy, batch_size, device, seed + i)
                            for i in range(trials)]
                    acc = sum(r[0] for r in runs) / trials
                    seconds = sum(r[1] for r in runs) / trials
                row = {"keep": keep, "tokens": tokens, "strategy": strategy, "accuracy": acc,
                       "images_per_s": len(data) / max(seconds, 1e-9)}
                if strategy == "random":
                    row["trials"] = trials
                rows.append(row)
                if progress is not None:
                    progress(f"keep {tokens}/{model.num_tokens} {strategy}: accuracy {acc:.4f}, "
                             f"{row['images_per_s']:.0f} img/s")
    finally:
        model.train(was_training)
    return rows


def format_table(rows, num_tokens: int | None = None) -> str:
    """Rows of evaluate_pruning as a markdown table (keep shown as a percentage of the tokens)."""
    total = num_tokens or max((r["tokens"] for r in rows), default=1)
    lines = ["| keep | tokens | strategy | accuracy | images/s |", "|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {100 * r['tokens'] / total:.1f}% | {r['tokens']} | {r['strategy']} | "
                     f"{100 * r['accuracy']:.2f}% | {r['images_per_s']:.0f} |")
    return "\n".join(lines)


def save_json(rows, path, **meta) -> Path:
    """Write {"rows": rows, **meta} to `path` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=2)
        f.write("\n")
    return path
