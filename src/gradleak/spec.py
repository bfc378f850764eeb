"""The fields every run spec shares, checked once.

`VictimSpec` is what any run needs to build its victim and its batches and to account its defences:
the attack run (`experiment.RunSpec`), the training run (`train.TrainSpec`) and the federated run
(`flower.spec.FlSpec`) inherit it. `AttackSpec` adds what a run that attacks needs: the attack's options
and the threat model, i.e. which facts of the private batch the server is given (`known_*`). The
default threat model is the honest-but-curious server's (`gradleak.knowledge.Knows()`): it knows the
batch size, which the protocol fixes, and neither the sequence lengths nor the labels.

Subclasses keep these field names (the store's canonical spec JSON and the study TOML files use
them) and may redeclare a field to change its default (`FlSpec.victim = "gpt2-tiny"`); dataclass
inheritance keeps a redeclared field in its base position, and every field has a default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gradleak.errors import GradleakError
from gradleak.knowledge import Knows

_KNOWS = Knows()
KEYED_WHEN_SET = "keyed_when_set"  # field metadata: the store's key holds the field only when set
# field metadata: the name of a spec method; where it returns False the field is left out of the key
# (an option no part of the run reads: `prior` for an attack that reads no prior)
KEYED_IF = "keyed_if"
DEFAULT_PRIOR = "smollm2"  # = gradleak.attacks.prior.DEFAULT_PRIOR (not imported: that loads torch)


@dataclass(frozen=True)
class VictimSpec:
    """The victim, the data, the batch, the defences and their accounting."""

    victim: str = "bert-tiny"
    data: str = "sample"
    batch_size: int = 1
    seed: int = 0
    task: str = "classify"
    dtype: str = "float32"
    device: str = "cpu"
    max_length: int = 32
    defenses: tuple[str, ...] = ()
    delta: float = 1e-5
    accountant: str = "rdp"
    # columns of a table or Hugging Face data set (found by name where not given); left out of the
    # store's key while unset, so the keys of runs stored before these fields existed still hold
    text_column: str | None = field(default=None, metadata={KEYED_WHEN_SET: True})
    label_column: str | None = field(default=None, metadata={KEYED_WHEN_SET: True})
    # parameter-efficient fine-tuning (`lora:r=8,targets=q_proj+v_proj`): the client trains and shares
    # only the adapters (`gradleak.adapters`); None: the full model
    peft: str | None = field(default=None, metadata={KEYED_WHEN_SET: True})

    def examples(self):  # -> list[gradleak.data.Example]
        """Every example of the spec's data set, read with its columns."""
        from gradleak.data import load_examples

        return load_examples(self.data, text_column=self.text_column, label_column=self.label_column)

    def validate_common(self) -> None:
        """The checks of the shared fields; each subclass's `validate()` calls it, then checks its own."""
        from gradleak.privacy import check_delta, get_accountant
        from gradleak.victims import DTYPES, TASKS, check_victim_name

        if self.batch_size < 1:
            raise GradleakError(f"batch size must be at least 1, got {self.batch_size}")
        if self.max_length < 2:
            raise GradleakError(f"max length must be at least 2, got {self.max_length}")
        if self.task not in TASKS:
            raise GradleakError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.dtype not in DTYPES:
            raise GradleakError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        check_victim_name(self.victim)
        if self.peft:
            from gradleak.adapters import parse_peft

            parse_peft(self.peft)
        check_delta(self.delta)
        get_accountant(self.accountant)
        self.defense_chain()

    def defense_chain(self):  # -> gradleak.defenses.DefenseChain
        from gradleak.defenses import DefenseChain

        return DefenseChain.parse(self.defenses)


@dataclass(frozen=True)
class AttackSpec(VictimSpec):
    """A run that attacks an update: the attack, its options, and what the server knows of the batch."""

    attack: str = "tag"
    iterations: int = 300
    attack_lr: float = 0.01
    optimizer: str = "adam"
    force: bool = False
    time_budget: float = 60.0
    max_words: int | None = None
    local_steps: int = 1
    local_lr: float = 0.01
    known_batch_size: bool = _KNOWS.batch_size
    known_lengths: bool = _KNOWS.lengths
    known_labels: bool = _KNOWS.labels
    # the language prior of the attacks that read one (lamp, exact-robust): a causal LM (smollm2,
    # gpt2-tiny, a model directory, ...) or "none"; in the store's key only when set and read by the attack
    prior: str = field(default=DEFAULT_PRIOR, metadata={KEYED_WHEN_SET: True, KEYED_IF: "uses_prior"})

    def validate_attack(self) -> None:
        """The shared checks, then the attack's name and options."""
        from gradleak.attacks import get_attack

        self.validate_common()
        if self.local_steps < 1:
            raise GradleakError(f"local steps must be at least 1, got {self.local_steps}")
        if not (self.local_lr > 0 and math.isfinite(self.local_lr)):
            raise GradleakError(f"local learning rate must be a finite number > 0, got {self.local_lr}")
        get_attack(self.attack)
        self.options()  # iterations, learning rate, optimiser
        from gradleak.attacks.prior import check_prior_name

        check_prior_name(self.prior)

    def options(self):  # -> gradleak.attacks.AttackOptions
        from gradleak.attacks import AttackOptions

        return AttackOptions(
            iterations=self.iterations,
            learning_rate=self.attack_lr,
            optimizer=self.optimizer,
            seed=self.seed,
            force=self.force,
            time_budget=self.time_budget,
            prior=self.prior,
        )

    def uses_prior(self) -> bool:
        """Whether the attack reads the language prior (`prior`)."""
        from gradleak.attacks import get_attack

        return bool(getattr(get_attack(self.attack), "uses_prior", False))

    def knows(self) -> Knows:
        """Which facts of the batch the attack is given."""
        return Knows(
            batch_size=bool(self.known_batch_size),
            lengths=bool(self.known_lengths),
            labels=bool(self.known_labels),
        )
