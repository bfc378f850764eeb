"""What the client of the theory lab shares: the gradient of the attention layer, optionally L2-clipped
to C and perturbed with Gaussian noise of std sigma on every coordinate, and what that costs in
(epsilon, delta)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from gradleak.client import Update
from gradleak.errors import GradleakError
from gradleak.theory.attention import DTYPE, AttentionLayer


def check_noise(sigma: float, clip: float | None, delta: float) -> None:
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise GradleakError(f"sigma must be a finite number >= 0, got {sigma}")
    if clip is not None and not (clip > 0 and math.isfinite(clip)):
        raise GradleakError(f"clip norm must be a positive number, got {clip}")
    if not 0 < delta < 1:
        raise GradleakError(f"delta must lie in (0, 1), got {delta}")


def global_norm(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(t.pow(2).sum() for t in tensors.values()))


def clip_tensors(tensors: Mapping[str, torch.Tensor], clip: float | None) -> dict[str, torch.Tensor]:
    """Scale the whole update to L2 norm at most `clip` (differentiable: the attacker applies the same
    public map to its dummy gradient)."""
    if clip is None:
        return dict(tensors)
    factor = torch.clamp(clip / global_norm(tensors).clamp_min(1e-300), max=1.0)
    return {k: v * factor for k, v in tensors.items()}


def gaussian_epsilon(sigma: float, clip: float | None, delta: float) -> float:
    """Epsilon of one release of the clipped gradient plus N(0, sigma^2) noise (analytic Gaussian
    mechanism, Balle & Wang 2018; client-level add/remove adjacency, L2 sensitivity C). Without a
    clip the sensitivity is unbounded and without noise there is no mechanism: both give inf."""
    if clip is None or sigma == 0:
        return math.inf
    from gradleak.privacy import analytic_gaussian_epsilon

    return float(analytic_gaussian_epsilon(sigma, clip, delta))


@dataclass(frozen=True)
class SharedGradient:
    """The server's view: named (noisy, clipped) gradient tensors and the public protocol facts."""

    tensors: Mapping[str, torch.Tensor]
    sigma: float = 0.0
    clip: float | None = None
    delta: float = 1e-5
    raw_norm: float = 0.0  # norm of the client's gradient before clipping (for reports, not attacks)

    @property
    def share(self) -> tuple[str, ...]:
        return tuple(self.tensors)

    @property
    def epsilon(self) -> float:
        return gaussian_epsilon(self.sigma, self.clip, self.delta)

    @property
    def clip_factor(self) -> float:
        """How much clipping shrank the gradient (1.0 when it did not)."""
        if self.clip is None or self.raw_norm == 0:
            return 1.0
        return min(1.0, self.clip / self.raw_norm)

    def to_update(self) -> Update:
        """The same tensors as a `gradleak.client.Update`, for the general defence machinery."""
        return Update(dict(self.tensors), "fedsgd")


def share_gradient(
    layer: AttentionLayer,
    X: torch.Tensor,
    Y: torch.Tensor,
    share: Sequence[str],
    *,
    sigma: float = 0.0,
    clip: float | None = None,
    delta: float = 1e-5,
    seed: int = 0,
) -> SharedGradient:
    """The client's step: gradient of the squared loss, clipped, then Gaussian noise (seeded)."""
    check_noise(sigma, clip, delta)
    grads = {k: v.detach() for k, v in layer.gradients(X, Y, share).items()}
    raw = float(global_norm(grads))
    # the same defence chain as the transformer victims: clip:norm=C, then gaussian:sigma=S
    from gradleak.defenses import DefenseChain, DefenseContext

    specs = ([f"clip:norm={clip!r}"] if clip is not None else []) + (
        [f"gaussian:sigma={sigma!r}"] if sigma > 0 else []
    )
    gen = torch.Generator().manual_seed(7_919 + seed)
    update, _ = DefenseChain.parse(specs).apply(Update(grads, "fedsgd"), DefenseContext(None, None, gen))
    tensors = {k: v.detach().to(DTYPE) for k, v in update.tensors.items()}
    return SharedGradient(tensors, sigma, clip, delta, raw)
