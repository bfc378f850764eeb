"""What a membership test's error rates prove about epsilon: the statistics of the canary audit.

Pure maths: no I/O, no model code. `gradleak.canary` runs the trials and calls this.

The bound. For any (epsilon, delta)-DP mechanism M and neighbouring data sets D, D', every test that
guesses from M's output whether it ran on D ("in") or D' ("out") has false-positive rate FPR and
false-negative rate FNR with

    FPR + e^eps FNR >= 1 - delta   and   FNR + e^eps FPR >= 1 - delta

(Kairouz, Oh & Viswanath 2015, "The composition theorem for differential privacy"), so

    eps >= log((1 - delta - FNR) / FPR)   and   eps >= log((1 - delta - FPR) / FNR).

Over finitely many trials only estimates of the rates are known. As Jagielski, Ullman & Oprea 2020
("Auditing differentially private machine learning", NeurIPS) and Nasr, Song, Thakurta, Papernot &
Carlini 2021 ("Adversary instantiation", IEEE S&P) do, each rate is replaced by its one-sided
Clopper-Pearson upper limit (`scipy.stats.beta`); both expressions decrease in both rates, so the
bound holds whenever both limits hold. The error budget alpha = 1 - confidence is split between the
two rates (alpha / 2 each, Bonferroni), so the whole bound, the larger of the two expressions, holds
at the stated confidence. The trials must be independent and the decision rule (its threshold
included) fixed before the trials it is evaluated on.

Why many independent trials and not one run. Steinke, Nasr & Jagielski 2023 ("Privacy auditing with
one (1) training run", NeurIPS) audit with m canaries, each included at random, in a single run, and
bound epsilon from the number of correct guesses. It pays off where one run is expensive (training a
model). Here one trial is one release of one client update, about a second on CPU, so independent
trials are cheap; with independent trials the error counts are exactly binomial, so Clopper-Pearson
applies as it stands; and each trial releases exactly the mechanism used in practice (one canary
against one other sentence in a batch of fixed size), where one run with many canaries would put
several into each client batch and audit a different mechanism. The one-run method is the natural
extension for audits of multi-round training.

Choosing the threshold. The rule's threshold must be fixed before the trials it is judged on. To
tune it, run calibration trials under another seed (their trials are other draws), read the scores
they report, and pass the threshold chosen there to the evaluation run.

The ceiling. With n_in trials that hold the canary and n_out that do not, even a perfect test (no
errors) certifies only `epsilon_ceiling(n_in, n_out, ...)`: roughly log(n / ln(2 / alpha)) for
n = n_in = n_out. A lower bound at the ceiling says "the attack wins every trial", not "epsilon is
this".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy.stats import beta

from gradleak.errors import GradleakError


def check_confidence(confidence: float) -> None:
    if not (0 < confidence < 1):
        raise GradleakError(f"confidence must be in (0, 1), got {confidence}")


def clopper_pearson_upper(errors: int, trials: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper limit at confidence 1 - alpha on a binomial rate, from
    `errors` in `trials` (1.0 when there are no trials or every trial is an error)."""
    if not (0 < alpha < 1):
        raise GradleakError(f"alpha must be in (0, 1), got {alpha}")
    if trials < 0 or not (0 <= errors <= trials):
        raise GradleakError(f"errors must be in 0..trials, got {errors} of {trials}")
    if errors >= trials:
        return 1.0
    return float(beta.ppf(1 - alpha, errors + 1, trials - errors))


@dataclass(frozen=True)
class EpsilonBound:
    """A lower bound on epsilon from a test's errors, and the rate limits it used."""

    epsilon: float  # >= 0; 0 when the errors prove nothing
    fpr_upper: float  # one-sided Clopper-Pearson upper limit on the false-positive rate
    fnr_upper: float  # ... on the false-negative rate
    confidence: float
    delta: float


def _log_ratio(num: float, den: float) -> float:
    if num <= 0:
        return 0.0
    return max(0.0, math.log(num / den))


def epsilon_lower_bound(
    *,
    false_positives: int,
    out_trials: int,
    false_negatives: int,
    in_trials: int,
    delta: float,
    confidence: float,
) -> EpsilonBound:
    """The largest epsilon the errors certify at `delta` with probability `confidence`: a false
    positive guesses "in" on a trial without the canary (of `out_trials`), a false negative guesses
    "out" on a trial with it (of `in_trials`)."""
    check_confidence(confidence)
    if not (0 < delta < 1):
        raise GradleakError(f"delta must be in (0, 1), got {delta}")
    alpha = (1 - confidence) / 2  # split between the two rates
    fpr_hi = clopper_pearson_upper(false_positives, out_trials, alpha)
    fnr_hi = clopper_pearson_upper(false_negatives, in_trials, alpha)
    eps = max(_log_ratio(1 - delta - fnr_hi, fpr_hi), _log_ratio(1 - delta - fpr_hi, fnr_hi))
    return EpsilonBound(eps, fpr_hi, fnr_hi, confidence, delta)


def epsilon_ceiling(*, in_trials: int, out_trials: int, delta: float, confidence: float) -> float:
    """The largest lower bound these trials could certify even with no errors at all."""
    return epsilon_lower_bound(
        false_positives=0,
        out_trials=out_trials,
        false_negatives=0,
        in_trials=in_trials,
        delta=delta,
        confidence=confidence,
    ).epsilon


def planned_ceiling(trials: int, *, delta: float, confidence: float) -> float:
    """`epsilon_ceiling` for `trials` split evenly between "in" and "out" (what a plan of that many
    trials can hope for; the realised split is random)."""
    return epsilon_ceiling(
        in_trials=trials // 2, out_trials=trials - trials // 2, delta=delta, confidence=confidence
    )


def min_trials(*, delta: float, confidence: float, limit: int = 100_000) -> int:
    """The fewest trials (split evenly) whose ceiling is above 0."""
    lo, hi = 1, 2
    while planned_ceiling(hi, delta=delta, confidence=confidence) <= 0:
        lo, hi = hi, hi * 2
        if hi > limit:
            raise GradleakError(f"no number of trials up to {limit} certifies epsilon > 0 at delta {delta:g}")
    while hi - lo > 1:  # the ceiling grows with the trials: bisect for the first above 0
        mid = (lo + hi) // 2
        if planned_ceiling(mid, delta=delta, confidence=confidence) > 0:
            hi = mid
        else:
            lo = mid
    return hi
