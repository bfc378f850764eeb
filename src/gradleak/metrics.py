"""Scores of a reconstruction against the private batch, as the literature reports them.

ROUGE-1/2/L F-measures via `rouge-score`; reconstructions are matched to references within a
batch by a Hungarian assignment on ROUGE-1 (as LAMP and DAGER do). Token accuracy counts
reference tokens recovered at their own position in the matched reconstruction; exact match
counts sequences recovered whole. All scores are 0-100.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np
from scipy.optimize import linear_sum_assignment

from gradleak.errors import GradleakError


@dataclass(frozen=True)
class Scores:
    rouge1: float
    rouge2: float
    rougeL: float  # noqa: N815 - the literature's name
    token_accuracy: float
    exact_match: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _rouge(reference: str, candidate: str) -> dict[str, float]:
    if not reference.strip() and not candidate.strip():
        return {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    scores = _scorer().score(reference, candidate)
    return {k: v.fmeasure for k, v in scores.items()}


def match(references: Sequence[str], reconstructions: Sequence[str]) -> list[int]:
    """For each reference, the index of its reconstruction (Hungarian on ROUGE-1 F)."""
    n = len(references)
    cost = np.zeros((n, len(reconstructions)))
    for i, ref in enumerate(references):
        for j, rec in enumerate(reconstructions):
            cost[i, j] = -_rouge(ref, rec)["rouge1"]
    rows, cols = linear_sum_assignment(cost)
    out = [-1] * n
    for r, c in zip(rows, cols, strict=True):
        out[r] = int(c)
    return out


def token_accuracy(reference: Sequence, reconstruction: Sequence) -> tuple[int, int]:
    """(correct, total): reference tokens equal to the reconstruction's token at that position."""
    correct = sum(1 for i, t in enumerate(reference) if i < len(reconstruction) and reconstruction[i] == t)
    return correct, len(reference)


def score(
    references: Sequence[str],
    reconstructions: Sequence[str],
    reference_tokens: Sequence[Sequence] | None = None,
    reconstruction_tokens: Sequence[Sequence] | None = None,
) -> Scores:
    """Score a batch. Tokens (ids, special and pad tokens already removed) default to words."""
    if not references:
        raise GradleakError("nothing to score: the batch is empty")
    if reference_tokens is None or reconstruction_tokens is None:
        reference_tokens = [r.split() for r in references]
        reconstruction_tokens = [r.split() for r in reconstructions]
    missing = max(0, len(references) - len(reconstructions))  # unrecovered sequences score 0
    reconstructions = [*reconstructions, *([""] * missing)]
    reconstruction_tokens = [*reconstruction_tokens, *([[]] * missing)]
    assignment = match(references, reconstructions)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    correct = total = exact = 0
    for i, j in enumerate(assignment):
        for k, v in _rouge(references[i], reconstructions[j]).items():
            totals[k] += v
        c, t = token_accuracy(list(reference_tokens[i]), list(reconstruction_tokens[j]))
        correct += c
        total += t
        exact += int(_normalise(references[i]) == _normalise(reconstructions[j]))
    n = len(references)
    return Scores(
        rouge1=100.0 * totals["rouge1"] / n,
        rouge2=100.0 * totals["rouge2"] / n,
        rougeL=100.0 * totals["rougeL"] / n,
        token_accuracy=100.0 * correct / max(total, 1),
        exact_match=100.0 * exact / n,
    )


def mean_scores(all_scores: Sequence[Scores]) -> Scores:
    """Mean of several batches' scores (each batch weighted equally)."""
    if not all_scores:
        raise GradleakError("no scores to average")
    keys = Scores.__dataclass_fields__.keys()
    return Scores(**{k: float(np.mean([getattr(s, k) for s in all_scores])) for k in keys})
