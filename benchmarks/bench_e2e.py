"""End-to-end: ZigMa training steps and sampling runs, and Recognizer inference with HiPrune.

ZigMa (zigspark.models.ZigMa) is timed three ways on the same weights, at two token counts (GPU: 1,024 and
4,096 tokens; CPU: far smaller):
  * fused zigzag    — every block's conv and scan read and write the tokens through its zigzag path;
  * gather + raster scan + scatter — the same mixers run in raster order on tokens copied into path order
    and copied back (what public ZigMa code does), for each kernel backend;
  * pure reference  — backend="reference" (on the CPU the fused path *is* the reference);
and against a DiT of equal width and depth (adaLN-Zero blocks of zigspark.nn.FlashSelfAttention + a GELU
MLP, FlashDiT below). A training step is one flow-matching step,

    x_t = (1 − t)·x₀ + t·ε,   loss = ‖v_θ(x_t, t, y) − (ε − x₀)‖²,   backward, AdamW step,

under bf16 autocast on CUDA; a sampling run is zigspark.sampling.sample (Euler). Reported: time, images per
second, and on CUDA the peak memory allocated during one step / run (torch.cuda.max_memory_allocated).
Recognizer inference (zigspark.models.Recognizer, backend "auto") at 100 %, 33.3 % and 11.1 % of the tokens
(HiPrune). Long calls are timed by CUDA events around each call (common.time_few_ms), never by host clocks
around asynchronous work.

    python benchmarks/bench_e2e.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import zigspark  # noqa: E402
from zigspark import backends, orders  # noqa: E402
from zigspark.models import ZigMa  # noqa: E402
from zigspark.models.adaln import FinalLayer, modulate, zero_linear  # noqa: E402
from zigspark.models.embeddings import LabelEmbedder, PositionEmbedding, TimestepEmbedder, sincos_2d  # noqa: E402
from zigspark.models.recognizer import Recognizer  # noqa: E402
from zigspark.nn import FlashSelfAttention  # noqa: E402


# ---------------------------------------------------------------------------------------------- models


class GatherScatterMixer(nn.Module):
    """A ZigzagMamba run the way public ZigMa code runs it: tokens copied into path order, a raster scan,
    the result copied back to raster order. Same weights, same output as the fused mixer (up to rounding)."""

    def __init__(self, mixer):
        super().__init__()
        self.path = mixer.order
        device = next(mixer.parameters()).device
        self.register_buffer("gather", self.path.indices(device), persistent=False)
        self.register_buffer("scatter", self.path.inverse_indices(device), persistent=False)
        mixer.order = orders.raster(len(self.path))
        self.inner = mixer

    @property
    def order(self):
        return self.path

    @property
    def backend(self):
        return self.inner.backend

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, D) in raster order → (B, L, D) in raster order."""
        return self.inner(tokens.index_select(1, self.gather)).index_select(1, self.scatter)


def gather_scatter(model: ZigMa) -> ZigMa:
    """The same model (same weights) with every mixer made to gather, scan in raster order and scatter."""
    for block in model.blocks:
        block.mixer = GatherScatterMixer(block.mixer)
    return model


class DiTBlock(nn.Module):
    """DiT's adaLN-Zero block on zigspark flash attention:

        (b₁, s₁, g₁, b₂, s₂, g₂) = Linear(SiLU(c))                     zero-initialised
        x ← x + g₁ · Attn(LN(x)·(1 + s₁) + b₁);   x ← x + g₂ · MLP(LN(x)·(1 + s₂) + b₂)
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, backend: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = FlashSelfAttention(width, heads, backend=backend)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.modulation = nn.Sequential(nn.SiLU(), zero_linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), c (B, D) → (B, L, D)."""
        b1, s1, g1, b2, s2, g2 = self.modulation(c).chunk(6, dim=-1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), b1, s1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), b2, s2))


class FlashDiT(nn.Module):
    """A DiT velocity field with ZigMa's interface (forward(x, t, y), num_classes, sample_shape, config):
    the same patch embedding, sin-cos positions, conditioning and final layer as ZigMa, DiT blocks inside."""

    def __init__(self, image_size: int, channels: int, patch_size: int, width: int, depth: int,
                 num_classes: int = 0, heads: int | None = None, mlp_ratio: float = 4.0, backend: str = "auto"):
        super().__init__()
        heads = heads or max(1, width // 64)
        self.config = dict(image_size=image_size, channels=channels, patch_size=patch_size, width=width,
                           depth=depth, num_classes=num_classes, heads=heads, mlp_ratio=mlp_ratio, backend=backend)
        self.channels, self.patch_size, self.num_classes = channels, patch_size, num_classes
        self.image_hw = (image_size, image_size)
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(channels, width, patch_size, stride=patch_size)
        self.pos_embed = PositionEmbedding(sincos_2d(width, self.grid, self.grid), learned=False)
        self.t_embed = TimestepEmbedder(width)
        self.y_embed = LabelEmbedder(num_classes, width) if num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio, backend) for _ in range(depth))
        self.final = FinalLayer(width, patch_size * patch_size * channels)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.image_hw)

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) in [0, 1], y (B,) long or None → velocity (B, C, H, W)."""
        batch = x.shape[0]
        t = torch.full((batch,), float(t), device=x.device) if not isinstance(t, torch.Tensor) else t.expand(batch)
        c = self.t_embed(t)
        if self.y_embed is not None:
            y = torch.full((batch,), self.num_classes, device=x.device, dtype=torch.long) if y is None else y
            c = c + self.y_embed(y)
        tokens = self.pos_embed(self.patch_embed(x).flatten(2).transpose(1, 2))
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.final(tokens, c)
        g, p = self.grid, self.patch_size
        out = out.reshape(batch, g, g, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(batch, self.channels, g * p, g * p).to(x.dtype)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- timing


def kernel_backends(op: str, device: torch.device) -> list[str]:
    """The backends of `op` that run here; the reference only where no kernel does (it is timed apart)."""
    found = [b for b in backends.BACKENDS if backends.unavailable_reason(op, b, device) is None]
    kernels = [b for b in found if b != "reference"]
    return kernels or found


def seeded(build):
    """build() under a fixed seed, so every ZigMa variant starts from the same weights."""
    def make():
        torch.manual_seed(0)
        return build()

    return make


def generators(config: dict, device: torch.device, reference_ok: bool) -> dict:
    """{impl name: a function building the model}: built one at a time, so a peak-memory figure counts only
    its own model, and the ZigMa variants share their weights (same seed)."""
    makers = {}
    zigma = lambda backend: ZigMa(**{**config, "backend": backend}).to(device)  # noqa: E731
    for backend in kernel_backends("selective_scan", device):
        makers[f"ZigMa fused zigzag, zigspark-{backend}"] = seeded(lambda b=backend: zigma(b))
        makers[f"ZigMa gather+raster scan+scatter, zigspark-{backend}"] = seeded(
            lambda b=backend: gather_scatter(zigma(b)))
    if device.type == "cuda" and reference_ok:
        makers["ZigMa pure reference, zigspark-reference"] = seeded(lambda: zigma("reference"))
    dit = {k: config[k] for k in ("image_size", "channels", "patch_size", "width", "depth", "num_classes")}
    for backend in kernel_backends("flash_attention", device):
        makers[f"DiT (equal width/depth) on flash attention, zigspark-{backend}"] = seeded(
            lambda b=backend: FlashDiT(**dit, backend=b).to(device))
    return makers


def training_step(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, device: torch.device):
    """One flow-matching step with AdamW; returns a callable that runs it."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        t = torch.rand(x0.shape[0], device=device)
        eps = torch.randn_like(x0)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            v = model(xt, t, y)
        loss = F.mse_loss(v.float(), eps - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(fn, device, reps, warmup) -> dict:
    """Time of fn() and, on CUDA, the peak memory one call allocates."""
    row = {"ms": common.time_few_ms(fn, device, reps=reps, warmup=warmup)}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        row["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def run_generators(device, channels, patch, width, depth, cases, sample_steps, reps, warmup, progress):
    """cases: [(image side, batch, whether to time the pure reference too)]; tokens = (side / patch)²."""
    try:
        from zigspark.sampling import sample
    except ImportError as error:  # the sampler is a separate module; time what exists
        sample, skipped = None, f"sampling not timed: {error}"
        progress(f"  {skipped}")
    else:
        skipped = None
    rows, described = [], {}
    for side, batch, reference_ok in cases:
        config = dict(image_size=side, channels=channels, patch_size=patch, width=width, depth=depth,
                      d_state=16 if device.type == "cuda" else 8, num_classes=10)
        tokens = (side // patch) ** 2
        x0 = torch.randn(batch, channels, side, side, device=device).clamp(-1, 1)
        y = torch.randint(0, 10, (batch,), device=device)
        for name, make in generators(config, device, reference_ok).items():
            model = make()
            described[name] = {"impl": name, "params": parameter_count(model), "width": width, "depth": depth}
            base = {"tokens": tokens, "image_size": side, "patch_size": patch, "batch": batch, "impl": name}
            m = measure(training_step(model, x0, y, device), device, reps, warmup)
            row = {**base, "step_ms": m["ms"], "images_per_s": batch / (m["ms"] * 1e-3)}
            if "peak_mem_mib" in m:
                row["step_peak_mem_mib"] = m["peak_mem_mib"]
            rows.append(row)
            line = (f"  train  {tokens:>5} tok b{batch:<3} {name:<62} {m['ms']:10.2f} ms "
                    f"{row['images_per_s']:9.1f} img/s")
            if sample is not None:
                model.eval()
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    run_sampler = lambda: sample(model, batch, steps=sample_steps, solver="euler",  # noqa: E731
                                                 seed=0, batch_size=batch, device=device)
                    s = measure(run_sampler, device, max(1, reps // 2), warmup=min(1, warmup))
                srow = {**base, "steps": sample_steps, "sample_ms": s["ms"], "images_per_s": batch / (s["ms"] * 1e-3)}
                if "peak_mem_mib" in s:
                    srow["sample_peak_mem_mib"] = s["peak_mem_mib"]
                rows.append(srow)
                line += f" | sample {sample_steps} steps {s['ms']:10.2f} ms"
            progress(line)
            del model  # before the next one is built: peak memory is per model
    return rows, list(described.values()), skipped


def run_recognizer(device, image_size, channels, patch, width, depth, heads, batch, progress):
    torch.manual_seed(0)
    model = Recognizer(image_size=image_size, channels=channels, num_classes=10, patch_size=patch, width=width,
                       depth=depth, heads=heads, backend="auto").to(device).eval()
    x = torch.randn(batch, channels, image_size, image_size, device=device)
    rows = []
    for keep, label in ((None, "all tokens"), (1 / 3, "HiPrune 33.3% of tokens"), (1 / 9, "HiPrune 11.1% of tokens")):
        name = f"Recognizer, {label} (backend=auto)"

        def infer(inp, keep=keep):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                return model(inp, keep=keep)

        ms = common.time_ms(infer, [(x,)], device)
        row = {"tokens": model.num_tokens, "batch": batch, "impl": name, "infer_ms": ms,
               "images_per_s": batch / (ms * 1e-3), "kept_tokens": model.num_kept(keep)}
        rows.append(row)
        progress(f"  recognizer {model.num_tokens:>5} tok b{batch:<3} {name:<44} {ms:9.2f} ms "
                 f"{row['images_per_s']:9.1f} img/s")
    return rows, {"impl": "Recognizer", "params": parameter_count(model), **model.config}


def run(device, generator_args: dict, recognizer_args: dict, progress=print) -> dict:
    load = common.cpu_load() if device.type == "cpu" else None
    rows, described, skipped = run_generators(device, **generator_args, progress=progress)
    rec_rows, rec_desc = run_recognizer(device, **recognizer_args, progress=progress)
    baselines = [r["impl"] for r in rows if "gather" in r["impl"] or "DiT" in r["impl"]
                 or "pure reference" in r["impl"]] + [r["impl"] for r in rec_rows if "all tokens" in r["impl"]]
    payload = {"baselines": list(dict.fromkeys(baselines)), "info_fields": ["kept_tokens"],
               "results": rows + rec_rows, "generators": described, "recognizer": rec_desc,
               "auto_resolved": zigspark.last_backends()}
    if skipped:
        payload["skipped"] = skipped
    if load is not None:
        payload["cpu_load_1min_before"], payload["cpu_load_1min_after"] = load, common.cpu_load()
    return payload


def main(argv=None) -> int:
    return common.cli(__doc__, "e2e", {
        "quick": lambda device: run(
            device, dict(channels=1, patch=1, width=32, depth=2, cases=[(8, 4, True)],
                         sample_steps=2, reps=1, warmup=1),
            dict(image_size=8, channels=1, patch=1, width=32, depth=2, heads=2, batch=4)),
        "cuda": lambda device: run(
            device, dict(channels=3, patch=2, width=384, depth=12,
                         cases=[(64, 16, True), (128, 4, False)], sample_steps=10, reps=5, warmup=2),
            dict(image_size=64, channels=3, patch=2, width=384, depth=12, heads=6, batch=32)),
        "cpu": lambda device: run(
            device, dict(channels=1, patch=1, width=64, depth=4,
                         cases=[(8, 32, True), (16, 16, True)], sample_steps=5, reps=3, warmup=1),
            dict(image_size=16, channels=1, patch=1, width=64, depth=4, heads=4, batch=32)),
    }, argv)


if __name__ == "__main__":
    raise SystemExit(main())
