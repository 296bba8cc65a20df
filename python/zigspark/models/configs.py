"""Named ZigMa sizes.

    name   width  depth  patch   N   expand  conv
    tiny     32     4      2     4     1      4     40k parameters on 8×8×1 digits with 10 classes
    S       384    24      2    16     2      4     DiT-S's width, 2× its depth (34M on 32×32×4 latents)
    B       768    24      2    16     2      4     ZigMa's released config (embed_dim 768, depth 24, patch 2)
    L      1024    48      2    16     2      4     DiT-L's width, 2× its depth

Why 2× DiT's depth: a ZigMa block is one Mamba mixer (≈ 3·expand·D² = 6D² weights) where a DiT block is
attention + MLP (≈ 12D²), so twice the blocks give about DiT's parameter count at the same width — the
rule Mamba uses against Transformers. B at 768/24 is the configuration ZigMa trains and reports. Patch 2
is ZigMa's choice on 32×32 latents; pass patch_size=1 (an override) for images with an odd side.

tiny was chosen by measuring a training step (forward + backward + AdamW, batch 128 of 8×8×1 images,
reference backend, one intra-op thread, CPU time; one row on 16×16 images) on the 2-core development machine:

    tokens (patch)   width  N  expand   ms/step        tokens (patch)   width  N   expand  ms/step
    16 (p2)            32   4    1      180–195        16 (p2)            64   4    2      1010–1040
    16 (p2)            32   2    2      280–315        16 (p2)            64   8    2      1420–1480
    16 (p2)            32   4    2      400–505        16 (p2)            64  16    2      3450–4150
    16 (p2)            64   4    1      355–400        64 (p1)            32   4    1       580–680
    64 (16×16 img, p2) 32   4    1      590–630        64 (p1)            64  16    2     13700–14400

The cost follows batch·(expand·width)·tokens·N — the reference scan's (B, D, L, N) tensors. With the
tiny size, 210 CPU-seconds of training (≈ 1000 steps, AdamW lr 4e-3, batch 128, class dropout 0.1) gave
class-conditional samples that an SVM trained on the digits recognised as their class 100% of the time
(300 samples, Euler 20 steps, cfg 2; 91–94% without guidance).
"""

from __future__ import annotations

SIZES = {
    "tiny": {"patch_size": 2, "width": 32, "depth": 4, "d_state": 4, "expand": 1},
    "S": {"patch_size": 2, "width": 384, "depth": 24, "d_state": 16},
    "B": {"patch_size": 2, "width": 768, "depth": 24, "d_state": 16},
    "L": {"patch_size": 2, "width": 1024, "depth": 48, "d_state": 16},
}
_OVERRIDABLE = ("patch_size", "width", "depth", "d_state", "expand", "d_conv", "class_dropout", "pos_embed",
                "backend")


def zigma_config(name: str, image_size, channels: int, num_classes: int = 0, **overrides) -> dict:
    """The ZigMa(**config) arguments of a named size ("tiny", "S", "B", "L") for these images.

    `overrides` replace any architecture field (e.g. patch_size=1 for images with an odd side).
    """
    if name not in SIZES:
        raise ValueError(f"unknown ZigMa config {name!r}; choose one of {sorted(SIZES)}")
    unknown = sorted(set(overrides) - set(_OVERRIDABLE))
    if unknown:
        raise ValueError(f"zigma_config got unknown fields {unknown}; overridable: {list(_OVERRIDABLE)}")
    config = {"image_size": image_size, "channels": channels, "num_classes": num_classes, "expand": 2,
              "d_conv": 4, "class_dropout": 0.1, "pos_embed": "sincos", "backend": "auto", **SIZES[name]}
    config.update(overrides)
    return config
