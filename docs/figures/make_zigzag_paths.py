"""Draw ZigMa's 8 zigzag scan paths (zigspark.orders) on a small grid: docs/figures/zigzag_paths.png.

    python docs/figures/make_zigzag_paths.py [h w]
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from zigspark import orders  # noqa: E402

CORNERS = ["top-left", "top-right", "bottom-left", "bottom-right"]


def main(h: int = 5, w: int = 6) -> Path:
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.2))
    for i in range(8):
        ax = axes[i % 2, i // 2]
        path = orders.zigzag_path(h, w, i)
        rows, cols = (path // w).tolist(), (path % w).tolist()
        ax.plot(cols, rows, "-", color="tab:blue", linewidth=2)
        ax.scatter(cols, rows, c=range(len(path)), cmap="viridis", s=40, zorder=3)
        ax.plot(cols[0], rows[0], "o", color="tab:red", markersize=11, zorder=4)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
        ax.set_title(f"path {i}: {CORNERS[i // 2]}, {'column' if i % 2 else 'row'}-wise", fontsize=10)
    fig.suptitle(f"zigspark.orders.zigzag_path(h={h}, w={w}, i): red = first token, colour = step", fontsize=12)
    fig.tight_layout()
    out = Path(__file__).with_name("zigzag_paths.png")
    fig.savefig(out, dpi=90)
    return out


if __name__ == "__main__":
    print(main(*map(int, sys.argv[1:3])) if len(sys.argv) > 2 else main())
