"""Linear probe of a generator's hidden tokens: how much class information a ZigMa holds at time t.

For every image x₀ with a fixed-seed noise ε (the same for every call with the same seed):

    x_t = (1 − t)·x₀ + t·ε                                    (the house flow-matching interpolant)
    φ(x₀) = mean over tokens of generator.features(x_t, t, y_null, layer)       ∈ R^width

y_null is the null class (num_classes), so the label is never given to the network. The features are
standardised with the train split's mean and standard deviation, then a linear classifier (W, b) is fit on
the train split and scored on the test split:

    ridge     (default) [W; b] = argmin (1/n)‖[φ 1]·[W; b] − Y‖² + λ‖W‖²,  Y one-hot: closed form, solved
              in float64 (torch.linalg.solve on the (width+1)² normal equations, bias not penalised)
    logistic  argmin (1/n) Σ cross-entropy(φW + b, y) + λ‖W‖²: `steps` full-batch L-BFGS iterations

Neither needs scikit-learn, which the GPU machine does not have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .recognizer_eval import in_batches

METHODS = ("ridge", "logistic")


def _split_pair(data, generator, seed):
    """(train, test) ImageSets from a (train, test) pair or a source name for zigspark.data.load_images."""
    if isinstance(data, str):
        from ..data import load_images

        size = generator.config["image_size"]
        resolution = size if isinstance(size, int) else int(size[0])
        channels = generator.config["channels"]
        return (load_images(data, resolution=resolution, split="train", seed=seed, channels=channels),
                load_images(data, resolution=resolution, split="test", seed=seed, channels=channels))
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    raise TypeError("data must be a source name for zigspark.data.load_images (e.g. 'digits') or a "
                    f"(train, test) pair of ImageSets, got {type(data).__name__}")


@torch.no_grad()
def generator_features(generator, images: torch.Tensor, *, t: float, layer: int = -1, seed: int = 0,
                       batch_size: int = 256, device=None) -> torch.Tensor:
    """φ of the module docstring: (N, width) float64 CPU features of images (N, C, H, W) in [−1, 1]."""
    noise = torch.Generator().manual_seed(seed)
    num_classes = getattr(generator, "num_classes", 0)

    def pooled(x0):                                    # batches arrive in order, so the noise stream is fixed
        eps = torch.randn(x0.shape, generator=noise).to(x0.device)   # drawn on the CPU: the same on every device
        xt = (1 - t) * x0 + t * eps
        tt = torch.full((x0.shape[0],), float(t), device=x0.device)
        y = torch.full((x0.shape[0],), num_classes, dtype=torch.long, device=x0.device) if num_classes > 0 else None
        tokens = generator.features(xt, tt, y, layer)
        if tokens.dim() != 3:
            raise ValueError(f"generator.features must return (B, tokens, width), got {tuple(tokens.shape)}")
        return tokens.mean(dim=1).double()

    return in_batches(generator, images, pooled, batch_size=batch_size, device=device)


def _fit_ridge(x, onehot, lam):
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    penalty = torch.eye(design.shape[1], dtype=x.dtype) * lam
    penalty[-1, -1] = 0.0                                    # the bias is not shrunk
    return torch.linalg.solve(design.T @ design + penalty, design.T @ onehot)


def _ridge_logits(x, weights):
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1) @ weights


def _fit_logistic(x, labels, num_classes, lam, steps):
    weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, labels) + lam * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(generator, data, *, t: float = 0.5, layer: int = -1, method: str = "ridge",
                 regularization: float = 1e-3, steps: int = 300, seed: int = 0, batch_size: int = 256,
                 device=None) -> dict:
    """Fit a linear classifier on a generator's pooled hidden tokens; report train and test accuracy.

    Args:
        generator: a model with features(x (B, C, H, W), t (B,), y (B,) or None, layer) → (B, tokens, width)
            and num_classes (the null label), e.g. a trained zigspark.models.ZigMa.
        data: a source name ("digits": train/test splits from zigspark.data.load_images at the generator's
            image size, split by `seed`) or a (train, test) pair of labelled ImageSets.
        t: noise level in [0, 1] of x_t.  layer: block whose output is probed (−1 = last).
        method: "ridge" (closed form) or "logistic" (L-BFGS, `steps` iterations).
        regularization: λ of either method.  seed: of the noise ε (and of the split for a source name).

    Returns:
        {"train_accuracy", "test_accuracy", "t", "layer", "method", "feature_dim", "train_size", "test_size"}.
    """
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"t must be a number in [0, 1] (0 = clean images, 1 = pure noise), got {t!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not regularization >= 0:
        raise ValueError(f"regularization must be >= 0, got {regularization}")
    train, test = _split_pair(data, generator, seed)
    for name, split in (("train", train), ("test", test)):
        if getattr(split, "labels", None) is None:
            raise ValueError(f"the {name} split has no labels; a linear probe needs a labelled data set")
    num_classes = max(train.num_classes, test.num_classes)
    kwargs = dict(t=float(t), layer=layer, seed=seed, batch_size=batch_size, device=device)
    # different noise for the two splits: the test images never share ε with a training image
    x_train = generator_features(generator, train.images, **kwargs)
    x_test = generator_features(generator, test.images, **{**kwargs, "seed": seed + 1})
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train, y_test = train.labels.cpu(), test.labels.cpu()
    if method == "ridge":
        weights = _fit_ridge(x_train, F.one_hot(y_train, num_classes).double(), regularization * len(x_train))
        train_logits, test_logits = _ridge_logits(x_train, weights), _ridge_logits(x_test, weights)
    else:
        weight, bias = _fit_logistic(x_train, y_train, num_classes, regularization, steps)
        train_logits, test_logits = x_train @ weight + bias, x_test @ weight + bias
    return {"train_accuracy": (train_logits.argmax(1) == y_train).double().mean().item(),
            "test_accuracy": (test_logits.argmax(1) == y_test).double().mean().item(),
            "t": float(t), "layer": layer, "method": method, "feature_dim": x_train.shape[1],
            "train_size": len(train), "test_size": len(test)}
