"""Local identifiability: the Jacobian of the map from the private batch to the shared gradient.

If J = d vec(G) / d vec(X) (and d / d vec(Y) when Y is unknown) has full column rank at the truth,
the truth is an isolated solution of G(X') = G and gradient matching can converge to it; a rank
deficit is a direction along which the gradient does not change to first order. For small Gaussian
noise xi of std sigma on the shared gradient, the linearised error of an exact matcher is
dX = -J_X^+ xi, so the expected relative error is sigma * ||J_X^+||_F / ||X||_F (`noise_gain`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradleak.theory.attention import AttentionLayer, flat
from gradleak.theory.share import clip_tensors

RANK_TOLERANCE = 1e-9  # singular values below this fraction of the largest count as zero


@dataclass(frozen=True)
class LocalIdentifiability:
    unknowns: int  # n d, or 2 n d with Y unknown
    equations: int  # entries of the shared gradient
    rank: int
    singular_max: float
    singular_min: float
    noise_gain: float  # relative error of X per unit sigma (linearised); inf when rank-deficient

    @property
    def full_rank(self) -> bool:
        return self.rank == self.unknowns

    def predicted_error(self, sigma: float) -> float:
        return sigma * self.noise_gain if sigma > 0 else 0.0

    def to_json(self) -> dict[str, float | int | bool | None]:
        out: dict[str, float | int | bool | None] = dict(self.__dict__)
        out["noise_gain"] = self.noise_gain if math.isfinite(self.noise_gain) else None
        out["full_rank"] = self.full_rank
        return out


def gradient_jacobian(
    layer: AttentionLayer,
    X: torch.Tensor,
    Y: torch.Tensor,
    share: Sequence[str],
    *,
    known_target: bool,
    clip: float | None = None,
) -> torch.Tensor:
    """J = d flat(clip(G(X, Y))) / d (vec X[, vec Y]), shape (equations, unknowns)."""
    n, d = X.shape

    def shared(z: torch.Tensor) -> torch.Tensor:
        Xz = z[: n * d].reshape(n, d)
        Yz = Y if known_target else z[n * d :].reshape(n, d)
        return flat(clip_tensors(layer.functional_gradients(Xz, Yz, share), clip))

    z = X.reshape(-1) if known_target else torch.cat([X.reshape(-1), Y.reshape(-1)])
    return torch.func.jacfwd(shared)(z)


def local_identifiability(
    layer: AttentionLayer,
    X: torch.Tensor,
    Y: torch.Tensor,
    share: Sequence[str],
    *,
    known_target: bool,
    clip: float | None = None,
) -> LocalIdentifiability:
    J = gradient_jacobian(layer, X, Y, share, known_target=known_target, clip=clip)
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    rank = int((S > S[0] * RANK_TOLERANCE).sum()) if S.numel() and S[0] > 0 else 0
    unknowns = J.shape[1]
    if rank < unknowns:
        gain = math.inf
    else:
        nx = X.numel()
        pinv_x = Vh.T[:nx] / S  # rows of J^+ = V S^-1 U^T for the X block (U has orthonormal columns)
        gain = float(torch.linalg.norm(pinv_x)) / float(torch.linalg.norm(X))
    return LocalIdentifiability(
        unknowns=unknowns,
        equations=J.shape[0],
        rank=rank,
        singular_max=float(S[0]) if S.numel() else 0.0,
        singular_min=float(S[-1]) if S.numel() else 0.0,
        noise_gain=gain,
    )
