"""Derived seeds: one integer seed fans out into independent, reproducible random streams.

    derive_seed(p₁, …, p_k) = splitmix64(… splitmix64(splitmix64(γ ⊕ p₁) ⊕ p₂) … ⊕ p_k) mod 2⁶³

SplitMix64 (Steele, Lea & Flood, 2014) is a bijective mixer of 64-bit words, so distinct (seed, epoch)
pairs give unrelated torch.Generator seeds — unlike seed + epoch, where (0, 1) and (1, 0) would collide.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(z: int) -> int:
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(*parts: int) -> int:
    """A seed in [0, 2⁶³) for torch.Generator.manual_seed, a pure function of the integer parts."""
    h = _GOLDEN
    for part in parts:
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h >> 1
