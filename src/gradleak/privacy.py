"""Differential-privacy accounting: (epsilon, delta) for Gaussian and Laplace mechanisms, subsampled
and composed, with real accountants, and calibration of the noise multiplier for a target epsilon.

Accountants (the `ACCOUNTANTS` registry; every epsilon names the one that produced it):

- `rdp`: Renyi DP (Mironov 2017; Poisson-subsampled Gaussian of Mironov, Talwar & Zhang 2019) via
  `dp_accounting.rdp.RdpAccountant`, over Opacus's default orders so the two libraries agree.
- `pld`: privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022) via
  `dp_accounting.pld.PLDAccountant`; near-tight.
- `prv`: privacy random variables (Gopi, Lee & Wutschitz 2021) via `opacus.accountants.PRVAccountant`;
  Gaussian mechanisms only.
- `analytic`: the analytic Gaussian mechanism (Balle & Wang 2018), exact for a single release
  (sample rate 1, one step), via `dp_accounting.get_epsilon_gaussian`.
- `classic`: sigma >= Delta * sqrt(2 ln(1.25/delta)) / epsilon (Dwork & Roth 2014, Thm A.1), single
  release, valid only for epsilon < 1; outside that range it refuses instead of returning a number.

A mechanism is given by its noise multiplier (noise standard deviation, or Laplace scale, divided by
the sensitivity), its sampling rate and its number of compositions. Noise without a sensitivity bound
(no clipping) is not a DP mechanism: it has no finite epsilon, which `PrivacyReport` states with
`epsilon=None`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import dp_accounting
from dp_accounting import pld, rdp

from .errors import GradleakError

log = logging.getLogger(__name__)

# Opacus's default RDP orders (opacus.accountants.RDPAccountant.DEFAULT_ALPHAS)
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
MAX_MULTIPLIER = 1e4


@dataclass(frozen=True)
class Mechanism:
    """A noise mechanism applied `steps` times, each time to a Poisson sample at rate `sample_rate`.

    `noise_multiplier` is std/sensitivity for `kind="gaussian"` (L2 sensitivity) and scale/sensitivity
    for `kind="laplace"` (L1 sensitivity)."""

    kind: str
    noise_multiplier: float
    sample_rate: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("gaussian", "laplace"):
            raise GradleakError(f"unknown mechanism {self.kind!r}: use gaussian or laplace")
        check_multiplier(self.noise_multiplier)
        check_sample_rate(self.sample_rate)
        check_steps(self.steps)

    def event(self) -> dp_accounting.DpEvent:
        base: dp_accounting.DpEvent
        if self.kind == "gaussian":
            base = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        else:
            base = dp_accounting.LaplaceDpEvent(self.noise_multiplier)
        if self.sample_rate < 1.0:
            base = dp_accounting.PoissonSampledDpEvent(self.sample_rate, base)
        return dp_accounting.SelfComposedDpEvent(base, self.steps) if self.steps > 1 else base


@dataclass(frozen=True)
class PrivacyReport:
    """What a defence buys: epsilon at delta under an accountant, or `epsilon=None` with the reason
    there is no finite bound."""

    epsilon: float | None
    delta: float
    accountant: str
    mechanisms: tuple[Mechanism, ...] = ()
    reason: str = ""

    def to_json(self) -> dict[str, object]:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "accountant": self.accountant,
            "mechanisms": [asdict(m) for m in self.mechanisms],
            "reason": self.reason,
        }

    def describe(self) -> str:
        if self.epsilon is None:
            return f"epsilon = inf (no finite bound: {self.reason})"
        return f"epsilon = {self.epsilon:.4g} at delta = {self.delta:g} ({self.accountant} accountant)"


# ------------------------------------------------------------------ checks


def check_multiplier(z: float) -> None:
    if not (z >= 0 and math.isfinite(z)):
        raise GradleakError(f"noise multiplier must be a finite number >= 0, got {z}")


def check_sample_rate(q: float) -> None:
    if not (0 < q <= 1):
        raise GradleakError(f"sample rate must be in (0, 1], got {q}")


def check_steps(t: int) -> None:
    if t < 1:
        raise GradleakError(f"steps must be >= 1, got {t}")


def check_delta(delta: float) -> None:
    if not (0 < delta < 1):
        raise GradleakError(f"delta must be in (0, 1), got {delta}")


# ------------------------------------------------------------------ accountants


def _dp_accounting(make: Callable[[], dp_accounting.PrivacyAccountant]) -> Callable[..., float]:
    def epsilon(mechs: tuple[Mechanism, ...], delta: float) -> float:
        acc = make()
        for m in mechs:
            acc.compose(m.event())
        return float(acc.get_epsilon(delta))

    return epsilon


def _prv(mechs: tuple[Mechanism, ...], delta: float) -> float:
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    for m in mechs:
        if m.kind != "gaussian":
            raise GradleakError("the prv accountant covers Gaussian mechanisms only; use pld or rdp")
        acc.history.append((m.noise_multiplier, m.sample_rate, m.steps))
    return float(acc.get_epsilon(delta))


def _single_gaussian(mechs: tuple[Mechanism, ...], name: str) -> float:
    if len(mechs) != 1 or mechs[0].kind != "gaussian" or mechs[0].sample_rate != 1 or mechs[0].steps != 1:
        raise GradleakError(
            f"the {name} accountant covers a single Gaussian release (sample rate 1, one step); "
            "use rdp, pld or prv for subsampled or composed mechanisms"
        )
    return mechs[0].noise_multiplier


def _analytic(mechs: tuple[Mechanism, ...], delta: float) -> float:
    z = _single_gaussian(mechs, "analytic")
    return float(dp_accounting.get_epsilon_gaussian(z, delta))


def _classic(mechs: tuple[Mechanism, ...], delta: float) -> float:
    z = _single_gaussian(mechs, "classic")
    eps = math.sqrt(2 * math.log(1.25 / delta)) / z if z > 0 else math.inf
    if not eps < 1:
        raise GradleakError(
            f"the classic Gaussian bound holds only for epsilon < 1 (here it gives {eps:.3g}); "
            "use --accountant analytic, rdp or pld"
        )
    return eps


@dataclass(frozen=True)
class Accountant:
    name: str
    epsilon: Callable[[tuple[Mechanism, ...], float], float]
    description: str
    citation: str = field(default="")


ACCOUNTANTS: dict[str, Accountant] = {
    a.name: a
    for a in (
        Accountant(
            "rdp",
            _dp_accounting(lambda: rdp.RdpAccountant(list(RDP_ORDERS))),
            "Renyi DP, dp_accounting.rdp",
            "Mironov 2017; Mironov, Talwar & Zhang 2019",
        ),
        Accountant(
            "pld",
            _dp_accounting(lambda: pld.PLDAccountant(value_discretization_interval=1e-4)),
            "privacy loss distributions, dp_accounting.pld",
            "Koskela et al. 2020; Doroshenko et al. 2022",
        ),
        Accountant("prv", _prv, "privacy random variables, opacus", "Gopi, Lee & Wutschitz 2021"),
        Accountant("analytic", _analytic, "analytic Gaussian mechanism, single release", "Balle & Wang 2018"),
        Accountant("classic", _classic, "classic Gaussian bound, epsilon < 1 only", "Dwork & Roth 2014"),
    )
}


def get_accountant(name: str) -> Accountant:
    try:
        return ACCOUNTANTS[name]
    except KeyError:
        raise GradleakError(f"unknown accountant {name!r}: choose one of {', '.join(ACCOUNTANTS)}") from None


def account(mechs: tuple[Mechanism, ...] | list[Mechanism], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of the composition of `mechs` at `delta`."""
    check_delta(delta)
    acc = get_accountant(accountant)
    mechs = tuple(mechs)
    if not mechs:
        return 0.0
    if any(m.noise_multiplier == 0 for m in mechs):
        return math.inf
    return acc.epsilon(mechs, delta)


def epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    kind: str = "gaussian",
) -> float:
    """Epsilon of `steps` Poisson-subsampled (rate `sample_rate`) Gaussian or Laplace mechanisms."""
    return account((Mechanism(kind, noise_multiplier, sample_rate, steps),), delta, accountant)


def without_replacement_epsilon(
    noise_multiplier: float, sample_size: int, population: int, steps: int, delta: float
) -> float:
    """Epsilon of `steps` DP-SGD releases, each on a fixed-size batch of `sample_size` distinct examples
    drawn uniformly without replacement from `population`, under replace-one adjacency (the population
    size is public): RDP of the subsampled Gaussian without replacement (Wang, Balle & Kasiviswanathan
    2019, Thm 27) via dp_accounting, the only one of its accountants that covers this sampling.
    Replacing one example moves the sum of clipped per-example gradients by up to 2C, so the Gaussian's
    multiplier relative to that sensitivity is `noise_multiplier / 2`. For comparison with the Poisson
    accounting gradleak's training uses (`epsilon`, add/remove-one adjacency)."""
    check_delta(delta)
    check_multiplier(noise_multiplier)
    check_steps(steps)
    if not 1 <= sample_size <= population:
        raise GradleakError(f"sample size must be in 1..{population}, got {sample_size}")
    if noise_multiplier == 0:
        return math.inf
    acc = rdp.RdpAccountant(
        list(RDP_ORDERS), neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    base = dp_accounting.SampledWithoutReplacementDpEvent(
        population, sample_size, dp_accounting.GaussianDpEvent(noise_multiplier / 2)
    )
    acc.compose(dp_accounting.SelfComposedDpEvent(base, steps))
    return float(acc.get_epsilon(delta))


def analytic_gaussian_epsilon(sigma: float, sensitivity: float, delta: float) -> float:
    """Epsilon of one release of a query with L2 sensitivity `sensitivity` plus N(0, sigma^2) noise
    (Balle & Wang 2018). `inf` without noise."""
    check_delta(delta)
    if sigma < 0 or sensitivity <= 0:
        raise GradleakError(f"sigma must be >= 0 and sensitivity > 0, got {sigma} and {sensitivity}")
    if sigma == 0:
        return math.inf
    return float(dp_accounting.get_epsilon_gaussian(sigma / sensitivity, delta))


def calibrate(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    kind: str = "gaussian",
    tolerance: float = 1e-3,
) -> float:
    """The smallest noise multiplier whose epsilon is at most `target_epsilon` (bisection on a log
    scale to relative `tolerance` in the multiplier; epsilon decreases with the multiplier)."""
    check_delta(delta)
    check_sample_rate(sample_rate)
    check_steps(steps)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise GradleakError(f"target epsilon must be a finite number > 0, got {target_epsilon}")

    def eps(z: float) -> float:
        try:
            return epsilon(z, sample_rate, steps, delta, accountant, kind)
        except GradleakError:
            if accountant == "classic":  # out of its validity range: more noise
                return math.inf
            raise

    hi = 1.0
    while eps(hi) > target_epsilon:
        hi *= 2
        if hi > MAX_MULTIPLIER:
            raise GradleakError(
                f"target epsilon {target_epsilon:g} at delta {delta:g} is not reachable with a noise "
                f"multiplier up to {MAX_MULTIPLIER:g} ({accountant} accountant)"
            )
    lo = hi / 2
    while eps(lo) <= target_epsilon:
        hi, lo = lo, lo / 2
        if lo < 1e-4:
            return hi
    while hi / lo > 1 + tolerance:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    log.info("calibrated noise multiplier %.6g for epsilon %.4g (%s)", hi, target_epsilon, accountant)
    return hi


def report(
    mechs: list[Mechanism] | tuple[Mechanism, ...] | None,
    delta: float,
    accountant: str = "rdp",
    reason: str = "",
) -> PrivacyReport:
    """A report for a defence chain: `mechs=None` means the chain is not a DP mechanism (`reason`)."""
    check_delta(delta)
    get_accountant(accountant)
    if mechs is None:
        return PrivacyReport(None, delta, accountant, (), reason or "no DP mechanism")
    mechs = tuple(mechs)
    if not mechs:
        return PrivacyReport(None, delta, accountant, (), reason or "no noise added")
    eps = account(mechs, delta, accountant)
    if not math.isfinite(eps):
        return PrivacyReport(None, delta, accountant, mechs, "zero noise")
    return PrivacyReport(eps, delta, accountant, mechs, reason)
