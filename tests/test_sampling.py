"""zigspark.sampling: Euler and Heun converge at order 1 and 2 on a velocity field whose flow is known in closed
form; determinism under the seed (whatever batch_size); classifier-free guidance is exactly
v_null + s·(v_y − v_null) in one batched forward; labels; progress; bad arguments (cpu tier)."""

import math

import pytest
import torch
from torch import nn

from zigspark.models import ZigMa
from zigspark.sampling import resolve_labels, sample, save_samples

pytestmark = [pytest.mark.cpu, pytest.mark.usefixtures("one_thread")]




class GaussianFlow(nn.Module):
    """The exact flow-matching velocity for data x₀ ~ N(μ, σ²) per pixel and noise ε ~ N(0, 1).

    x_t = (1 − t)x₀ + tε is Gaussian with mean m_t = (1 − t)μ and variance s_t² = (1 − t)²σ² + t², and
        v(x, t) = E[ε − x₀ | x_t = x] = −μ + (t − (1 − t)σ²)·(x − m_t)/s_t²,
    whose flow from t = 1 to t = 0 maps a noise value z to exactly μ + σ·z.
    """

    num_classes = 0

    def __init__(self, mu=0.3, sigma=0.2, shape=(1, 2, 3)):
        super().__init__()
        self.mu, self.sigma, self.sample_shape = mu, sigma, shape
        self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))   # gives the sampler a dtype/device
        self.calls, self.modes = [], []

    def forward(self, x, t, y):
        assert y is None
        self.calls.append(x.shape[0])
        self.modes.append(self.training)
        t = t.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        m, s2 = (1 - t) * self.mu, (1 - t) ** 2 * self.sigma ** 2 + t ** 2
        return -self.mu + (t - (1 - t) * self.sigma ** 2) * (x - m) / s2


def sampler_noise(num, shape, seed):
    return torch.randn((num, *shape), generator=torch.Generator().manual_seed(seed)).double()


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_solvers_converge_at_their_order(solver, order):
    model = GaussianFlow()
    exact = (model.mu + model.sigma * sampler_noise(64, model.sample_shape, seed=3)).clamp(-1, 1)
    errors = [(sample(model, 64, steps=n, solver=solver, seed=3) - exact).abs().max().item() for n in (16, 32, 64)]
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.2 for r in rates), (errors, rates)
    assert errors[-1] < (0.05 if order == 1 else 1e-3)


def test_heun_beats_euler_at_equal_model_calls():
    model = GaussianFlow()
    exact = (model.mu + model.sigma * sampler_noise(16, model.sample_shape, seed=0)).clamp(-1, 1)
    euler = (sample(model, 16, steps=20, solver="euler") - exact).abs().max()
    heun = (sample(model, 16, steps=10, solver="heun") - exact).abs().max()
    assert heun < euler / 5


def test_eval_mode_calls_and_progress():
    model = GaussianFlow().train()
    seen = []
    out = sample(model, 10, steps=3, solver="heun", batch_size=4, progress=lambda *a: seen.append(a))
    assert out.shape == (10, 1, 2, 3) and out.dtype == torch.float64
    assert model.calls == [4] * 6 + [4] * 6 + [2] * 6                  # 3 batches x 3 steps x 2 (Heun)
    assert not any(model.modes) and model.training                       # eval while sampling, restored after
    assert seen == [(i, 9) for i in range(1, 10)]
    assert sample(GaussianFlow(), 0).shape == (0, 1, 2, 3)


def test_same_seed_same_samples_whatever_batch_size():
    model = GaussianFlow()
    a = sample(model, 9, steps=4, seed=7, batch_size=9)
    assert torch.equal(a, sample(model, 9, steps=4, seed=7, batch_size=2))
    assert not torch.equal(a, sample(model, 9, steps=4, seed=8))


def test_real_zigma_is_deterministic_and_in_range():
    torch.manual_seed(0)
    model = ZigMa(image_size=4, channels=1, patch_size=2, width=8, depth=2, d_state=2, num_classes=3,
                  backend="reference")
    with torch.no_grad():
        model.final.linear.weight.normal_(0, 0.5)    # so the velocity is not identically zero
    a, labels = sample(model, 5, steps=2, cfg_scale=2.0, seed=1, return_labels=True)
    b = sample(model, 5, steps=2, cfg_scale=2.0, seed=1, batch_size=2)
    assert a.shape == (5, 1, 4, 4) and a.abs().max() <= 1
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert labels.shape == (5,) and ((labels >= 0) & (labels < 3)).all()


class ConstantVelocity(nn.Module):
    """v(x, t, y) = x − k(y) with k(y) = 0.1·y − 0.5: one Euler step from t = 1 to 0 lands exactly on the
    (guided) k, whatever the noise. Records every call's labels."""

    sample_shape = (1, 2, 2)

    def __init__(self, num_classes=10):
        super().__init__()
        self.num_classes = num_classes
        self.anchor = nn.Parameter(torch.zeros(()))
        self.labels = []

    def forward(self, x, t, y):
        self.labels.append(y.clone())
        return x - (0.1 * y.to(x.dtype) - 0.5).reshape(-1, 1, 1, 1)


def test_guidance_is_v_null_plus_s_times_the_difference_in_one_forward():
    model = ConstantVelocity()
    y = torch.tensor([3, 0, 7])
    out = sample(model, 3, steps=1, cfg_scale=1.5, labels=y)
    k = lambda labels: 0.1 * labels.double() - 0.5                        # noqa: E731
    guided = k(torch.full((3,), 10)) + 1.5 * (k(y) - k(torch.full((3,), 10)))
    torch.testing.assert_close(out.double(), guided.reshape(-1, 1, 1, 1).expand(3, 1, 2, 2), rtol=0, atol=1e-6)
    assert len(model.labels) == 1 and torch.equal(model.labels[0], torch.tensor([3, 0, 7, 10, 10, 10]))
    model.labels.clear()
    sample(model, 3, steps=1, cfg_scale=1.0, labels=y)                   # no guidance: one half only
    assert torch.equal(model.labels[0], y)


def test_labels_argument():
    g = lambda: torch.Generator().manual_seed(0)                          # noqa: E731
    random = resolve_labels(None, 500, 10, g())
    assert random.dtype == torch.long and set(random.tolist()) == set(range(10))
    assert torch.equal(random, resolve_labels(None, 500, 10, g()))
    assert resolve_labels(None, 4, 0, g()) is None
    assert resolve_labels(4, 3, 10, g()).tolist() == [4, 4, 4]
    assert resolve_labels(10, 2, 10, g()).tolist() == [10, 10]            # the null class: unconditional
    assert resolve_labels([1, 2], 2, 10, g()).tolist() == [1, 2]
    model = ConstantVelocity()
    _, used = sample(model, 6, steps=1, labels=None, seed=2, return_labels=True)
    _, again = sample(model, 6, steps=1, labels=None, seed=2, return_labels=True)
    assert torch.equal(used, again) and torch.equal(model.labels[0], used)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(steps=0), ValueError, "steps must be >= 1"),
    (dict(steps=2.5), TypeError, "steps must be an int"),
    (dict(num=-1), ValueError, "num must be >= 0"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(solver="rk4"), ValueError, "solver must be one of"),
    (dict(cfg_scale="2"), TypeError, "cfg_scale must be a number"),
    (dict(labels=torch.tensor([1, 2])), ValueError, "expected 4, got 2"),
    (dict(labels=11), ValueError, r"labels must be in 0..9 \(or 10 for the null class\)"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError, "labels must be None, an int or a LongTensor"),
])
def test_bad_arguments(kwargs, error, match):
    arguments = dict(num=4, steps=1)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        sample(ConstantVelocity(), arguments.pop("num"), **arguments)


def test_unconditional_model_rejects_labels_and_guidance():
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        sample(GaussianFlow(), 2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="the model is unconditional"):
        sample(GaussianFlow(), 2, labels=1)
    with pytest.raises(TypeError, match="model must expose `sample_shape`"):
        sample(nn.Linear(2, 2), 2)


def test_save_samples_groups_classes_in_rows(tmp_path):
    from PIL import Image

    images = torch.linspace(-1, 1, 6).reshape(6, 1, 1, 1).expand(6, 1, 4, 4)
    path = save_samples(images, tmp_path / "grid.png", labels=torch.tensor([2, 0, 1, 0, 2, 1]))
    width, height = Image.open(path).size
    assert height > 1.3 * width                                          # 3 rows (classes) of 2 samples
