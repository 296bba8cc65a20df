"""A ViT recognizer with Spark FFNs and training-free HiPrune token pruning before its head.

Patch tokens of an image x ∈ R^{C×H×W} with patch p, on the grid (h, w) = (H/p, W/p), raster order:

    z⁰_i = E ⋆ x |_i + P_i                                    i = 1..N, N = h·w, no CLS token
    zˡ   = zˡ⁻¹ + Attn(LN(zˡ⁻¹));  zˡ ← zˡ + FFN(LN(zˡ))       l = 1..depth   (the encoder)
    r^l_j = (1/heads) Σ_heads Σ_i softmax_j(q_i·k_j/√d)          attention token j receives in block l

E ⋆ x |_i is a convolution of stride p over the (p + 2·overlap)² window around patch i (overlap 1 by
default: with patch 1 a token would otherwise be a single pixel value). P starts as the 2-D sin-cos code.

HiPrune (arXiv 2508.00553) picks `keep` of the N encoder outputs from r at a middle "object" block and at a
deep block (zigspark.hiprune_select: anchors, their 4-neighbours, then registers), and only those go on
through a small transformer head, as the vision tokens handed to the language model in a VLM:

    u = Head(z^depth[kept]),   f_d = max_{i kept} LN(u)_{i,d}   (the penultimate features),   logits = W·f + b

The received sums come from the encoder's own flash-attention call (return_received=True), so no N×N matrix
exists. The network is trained on all tokens and pruned only at inference (training-free).

FFN: density 1.0 is a plain MLP, Linear → GELU → Linear (width·mlp_ratio hidden units); density < 1 is a
SparkFFN with d_ff = width·mlp_ratio and about density·d_ff active neurons per token.

Choices, measured on digits (8×8, 64 tokens; 4 training seeds; numbers in the issue #8 report):
- No CLS token in the encoder: it would gather the whole image before the pruning, so the head would see
  everything through it whatever was dropped, and every token being a patch keeps the raster grid that
  HiPrune's neighbourhoods need.
- Max pooling (pool="max", the default): each feature is the strongest evidence among the kept tokens, a
  statistic that does not renormalise by how many tokens survive. Mean pooling makes a uniformly random
  subset an unbiased estimate of the all-token mean the classifier was trained on, so on digits random
  pruning matched or beat every informed selection; a CLS token in the head ("cls", attention pooling)
  reached the best dense accuracy but collapsed unpredictably under pruning (by seed: from −1 to −70 points
  at 11% of the tokens).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..nn.attention import FlashSelfAttention
from ..nn.spark import SparkFFN
from ..ops.token_prune import STRATEGIES, hiprune_select, prune_tokens
from .embeddings import sincos_2d

_BACKENDS = ("auto", "reference", "triton", "cuda")
POOLS = ("max", "mean", "cls")

# The digits configuration (8×8, patch 1 = 64 tokens), sized by measuring CPU training (see the report of
# issue #8); also the constructor's defaults.
DIGITS_CONFIG = dict(image_size=8, channels=1, num_classes=10, patch_size=1, width=32, depth=4, heads=2,
                     head_depth=1, mlp_ratio=2.0, density=1.0)


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair


class MLP(nn.Module):
    """The plain FFN of density 1.0: Linear(width, hidden) → GELU → Linear(hidden, width)."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; forward(x (B, N, D), return_received) → x [, received (B, N)]."""

    def __init__(self, width: int, heads: int, hidden: int, density: float, backend: str):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = FlashSelfAttention(width, heads, backend=backend)
        self.ffn = MLP(width, hidden) if density == 1.0 else SparkFFN(width, hidden, density, backend=backend)

    def forward(self, x, return_received: bool = False):
        mixed = self.attn(self.norm1(x), return_received=return_received)
        mixed, received = mixed if return_received else (mixed, None)
        x = x + mixed
        x = x + self.ffn(self.norm2(x))
        return (x, received) if return_received else x


class Recognizer(nn.Module):
    """ViT classifier with HiPrune between its encoder and its head (math in the module docstring).

    Args:
        image_size: H (= W) or (H, W).  channels: C.  num_classes: classes of the classifier.
        patch_size: p; H and W must be multiples of it.  width: token width D.  heads: attention heads.
        depth: encoder blocks.  head_depth: blocks after the pruning (1 or 2 is the intent).
        mlp_ratio: FFN hidden units per width.  density: 1.0 = plain GELU MLP, (0, 1) = SparkFFN density.
        obj_layer: encoder block (0-based, negative from the end) whose received attention picks the
            anchors; default the middle block, depth // 2 (the later of the two middles when depth is even:
            on digits the anchors of earlier blocks sit less often on the stroke).
        deep_layer: block whose received attention ranks the registers; default the second-to-last,
            depth − 2 (block 0 when depth is 1).
        prune_alpha: HiPrune's anchor share α (paper: 0.1).  patch_overlap: pixels of context the patch
            embedding sees on each side of its patch.  pool: "max" | "mean" over the head's tokens, or "cls"
            (a class token added in the head).  backend: for the attention, Spark and selection ops
            ("auto" | "reference" | "triton" | "cuda").

    forward(x (B, C, H, W), keep=None, strategy="hiprune", generator=None) → logits (B, num_classes);
    keep=None runs every token; a float in (0, 1] keeps that share of the N tokens (rounded, at least 1), an
    int that many. features(...) takes the same arguments and returns the (B, D) penultimate features.

    Example:
        >>> import torch
        >>> from zigspark.models.recognizer import Recognizer
        >>> model = Recognizer(image_size=8, channels=1, num_classes=10, width=32, depth=2, heads=2)
        >>> model(torch.randn(3, 1, 8, 8), keep=1 / 3).shape
        torch.Size([3, 10])
    """

    def __init__(self, image_size=8, channels: int = 1, num_classes: int = 10, patch_size: int = 1,
                 width: int = 32, depth: int = 4, heads: int = 2, head_depth: int = 1, mlp_ratio: float = 2.0,
                 density: float = 1.0, obj_layer: int | None = None, deep_layer: int | None = None,
                 prune_alpha: float = 0.1, patch_overlap: int = 1, pool: str = "max", backend: str = "auto"):
        super().__init__()
        height, width_px = _pair(image_size, "image_size")
        for name, value in (("channels", channels), ("num_classes", num_classes), ("patch_size", patch_size),
                            ("width", width), ("depth", depth), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("head_depth", head_depth), ("patch_overlap", patch_overlap)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if height % patch_size or width_px % patch_size:
            raise ValueError(f"image_size {(height, width_px)} must be a multiple of patch_size {patch_size}; "
                             "resize the images or choose a patch size that divides them")
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        if not (density == 1.0 or 0.0 < density < 1.0):
            raise ValueError(f"density must be 1.0 (plain MLP) or in (0, 1) (SparkFFN), got {density!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if not 0.0 < prune_alpha <= 5.0:
            raise ValueError(f"prune_alpha must be in (0, 5], got {prune_alpha!r}")
        obj = depth // 2 if obj_layer is None else obj_layer
        deep = max(0, depth - 2) if deep_layer is None else deep_layer
        for name, layer in (("obj_layer", obj), ("deep_layer", deep)):
            if isinstance(layer, bool) or not isinstance(layer, int) or not -depth <= layer < depth:
                raise ValueError(f"{name} must be an encoder block index in [-{depth}, {depth}), got {layer!r}")
        hidden = max(1, round(width * mlp_ratio))

        self._config = dict(image_size=image_size if isinstance(image_size, int) else [height, width_px],
                            channels=channels, num_classes=num_classes, patch_size=patch_size, width=width,
                            depth=depth, heads=heads, head_depth=head_depth, mlp_ratio=float(mlp_ratio),
                            density=float(density), obj_layer=obj_layer, deep_layer=deep_layer,
                            prune_alpha=float(prune_alpha), patch_overlap=patch_overlap, pool=pool,
                            backend=backend)
        self.num_classes, self.backend, self.prune_alpha = num_classes, backend, float(prune_alpha)
        self.grid = (height // patch_size, width_px // patch_size)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.obj_layer, self.deep_layer = obj % depth, deep % depth

        self.patch_embed = nn.Conv2d(channels, width, patch_size + 2 * patch_overlap, stride=patch_size,
                                     padding=patch_overlap)
        # learned, started at the 2-D sin-cos code: at ViT's usual 0.02-std start the pixel tokens of patch 1
        # are nearly indistinguishable by position, and the model first learns an intensity histogram
        if width % 4 == 0:
            table = sincos_2d(width, *self.grid)[None]
        else:
            table = torch.randn(1, self.num_tokens, width) * 0.5
        self.pos_embed = nn.Parameter(table.clone())
        self.encoder = nn.ModuleList(Block(width, heads, hidden, density, backend) for _ in range(depth))
        self.head = nn.ModuleList(Block(width, heads, hidden, density, backend) for _ in range(head_depth))
        self.pool = pool
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if pool == "cls" else None
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, num_classes)

    @property
    def config(self) -> dict:
        """JSON-able constructor arguments: Recognizer(**model.config) rebuilds this architecture."""
        return dict(self._config)

    def set_backend(self, backend: str) -> None:
        """Run the attention, Spark FFN and selection ops on `backend` from now on (weights unchanged)."""
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.backend = self._config["backend"] = backend
        for module in self.modules():
            if isinstance(module, (FlashSelfAttention, SparkFFN)):
                module.backend = backend

    def num_kept(self, keep) -> int:
        """Tokens kept for `keep`: None → N; float in (0, 1] → max(1, round(keep·N)); int in [1, N] → keep."""
        n = self.num_tokens
        if keep is None:
            return n
        if isinstance(keep, bool):
            raise TypeError(f"keep must be None, a float ratio in (0, 1] or an int count, got {keep!r}")
        if isinstance(keep, int):
            if not 1 <= keep <= n:
                raise ValueError(f"keep as a count must be in [1, {n}] (the model has {n} tokens), got {keep}")
            return keep
        if isinstance(keep, float):
            if not 0.0 < keep <= 1.0 or math.isnan(keep):
                raise ValueError(f"keep as a ratio must be in (0, 1], got {keep}; pass an int for a token count")
            return max(1, min(n, round(keep * n)))
        raise TypeError(f"keep must be None, a float ratio in (0, 1] or an int count, got {type(keep).__name__}")

    def encode(self, x: torch.Tensor, return_scores: bool = True):
        """Encoder outputs (B, N, D) in raster order [, obj_scores (B, N), deep_scores (B, N)]."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a (B, C, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        expected = (self._config["channels"], self.grid[0] * self._config["patch_size"],
                    self.grid[1] * self._config["patch_size"])
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have (C, H, W) = {expected} for this model, got {tuple(x.shape[1:])}")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        scores = {}
        for index, block in enumerate(self.encoder):
            if return_scores and index in (self.obj_layer, self.deep_layer):
                tokens, scores[index] = block(tokens, return_received=True)
            else:
                tokens = block(tokens)
        if not return_scores:
            return tokens
        return tokens, scores[self.obj_layer].float(), scores[self.deep_layer].float()

    def keep_indices(self, obj_scores, deep_scores, keep, strategy: str = "hiprune", generator=None):
        """(B, keep) ascending token indices chosen by `strategy` from the encoder's scores."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        return hiprune_select(obj_scores, deep_scores, self.grid, self.num_kept(keep), alpha=self.prune_alpha,
                              strategy=strategy, generator=generator, backend=self.backend)

    def head_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, n, D) kept encoder tokens → (B, D) pooled features after the head."""
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.head:
            tokens = block(tokens)
        tokens = self.norm(tokens)
        if self.pool == "cls":
            return tokens[:, 0]
        return tokens.amax(dim=1) if self.pool == "max" else tokens.mean(dim=1)

    def features(self, x: torch.Tensor, keep=None, strategy: str = "hiprune", generator=None) -> torch.Tensor:
        """x (B, C, H, W) → (B, D) penultimate features, after pruning to `keep` tokens (None: all)."""
        n_keep = self.num_kept(keep)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if keep is None or n_keep == self.num_tokens:  # nothing to drop: skip the scores
            return self.head_features(self.encode(x, return_scores=False))
        tokens, obj, deep = self.encode(x)
        idx = self.keep_indices(obj, deep, n_keep, strategy, generator)
        return self.head_features(prune_tokens(tokens, idx))

    def forward(self, x: torch.Tensor, keep=None, strategy: str = "hiprune", generator=None) -> torch.Tensor:
        """x (B, C, H, W) → logits (B, num_classes); see features() for keep / strategy."""
        return self.classifier(self.features(x, keep, strategy, generator))
