"""Scan orders computed inside Triton kernels (the closed forms of zigspark/orders.py).

`order_position(t, ...)` maps scan steps t to raster positions, so a kernel reads and writes tokens in
raster layout while it scans in path order: no permuted copy of any tensor, and for built-in orders no
index tensor either. KIND: 0 raster, 1 zigzag, 2 temporal (zigspark.orders.KIND_CODES), 3 an index
tensor, 4 the identity (no order given).
"""

import triton
import triton.language as tl

KIND_INDEX = 3
KIND_IDENTITY = 4


@triton.jit
def order_position(t, ORDER, length, frames, h, w,
                   KIND: tl.constexpr, PATH: tl.constexpr, REVERSE: tl.constexpr):
    if KIND == 4:
        pos = t
    elif KIND == 3:
        pos = tl.load(ORDER + t, mask=(t >= 0) & (t < length), other=0).to(tl.int32)  # the conv asks for t < 0
    elif KIND == 0:
        if REVERSE:
            pos = length - 1 - t
        else:
            pos = t
    elif KIND == 1:
        hw = h * w
        frame = t // hw
        s = t % hw
        if PATH % 2 == 1:   # column-wise snake
            c = s // h
            r = s % h
            r = tl.where(c % 2 == 1, h - 1 - r, r)
        else:               # row-wise snake
            r = s // w
            c = s % w
            c = tl.where(r % 2 == 1, w - 1 - c, c)
        if PATH >= 4:       # starts at a bottom corner
            r = h - 1 - r
        if (PATH // 2) % 2 == 1:  # starts at a right corner
            c = w - 1 - c
        pos = frame * hw + r * w + c
    else:
        s = t // frames
        f = t % frames
        if REVERSE:
            f = frames - 1 - f
        pos = f * (h * w) + s
    return pos


def order_launch_args(order_params, order_index, length):
    """(ORDER tensor or None, frames, h, w, KIND, PATH, REVERSE) for order_position."""
    if order_index is not None:
        return order_index, 1, 1, length, KIND_INDEX, 0, False
    if not order_params:
        return None, 1, 1, length, KIND_IDENTITY, 0, False
    kind, frames, h, w, path, reverse = order_params
    return None, frames, h, w, kind, path, bool(reverse)
