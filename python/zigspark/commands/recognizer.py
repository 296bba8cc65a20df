"""Subcommands: `zigspark train-recognizer`, `zigspark eval-recognizer` and `zigspark probe`.

    zigspark train-recognizer --data digits --out runs/recognizer
    zigspark eval-recognizer --checkpoint runs/recognizer --keep 1.0 0.333 0.111 \
        --strategy hiprune attention random --json runs/recognizer/pruning.json
    zigspark probe --generator runs/digits --data digits --t 0.5 --layer -1

train-recognizer trains the ViT on every token and saves a checkpoint (config.json records the data source,
resolution and split seed, so eval-recognizer scores the same held-out split by default). eval-recognizer
prunes at inference: a --keep with a decimal point is a share of the tokens (1.0, 0.333), a whole number a
token count (21). probe fits a linear classifier on a ZigMa checkpoint's pooled hidden tokens.

Bad arguments and paths end with a one-line message and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from .generator import CommandError, load_generator, positive_int


def _fail(command: str, message) -> int:
    print(f"zigspark {command}: error: {message}", file=sys.stderr, flush=True)
    return 2


def _keep(text: str):
    """'0.333' → a ratio (float), '21' → a token count (int)."""
    try:
        value = int(text) if text.strip().lstrip("+").isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a ratio in (0, 1] (e.g. 0.333) or a token count (e.g. 21), "
                                         f"got {text!r}") from None
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a ratio must be in (0, 1], got {text}; give a whole number for a count")
    if isinstance(value, int) and value < 1:
        raise argparse.ArgumentTypeError(f"a token count must be >= 1, got {text}")
    return value


def _device(name):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CommandError(f"--device {name!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return device


def _load_data(source, resolution, split, seed):
    from ..data import load_images

    try:
        return load_images(source, resolution=resolution, split=split, seed=seed)
    except FileNotFoundError as exc:
        raise CommandError(f"--data {source!r}: {exc}") from None


# ---- train-recognizer -----------------------------------------------------------------------------------

def _cmd_train(args) -> int:
    import torch

    from ..evaluation.recognizer_eval import accuracy
    from ..models.recognizer import Recognizer
    from ..train.checkpoint import has_checkpoint
    from ..train.recognizer import train_recognizer

    try:
        device = _device(args.device)
        if has_checkpoint(args.out) and not args.overwrite:
            raise CommandError(f"{args.out} already holds a checkpoint; pass --overwrite to replace it, or "
                               "choose another --out")
        train = _load_data(args.data, args.resolution, "train", args.data_seed)
        test = _load_data(args.data, args.resolution, "test", args.data_seed)
        if train.labels is None:
            raise CommandError(f"--data {args.data!r} has no labels; the recognizer needs classes (digits, faces, "
                               "or a folder with one subfolder per class)")
        torch.manual_seed(args.seed)
        height, width = train.image_size
        model = Recognizer(image_size=height if height == width else [height, width], channels=train.channels,
                           num_classes=train.num_classes, patch_size=args.patch_size, width=args.width,
                           depth=args.depth, heads=args.heads, head_depth=args.head_depth,
                           mlp_ratio=args.mlp_ratio, density=args.density, backend=args.backend)
        print(f"recognizer: {sum(p.numel() for p in model.parameters())} parameters, {model.num_tokens} tokens, "
              f"{len(train)} train / {len(test)} test images of {args.data}", flush=True)
        run = {"data": args.data, "resolution": args.resolution, "data_seed": args.data_seed}
        result = train_recognizer(train, model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                  weight_decay=args.weight_decay, shift=args.shift, seed=args.seed, device=device,
                                  log_every=args.log_every, out_dir=args.out, run_config=run,
                                  progress=lambda line: print(line, flush=True))
    except (CommandError, ValueError, TypeError, ImportError) as exc:
        return _fail("train-recognizer", exc)
    test_acc = accuracy(model, test.images, test.labels, device=device)
    print(f"test accuracy (all tokens) {test_acc:.4f}; checkpoint in {result.checkpoint}", flush=True)
    return 0


# ---- eval-recognizer ------------------------------------------------------------------------------------

def _cmd_eval(args) -> int:
    from ..evaluation.recognizer_eval import evaluate_pruning, format_table, save_json
    from ..train.recognizer import load_recognizer

    try:
        device = _device(args.device)
        model, config = load_recognizer(args.checkpoint, device=device, backend=args.backend,
                                        return_config=True)
        run = config.get("run", {})
        source = args.data or run.get("data")
        if source is None:
            raise CommandError(f"{args.checkpoint}/config.json does not name its data; pass --data")
        resolution = args.resolution if args.resolution is not None else run.get("resolution")
        seed = args.data_seed if args.data_seed is not None else run.get("data_seed", 0)
        data = _load_data(source, resolution, args.split, seed)
        for keep in args.keep:
            model.num_kept(keep)          # a count larger than the model's tokens fails here, before any work
        print(f"eval-recognizer: {args.checkpoint}, {len(data)} {args.split} images of {source}, "
              f"{model.num_tokens} tokens", flush=True)
        rows = evaluate_pruning(model, data, keeps=args.keep, strategies=args.strategy, batch_size=args.batch_size,
                                device=device, seed=args.seed, random_trials=args.random_trials,
                                progress=lambda line: print(line, flush=True))
    except (CommandError, ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        return _fail("eval-recognizer", exc)
    print(format_table(rows, model.num_tokens), flush=True)
    if args.json:
        path = save_json(rows, args.json, checkpoint=str(args.checkpoint), data=source, split=args.split,
                         num_tokens=model.num_tokens, device=str(device), model=model.config)
        print(f"wrote {path}", flush=True)
    return 0


# ---- probe ----------------------------------------------------------------------------------------------

def _cmd_probe(args) -> int:
    from ..evaluation.probe import linear_probe

    try:
        device = _device(args.device)
        generator, ckpt = load_generator(args.generator, args.weights, args.backend)
        if not hasattr(generator, "sample_shape") or len(generator.sample_shape) != 3:
            raise CommandError(f"{args.generator} holds a video generator; the probe takes image generators")
        source = args.data or (ckpt.config.get("run") or {}).get("data") or \
            (ckpt.config.get("data") or {}).get("name")
        if source is None:
            raise CommandError(f"{args.generator}/config.json does not name its data; pass --data")
        channels, height, width = generator.sample_shape
        train = _load_data(source, height, "train", args.data_seed)
        test = _load_data(source, height, "test", args.data_seed)
        if train.labels is None:
            raise CommandError(f"--data {source!r} has no labels; a linear probe needs classes")
        if train.images.shape[1:] != (channels, height, width):
            raise CommandError(f"--data {source!r} gives images {tuple(train.images.shape[1:])} but the generator "
                               f"takes {(channels, height, width)}")
        result = linear_probe(generator.to(device), (train, test), t=args.t, layer=args.layer, method=args.method,
                              seed=args.seed, batch_size=args.batch_size, device=device)
    except (CommandError, ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        return _fail("probe", exc)
    print(f"linear probe ({result['method']}) on {source}, t = {result['t']}, layer {result['layer']}, "
          f"{result['feature_dim']} features: train accuracy {result['train_accuracy']:.4f}, "
          f"test accuracy {result['test_accuracy']:.4f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "generator": str(args.generator), "data": source}, f, indent=2)
        print(f"wrote {args.json}", flush=True)
    return 0


def add_parsers(sub) -> None:
    """Add train-recognizer, eval-recognizer and probe to the `zigspark` parser."""
    from ..models.recognizer import DIGITS_CONFIG
    from ..train.recognizer import DIGITS_TRAINING

    backends = ["auto", "reference", "triton", "cuda"]
    p = sub.add_parser("train-recognizer", help="train the ViT recognizer (Spark FFN, HiPrune-ready) on labelled images")
    p.add_argument("--data", default="digits", help="digits, faces, an image folder or a .npy file (default: digits)")
    p.add_argument("--resolution", type=positive_int, help="resize the images to this side (default: the source's)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/test split (default 0)")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    p.add_argument("--steps", type=positive_int, default=DIGITS_TRAINING["steps"])
    p.add_argument("--batch-size", type=positive_int, default=DIGITS_TRAINING["batch_size"])
    p.add_argument("--lr", type=float, default=DIGITS_TRAINING["lr"])
    p.add_argument("--weight-decay", type=float, default=DIGITS_TRAINING["weight_decay"])
    p.add_argument("--shift", type=int, default=DIGITS_TRAINING["shift"], help="random shift augmentation, pixels")
    for name in ("patch_size", "width", "depth", "heads", "head_depth"):
        p.add_argument("--" + name.replace("_", "-"), type=positive_int if name != "head_depth" else int,
                       default=DIGITS_CONFIG[name])
    p.add_argument("--mlp-ratio", type=float, default=DIGITS_CONFIG["mlp_ratio"])
    p.add_argument("--density", type=float, default=DIGITS_CONFIG["density"],
                   help="FFN density: 1.0 = plain GELU MLP, (0, 1) = Spark FFN (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="initialisation, batches and shifts")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--backend", default="auto", choices=backends)
    p.add_argument("--log-every", type=positive_int, default=50)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval-recognizer", help="accuracy and throughput of a recognizer pruned by HiPrune and baselines")
    p.add_argument("--checkpoint", required=True, help="directory written by train-recognizer")
    p.add_argument("--keep", type=_keep, nargs="+", default=[1.0, 1 / 3, 1 / 9],
                   help="budgets: ratios like 0.333 or token counts like 21 (default 1.0 1/3 1/9)")
    p.add_argument("--strategy", nargs="+", default=["hiprune", "attention", "random"],
                   choices=["hiprune", "attention", "random"])
    p.add_argument("--data", help="data source (default: the one the checkpoint was trained on)")
    p.add_argument("--resolution", type=positive_int, help="default: the checkpoint's")
    p.add_argument("--data-seed", type=int, help="split seed (default: the checkpoint's)")
    p.add_argument("--split", default="test", choices=["train", "test", "all"])
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--random-trials", type=positive_int, default=3, help="draws averaged for the random baseline")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--backend", choices=backends, help="override the checkpoint's backend")
    p.add_argument("--json", help="also write the rows as JSON to this path")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("probe", help="linear probe of a ZigMa generator's hidden tokens on noised labelled images")
    p.add_argument("--generator", required=True, help="directory written by train-generator")
    p.add_argument("--data", help="labelled data source (default: the generator's)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/test split (default 0)")
    p.add_argument("--t", type=float, default=0.5, help="noise level of x_t in [0, 1] (default 0.5)")
    p.add_argument("--layer", type=int, default=-1, help="block whose output is probed (default -1, the last)")
    p.add_argument("--method", default="ridge", choices=["ridge", "logistic"])
    p.add_argument("--weights", default="ema", choices=["ema", "model"])
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--backend", default="auto", choices=backends)
    p.add_argument("--json", help="also write the result as JSON to this path")
    p.set_defaults(func=_cmd_probe)
