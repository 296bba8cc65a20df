"""ZigzagMamba: a Mamba mixer whose convolution and scan follow a zigzag path over the token grid (ZigMa).

    (batch, L, d_model) in raster order → in_proj → [x, z] → causal conv1d along the path → x_proj / dt_proj
    → selective scan along the path → gate by silu(z) → out_proj → (batch, L, d_model) in raster order

Layer i of a ZigMa stack uses zigzag path i mod 8 (zigspark.orders.path_for_layer). The tokens are never
copied into path order: the kernels read and write them through the order. Initialisation follows
mamba-ssm's Mamba block (S4D-real A, dt in [dt_min, dt_max] through an inverse-softplus bias, D = 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import orders
from ..compat.mamba_ssm import mamba_inner_fn


class ZigzagMamba(nn.Module):
    """Mamba mixer along a zigzag path.

    Args:
        d_model: width of the tokens.
        grid: (h, w) of the image token grid, or (frames, h, w) for video (the path runs inside each frame).
        layer_index: picks path layer_index mod 8, unless `order` is given.
        order: any zigspark.orders order or LongTensor permutation, overriding the path.
        d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init_floor, conv_bias, bias: as mamba-ssm's Mamba.
        backend: "auto" | "cuda" | "triton" | "reference" for the conv and the scan.

    Example:
        >>> import torch
        >>> from zigspark.nn import ZigzagMamba
        >>> layer = ZigzagMamba(64, grid=(8, 8), layer_index=3)
        >>> layer(torch.randn(2, 64, 64)).shape
        torch.Size([2, 64, 64])
    """

    def __init__(self, d_model: int, grid, layer_index: int = 0, *, order=None, d_state: int = 16, d_conv: int = 4,
                 expand: int = 2, dt_rank="auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        grid = tuple(grid)
        if len(grid) not in (2, 3):
            raise ValueError(f"grid must be (h, w) or (frames, h, w), got {grid}")
        frames, h, w = (1, *grid) if len(grid) == 2 else grid
        self.grid, self.layer_index, self.backend = grid, layer_index, backend
        order = order if order is not None else orders.zigzag(h, w, orders.path_for_layer(layer_index), frames)
        if isinstance(order, torch.Tensor):
            # Checked once, and kept as the kernels read it (int64, contiguous). A buffer, so that .to() and
            # .cuda() move it with the parameters; not persistent, so that state_dicts stay as they were
            # (the order comes from the constructor, as a built-in order does).
            self.register_buffer("order", orders.check_order(order, order.numel(), order.device), persistent=False)
        else:
            self.order = order
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(self.d_inner, **factory) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (batch, L, d_model) in raster order, L = frames·h·w. Returns the same shape."""
        length = self.order.numel() if isinstance(self.order, torch.Tensor) else len(self.order)
        if hidden.dim() != 3 or hidden.shape[1] != length:
            raise ValueError(f"ZigzagMamba expects (batch, L, d_model) with L = {length} tokens for "
                             f"grid {self.grid}, got shape {tuple(hidden.shape)}")
        xz = self.in_proj(hidden).transpose(1, 2)
        return mamba_inner_fn(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                              self.out_proj.weight, self.out_proj.bias, -torch.exp(self.A_log.float()), D=self.D.float(),
                              delta_bias=self.dt_proj.bias.float(), delta_softplus=True, order=self.order,
                              backend=self.backend)

    def extra_repr(self) -> str:
        return f"d_inner={self.d_inner}, d_state={self.d_state}, grid={self.grid}, order={self.order}"
