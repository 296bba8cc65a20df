"""`zigspark demo`: the main job (see zigspark.demo)."""

from __future__ import annotations

import os


def _cmd_demo(args) -> int:
    from ..demo import run_demo

    try:
        run_demo(args.out, size=args.size, device=args.device, seed=args.seed)
    except ImportError as exc:  # the demo's data ships with scikit-learn
        print(f"zigspark demo: {exc}")
        return 2
    return 0


def add_parsers(sub) -> None:
    """Add `demo` to the `zigspark` parser."""
    p = sub.add_parser("demo", help="train a recognizer and a ZigMa generator on digits, sample, judge, report")
    p.add_argument("--out", default="demo-output", help="output folder (default: demo-output)")
    p.add_argument("--size", choices=["test", "fast", "full"],
                   default=os.environ.get("DEMO_SIZE") or "fast",
                   help="test: seconds; fast: the CPU default (minutes); full: GPU settings (env DEMO_SIZE)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
