"""Accountants against Opacus and dp-accounting, calibration round trips, and the CLI."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import dp_accounting
import pytest
from dp_accounting import pld
from opacus.accountants import PRVAccountant, RDPAccountant

from gradleak import privacy
from gradleak.errors import GradleakError

GRID = list(itertools.product((1.0, 2.0, 4.0), (0.001, 0.01), (1, 100, 1000), (1e-5, 1e-6)))


def gradleak(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradleak", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(("z", "q", "t", "delta"), GRID)
def test_rdp_agrees_with_opacus(z, q, t, delta):
    acc = RDPAccountant()
    acc.history = [(z, q, t)]
    ours = privacy.epsilon(z, q, t, delta, "rdp")
    assert ours == pytest.approx(acc.get_epsilon(delta), rel=1e-6)


@pytest.mark.parametrize(("z", "q", "t", "delta"), GRID[::3])
def test_pld_agrees_with_dp_accounting(z, q, t, delta):
    acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    acc.compose(event if t == 1 else dp_accounting.SelfComposedDpEvent(event, t))
    assert privacy.epsilon(z, q, t, delta, "pld") == pytest.approx(acc.get_epsilon(delta), rel=1e-6)


@pytest.mark.parametrize(("z", "q", "t", "delta"), [(1.0, 0.01, 1000, 1e-5), (2.0, 0.001, 100, 1e-6)])
def test_prv_agrees_with_opacus_and_with_pld(z, q, t, delta):
    acc = PRVAccountant()
    acc.history = [(z, q, t)]
    ours = privacy.epsilon(z, q, t, delta, "prv")
    assert ours == pytest.approx(acc.get_epsilon(delta), rel=1e-6)
    # Opacus bounds the PRV error by eps_error = 0.01 in absolute terms
    assert ours == pytest.approx(privacy.epsilon(z, q, t, delta, "pld"), abs=0.02)


def test_the_reference_point():
    assert privacy.epsilon(1.0, 0.01, 1000, 1e-5, "rdp") == pytest.approx(2.10, abs=0.01)
    assert privacy.epsilon(1.0, 0.01, 1000, 1e-5, "pld") == pytest.approx(1.83, abs=0.01)
    assert privacy.epsilon(1.0, 0.01, 1000, 1e-5, "prv") == pytest.approx(1.83, abs=0.02)


def test_single_release_accountants_order():
    z, delta = 5.0, 1e-5
    analytic = privacy.epsilon(z, 1.0, 1, delta, "analytic")
    classic = privacy.epsilon(z, 1.0, 1, delta, "classic")
    # the classic bound is valid but loose; analytic is exact for one release
    assert analytic < classic < 1
    assert classic == pytest.approx(math.sqrt(2 * math.log(1.25 / delta)) / z)
    assert privacy.epsilon(z, 1.0, 1, delta, "pld") == pytest.approx(analytic, rel=0.01)
    assert privacy.analytic_gaussian_epsilon(5.0, 1.0, delta) == pytest.approx(analytic)
    assert privacy.analytic_gaussian_epsilon(0.0, 1.0, delta) == math.inf


def test_classic_refuses_outside_its_range():
    with pytest.raises(GradleakError, match="epsilon < 1"):
        privacy.epsilon(1.0, 1.0, 1, 1e-5, "classic")
    with pytest.raises(GradleakError, match="single Gaussian release"):
        privacy.epsilon(10.0, 0.01, 10, 1e-5, "analytic")


@pytest.mark.parametrize("accountant", ["rdp", "pld", "prv"])
@pytest.mark.parametrize(("target", "q", "t"), [(2.0, 0.01, 1000), (8.0, 0.1, 100), (1.0, 1.0, 1)])
def test_calibration_round_trips(accountant, target, q, t):
    z = privacy.calibrate(target, 1e-5, q, t, accountant)
    eps = privacy.epsilon(z, q, t, 1e-5, accountant)
    assert eps <= target
    assert eps == pytest.approx(target, rel=0.01)  # the smallest multiplier that meets the target


def test_laplace_mechanism():
    # one Laplace release with scale = sensitivity / epsilon is epsilon-DP
    assert privacy.epsilon(1.0, 1.0, 1, 1e-5, "pld", kind="laplace") == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(GradleakError, match="Gaussian mechanisms only"):
        privacy.epsilon(1.0, 1.0, 1, 1e-5, "prv", kind="laplace")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_multiplier": -1.0}, "noise multiplier"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"sample_rate": 0.0}, "sample rate"),
        ({"sample_rate": 1.5}, "sample rate"),
        ({"steps": 0}, "steps"),
        ({"accountant": "moments"}, "unknown accountant"),
    ],
)
def test_bad_parameters(kwargs, message):
    args = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "delta": 1e-5} | kwargs
    with pytest.raises(GradleakError, match=message):
        privacy.epsilon(**args)


def test_unreachable_target():
    with pytest.raises(GradleakError, match="not reachable"):
        privacy.calibrate(1e-9, 1e-5, 1.0, 10_000)


def test_cli_epsilon_and_calibrate():
    proc = gradleak(
        "privacy", "epsilon", "--noise-multiplier", "1", "--sample-rate", "0.01", "--steps", "1000",
        "--delta", "1e-5", "--accountant", "pld", "--json", "-",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["accountant"] == "pld"
    assert out["epsilon"] == pytest.approx(1.83, abs=0.01)
    proc = gradleak(
        "privacy", "calibrate", "--epsilon", "2.1", "--sample-rate", "0.01", "--steps", "1000",
        "--delta", "1e-5", "--json", "-",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["noise_multiplier"] == pytest.approx(1.0, rel=0.01)
    assert out["accountant"] == "rdp"


@pytest.mark.parametrize(
    "args",
    [
        ("epsilon", "--noise-multiplier", "-1"),
        ("epsilon", "--noise-multiplier", "1", "--delta", "1.5"),
        ("epsilon", "--noise-multiplier", "1", "--sample-rate", "2"),
        ("epsilon", "--noise-multiplier", "1", "--accountant", "nope"),
        ("calibrate", "--epsilon", "1e-9", "--steps", "10000"),
    ],
)
def test_cli_bad_input_is_one_line(args):
    proc = gradleak("privacy", *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
