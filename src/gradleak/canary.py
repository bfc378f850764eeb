"""The canary audit: what an attack proves about epsilon.

Over `trials` independent trials a canary sentence is put into the client's private batch or left
out, each with probability 1/2. The rest of the batch is other sentences of the data set (the canary
excluded), drawn afresh each trial, so the batch size is fixed and the two worlds of a trial differ
in one example: the canary, or another sentence in its place (replace-one neighbours). The client
computes its FedSGD update (`client.fedsgd`), the defence chain perturbs it (`defenses`, the same
`--defense` specs as everywhere), the attack reconstructs the batch from the update and what the
server knows (the batch size only: lengths or labels depend on the canary's presence and would leak
it outside the mechanism audited), and a decision rule fixed in advance guesses "in" or "out":

    "in"  iff  the best ROUGE-1 (0-100) of any reconstructed sentence against the canary >= threshold

(default 50). An attack that refuses a trial guesses "out". The errors give a lower bound on epsilon
at `delta` with probability `confidence` (`canary_stats`: Clopper-Pearson limits on both error rates,
Jagielski et al. 2020, Nasr et al. 2021). The threshold is never fitted on the trials: a threshold
chosen after seeing them would void the bound.

Beside it stands the accountant's epsilon for exactly the mechanism audited: one release, under
replace-one adjacency. Replacing one example moves a clipped update (the whole update clipped to C,
or a sum of examples each clipped to C) by up to 2C, twice the add/remove sensitivity, so every noise
multiplier of the chain is halved before the named accountant turns it into epsilon. The add/remove
epsilon that `gradleak attack` reports is kept as `epsilon_add_remove` for reference. A chain that is
not a DP mechanism (no defence, noise on an unclipped update) has no upper bound (`None`); the audit's
lower bound is then the only number there is. A lower bound above the upper bound is a bug in one
of them.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from gradleak.canary_stats import (
    check_confidence,
    epsilon_ceiling,
    epsilon_lower_bound,
    min_trials,
    planned_ceiling,
)
from gradleak.errors import GradleakError, Refusal
from gradleak.knowledge import Knows
from gradleak.privacy import Mechanism, PrivacyReport, report

log = logging.getLogger(__name__)

# SST-2 validation sentence 27 (gradleak/resources/sst2-dev.tsv.gz), label 0: long, and rare words
DEFAULT_CANARY = (
    "the whole thing plays out with the drowsy heaviness of synchronized swimmer wearing a wool wetsuit"
)
DEFAULT_CANARY_LABEL = 0
DEFAULT_VICTIM = "gpt2-tiny"
DEFAULT_DATA = "sst2"
DEFAULT_BATCH_SIZE = 1
DEFAULT_ATTACK = "exact"
DEFAULT_DTYPE = "float64"  # the exact attack's span checks need it on the small random models
DEFAULT_TRIALS = 100
DEFAULT_THRESHOLD = 50.0
DEFAULT_CONFIDENCE = 0.95
NEIGHBOURS = "replace-one"

CanaryProgress = Callable[[int, int], None]  # (trials done, trials)


@dataclass(frozen=True)
class CanaryResult:
    """The outcome of a canary audit: the certified lower bound, the accountant's upper bound for the
    same mechanism, and the counts they come from."""

    epsilon_lower: float  # certified at `confidence` (0: nothing certified)
    epsilon_upper: float | None  # the accountant's, replace-one, one release; None: no finite bound
    epsilon_upper_reason: str  # why there is no upper bound (empty when there is one)
    epsilon_add_remove: float | None  # the accountant's under add/remove-one (what `attack` reports)
    epsilon_ceiling: float  # the largest lower bound these trials could certify with no errors
    confidence: float
    delta: float
    accountant: str
    trials: int
    in_trials: int
    out_trials: int
    false_positives: int  # guessed "in", canary out
    false_negatives: int  # guessed "out", canary in
    fpr_upper: float
    fnr_upper: float
    refusals: int  # trials the attack refused (guessed "out")
    threshold: float
    canary: str  # as the batch holds it (decoded truncated tokens)
    victim: str
    data: str
    batch_size: int
    attack: str
    defenses: tuple[str, ...]
    seed: int
    dtype: str
    seconds: float
    mechanisms: tuple[Mechanism, ...] = ()  # as audited (replace-one multipliers)
    scores_in: tuple[float, ...] = field(default=())  # the rule's score on each trial with the canary
    scores_out: tuple[float, ...] = field(default=())  # ... and without it

    @property
    def fpr(self) -> float:
        return self.false_positives / self.out_trials if self.out_trials else 0.0

    @property
    def fnr(self) -> float:
        return self.false_negatives / self.in_trials if self.in_trials else 0.0

    def consistent(self) -> bool:
        """False when the certified lower bound exceeds the accountant's upper bound: a bug."""
        return self.epsilon_upper is None or self.epsilon_lower <= self.epsilon_upper

    def to_json(self) -> dict[str, Any]:
        return {
            "epsilon_lower": self.epsilon_lower,
            "epsilon_upper": self.epsilon_upper,
            "epsilon_upper_reason": self.epsilon_upper_reason,
            "epsilon_add_remove": self.epsilon_add_remove,
            "epsilon_ceiling": self.epsilon_ceiling,
            "neighbours": NEIGHBOURS,
            "confidence": self.confidence,
            "delta": self.delta,
            "accountant": self.accountant,
            "trials": self.trials,
            "in_trials": self.in_trials,
            "out_trials": self.out_trials,
            "false_positives": self.false_positives,
            "false_negatives": self.false_negatives,
            "fpr": self.fpr,
            "fnr": self.fnr,
            "fpr_upper": self.fpr_upper,
            "fnr_upper": self.fnr_upper,
            "refusals": self.refusals,
            "rule": f"best ROUGE-1 of a reconstructed sentence against the canary >= {self.threshold:g}",
            "threshold": self.threshold,
            "canary": self.canary,
            "victim": self.victim,
            "data": self.data,
            "batch_size": self.batch_size,
            "attack": self.attack,
            "defenses": list(self.defenses),
            "mechanisms": [{"kind": m.kind, "noise_multiplier": m.noise_multiplier} for m in self.mechanisms],
            "seed": self.seed,
            "dtype": self.dtype,
            "seconds": self.seconds,
            "consistent": self.consistent(),
            "scores_in": list(self.scores_in),
            "scores_out": list(self.scores_out),
        }


def upper_bound(trace: Any, *, delta: float, accountant: str) -> tuple[PrivacyReport, PrivacyReport]:
    """(replace-one, add/remove-one) epsilon of one release of a defence chain, from its
    `PrivacyTrace`: replace-one halves each noise multiplier (sensitivity 2C instead of C)."""
    add_remove = _guarded(lambda: trace.report(delta, accountant), accountant)
    if not trace.mechanisms:
        return add_remove, add_remove
    mechs = [Mechanism(kind, z / 2) for kind, z in trace.mechanisms]
    replace_one = _guarded(
        lambda: report(mechs, delta, accountant, f"{trace.unit}-level DP, {NEIGHBOURS}"), accountant
    )
    return replace_one, add_remove


def _guarded(make: Callable[[], PrivacyReport], accountant: str) -> PrivacyReport:
    """dp_accounting's PLD and Opacus's PRV run out of memory on the tiny noise multipliers under which
    the attacks still work; say so in one line instead of a traceback."""
    try:
        return make()
    except (MemoryError, OverflowError) as exc:
        raise GradleakError(
            f"the {accountant} accountant cannot compute this epsilon ({type(exc).__name__} at a tiny noise "
            "multiplier); use --accountant rdp or analytic"
        ) from None


def _decide(canary: str, reconstructions: Sequence[str]) -> float:
    """The rule's score: the best ROUGE-1 F (0-100) of any reconstructed sentence against the canary."""
    from gradleak.metrics import _rouge

    return max((100.0 * _rouge(canary, text)["rouge1"] for text in reconstructions), default=0.0)


def run_canary_audit(
    *,
    victim: str = DEFAULT_VICTIM,
    data: str = DEFAULT_DATA,
    batch_size: int = DEFAULT_BATCH_SIZE,
    attack: str = DEFAULT_ATTACK,
    defenses: Sequence[str] = (),
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    device: str = "cpu",
    delta: float = 1e-5,
    accountant: str = "rdp",
    confidence: float = DEFAULT_CONFIDENCE,
    canary: str | None = None,
    canary_label: int = DEFAULT_CANARY_LABEL,
    threshold: float = DEFAULT_THRESHOLD,
    dtype: str = DEFAULT_DTYPE,
    task: str = "classify",
    max_length: int = 32,
    max_words: int | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    iterations: int = 300,
    time_budget: float = 60.0,
    knows: Knows = Knows(),
    progress: CanaryProgress | None = None,
) -> CanaryResult:
    """Run the canary audit (module doc) and return its bounds.

    `victim`, `data`, `batch_size`, `attack`, `defenses` (the `--defense` specs, in order), `delta`,
    `accountant`, `seed`, `device`, `dtype`, `task`, `max_length`, `max_words`, the columns,
    `iterations` and `time_budget` mean what they mean for `gradleak attack` (an `AuditSpec` has all
    but the last few). `trials` independent trials, each with its own seed drawn from `seed`;
    `canary` (default `DEFAULT_CANARY`) with `canary_label` for a classifier; `threshold` (0-100) is
    the decision rule's, fixed in advance; `confidence` that of the lower bound; `knows` the threat
    model, which may hold the batch size only. `progress(done, trials)` is called after each trial.
    """
    from gradleak.attacks import Knowledge, get_attack
    from gradleak.client import fedsgd
    from gradleak.data import Example, filter_by_words, make_batch
    from gradleak.defenses import DefenseContext
    from gradleak.experiment import RunSpec
    from gradleak.victims import load_victim

    spec = RunSpec(
        victim=victim,
        data=data,
        text_column=text_column,
        label_column=label_column,
        batch_size=batch_size,
        attack=attack,
        iterations=iterations,
        seed=seed,
        task=task,
        dtype=dtype,
        device=device,
        max_length=max_length,
        max_words=max_words,
        defenses=tuple(defenses),
        delta=delta,
        accountant=accountant,
        time_budget=time_budget,
        **knows.spec_fields(),
    )
    spec.validate()  # victim name, batch size, attack, defences, delta, accountant, ...
    check_confidence(confidence)
    if knows.lengths or knows.labels:
        raise GradleakError(
            "the canary audit gives the attack the batch size only: the sequence lengths and labels "
            "depend on whether the canary is in the batch and would leak it outside the update audited"
        )
    if not (0 < threshold <= 100):
        raise GradleakError(f"the threshold is a ROUGE-1 score in (0, 100], got {threshold}")
    needed = min_trials(delta=delta, confidence=confidence)
    if trials < needed:
        raise GradleakError(
            f"{trials} trials cannot certify any epsilon > 0 at confidence {confidence:g} and delta "
            f"{delta:g}, even with no errors: use at least {needed}"
        )
    text = DEFAULT_CANARY if canary is None else " ".join(canary.split())
    if not text:
        raise GradleakError("the canary is empty")
    pool = [e for e in filter_by_words(spec.examples(), 0, max_words) if " ".join(e.text.split()) != text]
    if len(pool) < batch_size:
        raise GradleakError(
            f"{data!r} has {len(pool)} sentences besides the canary; batch size {batch_size} needs more"
        )
    chain = spec.defense_chain()
    attacker = get_attack(attack)
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = load_victim(victim, task=task, dtype=dtype, seed=seed, device=device)
    canary_example = Example(text, canary_label)
    reference = make_batch([canary_example], model.tokenizer, max_length).texts[0]
    if not reference.strip():
        raise GradleakError("the canary has no tokens the victim's tokenizer keeps")
    with_labels = model.task == "classify"
    knowledge = Knowledge(batch_size=batch_size if knows.batch_size else None, perturbed=chain.perturbs())

    scores_in: list[float] = []
    scores_out: list[float] = []
    refusals = 0
    trace0 = None
    for t in range(trials):
        rng = random.Random(f"gradleak-canary:{seed}:{t}")  # a fresh, reproducible seed per trial
        member = rng.random() < 0.5
        chosen = rng.sample(pool, batch_size - 1 if member else batch_size)
        if member:
            chosen.insert(rng.randrange(batch_size), canary_example)
        trial_seed = rng.getrandbits(63)
        batch = make_batch(chosen, model.tokenizer, max_length, with_labels=with_labels)
        update = fedsgd(model, batch)
        gen = torch.Generator(device=model.device).manual_seed(trial_seed)
        update, trace = chain.apply(update, DefenseContext(model, batch, gen))
        if trace0 is None:
            trace0 = trace
        elif trace.mechanisms != trace0.mechanisms:  # pragma: no cover - the chain is data-independent
            raise GradleakError("the defence chain's mechanism changed between trials")
        try:
            options = replace(spec.options(), seed=trial_seed % 2**31)
            rec = attacker.reconstruct(model, update, knowledge, options, None)
            score = _decide(reference, rec.texts)
        except Refusal as exc:
            refusals += 1
            score = 0.0
            log.info("trial %d: the attack refused (%s): guessed out", t, exc)
        (scores_in if member else scores_out).append(score)
        log.debug("trial %d: canary %s, score %.1f", t, "in" if member else "out", score)
        if progress is not None:
            progress(t + 1, trials)

    assert trace0 is not None
    replace_one, add_remove = upper_bound(trace0, delta=delta, accountant=accountant)
    fp = sum(s >= threshold for s in scores_out)
    fn = sum(s < threshold for s in scores_in)
    bound = epsilon_lower_bound(
        false_positives=fp,
        out_trials=len(scores_out),
        false_negatives=fn,
        in_trials=len(scores_in),
        delta=delta,
        confidence=confidence,
    )
    ceiling = epsilon_ceiling(
        in_trials=len(scores_in), out_trials=len(scores_out), delta=delta, confidence=confidence
    )
    result = CanaryResult(
        epsilon_lower=bound.epsilon,
        epsilon_upper=replace_one.epsilon,
        epsilon_upper_reason="" if replace_one.epsilon is not None else replace_one.reason,
        epsilon_add_remove=add_remove.epsilon,
        epsilon_ceiling=ceiling,
        confidence=confidence,
        delta=delta,
        accountant=accountant,
        trials=trials,
        in_trials=len(scores_in),
        out_trials=len(scores_out),
        false_positives=fp,
        false_negatives=fn,
        fpr_upper=bound.fpr_upper,
        fnr_upper=bound.fnr_upper,
        refusals=refusals,
        threshold=threshold,
        canary=reference,
        victim=victim,
        data=data,
        batch_size=batch_size,
        attack=attack,
        defenses=tuple(defenses),
        seed=seed,
        dtype=dtype,
        seconds=time.perf_counter() - start,
        mechanisms=replace_one.mechanisms,
        scores_in=tuple(scores_in),
        scores_out=tuple(scores_out),
    )
    if not result.consistent():
        log.warning(
            "the canary lower bound %.3g exceeds the accountant's upper bound %.3g: a bug in one of them",
            result.epsilon_lower,
            result.epsilon_upper,
        )
    log.info(
        "canary audit: epsilon >= %.3g (ceiling %.3g) at confidence %g; accountant %s",
        result.epsilon_lower,
        result.epsilon_ceiling,
        confidence,
        result.epsilon_upper,
    )
    return result


__all__ = ["CanaryResult", "run_canary_audit", "upper_bound", "planned_ceiling", "DEFAULT_CANARY"]
