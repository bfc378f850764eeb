"""What every attack shares: the server's knowledge, the reconstruction, the options, the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from gradleak.attacks.prior import DEFAULT_PRIOR
from gradleak.client import Update
from gradleak.errors import GradleakError, Refusal
from gradleak.victims import Victim

Progress = Callable[[int, int, float], None]  # (step, total, objective)


@dataclass(frozen=True)
class Knowledge:
    """What the server is assumed to know besides the update and the model weights."""

    batch_size: int | None = None
    lengths: tuple[int, ...] | None = None  # token counts per sequence, specials included
    labels: tuple[int, ...] | None = None
    perturbed: bool = False  # the protocol perturbs updates (noise, pruning, quantisation)

    def require(self, attack: str, *, batch_size: bool = False, lengths: bool = False) -> None:
        if batch_size and self.batch_size is None:
            raise Refusal(f"attack {attack!r} needs the batch size, which this scenario withholds")
        if lengths and self.lengths is None:
            raise Refusal(f"attack {attack!r} needs the sequence lengths, which this scenario withholds")


@dataclass(frozen=True)
class AttackOptions:
    iterations: int = 300
    learning_rate: float = 0.01
    optimizer: str = "adam"  # "adam" or "lbfgs"
    tag_alpha: float = 0.01  # weight of the L1 term in TAG
    norm_weight: float = 0.01  # weight of the embedding-norm regulariser of the cosine attack
    seed: int = 0
    force: bool = False  # run the exact attack even where its assumptions fail
    time_budget: float = 60.0  # seconds the exact attack's sequence assembly may take
    prior: str = DEFAULT_PRIOR  # language prior of the attacks that read one (lamp, exact-robust), or "none"
    prior_weight: float = 0.5  # lamp: weight of the prior's NLL per token against the relative distance

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise GradleakError(f"iterations must be at least 1, got {self.iterations}")
        if self.learning_rate <= 0:
            raise GradleakError(f"attack learning rate must be positive, got {self.learning_rate}")
        if self.optimizer not in ("adam", "lbfgs"):
            raise GradleakError(f"unknown optimizer {self.optimizer!r}; choose adam or lbfgs")
        if not self.prior_weight >= 0:
            raise GradleakError(f"prior weight must be a number >= 0, got {self.prior_weight}")


@dataclass(frozen=True)
class Reconstruction:
    token_ids: tuple[tuple[int, ...], ...]  # per sequence, specials included
    texts: tuple[str, ...]
    labels: tuple[int, ...] | None
    trace: tuple[float, ...] = field(default=())  # objective over iterations
    seconds: float = 0.0
    notes: tuple[str, ...] = field(default=())


class Attack(Protocol):
    name: str

    def reconstruct(
        self,
        victim: Victim,
        update: Update,
        knowledge: Knowledge,
        options: AttackOptions,
        progress: Progress | None = None,
    ) -> Reconstruction: ...


ATTACKS: dict[str, Attack] = {}


def register(attack: Attack) -> Attack:
    ATTACKS[attack.name] = attack
    return attack


def get_attack(name: str) -> Attack:
    if name not in ATTACKS:
        raise GradleakError(f"unknown attack {name!r}; choose one of {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]
