"""DLG on the attention layer: find X' (and Y' when the target is unknown) whose gradient matches the
shared one, then measure the relative error ||X' - X||_F / ||X||_F modulo the layer's symmetries.

The attack (`gradient_matching`) sees only the layer's weights, the shared gradient, the number of
tokens and, when known, the target Y; the truth enters only through the `monitor` the experiment
(`recover`) passes in to record the error along the run.

Symmetries of the shared gradient: a joint permutation of the rows of X and Y (token order), and,
with Y unknown, the sign flip (X, Y) -> (-X, -Y). With Y known its rows fix the order and the sign,
so the error is taken without any alignment; with Y unknown the rows of [X' | Y'] are matched to those
of [X | Y] (Hungarian) and the better sign is kept.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from scipy.optimize import linear_sum_assignment

from gradleak.errors import GradleakError
from gradleak.theory.attention import (
    DTYPE,
    AttentionLayer,
    check_size,
    flat,
    make_data,
    make_layer,
    parse_share,
)
from gradleak.theory.convergence import ConvergenceReport, Trace, analyse
from gradleak.theory.identifiability import LocalIdentifiability, local_identifiability
from gradleak.theory.share import SharedGradient, check_noise, clip_tensors, share_gradient

log = logging.getLogger(__name__)

OPTIMIZERS = ("lbfgs", "adam", "gd", "lm")
Progress = Callable[[int, int, float], None]  # (evaluation, total, objective)
Monitor = Callable[[torch.Tensor, torch.Tensor | None], float]  # (X', Y' or None) -> error
MAX_JACOBIAN_UNKNOWNS = 2048  # above this, local identifiability is not computed
STOP_OBJECTIVE = 1e-26  # relative objective at which a restart has matched to machine precision


# ----------------------------------------------------------------- error modulo symmetries


def aligned_error(
    X_hat: torch.Tensor,
    X: torch.Tensor,
    Y_hat: torch.Tensor | None = None,
    Y: torch.Tensor | None = None,
) -> tuple[float, float | None]:
    """(||X' - X||_F / ||X||_F, ||Y' - Y||_F / ||Y||_F or None) after the best joint row permutation
    and sign of (X', Y'); with Y' None (target known) no alignment is applied."""
    xn = float(torch.linalg.norm(X))
    if Y_hat is None or Y is None:
        return float(torch.linalg.norm(X_hat - X)) / xn, None
    truth = torch.cat([X, Y], dim=1)
    best: tuple[float, float] | None = None
    for sign in (1.0, -1.0):
        guess = sign * torch.cat([X_hat, Y_hat], dim=1)
        cost = torch.cdist(guess, truth).pow(2).detach().cpu().numpy()
        rows, cols = linear_sum_assignment(cost)
        aligned = torch.empty_like(guess)
        aligned[torch.as_tensor(cols)] = guess[torch.as_tensor(rows)]
        d = X.shape[1]
        ex = float(torch.linalg.norm(aligned[:, :d] - X)) / xn
        ey = float(torch.linalg.norm(aligned[:, d:] - Y)) / max(float(torch.linalg.norm(Y)), 1e-300)
        if best is None or ex < best[0]:
            best = (ex, ey)
    assert best is not None
    return best


# ----------------------------------------------------------------- the attack


@dataclass(frozen=True)
class MatchOptions:
    optimizer: str = "lbfgs"
    iterations: int = 300  # gradient evaluations per restart (LM: Jacobians)
    restarts: int = 8
    learning_rate: float = 0.05  # Adam; L-BFGS uses 1 with a strong-Wolfe line search; GD and LM adapt
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            choices = ", ".join(OPTIMIZERS)
            raise GradleakError(f"unknown optimizer {self.optimizer!r}; choose one of {choices}")
        if self.iterations < 1:
            raise GradleakError(f"iterations must be at least 1, got {self.iterations}")
        if self.restarts < 1:
            raise GradleakError(f"restarts must be at least 1, got {self.restarts}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise GradleakError(f"learning rate must be positive, got {self.learning_rate}")


@dataclass(frozen=True)
class Attempt:
    """One restart: the best point seen, its relative objective, and the trace of the run."""

    X: torch.Tensor
    Y: torch.Tensor | None
    objective: float
    trace: Trace
    first_within: int | None  # evaluations until the monitored error fell below the tolerance


class _Done(Exception):
    """Raised from inside an optimiser's closure once the objective has reached machine precision."""


class _Run:
    """Evaluates the gradient-matching objective and records everything along the way."""

    def __init__(
        self,
        layer: AttentionLayer,
        shared: SharedGradient,
        Y_known: torch.Tensor | None,
        n: int,
        budget: int,
        monitor: Monitor | None,
        tolerance: float,
        progress: Progress | None,
        offset: int,
        total: int,
    ) -> None:
        self.layer, self.shared, self.Y_known, self.n = layer, shared, Y_known, n
        self.target = flat(shared.tensors)
        self.scale = float(self.target.pow(2).sum()) or 1.0
        self.budget, self.monitor, self.tolerance = budget, monitor, tolerance
        self.progress, self.offset, self.total = progress, offset, total
        self.objective: list[float] = []
        self.grad_sq: list[float] = []
        self.secant: list[float] = []
        self.error: list[float] = []
        self.first_within: int | None = None
        self.best: tuple[float, torch.Tensor] | None = None
        self._prev: tuple[torch.Tensor, torch.Tensor] | None = None

    def split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.layer.d
        X = z[: self.n * d].reshape(self.n, d)
        Y = self.Y_known if self.Y_known is not None else z[self.n * d :].reshape(self.n, d)
        return X, Y

    def residual(self, z: torch.Tensor) -> torch.Tensor:
        """(clip(G(X', Y')) - G~) / ||G~||: the objective is its squared norm."""
        X, Y = self.split(z)
        grads = self.layer.gradients(X, Y, self.shared.share, create_graph=True)
        grads = clip_tensors(grads, self.shared.clip)
        return (flat(grads) - self.target) / math.sqrt(self.scale)

    def value(self, z: torch.Tensor) -> torch.Tensor:
        return self.residual(z).pow(2).sum()

    def jacobian(self, z: torch.Tensor) -> torch.Tensor:
        """d residual / d z by forward mode over `torch.func.grad` (one vectorised pass)."""

        def residual(zz: torch.Tensor) -> torch.Tensor:
            X, Y = self.split(zz)
            grads = clip_tensors(self.layer.functional_gradients(X, Y, self.shared.share), self.shared.clip)
            return (flat(grads) - self.target) / math.sqrt(self.scale)

        return torch.func.jacfwd(residual)(z)

    def evaluate(self, z: torch.Tensor) -> tuple[float, torch.Tensor]:
        """f(z) and its gradient, recorded; raises _Done at the budget or at machine precision."""
        if len(self.objective) >= self.budget:
            raise _Done
        zz = z.detach().clone().requires_grad_(True)
        f = self.value(zz)
        (g,) = torch.autograd.grad(f, zz)
        fv, zd = float(f.detach()), zz.detach()
        self.objective.append(fv)
        self.grad_sq.append(float(g.pow(2).sum()))
        if self._prev is None:
            self.secant.append(math.nan)
        else:
            step = float(torch.linalg.norm(zd - self._prev[0]))
            self.secant.append(float(torch.linalg.norm(g - self._prev[1])) / step if step > 0 else math.nan)
        self._prev = (zd, g)
        if self.best is None or fv < self.best[0]:
            self.best = (fv, zd)
        if self.monitor is not None:
            X, Y = self.split(zd)
            err = self.monitor(X, None if self.Y_known is not None else Y)
            self.error.append(err)
            if self.first_within is None and err < self.tolerance:
                self.first_within = len(self.objective)
        if self.progress is not None:
            self.progress(self.offset + len(self.objective), self.total, fv)
        if not math.isfinite(fv):
            raise _Done
        return fv, g

    def closure_for(self, z: torch.Tensor) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            fv, g = self.evaluate(z)
            z.grad = g.clone()
            if fv < STOP_OBJECTIVE:
                raise _Done
            return torch.tensor(fv, dtype=DTYPE)

        return closure


def _lbfgs(run: _Run, z: torch.Tensor, opts: MatchOptions) -> None:
    opt = torch.optim.LBFGS(
        [z],
        lr=1.0,
        max_iter=opts.iterations,
        max_eval=opts.iterations,
        history_size=100,
        tolerance_grad=1e-16,
        tolerance_change=1e-32,
        line_search_fn="strong_wolfe",
    )
    opt.step(run.closure_for(z))


def _adam(run: _Run, z: torch.Tensor, opts: MatchOptions) -> None:
    opt = torch.optim.Adam([z], lr=opts.learning_rate)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(k, opts.iterations) / opts.iterations))
    )
    closure = run.closure_for(z)
    for _ in range(opts.iterations):
        opt.zero_grad()
        closure()
        opt.step()
        sched.step()


def _gd(run: _Run, z: torch.Tensor, opts: MatchOptions) -> None:
    """Gradient descent with step 1/L, L found by backtracking (doubled until the sufficient decrease
    f(x - g/L) <= f(x) - ||g||^2 / (2L) of an L-smooth function holds, halved after each step)."""
    L = 1.0
    x = z.detach().clone()
    f, g = run.evaluate(x)
    while True:
        if f < STOP_OBJECTIVE:
            return
        gsq = float(g.pow(2).sum())
        while True:
            x_new = x - g / L
            f_new, g_new = run.evaluate(x_new)
            if f_new <= f - gsq / (2 * L) or not math.isfinite(L):
                break
            L *= 2.0
        x, f, g = x_new, f_new, g_new
        with torch.no_grad():
            z.copy_(x)
        L = max(L / 2.0, 1e-12)


def _lm(run: _Run, z: torch.Tensor, opts: MatchOptions) -> None:
    """Levenberg-Marquardt on the residual vector: an iteration is one Jacobian (as many gradient
    evaluations as the shared gradient has entries) and one recorded evaluation; trial steps that
    do not decrease the objective raise the damping."""
    lam = 1e-3
    x = z.detach().clone()
    while True:
        f, _ = run.evaluate(x)
        if f < STOP_OBJECTIVE:
            return
        r = run.residual(x).detach()
        J = run.jacobian(x)
        g, H = J.T @ r, J.T @ J
        damping = torch.diag(torch.diag(H)) + 1e-12 * torch.eye(H.shape[0], dtype=DTYPE)
        while lam < 1e12:
            x_new = x - torch.linalg.solve(H + lam * damping, g)
            f_new = float(run.value(x_new).detach())
            if f_new < f:
                x, lam = x_new, max(lam / 3.0, 1e-12)
                break
            lam *= 4.0
        else:
            return  # no descent step at any damping: a stationary point
        with torch.no_grad():
            z.copy_(x)


_STEPPERS = {"lbfgs": _lbfgs, "adam": _adam, "gd": _gd, "lm": _lm}


def gradient_matching(
    layer: AttentionLayer,
    shared: SharedGradient,
    n: int,
    *,
    Y_known: torch.Tensor | None,
    options: MatchOptions,
    starts: list[torch.Tensor] | None = None,
    monitor: Monitor | None = None,
    tolerance: float = 1e-3,
    distance: Callable[[torch.Tensor], float] | None = None,
    progress: Progress | None = None,
) -> list[Attempt]:
    """Minimise ||g(X', Y') - G||^2 / ||G||^2 over X' (and Y' when `Y_known` is None) from
    `options.restarts` starts (random N(0, 1) unless `starts` are given). Returns every attempt; the
    attacker picks the one with the lowest objective. A restart that matches to machine precision
    ends the search."""
    check_size(n, layer.d)
    d = layer.d
    size = n * d * (1 if Y_known is not None else 2)
    gen = torch.Generator().manual_seed(104_729 + options.seed)
    total = options.iterations * options.restarts
    attempts: list[Attempt] = []
    for r in range(options.restarts):
        z0 = starts[r] if starts is not None else torch.randn(size, generator=gen, dtype=DTYPE)
        z = z0.detach().clone().requires_grad_(True)
        run = _Run(
            layer, shared, Y_known, n, options.iterations, monitor, tolerance, progress,
            r * options.iterations, total,
        )  # fmt: skip
        try:
            _STEPPERS[options.optimizer](run, z, options)
        except _Done:
            pass
        if run.best is None:
            raise GradleakError("the attack made no gradient evaluation")
        f_best, z_best = run.best
        X, Y = run.split(z_best)
        trace = Trace(
            tuple(run.objective),
            tuple(run.grad_sq),
            tuple(run.secant),
            tuple(run.error),
            distance(z0) if distance is not None else math.nan,
        )
        attempts.append(Attempt(X, None if Y_known is not None else Y, f_best, trace, run.first_within))
        log.info("restart %d: objective %.3g after %d evaluations", r, f_best, len(trace))
        if f_best < STOP_OBJECTIVE:
            break
    return attempts


# ----------------------------------------------------------------- the experiment


@dataclass(frozen=True)
class RecoverySpec:
    n: int = 4
    d: int = 8
    seed: int = 0
    weight_norm: float = 1.0
    share: str = "qkv"
    known_target: bool = False
    sigma: float = 0.0
    clip: float | None = None
    delta: float = 1e-5
    init_distance: float | None = None  # None: random start; r: ||X'_0 - X|| = r ||X|| (and for Y')
    optimizer: str = "lbfgs"
    iterations: int = 300
    restarts: int = 8
    learning_rate: float = 0.05
    tolerance: float = 1e-3
    jacobian: bool = True  # also report local identifiability (the Jacobian at the truth)

    def validate(self) -> None:
        check_size(self.n, self.d)
        check_noise(self.sigma, self.clip, self.delta)
        parse_share(self.share)
        if not (self.weight_norm > 0 and math.isfinite(self.weight_norm)):
            raise GradleakError(f"weight norm must be a positive number, got {self.weight_norm}")
        if self.init_distance is not None and not (
            self.init_distance >= 0 and math.isfinite(self.init_distance)
        ):
            raise GradleakError(f"initial distance must be a number >= 0, got {self.init_distance}")
        if not (self.tolerance > 0):
            raise GradleakError(f"tolerance must be positive, got {self.tolerance}")
        self.options()

    def options(self) -> MatchOptions:
        return MatchOptions(self.optimizer, self.iterations, self.restarts, self.learning_rate, self.seed)


@dataclass(frozen=True)
class RecoveryResult:
    spec: RecoverySpec
    relative_error: float  # ||X' - X||_F / ||X||_F modulo the symmetries
    target_error: float | None  # the same for Y' when Y is unknown
    objective: float  # best relative gradient distance
    iterations: int | None  # gradient evaluations (all restarts) until the error fell below tolerance
    evaluations: int  # gradient evaluations spent in total
    restart: int  # the attempt the attacker kept (lowest objective)
    seconds: float
    gradient_norm: float  # of the client's gradient before clipping
    epsilon: float  # of the shared gradient at spec.delta (inf: no DP guarantee)
    symmetries: tuple[str, ...]
    convergence: ConvergenceReport
    identifiability: LocalIdentifiability | None
    trace: Trace = field(repr=False)

    @property
    def success(self) -> bool:
        return self.relative_error < self.spec.tolerance

    def to_json(self, *, with_trace: bool = False) -> dict[str, object]:
        def num(v: float | None) -> float | None:
            return None if v is None or not math.isfinite(v) else v

        out: dict[str, object] = {
            "relative_error": self.relative_error,
            "target_error": self.target_error,
            "success": self.success,
            "iterations": self.iterations,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
            "objective": self.objective,
            "restart": self.restart,
            "gradient_norm": self.gradient_norm,
            "epsilon": num(self.epsilon),
            "delta": self.spec.delta,
            "symmetries": list(self.symmetries),
            "convergence": self.convergence.to_json(),
            "identifiability": None if self.identifiability is None else self.identifiability.to_json(),
            "spec": asdict(self.spec),
        }
        if with_trace:
            out["trace"] = {
                "objective": list(self.trace.objective),
                "grad_sq": list(self.trace.grad_sq),
                "error": list(self.trace.error),
            }
        return out


def symmetries(known_target: bool) -> tuple[str, ...]:
    if known_target:
        return ()  # the known rows of Y pin token order and sign
    return ("token permutation (rows of X and Y jointly)", "sign flip (X, Y) -> (-X, -Y)")


def _start(truth: torch.Tensor, r: float, gen: torch.Generator) -> torch.Tensor:
    e = torch.randn(truth.shape, generator=gen, dtype=DTYPE)
    return truth + r * float(torch.linalg.norm(truth)) * e / torch.linalg.norm(e)


def recover(spec: RecoverySpec, progress: Progress | None = None) -> RecoveryResult:
    """Draw the layer and the private batch, share the (noisy) gradient, run the attack, score it."""
    spec.validate()
    t0 = time.perf_counter()
    share = parse_share(spec.share)
    layer = make_layer(spec.d, weight_norm=spec.weight_norm, seed=spec.seed)
    X, Y = make_data(spec.n, spec.d, seed=spec.seed)
    shared = share_gradient(
        layer, X, Y, share, sigma=spec.sigma, clip=spec.clip, delta=spec.delta, seed=spec.seed
    )
    if not all(torch.isfinite(t).all() for t in shared.tensors.values()):
        raise GradleakError("the shared gradient contains NaN or infinite values (weight norm too large?)")
    Y_known = Y if spec.known_target else None
    truth = X.reshape(-1) if spec.known_target else torch.cat([X.reshape(-1), Y.reshape(-1)])

    def monitor(Xh: torch.Tensor, Yh: torch.Tensor | None) -> float:
        return aligned_error(Xh, X, Yh, None if Yh is None else Y)[0]

    def distance(z0: torch.Tensor) -> float:
        Xh = z0[: spec.n * spec.d].reshape(spec.n, spec.d)
        Yh = None if spec.known_target else z0[spec.n * spec.d :].reshape(spec.n, spec.d)
        ex, ey = aligned_error(Xh, X, Yh, None if Yh is None else Y)
        sq = (ex * float(torch.linalg.norm(X))) ** 2
        if ey is not None:
            sq += (ey * float(torch.linalg.norm(Y))) ** 2
        return math.sqrt(sq)

    starts = None
    if spec.init_distance is not None:
        gen = torch.Generator().manual_seed(15_485_863 + spec.seed)
        parts = [(X, gen)] if spec.known_target else [(X, gen), (Y, gen)]
        starts = [
            torch.cat([_start(t, spec.init_distance, g).reshape(-1) for t, g in parts])
            for _ in range(spec.restarts)
        ]
    attempts = gradient_matching(
        layer, shared, spec.n, Y_known=Y_known, options=spec.options(), starts=starts,
        monitor=monitor, tolerance=spec.tolerance, distance=distance, progress=progress,
    )  # fmt: skip
    best = min(range(len(attempts)), key=lambda i: attempts[i].objective)
    chosen = attempts[best]
    err_x, err_y = aligned_error(chosen.X, X, chosen.Y, None if chosen.Y is None else Y)
    spent_before = sum(len(a.trace) for a in attempts[:best])
    iterations = None if chosen.first_within is None else spent_before + chosen.first_within
    local = None
    if spec.jacobian and truth.numel() <= MAX_JACOBIAN_UNKNOWNS:
        local = local_identifiability(layer, X, Y, share, known_target=spec.known_target, clip=spec.clip)
    return RecoveryResult(
        spec=spec,
        relative_error=err_x,
        target_error=err_y,
        objective=chosen.objective,
        iterations=iterations,
        evaluations=sum(len(a.trace) for a in attempts),
        restart=best,
        seconds=time.perf_counter() - t0,
        gradient_norm=shared.raw_norm,
        epsilon=shared.epsilon,
        symmetries=symmetries(spec.known_target),
        convergence=analyse(chosen.trace),
        identifiability=local,
        trace=chosen.trace,
    )
