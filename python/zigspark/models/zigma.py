"""ZigMa: a DiT-style zigzag Mamba generator (Hu et al., "ZigMa: A DiT-style Zigzag Mamba Diffusion Model",
ECCV 2024), trained as a flow-matching velocity field.

    tokens  z⁰ = PatchEmbed(x) + pos            x (B, C, H, W) → (B, L, D),  L = (H/p)·(W/p), raster order
    cond    c  = MLP(sincos(1000·t)) + E[y]      y = num_classes is the null class (unconditional / CFG)
    blocks  zⁱ⁺¹ = zⁱ + gateᵢ(c) · Mambaᵢ(LN(zⁱ)·(1 + scaleᵢ(c)) + shiftᵢ(c)),  i = 0..depth−1
    out     v  = Unpatchify(Linear(LN(z)·(1 + scale(c)) + shift(c)))         (B, C, H, W)

Block i's Mamba runs its causal conv and scan along ZigMa's zigzag path i mod 8 (zigspark.orders) inside
the kernels: the tokens stay in raster order and are never permuted. The blocks are mixer-only, as in
ZigMa (no MLP). adaLN-Zero: every modulation and the output linear start at zero, so each block starts as
the identity and the untrained model predicts v = 0.

Flow matching (the house convention): x_t = (1 − t)·x₀ + t·ε, the model predicts v = ε − x₀, and sampling
integrates dx/dt = v from t = 1 (noise) to t = 0 (data) — see zigspark.sampling.

Video (ZigMaVideo, x (B, T, C, H, W)): every frame is patch-embedded alike, the T·h·w tokens are in raster
order frame by frame, positions are spatial(r, c) + temporal(f), and the blocks cycle ZigMa's
spatial–spatial–temporal ("sst") pattern: the k-th spatial block scans zigzag path k mod 8 inside every
frame; the j-th temporal block scans, for every spatial position, all frames forward (j even) or backward
(j odd).
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from .. import orders
from ..validation import check_int
from .adaln import FinalLayer, ZigMaBlock
from .embeddings import LabelEmbedder, PositionEmbedding, TimestepEmbedder, sincos_2d, sincos_3d

BACKENDS = ("auto", "cuda", "triton", "reference")
POS_EMBEDS = ("sincos", "learned")


# ---- argument checks -----------------------------------------------------------------------------------


def _image_size(value) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return check_int("image_size", value, 1), int(value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return check_int("image_size[0]", value[0], 1), check_int("image_size[1]", value[1], 1)
    raise TypeError(f"image_size must be an int or an (H, W) pair, got {value!r}")


def _common_config(image_size, channels, patch_size, width, depth, d_state, expand, d_conv, num_classes,
                   class_dropout, pos_embed, backend) -> dict:
    """Validate the arguments ZigMa and ZigMaVideo share; return them as a JSON-able dict."""
    height, width_px = _image_size(image_size)
    patch_size = check_int("patch_size", patch_size, 1)
    if height % patch_size or width_px % patch_size:
        raise ValueError(f"image_size {height}x{width_px} is not divisible by patch_size={patch_size}; "
                         f"choose a patch_size that divides both sides (or resize the images)")
    width = check_int("width", width, 1)
    if width % 4:
        raise ValueError(f"width must be a multiple of 4 (the 2-D sin-cos positions split it in four), got {width}")
    if not 2 <= check_int("d_conv", d_conv, 1) <= 4:
        raise ValueError(f"d_conv must be 2, 3 or 4 (the causal conv1d kernels take widths 2-4), got {d_conv}")
    if not isinstance(class_dropout, numbers.Real) or not 0.0 <= class_dropout < 1.0:
        raise ValueError(f"class_dropout must be a probability in [0, 1), got {class_dropout!r}")
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return {
        "image_size": height if height == width_px else [height, width_px],
        "channels": check_int("channels", channels, 1),
        "patch_size": patch_size,
        "width": width,
        "depth": check_int("depth", depth, 1),
        "d_state": check_int("d_state", d_state, 1),
        "expand": check_int("expand", expand, 1),
        "d_conv": check_int("d_conv", d_conv, 1),
        "num_classes": check_int("num_classes", num_classes, 0),
        "class_dropout": float(class_dropout),
        "pos_embed": pos_embed,
        "backend": backend,
    }


# ---- shared body ---------------------------------------------------------------------------------------

class _ZigMaStack(nn.Module):
    """Patch embedding, conditioning, adaLN-Zero zigzag Mamba blocks and the final layer, on (B, F, C, H, W)
    inputs (F = 1 for images). Subclasses choose the block orders, the position table and the input layout."""

    def __init__(self, config: dict, frames: int, block_orders: list, position_table: torch.Tensor):
        super().__init__()
        self.config = config
        self.frames = frames
        height, width_px = _image_size(config["image_size"])
        self.channels, self.patch_size = config["channels"], config["patch_size"]
        self.image_hw = (height, width_px)
        self.grid_hw = (height // self.patch_size, width_px // self.patch_size)
        self.num_classes = config["num_classes"]
        self.class_dropout = config["class_dropout"]
        width, p = config["width"], self.patch_size
        grid = (frames, *self.grid_hw) if frames > 1 else self.grid_hw

        self.patch_embed = nn.Conv2d(self.channels, width, kernel_size=p, stride=p)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(width, -1))
        nn.init.zeros_(self.patch_embed.bias)
        self.pos_embed = PositionEmbedding(position_table, learned=config["pos_embed"] == "learned")
        self.t_embed = TimestepEmbedder(width)
        self.y_embed = LabelEmbedder(self.num_classes, width) if self.num_classes > 0 else None
        mamba = {k: config[k] for k in ("d_state", "expand", "d_conv", "backend")}
        self.blocks = nn.ModuleList(ZigMaBlock(width, grid, order, **mamba) for order in block_orders)
        self.final = FinalLayer(width, p * p * self.channels)

    # -- public helpers --

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def block_orders(self) -> list:
        """The scan order of every block's mixer (zigspark.orders.ScanOrder)."""
        return [block.order for block in self.blocks]

    def set_backend(self, backend: str) -> None:
        """Run every mixer's conv and scan on `backend` ("auto" | "cuda" | "triton" | "reference")."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        for block in self.blocks:
            block.mixer.backend = backend
        self.config["backend"] = backend

    def drop_labels(self, y: torch.Tensor | None, generator: torch.Generator | None = None):
        """Replace each label by the null class (num_classes) with probability `class_dropout`.

        y: (B,) long or None → the same. Training calls this for classifier-free guidance; forward never
        drops labels itself. Draws from `generator` (on its device) when given.
        """
        if y is None or self.num_classes == 0 or self.class_dropout == 0.0:
            return y
        device = generator.device if generator is not None else y.device
        drop = torch.rand(y.shape, generator=generator, device=device).to(y.device) < self.class_dropout
        return torch.where(drop, torch.full_like(y, self.num_classes), y)

    # -- the computation --

    def _check_t(self, t, batch: int, device) -> torch.Tensor:
        if isinstance(t, numbers.Real) and not isinstance(t, bool):
            return torch.full((batch,), float(t), device=device)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t must be a float tensor of shape ({batch},) or a number, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"t must be a floating tensor of times in [0, 1], got dtype {t.dtype}; use t.float()")
        if t.dim() == 0:
            return t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must have shape ({batch},) (one time per sample), got {tuple(t.shape)}")
        return t

    def _check_y(self, y, batch: int):
        if y is None:
            return None
        if self.num_classes == 0:
            raise ValueError("y was given but this model is unconditional (num_classes=0); pass y=None, or build "
                             "the model with num_classes > 0")
        if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"y must be a LongTensor of class labels, got "
                            f"{y.dtype if isinstance(y, torch.Tensor) else type(y).__name__}")
        if y.shape != (batch,):
            raise ValueError(f"y must have shape ({batch},) (one label per sample), got {tuple(y.shape)}")
        if not torch.compiler.is_compiling() and y.numel() and bool(((y < 0) | (y > self.num_classes)).any()):
            raise ValueError(f"y must hold labels in 0..{self.num_classes - 1}, or {self.num_classes} for the null "
                             f"class; got values in {int(y.min())}..{int(y.max())}")
        return y.long()

    def condition(self, t, y, batch: int, device) -> torch.Tensor:
        """c (B, width) = t embedding + class embedding (null class where y is None)."""
        c = self.t_embed(self._check_t(t, batch, device))
        if self.y_embed is not None:
            y = self._check_y(y, batch)
            if y is None:
                y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
            c = c + self.y_embed(y)
        else:
            self._check_y(y, batch)
        return c

    def _tokens(self, frames_x: torch.Tensor) -> torch.Tensor:
        """(B, F, C, H, W) → (B, F·h·w, width) tokens in raster order, positions added."""
        batch, frames = frames_x.shape[:2]
        patches = self.patch_embed(frames_x.reshape(batch * frames, *frames_x.shape[2:]))   # (B·F, D, h, w)
        tokens = patches.flatten(2).transpose(1, 2).reshape(batch, -1, patches.shape[1])
        # the residual stream keeps the input's precision (float32 under autocast, where the conv gave bf16)
        return self.pos_embed(tokens.to(frames_x.dtype))

    def _unpatchify(self, out: torch.Tensor) -> torch.Tensor:
        """(B, F·h·w, p·p·C) → (B, F, C, H, W)."""
        (h, w), p, c = self.grid_hw, self.patch_size, self.channels
        out = out.reshape(out.shape[0], self.frames, h, w, p, p, c)
        return out.permute(0, 1, 6, 2, 4, 3, 5).reshape(out.shape[0], self.frames, c, h * p, w * p)

    def _run(self, frames_x: torch.Tensor, t, y, stop_after: int | None = None) -> torch.Tensor:
        c = self.condition(t, y, frames_x.shape[0], frames_x.device)
        tokens = self._tokens(frames_x)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, c)
            if i == stop_after:
                return tokens
        return self._unpatchify(self.final(tokens, c)).to(frames_x.dtype)

    def _check_layer(self, layer) -> int:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"layer must be an int block index, got {type(layer).__name__}")
        if not -self.depth <= layer < self.depth:
            raise ValueError(f"layer={layer} is out of range for a model of depth {self.depth} "
                             f"(expected {-self.depth} <= layer < {self.depth}; -1 = the last block)")
        return int(layer) % self.depth

    def _check_x(self, x, expected: tuple[int, ...], layout: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor {layout}, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor (images in [-1, 1]), got dtype {x.dtype}; use x.float()")
        if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (batch, {', '.join(map(str, expected))}) {layout} for this model "
                             f"(config image_size={self.config['image_size']}, channels={self.channels}), "
                             f"got {tuple(x.shape)}")


# ---- the models ----------------------------------------------------------------------------------------

class ZigMa(_ZigMaStack):
    """ZigMa image generator: a flow-matching velocity field v(x, t, y).

    Args:
        image_size: H (square) or (H, W) of the inputs; both divisible by patch_size.
        channels: C of the inputs.
        patch_size: p; the token grid is (H/p) × (W/p).
        width: token width D (a multiple of 4).
        depth: number of blocks; block i scans zigzag path i mod 8.
        d_state, expand, d_conv: the Mamba mixer's state size N, expansion and conv width.
        num_classes: 0 for an unconditional model; else labels 0..num_classes−1 (+ the null class num_classes).
        class_dropout: probability with which `drop_labels` replaces a label by the null class.
        pos_embed: "sincos" (fixed 2-D sin-cos) or "learned" (initialised to the sin-cos table).
        backend: "auto" | "cuda" | "triton" | "reference" for the mixers' conv and scan.

    `model.config` holds these arguments (JSON-able); `ZigMa(**model.config)` rebuilds the architecture.

    Example:
        >>> import torch
        >>> from zigspark.models import ZigMa, zigma_config
        >>> model = ZigMa(**zigma_config("tiny", image_size=8, channels=1, num_classes=10))
        >>> x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 10])
        >>> model(x, t, y).shape
        torch.Size([4, 1, 8, 8])
    """

    def __init__(self, image_size, channels: int, patch_size: int, width: int, depth: int, d_state: int = 16,
                 expand: int = 2, d_conv: int = 4, num_classes: int = 0, class_dropout: float = 0.1,
                 pos_embed: str = "sincos", backend: str = "auto"):
        config = _common_config(image_size, channels, patch_size, width, depth, d_state, expand, d_conv,
                                num_classes, class_dropout, pos_embed, backend)
        height, width_px = _image_size(config["image_size"])
        h, w = height // config["patch_size"], width_px // config["patch_size"]
        block_orders = [orders.zigzag(h, w, orders.path_for_layer(i)) for i in range(config["depth"])]
        super().__init__(config, 1, block_orders, sincos_2d(config["width"], h, w))

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample."""
        return (self.channels, *self.image_hw)

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity v(x_t, t, y).

        x: (B, C, H, W) float; t: (B,) float in [0, 1] (or one number for all); y: (B,) long labels in
        0..num_classes (num_classes = null class) or None (null class; required for unconditional models).
        Returns (B, C, H, W) in x's dtype.
        """
        self._check_x(x, self.sample_shape, "(images)")
        return self._run(x[:, None], t, y)[:, 0]

    def features(self, x: torch.Tensor, t, y: torch.Tensor | None = None, layer: int = -1) -> torch.Tensor:
        """Hidden tokens after block `layer` (0-based, −1 = last): (B, (H/p)·(W/p), width), raster order."""
        self._check_x(x, self.sample_shape, "(images)")
        return self._run(x[:, None], t, y, stop_after=self._check_layer(layer))


def video_block_order(i: int, frames: int, h: int, w: int) -> orders.ScanOrder:
    """Block i's order in ZigMa's spatial–spatial–temporal video pattern (module docstring)."""
    cycle, phase = divmod(i, 3)
    if phase < 2:
        return orders.zigzag(h, w, orders.path_for_layer(2 * cycle + phase), frames)
    return orders.temporal(frames, h, w, backward=cycle % 2 == 1)


class ZigMaVideo(_ZigMaStack):
    """ZigMa video generator on (B, T, C, H, W) clips; blocks cycle spatial, spatial, temporal scans.

    Args: `frames` (T) and everything ZigMa takes. `model.config` includes frames.
    """

    def __init__(self, frames: int, image_size, channels: int, patch_size: int, width: int, depth: int,
                 d_state: int = 16, expand: int = 2, d_conv: int = 4, num_classes: int = 0,
                 class_dropout: float = 0.1, pos_embed: str = "sincos", backend: str = "auto"):
        frames = check_int("frames", frames, 1)
        config = {"frames": frames, **_common_config(image_size, channels, patch_size, width, depth, d_state,
                                                     expand, d_conv, num_classes, class_dropout, pos_embed,
                                                     backend)}
        height, width_px = _image_size(config["image_size"])
        h, w = height // config["patch_size"], width_px // config["patch_size"]
        block_orders = [video_block_order(i, frames, h, w) for i in range(config["depth"])]
        super().__init__(config, frames, block_orders, sincos_3d(config["width"], frames, h, w))

    @property
    def sample_shape(self) -> tuple[int, int, int, int]:
        """(T, C, H, W) of one sample."""
        return (self.frames, self.channels, *self.image_hw)

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C, H, W); t, y as ZigMa. Returns the velocity (B, T, C, H, W)."""
        self._check_x(x, self.sample_shape, "(clips)")
        return self._run(x, t, y)

    def features(self, x: torch.Tensor, t, y: torch.Tensor | None = None, layer: int = -1) -> torch.Tensor:
        """Hidden tokens after block `layer`: (B, T·(H/p)·(W/p), width), raster order frame by frame."""
        self._check_x(x, self.sample_shape, "(clips)")
        return self._run(x, t, y, stop_after=self._check_layer(layer))
