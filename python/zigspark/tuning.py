"""The Triton kernels' tuned tiles, kept across processes (triton_kernels/_tune.py).

On a GPU each Triton kernel times its candidate tiles the first time it meets a shape bucket. Timing varies
between processes, so two runs, or two DDP ranks, can pick different tiles and round differently in the
last bits. To make them agree, tune once and carry the table:

    zigspark.tuning.save_tiles("tiles.json")      # after a warm-up step
    zigspark.tuning.load_tiles("tiles.json")      # or ZIGSPARK_TUNED_TILES=tiles.json in the environment

or, across ranks, broadcast `tiles()` from rank 0 and call `use_tiles(table)` on every rank. Loaded tiles are
used without timing, also with ZIGSPARK_AUTOTUNE=0; a bucket the table lacks is tuned as usual.
"""

from .triton_kernels._tune import TILES_ENV, load_tiles, save_tiles, tiles, use_tiles

__all__ = ["TILES_ENV", "load_tiles", "save_tiles", "tiles", "use_tiles"]
