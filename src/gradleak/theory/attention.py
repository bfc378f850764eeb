"""The theory lab's victim: one softmax self-attention layer with a squared loss, in float64.

    F(X) = softmax(X W_Q W_K^T X^T / sqrt(d)) X W_V,      L(X, Y) = 0.5 * ||F(X) - Y||_F^2

X is the private input (n tokens x d), Y the regression target (n x d). The loss is summed over
tokens, so the layer is permutation-equivariant and the gradient a client shares is invariant to
permuting the rows of X and Y jointly (`permute`); it is also invariant to (X, Y) -> (-X, -Y),
since the scores are quadratic in X and F is odd in X (`negate`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from gradleak.errors import GradleakError

WEIGHTS = ("W_Q", "W_K", "W_V")
SHARE_LETTERS = {"q": "W_Q", "k": "W_K", "v": "W_V"}
DTYPE = torch.float64


def parse_share(text: str) -> tuple[str, ...]:
    """`qkv`, `qk`, `v`, ... -> the weight names whose gradients the client shares, in order."""
    letters = text.strip().lower().replace(",", "")
    if not letters or any(c not in SHARE_LETTERS for c in letters) or len(set(letters)) != len(letters):
        raise GradleakError(f"share must be a non-empty set of the letters q, k, v (e.g. qkv), got {text!r}")
    return tuple(SHARE_LETTERS[c] for c in "qkv" if c in letters)


def share_label(names: Sequence[str]) -> str:
    return "".join(k for k, v in SHARE_LETTERS.items() if v in names)


def check_size(n: int, d: int) -> None:
    if n < 1:
        raise GradleakError(f"n (tokens) must be at least 1, got {n}")
    if d < 1:
        raise GradleakError(f"d (width) must be at least 1, got {d}")


@dataclass(frozen=True)
class AttentionLayer:
    """One attention head of width d (query, key and value maps d x d), no bias, no output map."""

    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor

    @property
    def d(self) -> int:
        return int(self.W_Q.shape[0])

    def weights(self) -> dict[str, torch.Tensor]:
        return {"W_Q": self.W_Q, "W_K": self.W_K, "W_V": self.W_V}

    def attention(self, X: torch.Tensor, weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        w = weights or self.weights()
        scores = X @ w["W_Q"] @ w["W_K"].T @ X.T / math.sqrt(self.d)
        return torch.softmax(scores, dim=-1)

    def forward(self, X: torch.Tensor, weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        w = weights or self.weights()
        return self.attention(X, w) @ X @ w["W_V"]

    def loss(
        self, X: torch.Tensor, Y: torch.Tensor, weights: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """0.5 * ||F(X) - Y||_F^2, summed over tokens and coordinates."""
        return 0.5 * (self.forward(X, weights) - Y).pow(2).sum()

    def gradients(
        self,
        X: torch.Tensor,
        Y: torch.Tensor,
        share: Sequence[str] = WEIGHTS,
        *,
        create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Gradient of the loss with respect to the shared weights. With `create_graph` the result is
        differentiable in X and Y (the attacker's gradient-matching objective needs that)."""
        weights = {k: v.detach().clone().requires_grad_(k in share) for k, v in self.weights().items()}
        loss = self.loss(X, Y, weights)
        grads = torch.autograd.grad(loss, [weights[k] for k in share], create_graph=create_graph)
        return {k: g if create_graph else g.detach() for k, g in zip(share, grads, strict=True)}

    def functional_gradients(
        self, X: torch.Tensor, Y: torch.Tensor, share: Sequence[str] = WEIGHTS
    ) -> dict[str, torch.Tensor]:
        """The same gradients through `torch.func.grad`, so that `torch.func.jacfwd` can differentiate
        them in X and Y (Jacobians for Levenberg-Marquardt and the identifiability analysis)."""
        from torch.func import grad

        fixed = self.weights()

        def loss(shared: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.loss(X, Y, {**fixed, **shared})

        grads = grad(loss)({k: fixed[k] for k in share})
        return {k: grads[k] for k in share}


def _scaled(shape: tuple[int, int], norm: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(shape, generator=gen, dtype=DTYPE)
    return w * (norm / torch.linalg.matrix_norm(w, ord=2))


def make_layer(d: int, *, weight_norm: float = 1.0, seed: int = 0) -> AttentionLayer:
    """Gaussian weights, each rescaled to spectral norm `weight_norm`; seeded."""
    check_size(1, d)
    if not (weight_norm > 0 and math.isfinite(weight_norm)):
        raise GradleakError(f"weight norm must be a positive number, got {weight_norm}")
    gen = torch.Generator().manual_seed(seed)
    return AttentionLayer(*(_scaled((d, d), weight_norm, gen) for _ in WEIGHTS))


def make_data(n: int, d: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The private batch: X and Y with i.i.d. N(0, 1) entries (a stream separate from the weights')."""
    check_size(n, d)
    gen = torch.Generator().manual_seed(1_000_003 + seed)
    X = torch.randn((n, d), generator=gen, dtype=DTYPE)
    Y = torch.randn((n, d), generator=gen, dtype=DTYPE)
    return X, Y


def permute(X: torch.Tensor, Y: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder the tokens of X and Y jointly (a symmetry of the shared gradient)."""
    return X[order], Y[order]


def negate(X: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, Y) -> (-X, -Y): a symmetry of the shared gradient, visible when Y is not known."""
    return -X, -Y


def flat(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])
