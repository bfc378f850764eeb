"""The reconstruction bound (gradleak.rero) against closed forms: the Gaussian and Laplace trade-off
functions, the privacy-profile route through dp_accounting's PLD, composition, subsampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from gradleak import rero
from gradleak.errors import GradleakError
from gradleak.privacy import Mechanism, epsilon


def _profile(mech: Mechanism, kappa: float) -> float:
    """The PLD privacy-profile route, forced even where a closed form exists."""
    pld = rero._pld([mech])
    eps = np.linspace(0, pld.get_epsilon_for_delta(1e-12), 4000)
    return rero.profile_bound(eps, pld.get_delta_for_epsilon(eps), kappa)


def test_gaussian_closed_form_values():
    # Phi(Phi^-1(kappa) + 1/z): at kappa = 1/2 and z = 1 it is Phi(1)
    assert rero.gaussian_bound(1.0, 0.5) == pytest.approx(norm.cdf(1.0), abs=1e-12)
    assert rero.gaussian_bound(1.0, 0.5) == pytest.approx(0.841345, abs=1e-6)
    assert rero.gaussian_bound(2.0, 1e-3) == pytest.approx(0.0047956, abs=1e-6)
    assert rero.gaussian_bound(0.0, 1e-3) == 1.0  # no noise: no bound
    assert rero.gaussian_bound(1e6, 0.01) == pytest.approx(0.01, rel=1e-3)  # much noise: the prior


@pytest.mark.parametrize("z", [0.7, 2.0])
@pytest.mark.parametrize("kappa", [1e-3, 0.1, 0.6])
def test_the_pld_profile_matches_the_gaussian_trade_off(z, kappa):
    assert _profile(Mechanism("gaussian", z), kappa) == pytest.approx(rero.gaussian_bound(z, kappa), abs=1e-5)


@pytest.mark.parametrize("b", [0.5, 2.0])
@pytest.mark.parametrize("kappa", [1e-3, 0.1, 0.6])
def test_the_pld_profile_matches_the_laplace_trade_off(b, kappa):
    assert _profile(Mechanism("laplace", b), kappa) == pytest.approx(rero.laplace_bound(b, kappa), abs=1e-5)
    # below e^-eps / 2 the Laplace bound is pure DP's e^eps kappa
    assert rero.laplace_bound(b, 1e-3) == pytest.approx(math.exp(1 / b) * 1e-3, rel=1e-12)


def test_composition_of_gaussians_is_one_gaussian():
    # 4 releases at z = 1 are one release at z = 1/2 (mu adds in quadrature)
    four = rero.reconstruction_bound([Mechanism("gaussian", 1.0, 1.0, 4)], 1e-3)
    assert four.method == "pld privacy profile"
    assert four.bound == pytest.approx(rero.gaussian_bound(0.5, 1e-3), abs=1e-5)
    two = rero.reconstruction_bound([Mechanism("gaussian", 1.0), Mechanism("gaussian", 1.0)], 0.01)
    assert two.bound == pytest.approx(rero.gaussian_bound(1 / math.sqrt(2), 0.01), abs=1e-5)


def test_subsampling_only_tightens_the_bound_and_it_stays_within_prior_and_one():
    full = rero.reconstruction_bound([Mechanism("gaussian", 1.0, 1.0, 10)], 1e-3).bound
    sampled = rero.reconstruction_bound([Mechanism("gaussian", 1.0, 0.01, 10)], 1e-3).bound
    assert 1e-3 <= sampled < full <= 1.0
    assert sampled < 2e-3  # q = 0.01, ten steps: close to the prior


def test_the_bound_is_no_looser_than_the_epsilon_delta_one():
    kappa, delta = 1e-3, 1e-5
    eps = epsilon(1.0, 1.0, 1, delta, "analytic")
    single = rero.reconstruction_bound([Mechanism("gaussian", 1.0)], kappa)
    assert single.method == "gaussian trade-off (exact)"
    assert single.bound <= math.exp(eps) * kappa + delta


def test_bad_priors_and_empty_mechanisms_are_refused():
    for bad in (0.0, 1.0, -0.1, math.nan):
        with pytest.raises(GradleakError, match="prior success"):
            rero.gaussian_bound(1.0, bad)
    with pytest.raises(GradleakError, match="needs a DP mechanism"):
        rero.reconstruction_bound([], 0.1)
    assert rero.reconstruction_bound([Mechanism("gaussian", 0.0)], 0.1).bound == 1.0
    assert rero.uniform_prior(1000) == 1e-3
    with pytest.raises(GradleakError, match="at least 2"):
        rero.uniform_prior(1)
