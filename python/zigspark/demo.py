"""`make demo` / `zigspark demo`: the main job, end to end on the digits that ship with scikit-learn.

    1. train a ViT recognizer (FlashSelfAttention + FFN) on the digits' train split, all tokens
    2. evaluate it pruned at inference: 100 / 33.3 / 11.1 % of tokens × hiprune / attention / random
    3. train a tiny class-conditional ZigMa (flow matching, zigzag Mamba mixers) on the same split
    4. sample a PNG grid per class (Euler ODE, classifier-free guidance)
    5. judge the samples with the recognizer: Fréchet distance to held-out real digits in its penultimate
       features, and the share of samples it assigns to their conditioning class
    6. a linear probe on the generator's pooled hidden tokens (diffusion features for recognition)
    7. which backend ran each op

Everything lands in one folder: summary.md, summary.json, the PNGs, the pruning table and both checkpoints.
`size` picks the settings: "test" (seconds, for the test suite), "fast" (the CPU default, a few minutes),
"full" (a GPU: longer training, more samples).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class DemoSettings:
    """Everything that differs between demo sizes."""

    recognizer_overrides: dict       # on top of models.recognizer.DIGITS_CONFIG
    recognizer_training: dict        # on top of train.recognizer.DIGITS_TRAINING
    generator_config: str
    generator_overrides: dict
    generator_steps: int
    generator_batch: int
    generator_lr: float
    generator_ema: float
    samples_per_class: int
    sample_steps: int
    cfg_scale: float
    probe_t: float


SIZES = {
    "test": DemoSettings(recognizer_overrides={"width": 16, "depth": 2}, recognizer_training={"steps": 4},
                         generator_config="tiny", generator_overrides={}, generator_steps=3, generator_batch=32,
                         generator_lr=2e-3, generator_ema=0.99,
                         samples_per_class=4, sample_steps=2, cfg_scale=2.0, probe_t=0.3),
    # tiny ZigMa: ~1000 steps at lr 4e-3 in about 3.5 CPU-minutes (see zigspark/models/configs.py); a short
    # run wants a short EMA horizon
    "fast": DemoSettings(recognizer_overrides={}, recognizer_training={},
                         generator_config="tiny", generator_overrides={}, generator_steps=1000, generator_batch=128,
                         generator_lr=4e-3, generator_ema=0.99,
                         samples_per_class=50, sample_steps=20, cfg_scale=2.0, probe_t=0.3),
    "full": DemoSettings(recognizer_overrides={"width": 64}, recognizer_training={"steps": 2000},
                         generator_config="tiny",
                         generator_overrides={"patch_size": 1, "width": 64, "d_state": 8, "expand": 2},
                         generator_steps=6000, generator_batch=256, generator_lr=1e-3, generator_ema=0.999,
                         samples_per_class=200, sample_steps=40, cfg_scale=2.0, probe_t=0.3),
}
KEEPS = (1.0, 1 / 3, 1 / 9)
STRATEGIES = ("hiprune", "attention", "random")


def _stage(progress, title: str):
    progress(f"== {title}")
    return time.perf_counter()


def run_demo(out_dir, *, size: str = "fast", device=None, seed: int = 0,
             progress: Optional[Callable[[str], None]] = print) -> dict:
    """Run the whole demo into `out_dir`; returns the summary (also written as summary.json / summary.md)."""
    from . import backends, sampling
    from .data import load_images, save_image_grid
    from .evaluation.frechet import class_accuracy, recognizer_frechet
    from .evaluation.probe import linear_probe
    from .evaluation.recognizer_eval import evaluate_pruning, format_table
    from .models import Recognizer, ZigMa, zigma_config
    from .models.recognizer import DIGITS_CONFIG
    from .train.generator import train_generator
    from .train.recognizer import DIGITS_TRAINING, train_recognizer

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    settings = SIZES[size]
    progress = progress or (lambda line: None)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for own in ("recognizer", "generator"):  # a fresh run: never resume the checkpoints of an earlier demo
        shutil.rmtree(out / own, ignore_errors=True)
    timings = {}
    started = time.perf_counter()

    t0 = _stage(progress, "data: scikit-learn's digits (8×8, 10 classes)")
    train = load_images("digits", split="train", seed=seed)
    test = load_images("digits", split="test", seed=seed)
    progress(f"   {len(train)} train / {len(test)} test images")

    rec_config = {**DIGITS_CONFIG, **settings.recognizer_overrides}
    rec_training = {**DIGITS_TRAINING, **settings.recognizer_training}
    t0 = _stage(progress, f"recognizer: ViT width {rec_config['width']}, depth {rec_config['depth']}, "
                          f"{rec_training['steps']} steps")
    torch.manual_seed(seed)
    recognizer = Recognizer(**rec_config).to(device)
    train_recognizer(train, recognizer, **rec_training, seed=seed, device=device, progress=progress,
                     out_dir=out / "recognizer")
    recognizer.eval()
    timings["recognizer_train_s"] = time.perf_counter() - t0

    t0 = _stage(progress, "pruned inference: " + ", ".join(f"{k:.1%}" for k in KEEPS) + " of tokens")
    pruning = evaluate_pruning(recognizer, test, keeps=KEEPS, strategies=STRATEGIES, device=device, seed=seed)
    pruning_table = format_table(pruning, recognizer.num_tokens)
    progress(pruning_table)
    timings["pruning_eval_s"] = time.perf_counter() - t0

    t0 = _stage(progress, f"generator: class-conditional ZigMa '{settings.generator_config}', "
                          f"{settings.generator_steps} steps")
    torch.manual_seed(seed)
    generator = ZigMa(**zigma_config(settings.generator_config, train.image_size[0], train.channels,
                                     num_classes=train.num_classes, **settings.generator_overrides)).to(device)
    result = train_generator(train, generator, steps=settings.generator_steps, batch_size=settings.generator_batch,
                             lr=settings.generator_lr, ema_decay=settings.generator_ema, seed=seed, device=device,
                             out_dir=out / "generator",
                             checkpoint_every=max(settings.generator_steps, 1), progress=progress,
                             run_config={"data": "digits", "demo_size": size})
    result.ema.copy_to(generator)
    generator.eval()
    timings["generator_train_s"] = time.perf_counter() - t0

    t0 = _stage(progress, f"sampling: {settings.samples_per_class} per class, {settings.sample_steps} Euler steps, "
                          f"cfg {settings.cfg_scale}")
    labels = torch.arange(train.num_classes).repeat_interleave(settings.samples_per_class)
    samples = sampling.sample(generator, len(labels), steps=settings.sample_steps, cfg_scale=settings.cfg_scale,
                              labels=labels, seed=seed, device=device)
    grids = []
    for c in range(train.num_classes):
        path = out / f"samples_class{c}.png"
        save_image_grid(samples[labels == c][:64], path)
        grids.append(path.name)
    save_image_grid(samples.view(train.num_classes, settings.samples_per_class, *samples.shape[1:])[:, :10]
                    .reshape(-1, *samples.shape[1:]), out / "samples.png", nrow=min(10, settings.samples_per_class))
    torch.save({"images": samples, "labels": labels}, out / "samples.pt")
    timings["sampling_s"] = time.perf_counter() - t0

    t0 = _stage(progress, "judging the samples with the recognizer")
    fid = recognizer_frechet(recognizer, test.images, samples, device=device)
    fid_train_test = recognizer_frechet(recognizer, test.images, train.images, device=device)
    sample_accuracy = class_accuracy(recognizer, samples, labels, device=device)
    progress(f"   Fréchet distance (recognizer features) samples↔test {fid:.3f} "
             f"(train↔test: {fid_train_test:.3f}); samples recognised as their class: {sample_accuracy:.1%}")
    probe = linear_probe(generator, (train, test), t=settings.probe_t, layer=-1, seed=seed, device=device)
    progress(f"   linear probe on the generator's last block at t={settings.probe_t}: "
             f"{probe['test_accuracy']:.1%} test accuracy")
    timings["evaluation_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started

    dense = next(r for r in pruning if r["strategy"] == "hiprune" and r["keep"] == 1.0)
    summary = {
        "size": size,
        "settings": asdict(settings),
        "device": str(device),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "recognizer": {"config": recognizer.config, "dense_test_accuracy": dense["accuracy"], "pruning": pruning},
        "generator": {"config": generator.config, "steps": result.step, "final_loss": result.losses[-1],
                      "images_per_s": result.images_per_s},
        "samples": {"num": len(labels), "frechet_to_test": fid, "frechet_train_to_test": fid_train_test,
                    "class_accuracy": sample_accuracy, "grids": grids},
        "probe": probe,
        "backends": backends.last_backends(),
        "timings_s": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(format_summary(summary, pruning_table))
    progress(f"== done in {timings['total_s']:.0f} s: {out / 'summary.md'}")
    return summary


def format_summary(summary: dict, pruning_table: str) -> str:
    """The markdown summary the README shows."""
    s, g, p = summary["samples"], summary["generator"], summary["probe"]
    lines = [
        f"# zigspark demo ({summary['size']}, {summary['device']}, torch {summary['torch']})",
        "",
        f"Recognizer on digits, all tokens: **{summary['recognizer']['dense_test_accuracy']:.1%}** test accuracy.",
        "",
        "Pruned at inference (training-free), test accuracy and throughput:",
        "",
        pruning_table,
        "",
        f"Class-conditional ZigMa, {g['steps']} steps (final loss {g['final_loss']:.4f}, "
        f"{g['images_per_s']:.0f} images/s in training):",
        f"- samples recognised as their conditioning class: **{s['class_accuracy']:.1%}** of {s['num']}",
        f"- Fréchet distance to held-out digits in the recognizer's features: **{s['frechet_to_test']:.3f}** "
        f"(real train vs test digits: {s['frechet_train_to_test']:.3f})",
        f"- linear probe on the generator's pooled last-block tokens at t = {p['t']}: "
        f"**{p['test_accuracy']:.1%}** test accuracy",
        "",
        "![samples, one row per class](samples.png)",
        "",
        "Backends that ran: " + ", ".join(f"`{op}`: {b}" for op, b in sorted(summary["backends"].items())),
        "",
        "Time: " + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.0f} s" for k, v in summary["timings_s"].items()),
        "",
    ]
    return "\n".join(lines)
