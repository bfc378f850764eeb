"""One run end to end: RunSpec -> victim + batch -> update -> attack -> scores = RunRecord."""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

import torch

from gradleak.adapters import check_sharing, shared_summary
from gradleak.attacks import AttackOptions, Knowledge, Reconstruction, get_attack
from gradleak.attacks.base import Progress
from gradleak.client import Update, fedavg, fedsgd, parse_share
from gradleak.data import filter_by_words, make_batch, sample_with_tokens
from gradleak.defenses import DefenseContext, DpSgd
from gradleak.errors import GradleakError
from gradleak.finetune import finetune
from gradleak.knowledge import Knows
from gradleak.metrics import Scores, score
from gradleak.privacy import PrivacyReport
from gradleak.spec import KEYED_WHEN_SET, AttackSpec
from gradleak.victims import load_victim

log = logging.getLogger(__name__)

PROTOCOLS = ("fedsgd", "fedavg")


@dataclass(frozen=True)
class RunSpec(AttackSpec):
    """Everything that determines a run; any record can be re-run from its spec. The shared fields
    (victim, data, batch, defences, attack options, what the server knows) are `AttackSpec`'s."""

    min_words: int = 0
    withhold: tuple[str, ...] = ()
    protocol: str = "fedsgd"
    # conditions of the attacked round
    share: tuple[str, ...] = ()  # only these groups/patterns are shared (empty: everything)
    finetune_steps: int = 0  # SGD steps on other examples of the data set before the attacked round
    finetune_lr: float = 1e-3
    min_tokens: int = 0  # only examples of at least this many tokens under the victim's tokenizer
    # FedAvg's local mini-batch size (None: every local step takes the whole batch)
    local_batch: int | None = field(default=None, metadata={KEYED_WHEN_SET: True})

    def validate(self) -> None:
        self.validate_attack()
        if self.protocol not in PROTOCOLS:
            raise GradleakError(f"unknown protocol {self.protocol!r}; choose {' or '.join(PROTOCOLS)}")
        if self.max_words is not None and self.max_words < self.min_words:
            raise GradleakError("max words is smaller than min words")
        if self.min_tokens < 0:
            raise GradleakError(f"min tokens must be at least 0, got {self.min_tokens}")
        if self.local_batch is not None and self.local_batch < 1:
            raise GradleakError(f"local mini-batch size must be at least 1, got {self.local_batch}")
        if self.local_batch is not None and self.protocol != "fedavg":
            raise GradleakError("--local-batch sets FedAvg's mini-batches: use --protocol fedavg")
        if self.finetune_steps < 0:
            raise GradleakError(f"fine-tuning steps must be at least 0, got {self.finetune_steps}")
        if self.finetune_lr <= 0:
            raise GradleakError(f"fine-tuning learning rate must be positive, got {self.finetune_lr}")
        for item in self.share:
            parse_share(item)
        chain = self.defense_chain()
        if self.protocol != "fedsgd" and any(isinstance(d, DpSgd) for d in chain):
            raise GradleakError("dp-sgd computes a FedSGD gradient; use --protocol fedsgd")


def attack_options(spec: AttackSpec) -> AttackOptions:
    """The attack's options of any attacking spec (RunSpec, the Flower spec): `AttackSpec.options`."""
    return spec.options()


@dataclass(frozen=True)
class RunRecord:
    spec: RunSpec
    references: tuple[str, ...]
    reconstructions: tuple[str, ...]
    scores: Scores
    seconds: float
    labels: tuple[int, ...] | None
    inferred_labels: tuple[int, ...] | None
    notes: tuple[str, ...] = ()
    environment: dict[str, str] = field(default_factory=dict)
    privacy: PrivacyReport | None = None
    knows: Knows | None = None  # what the attack was given (None: what the spec says)
    shared: dict[str, Any] | None = None  # what the update held (`adapters.shared_summary`)

    def to_json(self) -> dict[str, Any]:
        return {
            "victim": self.spec.victim,
            "attack": self.spec.attack,
            "data": self.spec.data,
            "batch_size": self.spec.batch_size,
            "seed": self.spec.seed,
            "references": list(self.references),
            "reconstructions": list(self.reconstructions),
            "scores": self.scores.as_dict(),
            "seconds": self.seconds,
            "labels": None if self.labels is None else list(self.labels),
            "inferred_labels": None if self.inferred_labels is None else list(self.inferred_labels),
            "notes": list(self.notes),
            "defenses": list(self.spec.defenses),
            "prior": self.spec.prior if self.spec.uses_prior() else None,  # the language prior read
            "privacy": None if self.privacy is None else self.privacy.to_json(),
            # what the attack was given besides the update
            "knowledge": (self.knows or self.spec.knows()).to_json(),
            "shared": self.shared,
            "spec": asdict(self.spec),
            "environment": self.environment,
        }


def environment(device: str) -> dict[str, str]:
    env = {
        "python": platform.python_version(),
        "device": device,
        "torch_threads": str(torch.get_num_threads()),
    }
    for pkg in ("gradleak", "torch", "transformers", "rouge-score"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:  # pragma: no cover
            env[pkg] = "not installed"
    return env


def strip_special(token_ids, special: set[int]) -> list[list[int]]:
    return [[t for t in seq if t not in special] for seq in token_ids]


def score_reconstruction(victim, batch, rec: Reconstruction) -> Scores:
    """Score a reconstruction against the batch, special and pad tokens removed."""
    special = set(victim.tokenizer.all_special_ids)
    return score(
        batch.texts,
        rec.texts,
        strip_special(batch.token_ids, special),
        strip_special(rec.token_ids, special),
    )


def make_update(spec: RunSpec, victim, batch) -> Update:
    if spec.protocol == "fedavg":
        return fedavg(
            victim,
            batch,
            local_steps=spec.local_steps,
            learning_rate=spec.local_lr,
            withhold=spec.withhold,
            share=spec.share,
            local_batch=spec.local_batch,
        )
    return fedsgd(victim, batch, withhold=spec.withhold, share=spec.share)


def run_one(spec: RunSpec, progress: Progress | None = None) -> RunRecord:
    """Run one attack as the spec says and score it against the private batch."""
    spec.validate()
    attack = get_attack(spec.attack)
    options = spec.options()
    torch.manual_seed(spec.seed)
    victim = load_victim(
        spec.victim, task=spec.task, dtype=spec.dtype, seed=spec.seed, device=spec.device, peft=spec.peft
    )
    everything = spec.examples()
    examples = filter_by_words(everything, spec.min_words, spec.max_words)
    if not examples:
        raise GradleakError(f"no sentences in {spec.data!r} have {spec.min_words}-{spec.max_words} words")
    try:
        chosen = sample_with_tokens(examples, spec.batch_size, spec.seed, victim.tokenizer, spec.min_tokens)
    except GradleakError as exc:
        raise GradleakError(f"{spec.data!r}: {exc}") from None
    batch = make_batch(chosen, victim.tokenizer, spec.max_length, with_labels=victim.task == "classify")
    run_notes: list[str] = []
    env = environment(spec.device)
    if spec.finetune_steps > 0:  # the client's other data: the whole data set without the private batch
        tuned = finetune(
            victim,
            everything,
            exclude=chosen,
            steps=spec.finetune_steps,
            learning_rate=spec.finetune_lr,
            seed=spec.seed,
            max_length=spec.max_length,
        )
        run_notes.append(tuned.note())
        env.update(tuned.as_environment())
    if spec.peft:
        check_sharing(victim.model, spec.share, spec.withhold)
    update = make_update(spec, victim, batch)
    shared = shared_summary(victim.model, dict(update.tensors), spec.peft)
    chain = spec.defense_chain()
    gen = torch.Generator(device=victim.device).manual_seed(spec.seed)
    update, trace = chain.apply(update, DefenseContext(victim, batch, gen))
    privacy = trace.report(spec.delta, spec.accountant)  # one release of one batch
    knowledge = Knowledge(
        batch_size=batch.size if spec.known_batch_size else None,
        lengths=batch.lengths if spec.known_lengths else None,
        labels=tuple(int(x) for x in batch.labels)
        if spec.known_labels and batch.labels is not None
        else None,
        perturbed=chain.perturbs(),
    )
    start = time.perf_counter()
    rec: Reconstruction = attack.reconstruct(victim, update, knowledge, options, progress)
    seconds = time.perf_counter() - start
    scores = score_reconstruction(victim, batch, rec)
    log.info("%s on %s B=%d: %s", spec.attack, spec.victim, spec.batch_size, scores)
    return RunRecord(
        spec=spec,
        references=batch.texts,
        reconstructions=rec.texts,
        scores=scores,
        seconds=seconds,
        labels=None if batch.labels is None else tuple(int(x) for x in batch.labels),
        inferred_labels=rec.labels,
        notes=(*run_notes, *rec.notes),
        environment=env,
        privacy=privacy,
        shared=shared,
        knows=Knows(  # what was given: an lm batch has no labels to give
            batch_size=knowledge.batch_size is not None,
            lengths=knowledge.lengths is not None,
            labels=knowledge.labels is not None,
        ),
    )
