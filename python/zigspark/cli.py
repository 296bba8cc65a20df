"""The `zigspark` command (also `python -m zigspark`)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

import torch


def _cmd_env(args) -> int:
    from .env import format_report, report

    info = report()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def _cmd_check(args) -> int:
    from .check import format_rows, run_checks

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = [getattr(torch, name) for name in args.dtypes]
    print(f"zigspark check on {device}: every available backend against the float64 reference", flush=True)
    rows = run_checks(device, dtypes, large=args.large, progress=lambda m: print(m, flush=True))
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.json}")
    failed = [r for r in rows if r["status"] == "FAIL"]
    if failed:
        print(f"{len(failed)} check(s) outside the numerics rule", file=sys.stderr)
    return 1 if failed else 0


_COMMAND_MODULES = ("generator", "recognizer", "demo")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="zigspark", description="zigspark: fused GPU kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("env", help="versions, the CUDA extension, the GPU, and which backends each op can use")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("check", help="check every available backend of every op against the reference")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"],
                   choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--large", action="store_true", help="GPU-sized inputs")
    p.add_argument("--json", help="also write the table as JSON to this path")
    p.set_defaults(func=_cmd_check)

    # The model layer's commands (train-generator, sample, train-recognizer, eval-recognizer, probe, demo)
    # live beside the code they drive; each module adds its own subparsers.
    for name in _COMMAND_MODULES:
        importlib.import_module(f"zigspark.commands.{name}").add_parsers(sub)

    args = parser.parse_args(argv)
    return args.func(args)
