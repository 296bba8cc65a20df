"""Fréchet distance between feature sets (FID's formula on the recognizer's features) and class accuracy.

For two sets of D-dimensional features with means μ₁, μ₂ and covariances Σ₁, Σ₂ (the Fréchet / 2-Wasserstein
distance between the Gaussians N(μ₁, Σ₁) and N(μ₂, Σ₂)):

    d² = ‖μ₁ − μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2·tr((Σ₁Σ₂)^{1/2})

Σ₁Σ₂ is not symmetric, so its square root is not taken directly. With S = Σ₁^{1/2} (symmetric, from eigh),
Σ₁Σ₂ = S⁻¹·(S Σ₂ S)·S is similar to the symmetric positive semi-definite M = S Σ₂ S, so both have the same
eigenvalues λ_i ≥ 0, and

    tr((Σ₁Σ₂)^{1/2}) = Σ_i √λ_i(M)

computed with eigvalsh in float64. Rounding can make tiny eigenvalues (of Σ₁ for S, or of M) slightly negative;
they are clamped to 0, which is exact for a rank-deficient covariance (fewer samples than dimensions) and
avoids the complex parts that scipy's sqrtm returns there. No matrix is inverted.

class_accuracy(recognizer, images, labels) is the share of class-conditional samples that the recognizer
assigns to the class they were generated for.
"""

from __future__ import annotations

import torch

from .recognizer_eval import accuracy, in_batches


def _as_float64(name: str, feats) -> torch.Tensor:
    if type(feats).__module__ == "numpy":       # an ndarray; NumPy itself is not needed otherwise
        feats = torch.from_numpy(feats)
    if not isinstance(feats, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or NumPy array of shape (N, D), got {type(feats).__name__}")
    if feats.dim() != 2 or feats.shape[0] < 2 or feats.shape[1] < 1:
        raise ValueError(f"{name} must be (N, D) with N >= 2 samples, got shape {tuple(feats.shape)}")
    feats = feats.detach().to("cpu", torch.float64)
    if not torch.isfinite(feats).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return feats


def gaussian_statistics(feats) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ (D,), Σ (D, D)) in float64 of features (N, D); Σ is the unbiased sample covariance."""
    feats = _as_float64("feats", feats)
    return feats.mean(0), torch.cov(feats.T).reshape(feats.shape[1], feats.shape[1])


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """d² of the module docstring from means (D,) and covariances (D, D)."""
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"means must be (D,) and covariances (D, D) of one D, got {tuple(mu1.shape)}, "
                         f"{tuple(sigma1.shape)}, {tuple(mu2.shape)}, {tuple(sigma2.shape)}")
    root = _psd_sqrt(sigma1)
    middle = root @ sigma2 @ root
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return max(d2.item(), 0.0)  # ≥ 0 in exact arithmetic; rounding may leave −1e-12


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance d² between feature sets (N_a, D) and (N_b, D) (tensors or NumPy arrays)."""
    feats_a, feats_b = _as_float64("feats_a", feats_a), _as_float64("feats_b", feats_b)
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feats_a and feats_b must share the feature dimension D, got {feats_a.shape[1]} and "
                         f"{feats_b.shape[1]}")
    return frechet_from_statistics(*gaussian_statistics(feats_a), *gaussian_statistics(feats_b))


def _images(name: str, value) -> torch.Tensor:
    images = getattr(value, "images", value)   # an ImageSet or a tensor
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"{name} must be an ImageSet or a (N, C, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    return images


@torch.no_grad()
def recognizer_features(recognizer, images, *, batch_size: int = 256, device=None) -> torch.Tensor:
    """(N, D) float32 CPU penultimate features (all tokens) of images (N, C, H, W) or an ImageSet."""
    images = _images("images", images)
    return in_batches(recognizer, images, lambda batch: recognizer.features(batch).float(), batch_size=batch_size,
                      device=device)


def recognizer_frechet(recognizer, real, fake, *, batch_size: int = 256, device=None) -> float:
    """Fréchet distance between the recognizer's features of real and of generated images.

    real, fake: ImageSet or (N, C, H, W) tensors in [−1, 1] of the recognizer's image shape.
    """
    return frechet_distance(recognizer_features(recognizer, real, batch_size=batch_size, device=device),
                            recognizer_features(recognizer, fake, batch_size=batch_size, device=device))


def class_accuracy(recognizer, images, labels, *, batch_size: int = 256, device=None) -> float:
    """Share of class-conditional samples images (N, C, H, W) that the recognizer assigns to their
    conditioning class labels (N,)."""
    images = _images("images", images)
    labels = torch.as_tensor(labels)
    return accuracy(recognizer, images, labels, batch_size=batch_size, device=device)
