"""What a federated run is: `FlSpec`, its checks, the clients' data partitions and the seeds of each
round. Nothing here imports Flower, so the CLI can refuse bad input before the simulation starts."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from gradleak.data import Example, filter_by_words
from gradleak.defenses import DpSgd, Withhold
from gradleak.errors import GradleakError
from gradleak.privacy import Mechanism, check_delta
from gradleak.spec import AttackSpec

FLOWER_DP = ("none", "local", "central-client-clip")

# Keys the server puts in every training round's ConfigRecord: the protocol the clients follow, so the
# learning rate and the number of local steps the audit divides by are the ones the server configured.
KEY_LOCAL_LR = "gradleak-local-lr"
KEY_LOCAL_STEPS = "gradleak-local-steps"
KEY_BATCH_SIZE = "gradleak-batch-size"


@dataclass(frozen=True)
class FlSpec(AttackSpec):
    """Everything that determines a federated run and its audit.

    `flower_dp` names Flower's own DP: `local` is `LocalDpMod(dp_clip, dp_sensitivity, dp_epsilon,
    dp_delta)` on every client (clip and noise before the update leaves the client);
    `central-client-clip` is `fixedclipping_mod` on the clients with the server-side strategy wrapper
    `DifferentialPrivacyClientSideFixedClipping(noise_multiplier=dp_noise_multiplier,
    clipping_norm=dp_clip)`, which adds the noise to the aggregate. `defenses` are gradleak defences the
    clients apply to their update (the weight delta) before Flower's mods. The shared fields (victim,
    data, batch, defences, attack options, what the server knows) are `AttackSpec`'s."""

    victim: str = "gpt2-tiny"
    data: str = "sst2"
    attack: str = "exact"
    iterations: int = 100
    clients: int = 2
    rounds: int = 2
    flower_dp: str = "none"
    dp_clip: float | None = None
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    dp_sensitivity: float | None = None
    dp_noise_multiplier: float | None = None

    def validate(self) -> None:
        self.validate_attack()
        if self.clients < 1:
            raise GradleakError(f"clients must be at least 1, got {self.clients}")
        if self.rounds < 1:
            raise GradleakError(f"rounds must be at least 1, got {self.rounds}")
        chain = self.defense_chain()
        if any(isinstance(d, Withhold) for d in chain):
            raise GradleakError(
                "withhold cannot apply in fl: Flower aggregates and clips arrays by name, so every client "
                "must return every parameter"
            )
        if self.local_steps > 1 and any(isinstance(d, DpSgd) for d in chain):
            raise GradleakError(
                "dp-sgd computes one FedSGD gradient: use --local-steps 1 with it "
                "(the delta is -lr * gradient)"
            )
        self._validate_flower_dp()

    def _validate_flower_dp(self) -> None:
        if self.flower_dp not in FLOWER_DP:
            raise GradleakError(
                f"unknown --flower-dp {self.flower_dp!r}; choose one of {', '.join(FLOWER_DP)}"
            )
        given = {
            "--dp-clip": self.dp_clip,
            "--dp-epsilon": self.dp_epsilon,
            "--dp-delta": self.dp_delta,
            "--dp-sensitivity": self.dp_sensitivity,
            "--dp-noise-multiplier": self.dp_noise_multiplier,
        }
        allowed = {
            "none": set(),
            "local": {"--dp-clip", "--dp-epsilon", "--dp-delta", "--dp-sensitivity"},
            "central-client-clip": {"--dp-clip", "--dp-noise-multiplier"},
        }[self.flower_dp]
        stray = [k for k, v in given.items() if v is not None and k not in allowed]
        if stray:
            raise GradleakError(f"{stray[0]} does not apply with --flower-dp {self.flower_dp}")
        if self.flower_dp == "none":
            return
        _positive("--dp-clip", self.dp_clip)
        if self.flower_dp == "local":
            _positive("--dp-epsilon", self.dp_epsilon)
            if self.dp_sensitivity is not None:
                _positive("--dp-sensitivity", self.dp_sensitivity)
            check_delta(self.local_dp_delta)
        else:
            _positive("--dp-noise-multiplier", self.dp_noise_multiplier)

    # ------------------------------------------------------------------ derived

    @property
    def local_dp_delta(self) -> float:
        return self.delta if self.dp_delta is None else self.dp_delta

    @property
    def local_dp_sensitivity(self) -> float:
        return float(self.dp_clip if self.dp_sensitivity is None else self.dp_sensitivity)  # type: ignore[arg-type]

    def local_dp_std(self) -> float:
        """The noise std `LocalDpMod` adds: sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon (its own
        formula, the classic Gaussian mechanism)."""
        return local_dp_std(self.local_dp_sensitivity, float(self.dp_epsilon), self.local_dp_delta)  # type: ignore[arg-type]

    def perturbed(self) -> bool:
        """Whether what the server receives is perturbed (noise, pruning, quantisation), so that the
        exact attack should run in its noise-aware mode. Central DP adds its noise after the server has
        read the updates, so it does not count."""
        return self.flower_dp == "local" or self.defense_chain().perturbs()

    def server_mechanisms(self) -> tuple[Mechanism, ...]:
        """Flower's noise on one client's update as the server sees it, each round (LocalDpMod only)."""
        if self.flower_dp != "local":
            return ()
        return (local_dp_mechanism(float(self.dp_clip), self.local_dp_std()),)  # type: ignore[arg-type]

    def server_view(self) -> str:
        """What the honest-but-curious server reads from each client, in words."""
        k = f"{self.local_steps} local SGD step{'s' if self.local_steps > 1 else ''} at lr {self.local_lr:g}"
        chain = self.defense_chain()
        through = f", through gradleak's {' -> '.join(chain.specs())}" if chain else ""
        weights = "each client's weights"
        if self.peft:
            from gradleak.adapters import parse_peft

            lora = parse_peft(self.peft).describe()
            weights = f"each client's adapter weights ({lora}; the frozen base is never sent)"
        if self.flower_dp == "local":
            return (
                f"{weights} after {k}{through}, clipped to {self.dp_clip:g} and noised "
                f"(std {self.local_dp_std():.4g}) by LocalDpMod on the client before sending"
            )
        if self.flower_dp == "central-client-clip":
            return (
                f"{weights} after {k}{through}, clipped to {self.dp_clip:g} by fixedclipping_mod "
                "but not noised: Flower adds the central noise to the aggregate after the server has read "
                "every client's update"
            )
        return f"{weights} after {k}{through}"


def _positive(name: str, value: float | None) -> None:
    if value is None:
        raise GradleakError(f"{name} is required with this --flower-dp")
    if not (value > 0 and math.isfinite(value)):
        raise GradleakError(f"{name} must be a finite number > 0, got {value}")


def local_dp_std(sensitivity: float, epsilon: float, delta: float) -> float:
    """`LocalDpMod`'s noise std (flwr.clientapp.mod.LocalDpMod, Flower 1.41)."""
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def local_dp_mechanism(clip: float, std: float) -> Mechanism:
    """The Gaussian mechanism of one LocalDpMod release: the clipped update has L2 sensitivity `clip`
    (one client's data added or removed), so the noise multiplier is std / clip whatever sensitivity
    the mod was given."""
    return Mechanism("gaussian", std / clip)


# ------------------------------------------------------------------ data


def partitions(spec: FlSpec) -> list[list[Example]]:
    """The clients' shards of the data set: a seeded shuffle dealt round-robin into `clients` parts.
    Refuses a data set smaller than the clients, or shards smaller than the batch."""
    examples = filter_by_words(spec.examples(), 0, spec.max_words)
    return split(examples, spec.clients, spec.batch_size, spec.seed, spec.data)


def split(
    examples: Sequence[Example], clients: int, batch_size: int, seed: int, name: str = "the data"
) -> list[list[Example]]:
    if clients < 1:
        raise GradleakError(f"clients must be at least 1, got {clients}")
    if len(examples) < clients:
        raise GradleakError(f"data {name!r} has {len(examples)} sentences, fewer than the {clients} clients")
    order = list(examples)
    random.Random(seed).shuffle(order)
    parts = [order[i::clients] for i in range(clients)]
    smallest = min(len(p) for p in parts)
    if smallest < batch_size:
        raise GradleakError(
            f"data {name!r} has {len(examples)} sentences: {clients} clients get {smallest} each, "
            f"fewer than the batch size {batch_size}"
        )
    return parts


def round_seed(seed: int, server_round: int, client: int) -> int:
    """The seed of one client's batch draw and noise in one round."""
    return (seed * 1_000_003 + server_round * 10_007 + client) % (2**31 - 1)
