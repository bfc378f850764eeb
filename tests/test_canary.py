"""The canary audit: the statistics of the epsilon lower bound, the accountant's epsilon it stands
beside, and the audit end to end on the random GPT-2 (float64, exact attack)."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from scipy.stats import binom

from gradleak import privacy
from gradleak.canary import DEFAULT_CANARY, run_canary_audit, upper_bound
from gradleak.canary_stats import (
    clopper_pearson_upper,
    epsilon_ceiling,
    epsilon_lower_bound,
    min_trials,
    planned_ceiling,
)
from gradleak.data import load_examples
from gradleak.defenses import PrivacyTrace
from gradleak.errors import GradleakError

DELTA = 1e-5

# ------------------------------------------------------------------ statistics (pure, fast)


@pytest.mark.parametrize("n", [1, 7, 100, 5000])
def test_clopper_pearson_with_no_errors_is_the_closed_form(n):
    assert clopper_pearson_upper(0, n, 0.025) == pytest.approx(1 - 0.025 ** (1 / n), rel=1e-9)


@pytest.mark.parametrize(("k", "n", "alpha"), [(1, 10, 0.05), (5, 20, 0.025), (37, 200, 0.01)])
def test_clopper_pearson_upper_limit_is_where_the_binomial_tail_is_alpha(k, n, alpha):
    p = clopper_pearson_upper(k, n, alpha)
    assert binom.cdf(k, n, p) == pytest.approx(alpha, rel=1e-6)
    assert p > k / n


def test_clopper_pearson_edges():
    assert clopper_pearson_upper(0, 0, 0.05) == 1.0
    assert clopper_pearson_upper(4, 4, 0.05) == 1.0
    with pytest.raises(GradleakError):
        clopper_pearson_upper(5, 4, 0.05)


def test_lower_bound_by_hand():
    b = epsilon_lower_bound(
        false_positives=0, out_trials=100, false_negatives=3, in_trials=120, delta=DELTA, confidence=0.95
    )
    fpr = 1 - 0.025 ** (1 / 100)
    fnr = clopper_pearson_upper(3, 120, 0.025)
    assert b.fpr_upper == pytest.approx(fpr)
    assert b.fnr_upper == pytest.approx(fnr)
    expected = max(math.log((1 - DELTA - fnr) / fpr), math.log((1 - DELTA - fpr) / fnr))
    assert b.epsilon == pytest.approx(expected)
    assert 3.2 < b.epsilon < 3.3


def test_chance_level_and_too_few_trials_certify_nothing():
    chance = epsilon_lower_bound(
        false_positives=50, out_trials=100, false_negatives=50, in_trials=100, delta=DELTA, confidence=0.95
    )
    assert chance.epsilon == 0.0
    assert planned_ceiling(min_trials(delta=DELTA, confidence=0.95) - 1, delta=DELTA, confidence=0.95) == 0
    assert planned_ceiling(min_trials(delta=DELTA, confidence=0.95), delta=DELTA, confidence=0.95) > 0


def test_the_ceiling_grows_with_trials_and_falls_with_confidence():
    ceilings = [planned_ceiling(n, delta=DELTA, confidence=0.95) for n in (20, 100, 1000, 10_000)]
    assert ceilings == sorted(ceilings)
    # with no errors the bound is about log(n / ln(2 / alpha)) for n trials a side
    assert ceilings[-1] == pytest.approx(math.log(5000 / math.log(40)), abs=0.01)
    assert planned_ceiling(1000, delta=DELTA, confidence=0.99) < ceilings[2]


def test_the_bound_is_sound_and_tight_on_randomised_response():
    """A mechanism of known epsilon: randomised response answers truthfully with probability
    e^eps / (1 + e^eps), and the best test's error rates are 1 / (1 + e^eps) on both sides. Over many
    simulated audits the bound exceeds the true epsilon in at most 5 % of them (here far fewer: the
    alpha split is conservative), and with many trials it comes close to the true epsilon."""
    eps, n, reps = 2.0, 400, 2000
    p = 1 / (1 + math.exp(eps))
    rng = np.random.default_rng(0)
    fp, fn = rng.binomial(n, p, reps), rng.binomial(n, p, reps)
    bounds = [
        epsilon_lower_bound(
            false_positives=int(a),
            out_trials=n,
            false_negatives=int(b),
            in_trials=n,
            delta=DELTA,
            confidence=0.95,
        ).epsilon
        for a, b in zip(fp, fn, strict=True)
    ]
    assert np.mean(np.array(bounds) > eps) <= 0.05
    big = 10**7
    tight = epsilon_lower_bound(
        false_positives=round(p * big),
        out_trials=big,
        false_negatives=round(p * big),
        in_trials=big,
        delta=DELTA,
        confidence=0.95,
    )
    assert eps * 0.98 < tight.epsilon <= eps


def test_bad_confidence():
    with pytest.raises(GradleakError, match="confidence"):
        epsilon_ceiling(in_trials=10, out_trials=10, delta=DELTA, confidence=1.0)


# ------------------------------------------------------------------ the accountant's side (fast)


@pytest.mark.parametrize("accountant", ["rdp", "analytic"])
def test_replace_one_halves_the_multiplier(accountant):
    trace = PrivacyTrace(sensitivity=0.5, unit="example", mechanisms=[("gaussian", 1.0)])
    replace_one, add_remove = upper_bound(trace, delta=DELTA, accountant=accountant)
    assert replace_one.epsilon == pytest.approx(privacy.epsilon(0.5, 1.0, 1, DELTA, accountant))
    assert add_remove.epsilon == pytest.approx(privacy.epsilon(1.0, 1.0, 1, DELTA, accountant))
    assert replace_one.epsilon > add_remove.epsilon
    assert replace_one.mechanisms[0].noise_multiplier == 0.5


def test_no_upper_bound_without_a_dp_mechanism():
    unclipped = PrivacyTrace(unbounded_noise=["gaussian noise"])
    replace_one, add_remove = upper_bound(unclipped, delta=DELTA, accountant="rdp")
    assert replace_one.epsilon is None and add_remove.epsilon is None
    assert "unclipped" in replace_one.reason


def test_an_accountant_that_cannot_cope_says_so_in_one_line():
    trace = PrivacyTrace(sensitivity=1.0, unit="example", mechanisms=[("gaussian", 1e-6)])
    with pytest.raises(GradleakError, match="use --accountant rdp or analytic"):
        upper_bound(trace, delta=DELTA, accountant="pld")


def test_the_default_canary_is_a_packaged_sentence():
    assert any(e.text == DEFAULT_CANARY for e in load_examples("sst2"))


# ------------------------------------------------------------------ end to end (gpt2-tiny, float64)
# Seed 1 splits 16 trials 8/8 (ceiling 0.54 at 95 %), 14 trials 7/7 (0.37): the attack has room to
# prove something. Each trial is one FedSGD release of the 13M-parameter model in float64, about 0.7 s
# (DP-SGD about 2 s: per-example gradients and noise on every coordinate) on one idle core.

AUDIT = dict(victim="gpt2-tiny", data="sst2", batch_size=1, attack="exact", seed=1, delta=DELTA)


def _cli(args, capsys, monkeypatch):
    from gradleak.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["gradleak", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_cli_json_without_a_defence_gives_a_finite_positive_lower_bound(capsys, monkeypatch):
    code, out, err = _cli(
        ("privacy", "audit", "--trials", "14", "--seed", "1", "--json", "-"), capsys, monkeypatch
    )
    assert code == 0, err
    payload = json.loads(out)
    for key in ("epsilon_lower", "epsilon_upper", "confidence", "trials"):
        assert key in payload
    assert payload["trials"] == 14 and payload["confidence"] == 0.95
    assert payload["epsilon_upper"] is None  # no defence: the accountant has no epsilon
    assert payload["in_trials"] == payload["out_trials"] == 7
    assert payload["false_positives"] == payload["false_negatives"] == 0
    assert 0 < payload["epsilon_lower"] == pytest.approx(payload["epsilon_ceiling"])
    assert payload["consistent"] is True


@pytest.mark.slow
def test_absolute_noise_gives_a_finite_positive_lower_bound_where_the_accountant_gives_none():
    seen: list[tuple[int, int]] = []
    r = run_canary_audit(
        **AUDIT, defenses=("gaussian:sigma=1e-4",), trials=14, progress=lambda d, n: seen.append((d, n))
    )
    assert seen == [(i, 14) for i in range(1, 15)]
    assert r.epsilon_upper is None and "unclipped" in r.epsilon_upper_reason
    assert 0 < r.epsilon_lower < math.inf
    assert min(r.scores_in) >= 50 > max(r.scores_out)  # the attack tells the worlds apart


@pytest.mark.slow
@pytest.mark.parametrize(("multiplier", "trials"), [(1e-6, 16), (0.5, 11), (2.0, 11)])
def test_the_lower_bound_never_exceeds_the_accountant(multiplier, trials):
    """At a tiny multiplier the attack still wins (the lower bound is positive: the check is not
        vacuous); at 0.5-2 it does not, and the accountant's epsilon (replace-one, rdp: 4.73 at Z = 2) is
        far above anything a few trials could certify, so there the check cannot fail (and 11 trials, the
    fewest that can certify anything, suffice)."""
    r = run_canary_audit(
        **AUDIT, defenses=(f"dp-sgd:clip=1,multiplier={multiplier:g}",), trials=trials, accountant="rdp"
    )
    assert r.epsilon_upper is not None
    assert r.epsilon_lower <= r.epsilon_upper
    assert r.consistent()
    if multiplier < 1e-3:
        assert r.epsilon_lower > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--trials", "5"), "use at least"),
        (("--batch-size", "0"), "batch size"),
        (("--attack", "nope"), "unknown attack"),
        (("--defense", "nope:x=1"), "unknown defence"),
        (("--confidence", "1"), "confidence"),
        (("--knows", "batch-size,lengths"), "batch size only"),
        (("--threshold", "0"), "threshold"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args, message, capsys, monkeypatch):
    code, _, err = _cli(("privacy", "audit", *args), capsys, monkeypatch)
    assert code == 2
    assert err.startswith("error:") and message in err
    assert len(err.strip().splitlines()) == 1


def test_cli_says_so_and_exits_1_when_the_lower_bound_exceeds_the_accountant(capsys, monkeypatch):
    """The bug signal: a (made-up) result whose lower bound is above the accountant's epsilon."""
    import gradleak.canary as canary

    bad = canary.CanaryResult(
        epsilon_lower=3.0,
        epsilon_upper=1.0,
        epsilon_upper_reason="",
        epsilon_add_remove=0.5,
        epsilon_ceiling=3.0,
        confidence=0.95,
        delta=DELTA,
        accountant="rdp",
        trials=200,
        in_trials=100,
        out_trials=100,
        false_positives=0,
        false_negatives=0,
        fpr_upper=0.04,
        fnr_upper=0.04,
        refusals=0,
        threshold=50.0,
        canary=DEFAULT_CANARY,
        victim="gpt2-tiny",
        data="sst2",
        batch_size=1,
        attack="exact",
        defenses=("dp-sgd:clip=1,multiplier=5",),
        seed=0,
        dtype="float64",
        seconds=1.0,
    )
    assert not bad.consistent() and bad.to_json()["consistent"] is False
    monkeypatch.setattr(canary, "run_canary_audit", lambda **kw: bad)
    code, out, err = _cli(("privacy", "audit", "--json", "-"), capsys, monkeypatch)
    assert code == 1
    assert json.loads(out)["epsilon_lower"] == 3.0
    assert "exceeds the rdp accountant's epsilon 1" in err and "bug" in err
