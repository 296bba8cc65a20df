"""zigspark.models.ZigMa / ZigMaVideo: shapes, adaLN-Zero identity at init, block orders (path i mod 8, video
s-s-t), fused-order mixers = gather + raster mixer + scatter (outputs and gradients, numerics rule),
config round trip, label dropout, bad inputs, named configs (cpu tier); Triton vs reference (interpret
tier); cuda/triton, fp32 and bf16 autocast vs reference (gpu tier). Each test carries its own tier mark."""

import json

import pytest
import torch

from numerics import assert_by_rule
from zigspark import orders
from zigspark.models import ZigMa, ZigMaVideo, zigma_config
from zigspark.models.embeddings import sincos_2d, timestep_embedding
from zigspark.nn import ZigzagMamba

cpu = pytest.mark.cpu
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.one_thread)




def small(**overrides):
    config = dict(image_size=4, channels=2, patch_size=1, width=16, depth=3, d_state=4, num_classes=5,
                  backend="reference")
    config.update(overrides)
    return ZigMa(**config)


def small_video(**overrides):
    config = dict(frames=3, image_size=4, channels=1, patch_size=2, width=16, depth=7, d_state=4, num_classes=0,
                  backend="reference")
    config.update(overrides)
    return ZigMaVideo(**config)


def randomise(model, seed=0, std=0.1):
    """Give the zero-initialised adaLN-Zero and output weights random values, so every path carries signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(std * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def inputs(model, batch=3, seed=1, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *model.sample_shape), generator=generator, dtype=dtype)
    t = torch.rand(batch, generator=generator, dtype=dtype)
    y = torch.randint(0, model.num_classes + 1, (batch,), generator=generator) if model.num_classes else None
    return x, t, y


# ---- shapes and initialisation -------------------------------------------------------------------------

@cpu
def test_shapes_and_zero_output_at_init():
    model = small(image_size=(4, 6), patch_size=2)
    x, t, y = inputs(model)
    v = model(x, t, y)
    assert v.shape == x.shape == (3, 2, 4, 6) and v.dtype == x.dtype
    assert torch.equal(v, torch.zeros_like(v))          # zero-initialised final linear
    assert model.features(x, t, y, layer=0).shape == (3, 2 * 3, 16)
    assert model(x, 0.5, None).shape == x.shape          # one time for the batch, null class


@cpu
def test_blocks_are_identity_at_init_and_not_after_training_signal():
    model = small()
    x, t, y = inputs(model)
    tokens = model._tokens(x[:, None])
    for layer in range(model.depth):
        assert torch.equal(model.features(x, t, y, layer=layer), tokens)
    randomise(model)
    assert not torch.allclose(model.features(x, t, y, layer=0), tokens)


@cpu
def test_block_i_scans_zigzag_path_i_mod_8():
    model = small(depth=11, width=8)
    assert model.block_orders == [orders.zigzag(4, 4, i % 8) for i in range(11)]
    assert all(block.mixer.order == orders.zigzag(4, 4, i % 8) for i, block in enumerate(model.blocks))
    assert isinstance(model.blocks[0].mixer, ZigzagMamba)


@cpu
def test_video_order_pattern_spatial_spatial_temporal():
    model = small_video(depth=9)
    f, h, w = 3, 2, 2
    expected = [orders.zigzag(h, w, 0, f), orders.zigzag(h, w, 1, f), orders.temporal(f, h, w),
                orders.zigzag(h, w, 2, f), orders.zigzag(h, w, 3, f), orders.temporal(f, h, w, backward=True),
                orders.zigzag(h, w, 4, f), orders.zigzag(h, w, 5, f), orders.temporal(f, h, w)]
    assert model.block_orders == expected


@cpu
def test_video_shapes_features_and_frames_matter():
    model = randomise(small_video(num_classes=4))
    x, t, y = inputs(model, batch=2)
    v = model(x, t, y)
    assert v.shape == (2, 3, 1, 4, 4)
    assert model.features(x, t, y).shape == (2, 3 * 2 * 2, 16)
    # the temporal blocks mix frames: changing frame 0 changes the velocity of the last frame
    x2 = x.clone()
    x2[:, 0] += 1
    assert not torch.allclose(model(x2, t, y)[:, -1], v[:, -1])


@cpu
def test_features_last_layer_and_manual_block():
    model = randomise(small())
    x, t, y = inputs(model)
    assert torch.equal(model.features(x, t, y, layer=-1), model.features(x, t, y, layer=model.depth - 1))
    c = model.condition(t, y, x.shape[0], x.device)
    manual = model.blocks[0](model._tokens(x[:, None]), c)
    torch.testing.assert_close(model.features(x, t, y, layer=0), manual, rtol=0, atol=0)


@cpu
def test_forward_backward_reference_reaches_every_parameter():
    model = randomise(small())
    x, t, y = inputs(model)
    x.requires_grad_(True)
    model(x, t, y).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert x.grad.abs().sum() > 0


# ---- the fused order equals gather → raster mixer → scatter ------------------------------------------

class GatherRasterMamba(ZigzagMamba):
    """The same mixer, but the tokens are explicitly permuted into path order, scanned in raster order and
    permuted back: what ZigMa does without order-aware kernels."""

    def __init__(self, fused: ZigzagMamba, expand: int):
        order = fused.order
        super().__init__(fused.in_proj.in_features, fused.grid, order=orders.raster(order.h, order.w, order.frames),
                         d_state=fused.d_state, d_conv=fused.conv1d.kernel_size[0], expand=expand,
                         backend=fused.backend)
        self.path = order.indices()

    def forward(self, hidden):
        return super().forward(hidden[:, self.path])[:, orders.inverse(self.path)]


def gather_raster_copy(model):
    twin = type(model)(**model.config)
    for block, fused_block in zip(twin.blocks, model.blocks):
        block.mixer = GatherRasterMamba(fused_block.mixer, model.config["expand"])
    twin.to(next(model.parameters()).dtype)
    twin.load_state_dict(model.state_dict())
    return twin


def run_with_grads(model, x, t, y):
    x = x.detach().clone().requires_grad_(True)
    out = model(x, t, y)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g = g.to(out.device, out.dtype)
    params = [p for _, p in model.named_parameters()]
    grads = torch.autograd.grad(out, [x, *params], g)
    names = ["x"] + [n for n, _ in model.named_parameters()]
    return out.detach(), dict(zip(names, grads))


@cpu
@pytest.mark.parametrize("make", [lambda: small(depth=9, image_size=(3, 5)), lambda: small_video(depth=4)],
                         ids=["image", "video"])
def test_fused_orders_equal_gather_plus_raster(make):
    torch.manual_seed(0)
    fused = randomise(make()).double()
    twin64 = gather_raster_copy(fused)
    twin32 = gather_raster_copy(fused).float()
    x, t, y = inputs(fused, batch=2, dtype=torch.float64)
    assert any(o.kind != "raster" for o in fused.block_orders)
    assert all(block.mixer.order.kind == "raster" for block in twin64.blocks)
    out, grads = run_with_grads(fused, x, t, y)
    out64, grads64 = run_with_grads(twin64, x, t, y)
    out32, grads32 = run_with_grads(twin32, x.float(), t.float(), y)
    assert out.abs().max() > 1e-3
    assert_by_rule(out, out64, out32, what="fused-order output")
    for name in grads:
        assert_by_rule(grads[name], grads64[name], grads32[name], factor=3, what=f"d{name}")


# ---- conditioning, config ------------------------------------------------------------------------------

@cpu
def test_null_class_is_y_none_and_labels_matter():
    model = randomise(small())
    x, t, _ = inputs(model)
    null = torch.full((3,), model.num_classes)
    torch.testing.assert_close(model(x, t, None), model(x, t, null), rtol=0, atol=0)
    assert not torch.allclose(model(x, t, torch.tensor([0, 1, 2])), model(x, t, null))
    assert not torch.allclose(model(x, t * 0.5, null), model(x, t, null))


@cpu
def test_drop_labels_rate_and_determinism():
    model = small(class_dropout=0.25)
    y = torch.randint(0, 5, (20000,), generator=torch.Generator().manual_seed(0))
    dropped = model.drop_labels(y, torch.Generator().manual_seed(3))
    is_null = dropped == model.num_classes
    assert abs(is_null.float().mean().item() - 0.25) < 0.015
    assert torch.equal(dropped[~is_null], y[~is_null])
    assert torch.equal(dropped, model.drop_labels(y, torch.Generator().manual_seed(3)))
    assert small(class_dropout=0.0).drop_labels(y) is y
    assert small(num_classes=0).drop_labels(None) is None


@cpu
@pytest.mark.parametrize("make", [lambda: small(image_size=(4, 6), pos_embed="learned"), small_video],
                         ids=["image-learned", "video"])
def test_config_round_trip(make):
    model = randomise(make())
    config = json.loads(json.dumps(model.config))
    twin = type(model)(**config)
    assert twin.config == model.config
    twin.load_state_dict(model.state_dict())
    x, t, y = inputs(model)
    torch.testing.assert_close(twin(x, t, y), model(x, t, y), rtol=0, atol=0)


@cpu
def test_positions_sincos_fixed_and_learned():
    fixed, learned = small(), small(pos_embed="learned")
    assert "pos_embed.table" not in fixed.state_dict()       # recomputed from the config
    assert isinstance(learned.pos_embed.table, torch.nn.Parameter)
    torch.testing.assert_close(learned.pos_embed.table.detach(), fixed.pos_embed.table)
    table = sincos_2d(16, 4, 4)
    assert table.shape == (16, 16) and len({tuple(r.tolist()) for r in table}) == 16   # distinct positions
    code = timestep_embedding(torch.tensor([0.0, 1.0]), 8)
    torch.testing.assert_close(code[0], torch.tensor([1.0] * 4 + [0.0] * 4))


@cpu
def test_set_backend():
    model = small()
    model.set_backend("triton")
    assert model.config["backend"] == "triton" and all(b.mixer.backend == "triton" for b in model.blocks)
    with pytest.raises(ValueError, match="backend must be one of"):
        model.set_backend("gpu")


# ---- named configs -------------------------------------------------------------------------------------

@cpu
def test_named_configs():
    tiny = zigma_config("tiny", 8, 1, num_classes=10)
    model = ZigMa(**tiny)
    x = torch.randn(2, 1, 8, 8)
    assert model(x, torch.rand(2), torch.tensor([3, 10])).shape == x.shape
    sizes = {name: zigma_config(name, 32, 4, 1000) for name in ("S", "B", "L")}
    assert [(c["width"], c["depth"], c["patch_size"], c["d_state"]) for c in sizes.values()] == [
        (384, 24, 2, 16), (768, 24, 2, 16), (1024, 48, 2, 16)]
    with torch.device("meta"):                              # no memory for the real weights
        s_model = ZigMa(**sizes["S"])
    params = sum(p.numel() for p in s_model.parameters())
    assert 25e6 < params < 45e6, params                      # DiT-S is 33M
    assert zigma_config("tiny", 8, 1, patch_size=1)["patch_size"] == 1
    with pytest.raises(ValueError, match="unknown ZigMa config 'XL'"):
        zigma_config("XL", 8, 1)
    with pytest.raises(ValueError, match=r"unknown fields \['heads'\]"):
        zigma_config("tiny", 8, 1, heads=4)


# ---- bad inputs ----------------------------------------------------------------------------------------

@cpu
@pytest.mark.parametrize("overrides, error, match", [
    (dict(image_size=5, patch_size=2), ValueError, "not divisible by patch_size=2"),
    (dict(width=18), ValueError, "width must be a multiple of 4"),
    (dict(depth=0), ValueError, "depth must be >= 1"),
    (dict(d_conv=5), ValueError, "d_conv must be 2, 3 or 4"),
    (dict(channels=1.5), TypeError, "channels must be an int"),
    (dict(image_size=(4, 4, 4)), TypeError, "image_size must be an int or an"),
    (dict(pos_embed="rope"), ValueError, "pos_embed must be one of"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(class_dropout=1.0), ValueError, "class_dropout must be a probability"),
    (dict(num_classes=-1), ValueError, "num_classes must be >= 0"),
])
def test_bad_constructor_arguments(overrides, error, match):
    with pytest.raises(error, match=match):
        small(**overrides)


@cpu
def test_bad_forward_inputs():
    model = small()
    x, t, y = inputs(model)
    cases = [
        ((torch.randn(3, 1, 4, 4), t, y), ValueError, r"x must have shape \(batch, 2, 4, 4\)"),
        ((torch.randn(3, 2, 4, 5), t, y), ValueError, r"got \(3, 2, 4, 5\)"),
        ((torch.randn(2, 4, 4), t, y), ValueError, "x must have shape"),
        ((x.long(), t, y), TypeError, "x must be a floating tensor"),
        ((x, torch.rand(2), y), ValueError, r"t must have shape \(3,\)"),
        ((x, torch.ones(3, dtype=torch.long), y), TypeError, "t must be a floating tensor"),
        ((x, t, torch.tensor([0, 1, 6])), ValueError, r"labels in 0..4, or 5 for the null class"),
        ((x, t, torch.tensor([0, -1, 2])), ValueError, "labels in 0..4"),
        ((x, t, torch.zeros(3)), TypeError, "y must be a LongTensor"),
        ((x, t, torch.zeros(2, dtype=torch.long)), ValueError, r"y must have shape \(3,\)"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            model(*args)
    with pytest.raises(ValueError, match="this model is unconditional"):
        small(num_classes=0)(x, t, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="layer=3 is out of range for a model of depth 3"):
        model.features(x, t, y, layer=3)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 3, 1, 4, 4\)"):
        small_video()(torch.randn(2, 2, 1, 4, 4), torch.rand(2))


# ---- other backends ------------------------------------------------------------------------------------

def check_backend(backend, device, make, autocast_dtype=None, rel_floor=2e-5):
    """Model on `backend` vs the float64 reference and the reference in the run's own precision."""
    torch.manual_seed(0)
    model = randomise(make(), std=0.05).to(device)
    x, t, y = (None if v is None else v.to(device) for v in inputs(model, batch=2))

    def run(module, which, dtype, amp):
        module = module.to(dtype)
        module.set_backend(which)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out, grads = run_with_grads(module, x.to(dtype), t.to(dtype), y)
        return out, grads

    amp = autocast_dtype is not None
    out, grads = run(model, backend, torch.float32, amp)
    out64, grads64 = run(model, "reference", torch.float64, False)
    outl, gradsl = run(model, "reference", torch.float32, amp)
    assert out.dtype == torch.float32
    assert_by_rule(out, out64, outl, what=f"{backend} output", rel_floor=rel_floor)
    for name in grads:
        assert_by_rule(grads[name].float(), grads64[name], gradsl[name].float(), factor=3, what=f"{backend} d{name}",
                       rel_floor=rel_floor)


@pytest.mark.interpret
def test_triton_model_matches_reference(triton_device):
    check_backend("triton", triton_device, lambda: small(image_size=(2, 3), channels=1, width=8, depth=2, d_state=2))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("make", [
    lambda: ZigMa(image_size=16, channels=3, patch_size=2, width=64, depth=4, num_classes=10),
    lambda: ZigMaVideo(frames=4, image_size=8, channels=3, patch_size=2, width=64, depth=3, num_classes=0),
], ids=["image", "video"])
def test_gpu_model_matches_reference(backend, amp, make):
    check_backend(backend, torch.device("cuda"), make, autocast_dtype=torch.bfloat16 if amp else None)
