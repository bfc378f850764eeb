"""What a DP guarantee promises about reconstruction: the largest success probability any
reconstruction attack can have against a mechanism, given how often it could succeed without the
mechanism's output at all (the prior, kappa).

The bound (reconstruction robustness, ReRo; Balle, Cherubin & Hayes 2022) follows from the
hypothesis-testing view of DP. If a mechanism M has trade-off function f (f(alpha) is the smallest
type-II error of any test between M(D) and M(D') at type-I error alpha; Dong, Roth & Su 2022), then
for a target z drawn from a prior pi, with every other record known,

    P[attack(M(D_- + z)) = z] <= 1 - f(kappa),   kappa = max_z' P_{z ~ pi}[z = z']  (the best blind guess)

(Hayes, Mahloujifar & Balle, NeurIPS 2023; Kaissis, Hayes, Ziller & Rueckert 2023): the attack's
success event is a test, and comparing M(D_- + z) with M(D_-), which does not depend on z, bounds its
power at size kappa (1 - f is concave, so averaging over z keeps the bound). The
adjacency is add/remove-one, the same as the accountants' (`gradleak.privacy`).

How f is obtained (`ReconstructionBound.method` says which):

- one Gaussian release with noise multiplier z (mu-GDP with mu = 1/z): exactly
  1 - f(kappa) = Phi(Phi^-1(kappa) + 1/z) (Dong, Roth & Su 2022; the closed form of Kaissis et al.
  2023 for the Gaussian mechanism);
- one Laplace release with scale b (pure 1/b-DP): exactly 1 - f(kappa) with the Laplace trade-off
  function (Dong, Roth & Su 2022, Prop. A.6);
- anything subsampled or composed: from the privacy profile delta(eps) that `dp_accounting`'s
  privacy loss distributions compute (Koskela et al. 2020; Doroshenko et al. 2022). Every
  (eps, delta(eps)) pair gives two lines that lie above 1 - f, so
  1 - f(kappa) <= min over eps >= 0 of min(e^eps kappa + delta(eps), 1 - e^-eps (1 - delta(eps) - kappa)),
  evaluated on a grid of eps (any eps gives a valid bound; the grid only makes it slightly loose).

Pure maths: no I/O, no model code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from gradleak.errors import GradleakError
from gradleak.privacy import Mechanism

CITATION = "Hayes, Mahloujifar & Balle, NeurIPS 2023; Kaissis et al. 2023: success <= 1 - f(kappa)"
PROFILE_POINTS = 4000  # grid of eps on which the privacy profile is evaluated
PLD_DISCRETIZATION = 1e-3


@dataclass(frozen=True)
class ReconstructionBound:
    """The largest reconstruction success a mechanism allows at prior `prior` (both 0-1)."""

    bound: float
    prior: float
    method: str  # "gaussian trade-off (exact)", "laplace trade-off (exact)", "pld privacy profile", ...

    def to_json(self) -> dict[str, object]:
        return {"bound": self.bound, "prior": self.prior, "method": self.method, "citation": CITATION}


def check_prior(kappa: float) -> None:
    if not (0 < kappa < 1 and math.isfinite(kappa)):
        raise GradleakError(f"the prior success must be a probability in (0, 1), got {kappa}")


def gaussian_bound(noise_multiplier: float, kappa: float) -> float:
    """1 - f(kappa) for one Gaussian release at multiplier z: Phi(Phi^-1(kappa) + 1/z)."""
    check_prior(kappa)
    if noise_multiplier <= 0:
        return 1.0
    return float(norm.cdf(norm.ppf(kappa) + 1.0 / noise_multiplier))


def laplace_bound(scale: float, kappa: float) -> float:
    """1 - f(kappa) for one Laplace release at scale b (sensitivity 1): eps = 1/b and
    f(a) = 1 - e^eps a for a < e^-eps / 2; e^-eps / (4 a) up to 1/2; e^-eps (1 - a) above."""
    check_prior(kappa)
    if scale <= 0:
        return 1.0
    eps = 1.0 / scale
    if kappa < math.exp(-eps) / 2:
        f = 1 - math.exp(eps) * kappa
    elif kappa <= 0.5:
        f = math.exp(-eps) / (4 * kappa)
    else:
        f = math.exp(-eps) * (1 - kappa)
    return min(1.0, 1.0 - f)


def profile_bound(epsilons: Sequence[float], deltas: Sequence[float], kappa: float) -> float:
    """min over the profile's points of the two lines above 1 - f(kappa), capped at 1."""
    check_prior(kappa)
    eps = np.asarray(epsilons, dtype=float)
    delta = np.clip(np.asarray(deltas, dtype=float), 0.0, 1.0)
    if eps.shape != delta.shape or eps.size == 0 or (eps < 0).any():
        raise GradleakError("the privacy profile needs matching, non-empty eps >= 0 and delta lists")
    lines = np.minimum(delta + np.exp(eps) * kappa, 1 - np.exp(-eps) * (1 - delta - kappa))
    return float(min(1.0, max(kappa, lines.min())))


def _pld(mechs: Sequence[Mechanism]):
    from dp_accounting.pld import privacy_loss_distribution as pl

    out = None
    for m in mechs:
        if m.kind == "gaussian":
            one = pl.from_gaussian_mechanism(
                m.noise_multiplier,
                sampling_prob=m.sample_rate,
                value_discretization_interval=PLD_DISCRETIZATION,
            )
        else:
            one = pl.from_laplace_mechanism(
                m.noise_multiplier,
                sampling_prob=m.sample_rate,
                value_discretization_interval=PLD_DISCRETIZATION,
            )
        if m.steps > 1:
            one = one.self_compose(m.steps)
        out = one if out is None else out.compose(one)
    return out


def reconstruction_bound(mechs: Sequence[Mechanism], kappa: float) -> ReconstructionBound:
    """The bound for the composition of `mechs` (each noise multiplier relative to its sensitivity;
    add/remove-one adjacency) at prior `kappa`."""
    check_prior(kappa)
    mechs = tuple(mechs)
    if not mechs:
        raise GradleakError("a reconstruction bound needs a DP mechanism; the chain has none")
    if any(m.noise_multiplier == 0 for m in mechs):
        return ReconstructionBound(1.0, kappa, "no noise: no bound")
    if len(mechs) == 1 and mechs[0].sample_rate == 1 and mechs[0].steps == 1:
        m = mechs[0]
        if m.kind == "gaussian":
            return ReconstructionBound(
                gaussian_bound(m.noise_multiplier, kappa), kappa, "gaussian trade-off (exact)"
            )
        return ReconstructionBound(
            laplace_bound(m.noise_multiplier, kappa), kappa, "laplace trade-off (exact)"
        )
    pld = _pld(mechs)
    top = pld.get_epsilon_for_delta(1e-12)
    if not math.isfinite(top):
        return ReconstructionBound(1.0, kappa, "pld privacy profile (unbounded loss)")
    eps = np.linspace(0.0, max(top, 1e-3), PROFILE_POINTS)
    deltas = pld.get_delta_for_epsilon(eps)
    return ReconstructionBound(profile_bound(eps, deltas, kappa), kappa, "pld privacy profile")


def uniform_prior(candidates: int) -> float:
    """The chance of guessing one sentence out of `candidates` equally likely ones."""
    if candidates < 2:
        raise GradleakError(f"a candidate pool needs at least 2 sentences, got {candidates}")
    return 1.0 / candidates
