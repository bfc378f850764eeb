"""The theory lab: one softmax attention layer, DLG on its gradient, noise, convergence, the CLI.

Documented regimes (docs/theory.md): with Y known and all three weights' gradients shared, n = 4 tokens
of width d = 8 are recovered to relative error < 1e-3 from random starts (L-BFGS, 8 restarts); with
n > 2d the shared gradient has fewer independent entries (2 d^2) than X has unknowns (n d), and the
attack matches the gradient exactly with an X that is far from the truth.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from gradleak.cli import app
from gradleak.errors import GradleakError
from gradleak.theory.attention import WEIGHTS, flat, make_data, make_layer, negate, parse_share, permute
from gradleak.theory.convergence import analyse
from gradleak.theory.identifiability import local_identifiability
from gradleak.theory.recover import RecoverySpec, aligned_error, recover
from gradleak.theory.share import gaussian_epsilon, share_gradient


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_recovers_x_below_1e_3_with_known_target():
    result = recover(RecoverySpec(n=4, d=8, seed=6, known_target=True))
    assert result.relative_error < 1e-3
    assert result.success and result.iterations is not None and result.iterations <= result.evaluations
    assert result.objective < 1e-20
    assert result.identifiability is not None and result.identifiability.full_rank
    # the run is measured against the gradient-descent guarantee with the L estimated along it
    c = result.convergence
    assert 0 < c.smoothness < math.inf
    assert c.within_gradient_bound and c.bound_violations == 0
    assert c.min_grad_sq <= c.gd_gradient_bound


def test_fails_when_tokens_exceed_twice_the_width():
    """n = 24 > 2d = 8: the gradient is matched to machine precision by an X far from the truth."""
    result = recover(RecoverySpec(n=24, d=4, seed=0, known_target=True))
    assert result.relative_error > 0.1
    assert not result.success
    li = result.identifiability
    assert li is not None and li.rank == 2 * 4 * 4 < li.unknowns


def test_error_grows_with_sigma():
    errors = []
    for sigma in (0.0, 1e-4, 1e-2):
        spec = RecoverySpec(
            n=4, d=8, seed=0, known_target=True, sigma=sigma, clip=1.0, init_distance=0.1, restarts=1
        )
        errors.append(recover(spec))
    assert errors[0].relative_error < errors[1].relative_error < errors[2].relative_error
    # and it follows the linearised prediction sigma ||J_X^+||_F / ||X||_F to within a small factor
    for r in errors[1:]:
        predicted = r.identifiability.predicted_error(r.spec.sigma)
        assert 0.2 < r.relative_error / predicted < 5.0
    # more noise, smaller epsilon (analytic Gaussian mechanism on the gradient clipped to C = 1)
    assert math.isinf(errors[0].epsilon)
    assert errors[1].epsilon > errors[2].epsilon > 0


def test_epsilon_is_the_analytic_gaussian_mechanism_of_the_clipped_gradient():
    from gradleak.privacy import analytic_gaussian_epsilon

    assert gaussian_epsilon(0.5, 2.0, 1e-5) == pytest.approx(analytic_gaussian_epsilon(0.5, 2.0, 1e-5))
    assert math.isinf(gaussian_epsilon(1.0, None, 1e-5))  # no clip: no sensitivity bound
    assert math.isinf(gaussian_epsilon(0.0, 1.0, 1e-5))  # no noise
    layer = make_layer(4, seed=1)
    X, Y = make_data(3, 4, seed=1)
    shared = share_gradient(layer, X, Y, WEIGHTS, sigma=0.1, clip=0.5, seed=1)
    assert shared.epsilon == pytest.approx(analytic_gaussian_epsilon(0.1, 0.5, 1e-5))
    assert set(shared.to_update().tensors) == set(WEIGHTS)


def test_gradient_is_invariant_under_joint_row_permutation_and_sign_flip():
    layer = make_layer(6, weight_norm=2.0, seed=3)
    X, Y = make_data(5, 6, seed=3)
    g = flat(layer.gradients(X, Y))
    order = torch.tensor([3, 0, 4, 1, 2])
    assert torch.allclose(flat(layer.gradients(*permute(X, Y, order))), g, rtol=1e-12, atol=1e-12)
    assert torch.allclose(flat(layer.gradients(*negate(X, Y))), g, rtol=1e-12, atol=1e-12)
    # permuting X alone (Y known and fixed) is not a symmetry: the known rows of Y pin the order
    assert not torch.allclose(flat(layer.gradients(X[order], Y)), g, atol=1e-6)
    # the error is measured modulo exactly those symmetries
    Xp, Yp = negate(*permute(X, Y, order))
    assert aligned_error(Xp, X, Yp, Y) == (pytest.approx(0.0, abs=1e-12), pytest.approx(0.0, abs=1e-12))
    assert aligned_error(X[order], X)[0] > 0.1


def test_local_identifiability_counts():
    layer = make_layer(4, seed=0)
    X, Y = make_data(3, 4, seed=0)
    known = local_identifiability(layer, X, Y, WEIGHTS, known_target=True)
    assert known.full_rank and known.rank == 12
    # Y unknown: one direction of (X, Y) leaves the gradient unchanged to first order
    unknown = local_identifiability(layer, X, Y, WEIGHTS, known_target=False)
    assert unknown.rank == unknown.unknowns - 1 and math.isinf(unknown.noise_gain)
    # only W_Q and W_K: likewise one direction of X
    qk = local_identifiability(layer, X, Y, parse_share("qk"), known_target=True)
    assert qk.rank == qk.unknowns - 1
    # beyond n = 2d the rank is capped at 2 d^2
    Xb, Yb = make_data(9, 4, seed=0)
    assert local_identifiability(layer, Xb, Yb, WEIGHTS, known_target=True).rank == 32


def test_convergence_report_on_a_short_trace():
    result = recover(
        RecoverySpec(n=2, d=4, seed=0, known_target=True, optimizer="gd", iterations=50, restarts=1)
    )
    report = analyse(result.trace)
    assert report.evaluations == len(result.trace) == 50
    assert report.initial_objective == result.trace.objective[0]
    assert report.final_objective <= report.initial_objective


def test_bad_specs_raise_gradleak_errors():
    for bad in (
        RecoverySpec(n=0),
        RecoverySpec(d=0),
        RecoverySpec(sigma=-1.0),
        RecoverySpec(share="qx"),
        RecoverySpec(optimizer="sgd"),
        RecoverySpec(clip=0.0),
    ):
        with pytest.raises(GradleakError):
            bad.validate()


def test_cli_recover_prints_json():
    runner = CliRunner()
    args = ["theory", "recover", "--n", "2", "--d", "4", "--seed", "0", "--known-target", "--json", "-"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert {"relative_error", "iterations", "seconds"} <= set(record)
    assert record["relative_error"] < 1e-3
    assert record["spec"]["n"] == 2 and record["spec"]["d"] == 4 and record["spec"]["known_target"]


def test_sweep_writes_tables_and_plots(tmp_path):
    from gradleak.theory.sweep import SweepConfig, run_sweep

    cfg = SweepConfig(
        out=tmp_path, ns=(1, 2), ds=(2,), seeds=1, sigmas=(0.0, 1e-3), noise_seeds=1,
        parts=("phase", "noise", "convergence"), convergence_iterations=20,
        base=RecoverySpec(n=2, d=2, known_target=True, restarts=2, iterations=60),
    )  # fmt: skip
    out = run_sweep(cfg)
    names = {p.name for p in out.files}
    assert {"phase_diagram.png", "noise.png", "convergence.png", "table.md", "results.json"} <= names
    for p in out.files:
        assert p.stat().st_size > 0
    assert "Phase diagram" in (tmp_path / "table.md").read_text(encoding="utf-8")


BAD = [
    (["theory", "recover", "--n", "0"], "n (tokens) must be at least 1"),
    (["theory", "recover", "--d", "0"], "d (width) must be at least 1"),
    (["theory", "recover", "--sigma", "-0.5"], "sigma must be"),
    (["theory", "sweep", "--out", "x", "--ns", "0,4"], "n (tokens) must be at least 1"),
]


@pytest.mark.parametrize(("args", "expected"), BAD, ids=["n0", "d0", "sigma<0", "sweep-n0"])
def test_bad_input_exits_2_with_one_line(tmp_path, args, expected):
    proc = subprocess.run(
        [sys.executable, "-m", "gradleak", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert expected in lines[0]
    assert proc.stdout == ""
