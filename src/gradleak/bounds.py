"""Convergence of SGD under perturbed gradients: the bound, its estimators, and an exact test problem.

Setting. f: R^d -> R is L-smooth (||grad f(x) - grad f(y)|| <= L ||x - y||) and bounded below by f*.
SGD takes x_{t+1} = x_t - eta g_t with a constant step eta, where g_t = grad f(x_t) + e_t.

**Theorem (unbiased perturbations).** Suppose E[e_t | x_t] = 0 and E[||e_t||^2 | x_t] <= V, where
V = sigma_g^2 + d sigma^2 when e_t is the minibatch error (variance <= sigma_g^2, summed over the
coordinates) plus independent noise N(0, sigma^2 I_d). For 0 < eta < 2/L,

    (1/T) sum_{t<T} E||grad f(x_t)||^2 <= [2 (f(x_0) - f*) / (eta T) + eta L V] / (2 - eta L),

and in particular, for eta <= 1/L (where 2 - eta L >= 1), the textbook statement

    min_{t<T} E||grad f(x_t)||^2 <= (1/T) sum_t E||grad f(x_t)||^2 <= 2 (f(x_0) - f*) / (eta T) + eta L V.

*Proof sketch* (descent lemma; Ghadimi & Lan 2013, Thm 2.1; Bottou, Curtis & Nocedal 2018, Thm 4.8).
L-smoothness gives f(x_{t+1}) <= f(x_t) - eta <grad f(x_t), g_t> + (L eta^2 / 2) ||g_t||^2. Taking the
expectation given x_t, with E g_t = grad f(x_t) and E||g_t||^2 = ||grad f(x_t)||^2 + E||e_t||^2:
E f(x_{t+1}) <= E f(x_t) - eta (1 - L eta / 2) E||grad f(x_t)||^2 + (L eta^2 / 2) V. Summing over
t < T, telescoping and using f(x_T) >= f*, then dividing by eta (1 - L eta / 2) T gives the bound. The
proof only uses the variance at the iterates visited, so V may be the mean over t of E||e_t||^2.

**Corollary (biased perturbations: clipping, DP-SGD, pruning, quantisation).** When E[e_t | x_t] != 0
the cross term no longer vanishes. For eta <= 1/L, -eta <a, a + e> + (eta / 2) ||a + e||^2 =
-(eta / 2) ||a||^2 + (eta / 2) ||e||^2, so *pathwise*, whatever the errors,

    (1/T) sum_t ||grad f(x_t)||^2 <= 2 (f(x_0) - f(x_T)) / (eta T) + (1/T) sum_t ||e_t||^2,

and in expectation, with e_t = (minibatch error) + (defence error) and Minkowski's inequality,
(1/T) sum_t E||grad f(x_t)||^2 <= 2 (f(x_0) - f*) / (eta T) + (sigma_g + sqrt(P))^2, where P bounds
E||g_defended - g_minibatch||^2 (the clipping error plus the noise). The error term no longer shrinks
with eta: a biased defence leaves a floor that no step size removes. DP-SGD's clipped mean is not the
gradient of f (nor, in general, of any function), so the unbiased theorem does not apply to it.

Estimators for a real run (`gradleak.train`): L as the largest |eigenvalue| of the Hessian of the loss
on a probe batch (power iteration on Hessian-vector products) at the start and the end of the run,
and the largest secant ratio ||g(x') - g(x)|| / ||x' - x|| along a path; sigma_g^2 as the sample
variance of several minibatch gradients at one point; f* >= 0 for cross-entropy. All are local: they
estimate, not certify, the constants of the region the run visits.

`QuadraticProblem` is least squares where every assumption holds exactly, with known L, f* and
sigma_g^2: the verification that the measured mean ||grad f||^2 stays under the bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from gradleak.errors import GradleakError


@dataclass(frozen=True)
class PerturbedSgdBound:
    """The bound on (1/T) sum_{t<T} E||grad f(x_t)||^2 for SGD with step `lr` on an L-smooth objective.

    gap: f(x_0) - f*; smoothness: L; grad_variance: sigma_g^2 = E||g_minibatch - grad f||^2;
    perturbation: E||g_defended - g_minibatch||^2 (d sigma^2 for additive N(0, sigma^2 I_d) noise);
    unbiased: whether the defence's error has mean zero (additive noise only)."""

    gap: float
    lr: float
    smoothness: float
    grad_variance: float
    perturbation: float
    unbiased: bool = True

    def __post_init__(self) -> None:
        for key in ("gap", "smoothness", "grad_variance", "perturbation"):
            value = getattr(self, key)
            if not (value >= 0 and math.isfinite(value)):
                raise GradleakError(f"bound: {key} must be a finite number >= 0, got {value}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise GradleakError(f"bound: the step size must be a finite number > 0, got {self.lr}")

    @property
    def lr_times_l(self) -> float:
        return self.lr * self.smoothness

    @property
    def applies(self) -> bool:
        """The step-size condition: eta L < 2 (unbiased), eta L <= 1 (biased)."""
        return self.lr_times_l < 2 if self.unbiased else self.lr_times_l <= 1

    @property
    def reason(self) -> str:
        if self.applies:
            return "" if self.unbiased else "biased defence: the error term is a floor, (sigma_g + sqrt(P))^2"
        limit = "2 / L" if self.unbiased else "1 / L"
        return f"step size {self.lr:g} exceeds {limit} (lr * L = {self.lr_times_l:.3g})"

    def value(self, steps: int) -> float:
        """The bound after `steps` steps; inf where the step-size condition fails."""
        if steps < 1:
            raise GradleakError(f"bound: steps must be >= 1, got {steps}")
        if not self.applies:
            return math.inf
        descent = 2 * self.gap / (self.lr * steps)
        if self.unbiased:
            variance = self.grad_variance + self.perturbation
            return (descent + self.lr_times_l * variance) / (2 - self.lr_times_l)
        return descent + (math.sqrt(self.grad_variance) + math.sqrt(self.perturbation)) ** 2

    def textbook(self, steps: int) -> float:
        """2 (f(x_0) - f*) / (eta T) + eta L (sigma_g^2 + d sigma^2): the issue's form, eta <= 1/L."""
        if not (self.unbiased and self.lr_times_l <= 1):
            return math.inf
        return 2 * self.gap / (self.lr * steps) + self.lr_times_l * (self.grad_variance + self.perturbation)

    def curve(self, steps: int) -> list[float]:
        """The bound for T = 1..steps, to draw beside the running mean of ||grad f||^2."""
        return [self.value(t) for t in range(1, steps + 1)]

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "lr_times_L": self.lr_times_l, "applies": self.applies, "reason": self.reason}


# ------------------------------------------------------------------ estimators


def running_mean(values: Sequence[float]) -> list[float]:
    """(1/T) sum_{t<T} values[t] for T = 1..len(values)."""
    out: list[float] = []
    total = 0.0
    for i, v in enumerate(values, start=1):
        total += v
        out.append(total / i)
    return out


def power_iteration(
    hvp: Callable[[torch.Tensor], torch.Tensor],
    like: torch.Tensor,
    iterations: int = 20,
    generator: torch.Generator | None = None,
) -> float:
    """The largest |eigenvalue| of a symmetric operator given by its products `hvp(v)` with flat
    vectors shaped like `like` (for a Hessian: the local smoothness constant)."""
    if iterations < 1:
        raise GradleakError(f"power iteration needs at least one iteration, got {iterations}")
    v = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    v = v / v.norm()
    estimate = 0.0
    for _ in range(iterations):
        hv = hvp(v)
        norm = float(hv.norm())
        if not math.isfinite(norm):
            raise GradleakError("power iteration: the Hessian-vector product is not finite")
        if norm == 0.0:
            return 0.0
        estimate = norm  # ||H v|| with ||v|| = 1 -> |lambda_max| as v aligns
        v = hv / norm
    return estimate


def secant_smoothness(points: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> float:
    """max_t ||g(x_{t+1}) - g(x_t)|| / ||x_{t+1} - x_t|| over successive points: a lower bound on L
    on the path (gradients of one fixed objective, e.g. a fixed large batch)."""
    if len(points) != len(grads):
        raise GradleakError(f"{len(points)} points but {len(grads)} gradients")
    best = 0.0
    for t in range(len(points) - 1):
        step = float((points[t + 1] - points[t]).double().norm())
        if step > 0:
            best = max(best, float((grads[t + 1] - grads[t]).double().norm()) / step)
    return best


class RunningVariance:
    """sum over coordinates of the sample variance of flat vectors fed one at a time (memory 2 d):
    fed k minibatch gradients at one point, it estimates sigma_g^2 = E||g_B - grad f||^2."""

    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.square = 0.0

    def add(self, flat: torch.Tensor) -> None:
        flat = flat.detach().double()
        self.total = flat.clone() if self.total is None else self.total + flat
        self.square += float(flat.pow(2).sum())
        self.count += 1

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise GradleakError("no vectors to average")
        return self.total / self.count

    def variance(self) -> float:
        if self.count < 2 or self.total is None:
            raise GradleakError("the variance needs at least two vectors")
        spread = self.square - float(self.total.pow(2).sum()) / self.count  # sum ||g_i - mean||^2
        return max(spread, 0.0) / (self.count - 1)


# ------------------------------------------------------------------ an exact test problem


@dataclass(frozen=True)
class QuadraticProblem:
    """Least squares f(x) = ||A x - b||^2 / (2n) whose n examples are row blocks sharing one design M:
    example i is ||M (x - c_i)||^2 / 2, so A stacks M n times, b stacks M c_i, and

    - L = lambda_max(A^T A) / n = lambda_max(M^T M) exactly;
    - f* = f(mean c) exactly (M has full column rank);
    - a minibatch S (size b, without replacement) has gradient H (x - c_S), H = M^T M: its error
      H (c - c_S) does not depend on x, so the variance bound sigma_g^2 holds everywhere, with the exact
      value (n - b) / (b (n - 1)) * (1/n) sum_i ||H (c_i - c)||^2."""

    design: torch.Tensor  # M, (m, d)
    centres: torch.Tensor  # c_i, (n, d)

    @classmethod
    def random(
        cls, examples: int = 64, dim: int = 20, rows: int = 30, seed: int = 0, spread: float = 1.0
    ) -> QuadraticProblem:
        gen = torch.Generator().manual_seed(seed)
        m = torch.randn(rows, dim, generator=gen, dtype=torch.float64) / math.sqrt(rows)
        c = spread * torch.randn(examples, dim, generator=gen, dtype=torch.float64)
        return cls(m, c)

    @property
    def dim(self) -> int:
        return int(self.design.shape[1])

    @property
    def examples(self) -> int:
        return int(self.centres.shape[0])

    @property
    def hessian(self) -> torch.Tensor:
        return self.design.T @ self.design

    @property
    def smoothness(self) -> float:
        return float(torch.linalg.eigvalsh(self.hessian)[-1])

    @property
    def minimum(self) -> float:
        return self.value(self.centres.mean(0))

    def value(self, x: torch.Tensor) -> float:
        r = (x[None, :] - self.centres) @ self.design.T  # (n, m)
        return float(0.5 * r.pow(2).sum(1).mean())

    def gradient(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        centres = self.centres if index is None else self.centres[index]
        return self.hessian @ (x - centres.mean(0))

    def grad_variance(self, batch_size: int) -> float:
        n, b = self.examples, batch_size
        if not 1 <= b <= n:
            raise GradleakError(f"batch size must be in 1..{n}, got {b}")
        if n == 1:
            return 0.0
        spread = (self.centres - self.centres.mean(0)) @ self.hessian  # rows H (c_i - c)
        per_example = float(spread.pow(2).sum(1).mean())
        return (n - b) / (b * (n - 1)) * per_example


def perturbed_sgd(
    problem: QuadraticProblem,
    x0: torch.Tensor,
    lr: float,
    steps: int,
    batch_size: int,
    sigma: float,
    seed: int,
) -> list[float]:
    """Minibatch SGD plus N(0, sigma^2 I_d) noise on `problem`; ||grad f(x_t)||^2 for t = 0..steps-1."""
    gen = torch.Generator().manual_seed(seed)
    h, centre = problem.hessian, problem.centres.mean(0)
    x = x0.clone().double()
    out: list[float] = []
    for _ in range(steps):
        out.append(float((h @ (x - centre)).pow(2).sum()))
        index = torch.randperm(problem.examples, generator=gen)[:batch_size]
        g = h @ (x - problem.centres[index].mean(0))
        if sigma > 0:
            g = g + sigma * torch.randn(problem.dim, generator=gen, dtype=torch.float64)
        x = x - lr * g
    return out
