"""`gradleak audit`, the main job: what does an honest-but-curious server recover from one client's
update, with and without a defence, and what epsilon does the defence buy?

The audit runs each attack (by default the exact attack and TAG, a gradient-matching attack) on the
same private batch twice, once on the plain update and once on the defended one, stores the runs,
and sums them up in a verdict of plain sentences and an HTML report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gradleak.errors import GradleakError
from gradleak.knowledge import Knows
from gradleak.sweeps.jobs import Job

if TYPE_CHECKING:  # the report's modules load matplotlib: only when a report is drawn
    from gradleak.report.data import AttackRun, ReportData

DEFAULT_VICTIM = "gpt2-tiny"
DEFAULT_DATA = "sst2"
DEFAULT_BATCH_SIZE = 4
DEFAULT_ATTACKS = ("exact", "tag")
DEFAULT_DEFENSES = ("dp-sgd:clip=1,multiplier=1",)
DEFAULT_ITERATIONS = 50


@dataclass(frozen=True)
class AuditSpec:
    victim: str = DEFAULT_VICTIM
    data: str = DEFAULT_DATA
    text_column: str | None = None
    label_column: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    defenses: tuple[str, ...] = DEFAULT_DEFENSES
    iterations: int = DEFAULT_ITERATIONS
    seed: int = 0
    device: str = "cpu"
    time_budget: float = 60.0
    max_words: int | None = None
    delta: float = 1e-5
    accountant: str = "rdp"
    knows: Knows = Knows()  # what the server knows of the batch (`--knows`): the runs' known_* fields

    def jobs(self) -> list[Job]:
        """Every attack on the plain update, then on the defended one; all specs validated."""
        from gradleak.experiment import RunSpec

        if not self.attacks:
            raise GradleakError("the audit needs at least one attack")
        if not self.defenses:
            raise GradleakError("the audit compares a defence with none: give at least one --defense")
        jobs = []
        for chain in ((), self.defenses):
            for attack in self.attacks:
                spec = RunSpec(
                    victim=self.victim,
                    data=self.data,
                    text_column=self.text_column,
                    label_column=self.label_column,
                    batch_size=self.batch_size,
                    attack=attack,
                    iterations=self.iterations,
                    seed=self.seed,
                    device=self.device,
                    time_budget=self.time_budget,
                    max_words=self.max_words,
                    defenses=chain,
                    delta=self.delta,
                    accountant=self.accountant,
                    **self.knows.spec_fields(),
                )
                spec.validate()
                jobs.append(Job("attack", spec))
        return jobs


def _strongest(runs: Sequence[AttackRun]) -> AttackRun | None:
    return max(runs, key=lambda r: (r.scores["rouge1"], r.scores["exact_match"]), default=None)


def _recovered(run: AttackRun) -> str:
    n = run.batch_size
    exact = round(run.scores["exact_match"] * n / 100)
    sentences = "sentence" if n == 1 else "sentences"
    return (
        f"recovers {exact}/{n} {sentences} exactly (ROUGE-1 {run.scores['rouge1']:.0f}, {run.attack} attack)"
    )


def verdict(spec: AuditSpec, data: ReportData) -> list[str]:
    """Two plain sentences: what the server recovers without and with the defence, and the epsilon."""
    chain = ",".join(spec.defenses)
    plain = _strongest([r for r in data.attacks if not r.defenses])
    defended = _strongest([r for r in data.attacks if r.defenses == spec.defenses])
    out = []
    if plain is None:
        out.append("Without a defence no attack finished (see the failed runs).")
    else:
        out.append(f"Without a defence the server {_recovered(plain)}.")
    if defended is None:
        out.append(f"With {chain} no attack finished (see the failed runs).")
    else:
        if defended.epsilon is None:
            privacy = "no finite epsilon: not a DP mechanism"
        else:
            privacy = f"epsilon {defended.epsilon:.3g} at delta {defended.delta:g}, {defended.accountant}"
        out.append(f"With {chain} ({privacy}) it {_recovered(defended)}.")
    if data.failed:
        out.append(f"{len(data.failed)} of {len(spec.attacks) * 2} runs failed; the report lists why.")
    return out
