"""The ViT recognizer (zigspark.models.Recognizer) and its training loop, on tiny configurations."""

import json
import math

import pytest
import torch

import zigspark
from zigspark.data import ImageSet
from zigspark.models import Recognizer
from zigspark.models.recognizer import MLP
from zigspark.nn import SparkFFN
from zigspark.train.recognizer import learning_rate, load_recognizer, random_shift, train_recognizer

from numerics import assert_by_rule

TINY = dict(image_size=4, channels=1, num_classes=3, width=16, depth=3, heads=2, head_depth=1)


def tiny(**overrides):
    torch.manual_seed(0)
    return Recognizer(**{**TINY, **overrides})


def images(batch=5, size=4, channels=1, seed=1):
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def by_hand(model, x, idx):
    """Run the head on the tokens picked by `idx`, gathered with a Python loop instead of prune_tokens."""
    tokens = model.encode(x, return_scores=False)
    kept = torch.stack([tokens[b, idx[b]] for b in range(x.shape[0])])
    if model.pool == "cls":
        kept = torch.cat([model.cls_token.expand(x.shape[0], 1, -1), kept], dim=1)
    for block in model.head:
        kept = block(kept)
    kept = model.norm(kept)
    pooled = {"max": lambda: kept.amax(1), "mean": lambda: kept.mean(1), "cls": lambda: kept[:, 0]}[model.pool]()
    return model.classifier(pooled)


# ---- cpu tier -------------------------------------------------------------------------------------------

@pytest.mark.cpu
def test_forward_backward_reference_reaches_every_parameter():
    model = tiny(density=0.5, backend="reference")
    logits = model(images())
    assert logits.shape == (5, 3) and model.features(images()).shape == (5, 16)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.cpu
@pytest.mark.parametrize("strategy,pool", [("hiprune", "max"), ("attention", "mean"), ("random", "cls")])
def test_pruned_inference_is_the_head_on_the_gathered_tokens(strategy, pool):
    model = tiny(image_size=6, pool=pool, backend="reference").eval()
    x = images(4, size=6)
    with torch.no_grad():
        tokens, obj, deep = model.encode(x)
        idx = zigspark.hiprune_select(obj, deep, (6, 6), 12, alpha=model.prune_alpha, strategy=strategy,
                                      generator=torch.Generator().manual_seed(3))
        assert not torch.equal(idx, torch.arange(12).expand(4, -1))       # a real selection, not a prefix
        expected = by_hand(model, x, idx)
        got = model(x, keep=12, strategy=strategy, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, expected)
    if strategy != "random":
        assert not torch.allclose(got, model(x))                           # pruning changed the logits


@pytest.mark.cpu
def test_scores_are_the_attention_received_at_the_object_and_deep_blocks():
    model = tiny(depth=4, obj_layer=1, deep_layer=-1, backend="reference").double()
    x = images(3).double()
    inputs = {}
    hooks = [model.encoder[i].attn.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, a[0]))
             for i in (1, 3)]
    _, obj, deep = model.encode(x)
    for h in hooks:
        h.remove()
    for layer, scores in ((1, obj), (3, deep)):
        attn = model.encoder[layer].attn
        q, k, _ = attn.qkv(inputs[layer]).reshape(3, 16, 3, 2, 8).unbind(2)
        probs = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(8), -1)
        torch.testing.assert_close(scores.double(), probs.sum(2).mean(1), rtol=1e-5, atol=1e-6)
    assert model.obj_layer == 1 and model.deep_layer == 3
    assert tiny(depth=4).obj_layer == 2 and tiny(depth=4).deep_layer == 2     # defaults: middle, second-to-last


@pytest.mark.cpu
def test_keep_as_ratio_or_count():
    model = tiny(image_size=6).eval()
    x = images(3, size=6)
    assert [model.num_kept(k) for k in (None, 1.0, 1 / 3, 1 / 9, 0.001, 7)] == [36, 36, 12, 4, 1, 7]
    with torch.no_grad():
        torch.testing.assert_close(model(x, keep=1 / 3), model(x, keep=12))
        for strategy in ("hiprune", "attention", "random"):     # every token kept: nothing to choose
            torch.testing.assert_close(model(x, keep=1.0, strategy=strategy), model(x))
            torch.testing.assert_close(model(x, keep=36, strategy=strategy), model(x))
    for bad, error in ((0, ValueError), (37, ValueError), (1.5, ValueError), (0.0, ValueError),
                       (True, TypeError), ("half", TypeError)):
        with pytest.raises(error, match="keep"):
            model(x, keep=bad)
    with pytest.raises(ValueError, match="strategy"):
        model(x, keep=3, strategy="topk")


@pytest.mark.cpu
def test_density_one_is_a_plain_gelu_mlp():
    dense = tiny(density=1.0)
    ffn = dense.encoder[0].ffn
    assert isinstance(ffn, MLP) and not any(isinstance(m, SparkFFN) for m in dense.modules())
    z = torch.randn(2, 5, 16)
    torch.testing.assert_close(ffn(z), ffn.fc2(torch.nn.functional.gelu(ffn.fc1(z))))
    sparse = tiny(density=0.25)
    assert all(isinstance(b.ffn, SparkFFN) and b.ffn.density == 0.25 for b in [*sparse.encoder, *sparse.head])
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="density"):
            tiny(density=bad)
    with pytest.raises(ValueError, match="pool"):
        tiny(pool="sum")


@pytest.mark.cpu
def test_config_is_json_and_rebuilds_the_same_model():
    model = tiny(image_size=[4, 6], density=0.5, head_depth=2, patch_size=2).eval()
    config = json.loads(json.dumps(model.config))
    rebuilt = Recognizer(**config).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = images(2, size=6)[:, :, :4]
    torch.testing.assert_close(rebuilt(x, keep=3), model(x, keep=3))
    assert model.grid == (2, 3) and model.num_tokens == 6 and config["image_size"] == [4, 6]


@pytest.mark.cpu
def test_bad_arguments_name_what_is_wrong():
    with pytest.raises(ValueError, match="patch_size"):
        Recognizer(image_size=6, patch_size=4)
    with pytest.raises(ValueError, match="heads"):
        Recognizer(width=30, heads=4)
    with pytest.raises(ValueError, match="obj_layer"):
        Recognizer(depth=2, obj_layer=2)
    with pytest.raises(ValueError, match="backend"):
        Recognizer(backend="fast")
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        tiny()(torch.randn(2, 1, 8, 8))


@pytest.mark.cpu
def test_random_shift_moves_each_image_within_the_range():
    x = torch.arange(2 * 36, dtype=torch.float32).reshape(2, 1, 6, 6)
    shifted = random_shift(x, 1, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    for b in range(2):
        matches = [(dy, dx) for dy in range(3) for dx in range(3)
                   if torch.equal(shifted[b], padded[b, :, dy:dy + 6, dx:dx + 6])]
        assert len(matches) == 1
    assert random_shift(x, 0, torch.Generator()) is x


@pytest.mark.cpu
def test_learning_rate_warms_up_then_follows_a_cosine():
    assert learning_rate(0, 100, 1.0, 10, "cosine") == pytest.approx(0.1 * 0.5 * (1 + math.cos(0)))
    assert learning_rate(50, 100, 1.0, 10, "cosine") == pytest.approx(0.5)
    assert learning_rate(99, 100, 1.0, 10, "cosine") < 0.01
    assert learning_rate(99, 100, 1.0, 10, "constant") == 1.0


def bars(n=48, seed=0):
    """Two classes a linear model separates: a bright top row or a bright bottom row, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = torch.full((n, 1, 4, 4), -1.0) + 0.2 * torch.rand(n, 1, 4, 4, generator=g)
    x[labels == 0, :, 0] = 1.0
    x[labels == 1, :, 3] = 1.0
    return ImageSet(x, labels.long(), 2, "bars")


@pytest.mark.cpu
def test_training_learns_a_separable_set_and_checkpoints_it(tmp_path):
    data = bars()
    model = tiny(num_classes=2, depth=2, backend="reference")
    lines = []
    result = train_recognizer(data, model, steps=40, batch_size=16, lr=3e-3, shift=0, seed=0, log_every=20,
                              progress=lines.append, out_dir=tmp_path / "rec", run_config={"data": "bars"})
    assert result.steps == 40 and len(result.losses) == 2 and result.losses[-1] < result.losses[0]
    assert result.train_accuracy == 1.0 and any("img/s" in line for line in lines)
    loaded, config = load_recognizer(tmp_path / "rec", return_config=True)
    assert config["kind"] == "recognizer" and config["run"] == {"data": "bars"} and config["model"] == model.config
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(data.images, keep=5), model(data.images, keep=5))


@pytest.mark.cpu
def test_training_is_deterministic_and_checks_its_arguments():
    data = bars(16)
    runs = []
    for _ in range(2):
        model = tiny(num_classes=2, depth=1)
        train_recognizer(data, model, steps=3, batch_size=8, seed=5, progress=None)
        runs.append(model.classifier.weight.detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    model = tiny(num_classes=2, depth=1)
    with pytest.raises(ValueError, match="exactly one of steps"):
        train_recognizer(data, model, progress=None)
    with pytest.raises(ValueError, match="num_classes=2"):
        train_recognizer(data, tiny(num_classes=3, depth=1), steps=1, progress=None)
    with pytest.raises(ValueError, match="no labels"):
        train_recognizer(ImageSet(data.images, None, 0, "x"), model, steps=1, progress=None)
    assert train_recognizer(data, model, epochs=1.0, batch_size=8, progress=None).steps == 2


# ---- interpret tier -------------------------------------------------------------------------------------

@pytest.mark.interpret
def test_triton_forward_backward_matches_the_reference(triton_device):
    """Training mode: flash attention forward/backward and Spark's stat_topk on Triton."""
    small = dict(density=0.5, depth=2, backend="reference")
    model64 = tiny(**small).double().to(triton_device)
    model32 = tiny(**small).to(triton_device)
    kernel = tiny(**small).to(triton_device)
    kernel.set_backend("triton")
    x = images(2).to(triton_device)
    y = torch.tensor([0, 2], device=triton_device)
    outs = []
    for model, inp in ((kernel, x), (model64, x.double()), (model32, x)):
        logits = model(inp)
        torch.nn.functional.cross_entropy(logits, y).backward()
        outs.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    assert_by_rule(outs[0][0], outs[1][0], outs[2][0], what="logits", rel_floor=1e-5)
    for name in ("patch_embed.weight", "encoder.0.attn.qkv.weight", "encoder.1.ffn.K1", "head.0.ffn.V"):
        assert_by_rule(outs[0][1][name], outs[1][1][name], outs[2][1][name], factor=3.0, what=name, rel_floor=1e-5)


@pytest.mark.interpret
def test_triton_pruned_inference_matches_the_reference(triton_device):
    """Inference: received scores and the fused HiPrune selection on Triton (plain MLP: the sparse Spark FFN
    kernel has its own interpret test in test_spark.py and takes the interpreter ~10 s here)."""
    small = dict(image_size=6, depth=2, backend="reference")
    reference = tiny(**small).to(triton_device).eval()
    kernel = tiny(**small).to(triton_device).eval()
    kernel.set_backend("triton")
    x = images(2, size=6).to(triton_device)
    with torch.no_grad():
        _, obj_k, deep_k = kernel.encode(x)
        _, obj_r, deep_r = reference.encode(x)
        torch.testing.assert_close(obj_k, obj_r, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(deep_k, deep_r, rtol=1e-4, atol=1e-5)
        # the selection kernel on the reference's scores, so a near-tie the scores' rounding breaks either way
        # cannot fail it
        idx_k = kernel.keep_indices(obj_r, deep_r, 1 / 3)
        torch.testing.assert_close(idx_k, reference.keep_indices(obj_r, deep_r, 1 / 3))
        torch.testing.assert_close(kernel(x, keep=1 / 3), reference(x, keep=1 / 3), rtol=1e-4, atol=1e-5)
