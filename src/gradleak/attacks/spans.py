"""Row spans of weight gradients and distances to them, in float64.

For a linear map applied token-wise, the weight gradient is a sum of outer products
delta_i x_i^T over the tokens i of the batch, so its rows span (at most) the inputs x_i that
occurred: rank <= number of distinct tokens. A candidate input lies in that span exactly when it
occurred (generically). The rank is cut at the last relative singular-value gap of at least
MIN_GAP that falls under FLOOR; with no such gap the span is taken as the whole space. A drop
that would leave a single dimension out is passed over: it is a dependency among the gradient's
rows (a LayerNorm after the map makes its output gradients sum to zero), not the span's edge.

A perturbed update (noise added) has no such gap: `noisy_span_of` then keeps the singular values
above the optimal hard threshold for a low-rank matrix in white noise of unknown level (Gavish &
Donoho 2014, omega(beta) * median singular value), i.e. the rank is chosen by energy above the
noise bulk rather than by a gap. `weighted_span_of` keeps every direction above the bulk's edge
instead, each weighted by the share of its energy that is signal, so that distances to it are scores
rather than a test (the noise-robust exact attack's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

MIN_GAP = 10.0  # a rank cut separates consecutive singular values by at least this factor
FLOOR = 1e-4  # ... and drops below this fraction of the largest one


@dataclass(frozen=True)
class Span:
    basis: torch.Tensor  # (d, r) orthonormal columns, float64
    rank: int
    dim: int
    gap: float  # s_r / s_{r+1}
    min_gap: float = MIN_GAP  # the gap this span was cut at (at least)

    @property
    def full(self) -> bool:
        return self.rank >= self.dim or self.gap < self.min_gap

    @cached_property
    def complement(self) -> torch.Tensor:
        """(d, d - r) orthonormal columns orthogonal to the span."""
        if self.rank == 0:
            return torch.eye(self.dim, dtype=torch.float64)
        q, _ = torch.linalg.qr(self.basis, mode="complete")
        return q[:, self.rank :].contiguous()


def span_of(rows: torch.Tensor, max_rank: int | None = None, min_gap: float = MIN_GAP) -> Span:
    """The row span of `rows` (k, d), cut at the last singular-value gap of at least `min_gap` that
    falls under FLOOR (see above)."""
    rows = rows.to(torch.float64)
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    dim = rows.shape[1]
    if s.numel() == 0 or float(s[0]) == 0.0:
        return Span(torch.zeros(dim, 0, dtype=torch.float64), 0, dim, float("inf"))
    rel = s / s[0]
    limit = len(s) if max_rank is None else min(len(s), max_rank + 1)
    if limit < 2:
        return Span(vh[:1].T.contiguous(), 1, dim, float("inf"))
    ratios = rel[: limit - 1] / rel[1:limit].clamp_min(1e-300)
    big = torch.nonzero((ratios >= min_gap) & (rel[1:limit] <= FLOOR)).flatten()
    # a drop that leaves one dimension out is a dependency among the rows (a LayerNorm after the map
    # makes its output gradients sum to zero), not the span's edge
    big = big[big + 1 < dim - 1]
    if len(big) == 0:  # no clean drop to the noise floor: the rows fill the space (or are noisy)
        return Span(vh.T.contiguous(), dim, dim, float(ratios.max()), min_gap)
    rank = int(big[-1]) + 1  # the last clean drop: signal may fall steeply, noise after it does not
    gap = float(ratios[rank - 1])
    return Span(vh[:rank].T.contiguous(), rank, dim, gap, min_gap)


def residual(span: Span, x: torch.Tensor) -> torch.Tensor:
    """Relative distance ||x - P x|| / ||x|| of each row of x (..., d) to the span; inf for a zero row
    (a padding embedding held at zero lies in every span and so is evidence of nothing)."""
    x = x.to(torch.float64)
    out = _residual(span, x)
    return out.masked_fill(x.abs().amax(dim=-1) == 0, float("inf"))


def _residual(span: Span, x: torch.Tensor) -> torch.Tensor:
    if 2 * span.rank > span.dim:  # the complement is the smaller basis (and needs no cancellation)
        return (x @ span.complement).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-300)
    total = x.pow(2).sum(dim=-1)
    inside = (x @ span.basis).pow(2).sum(dim=-1)  # orthonormal basis: ||P x||^2 = ||B^T x||^2
    out = (total - inside).clamp_min(0.0).sqrt() / total.sqrt().clamp_min(1e-300)
    # the difference of squares loses precision for rows almost inside the span: compute those directly
    close = out < 1e-6
    if bool(close.any()):
        xc = x[close]
        out[close] = (xc - (xc @ span.basis) @ span.basis.T).norm(dim=-1) / xc.norm(dim=-1).clamp_min(1e-300)
    return out


def gavish_donoho_omega(beta: float) -> float:
    """omega(beta) of Gavish & Donoho (2014, eq. 5): the hard threshold is omega * median(s) for an
    m x n matrix with beta = min(m, n) / max(m, n) and white noise of unknown level."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def noisy_span_of(rows: torch.Tensor) -> Span:
    """The row span of `rows` (k, d) kept above the noise bulk (see the module docstring)."""
    rows = rows.to(torch.float64)
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    dim = rows.shape[1]
    if s.numel() == 0 or float(s[0]) == 0.0:
        return Span(torch.zeros(dim, 0, dtype=torch.float64), 0, dim, float("inf"))
    beta = min(rows.shape) / max(rows.shape)
    cut = gavish_donoho_omega(beta) * float(s.median())
    rank = max(1, int((s > cut).sum()))
    gap = float(s[rank - 1] / s[rank]) if rank < len(s) else float("inf")
    return Span(vh[:rank].T.contiguous(), rank, dim, gap)


def bulk_edge_ratio(beta: float) -> float:
    """The noise bulk's edge (1 + sqrt(beta)) over Gavish & Donoho's optimal hard threshold lambda*(beta)
    (their eq. 11), both in units of sqrt(n) sigma: the edge is this times the threshold."""
    lam = math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta * beta + 14 * beta + 1)))
    return (1 + math.sqrt(beta)) / lam


def weighted_span_of(rows: torch.Tensor) -> Span:
    """The row span of a noisy `rows` (k, d) as a weighted basis: every right singular vector whose
    singular value s passes the noise bulk's edge (estimated from the median singular value, as
    `noisy_span_of`), scaled by sqrt(1 - edge^2 / s^2), the share of its energy above the noise. With
    that basis `residual` is sqrt(1 - sum_k w_k (v_k . x)^2 / |x|^2): a score that falls smoothly as a
    candidate aligns with strong directions, where a rank cut would count weak and strong alike. The
    rank is at most half the width, so that `residual` reads the (scaled) basis, never its complement."""
    rows = rows.to(torch.float64)
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    dim = rows.shape[1]
    if s.numel() == 0 or float(s[0]) == 0.0:
        return Span(torch.zeros(dim, 0, dtype=torch.float64), 0, dim, float("inf"))
    beta = min(rows.shape) / max(rows.shape)
    edge = bulk_edge_ratio(beta) * gavish_donoho_omega(beta) * float(s.median())
    weights = (1 - (edge / s).pow(2)).clamp_min(0.0)
    rank = max(1, min(int((weights > 0).sum()), dim // 2))
    weights[0] = weights[0] if float(weights[0]) > 0 else 1.0  # nothing above the edge: the top one
    gap = float(s[rank - 1] / s[rank]) if rank < len(s) else float("inf")
    basis = vh[:rank].T * weights[:rank].sqrt()
    return Span(basis.contiguous(), rank, dim, gap)
