"""Subcommands: `zigspark train-generator` and `zigspark sample`.

    zigspark train-generator --data digits --config tiny --steps 3000 --out runs/digits
    torchrun --nproc_per_node=2 -m zigspark train-generator --data digits --steps 3000 --out runs/digits
    zigspark sample --checkpoint runs/digits --num 64 --steps 20 --cfg 2.0 --out runs/digits/samples.png

train-generator resumes when --out already holds a checkpoint (same data and model arguments; --steps is
the total). sample rebuilds the model from the checkpoint's config.json, loads the EMA weights (the raw
weights with --weights model), integrates the flow ODE and writes a PNG grid plus the raw images as .npy
(float32 (N, C, H, W) in [−1, 1]; the labels, if any, as <name>.labels.npy).

Bad arguments, paths and configs end with a one-line message and exit code 2, a diverged run with exit
code 1; neither prints a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_ARCH_FIELDS = ("patch_size", "width", "depth", "d_state", "class_dropout")


class CommandError(Exception):
    """A user error the command reports in one line (exit code 2)."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _say(message: str) -> None:
    print(message, flush=True)


def _fail(command: str, message) -> int:
    print(f"zigspark {command}: error: {message}", file=sys.stderr, flush=True)
    return 2


# ---- train-generator --------------------------------------------------------------------------------------

def _build_model(args, data):
    from ..models import ZigMa, zigma_config

    channels, height, width = data.images.shape[1:]
    class_cond = args.class_cond if args.class_cond is not None else data.num_classes > 0
    if class_cond and data.num_classes == 0:
        raise CommandError(f"--class-cond needs labelled data, and {args.data!r} has no labels; use --no-class-cond")
    overrides = {k: getattr(args, k) for k in _ARCH_FIELDS if getattr(args, k) is not None}
    overrides["backend"] = args.backend
    config = zigma_config(args.config, [int(height), int(width)] if height != width else int(height),
                          int(channels), num_classes=data.num_classes if class_cond else 0, **overrides)
    return ZigMa(**config)


def _cmd_train_generator(args) -> int:
    import torch

    from ..data import load_images
    from ..train import distributed
    from ..train.generator import TrainingDiverged, train_generator

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ctx = distributed.init_distributed(args.device)
    except (ValueError, RuntimeError) as e:
        return _fail("train-generator", e)
    try:
        try:
            data = load_images(args.data, resolution=args.resolution, split=args.split, seed=args.seed,
                               channels=args.channels)
            torch.manual_seed(args.seed)        # the same initial weights on every rank and every rerun
            model = _build_model(args, data)
            amp = None if args.amp == "auto" else args.amp
            run = {"data": args.data, "resolution": args.resolution, "split": args.split, "channels": args.channels,
                   "config": args.config}
            train_generator(data, model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                            ema_decay=args.ema_decay, grad_clip=args.grad_clip, seed=args.seed,
                            time_sampling=args.time_sampling, out_dir=args.out,
                            checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                            device=ctx.device if ctx.distributed else args.device, amp=amp,
                            progress=_say if ctx.is_main else None, run_config=run)
        except TrainingDiverged as e:
            print(f"zigspark train-generator: {e}", file=sys.stderr, flush=True)
            return 1
        except (CommandError, ValueError, TypeError, FileNotFoundError, NotADirectoryError, ImportError) as e:
            return _fail("train-generator", e)
    finally:
        distributed.shutdown()
    return 0


# ---- sample -----------------------------------------------------------------------------------------------

def _parse_labels(text, num_classes: int, num: int):
    """'3' → every sample class 3; '0,1,2' → cycled to num samples; 'all' → 0,1,..,K−1 cycled; None → None."""
    import torch

    if text is None:
        return None
    if num_classes == 0:
        raise CommandError("--labels given but the checkpoint's model is unconditional; drop --labels")
    if text == "all":
        values = list(range(num_classes))
    else:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise CommandError(f"--labels must be 'all', a class or a comma-separated list of classes, got {text!r}") \
                from None
        if not values:
            raise CommandError("--labels is empty")
        bad = [v for v in values if not 0 <= v <= num_classes]
        if bad:
            raise CommandError(f"--labels {bad} out of range: classes are 0..{num_classes - 1} "
                               f"({num_classes} = the null class)")
    return torch.tensor([values[i % len(values)] for i in range(num)], dtype=torch.long)


def load_generator(checkpoint: str, weights: str, backend: str):
    from .. import models
    from ..train.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)
    model_class, model_config = ck.config.get("model_class"), ck.config.get("model")
    if ck.config.get("kind") != "generator" or not isinstance(model_config, dict) or \
            model_class not in ("ZigMa", "ZigMaVideo"):
        raise CommandError(f"{checkpoint} is not a ZigMa generator checkpoint (config.json has kind="
                           f"{ck.config.get('kind')!r}, model_class={model_class!r}); pass the --out directory "
                           f"of `zigspark train-generator`")
    model = getattr(models, model_class)(**{**model_config, "backend": backend})
    if weights == "ema" and ck.ema_state is None:
        raise CommandError(f"{checkpoint} has no ema.safetensors; use --weights model")
    model.load_state_dict(ck.ema_state if weights == "ema" else ck.model_state)
    return model.eval(), ck


def _cmd_sample(args) -> int:
    import numpy as np

    from ..data import save_image_grid

    try:
        out = Path(args.out) if args.out else Path(args.checkpoint) / "samples.png"
        if out.suffix.lower() != ".png":
            raise CommandError(f"--out must end in .png, got {str(out)!r}")
        model, ck = load_generator(args.checkpoint, args.weights, args.backend)
        labels = _parse_labels(args.labels, model.num_classes, args.num)
        import torch

        from ..sampling import sample

        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CommandError("--device cuda but torch sees no CUDA device; use --device cpu")
        model.to(device)
        _say(f"sampling {args.num} images from {ck.path} (step {ck.state.get('step', '?')}, {args.weights} weights), "
             f"{args.steps} {args.solver} steps, cfg {args.cfg:g}")
        every = max(1, args.steps * -(-args.num // args.batch_size) // 4)

        def report(done: int, total: int) -> None:
            if done % every == 0 or done == total:
                _say(f"  {done}/{total} solver steps")

        images, labels = sample(model, args.num, steps=args.steps, solver=args.solver, cfg_scale=args.cfg,
                                labels=labels, seed=args.seed, batch_size=args.batch_size, device=device,
                                progress=report, return_labels=True)
        grid_images = images.flatten(0, 1) if images.dim() == 5 else images      # video: frames side by side
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image_grid(grid_images.cpu(), out, nrow=args.nrow)
        np.save(out.with_suffix(".npy"), images.cpu().numpy().astype(np.float32))
        if labels is not None:
            np.save(out.with_suffix(".labels.npy"), labels.numpy())
    except (CommandError, ValueError, TypeError, FileNotFoundError, NotADirectoryError, ImportError) as e:
        return _fail("sample", e)
    _say(f"wrote {out} and {out.with_suffix('.npy')}")
    return 0


# ---- parsers ----------------------------------------------------------------------------------------------

def add_parsers(sub) -> None:
    """Add train-generator and sample to the `zigspark` parser."""
    p = sub.add_parser("train-generator", help="train a ZigMa flow-matching generator (resumes from --out)",
                       description="Train a ZigMa generator by flow matching. Resumes if --out holds a checkpoint; "
                                   "runs data-parallel under torchrun.")
    p.add_argument("--data", default="digits", help="digits | faces | photos | a folder of images | a .npy file")
    p.add_argument("--resolution", type=positive_int, help="resize images to this side (default: the source's)")
    p.add_argument("--split", default="train", choices=["train", "test", "all"])
    p.add_argument("--channels", type=int, choices=[1, 3], help="convert to gray (1) or RGB (3)")
    p.add_argument("--config", default="tiny", choices=["tiny", "S", "B", "L"], help="named ZigMa size")
    for name in ("patch_size", "width", "depth", "d_state"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=positive_int,
                       help=f"override the config's {name}")
    p.add_argument("--class-dropout", type=nonnegative_float, help="label dropout for guidance (default 0.1)")
    p.add_argument("--class-cond", action=argparse.BooleanOptionalAction, default=None,
                   help="condition on the labels (default: when the data is labelled)")
    p.add_argument("--steps", type=positive_int, default=1000, help="total optimiser steps (default 1000)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="global batch (default 128)")
    p.add_argument("--lr", type=nonnegative_float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps")
    p.add_argument("--ema-decay", type=nonnegative_float, default=0.999)
    p.add_argument("--grad-clip", type=nonnegative_float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--time-sampling", default="uniform", choices=["uniform", "logit_normal"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="checkpoint directory (created; resumed from if it holds one)")
    p.add_argument("--checkpoint-every", type=positive_int, default=500)
    p.add_argument("--log-every", type=positive_int, default=50)
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "reference"],
                   help="kernels of the Mamba mixers")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"],
                   help="bf16 autocast (auto: on CUDA only)")
    p.add_argument("--threads", type=positive_int,
                   help="CPU threads of torch (default: torch's choice; 1 is fastest for tiny models on a busy CPU)")
    p.set_defaults(func=_cmd_train_generator)

    p = sub.add_parser("sample", help="draw images from a trained generator checkpoint",
                       description="Sample a ZigMa checkpoint by integrating the flow ODE from noise to data.")
    p.add_argument("--checkpoint", required=True, help="the --out directory of train-generator")
    p.add_argument("--num", type=positive_int, default=64)
    p.add_argument("--steps", type=positive_int, default=20, help="ODE steps (default 20)")
    p.add_argument("--solver", default="euler", choices=["euler", "heun"])
    p.add_argument("--cfg", type=nonnegative_float, default=1.0, help="classifier-free guidance scale (1: off)")
    p.add_argument("--labels", help="'all' (cycle through the classes), a class, or a comma-separated list")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--nrow", type=positive_int, help="images per grid row")
    p.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    p.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "reference"])
    p.add_argument("--out", help="PNG path (default: CHECKPOINT/samples.png); the .npy goes next to it")
    p.set_defaults(func=_cmd_sample)
