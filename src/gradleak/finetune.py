"""A fine-tuned stage: train the victim for a few SGD steps on the client's other data before the
attacked round, so that "random", "pretrained" and "fine-tuned" weights can be compared.

The steps are plain SGD (what FL clients run) on the victim's own loss, on seeded batches drawn
from the data set without the private examples; the model trains in train mode and is left in
eval mode. The loss is measured (in eval mode) before and after on the same few of those batches.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gradleak.data import Example, make_batch
from gradleak.errors import GradleakError
from gradleak.victims import Victim

log = logging.getLogger(__name__)

BATCH_SIZE = 8
EVAL_BATCHES = 8  # the loss before and after is measured on (at most) this many of the batches
SEED_SALT = 0x5EED  # the fine-tuning batches' stream differs from the private batch's


@dataclass(frozen=True)
class FinetuneResult:
    steps: int
    learning_rate: float
    batch_size: int
    examples: int  # distinct examples the steps saw
    loss_before: float  # mean loss on the evaluation batches, before and after
    loss_after: float

    def note(self) -> str:
        return (
            f"fine-tuned {self.steps} SGD steps (lr {self.learning_rate:g}, batch {self.batch_size}) on "
            f"{self.examples} sentences outside the private batch: loss {self.loss_before:.4g} -> "
            f"{self.loss_after:.4g}"
        )

    def as_environment(self) -> dict[str, str]:
        return {
            "finetune_loss_before": f"{self.loss_before:.6g}",
            "finetune_loss_after": f"{self.loss_after:.6g}",
        }


def finetune_batches(
    examples: Sequence[Example],
    exclude: Sequence[Example],
    *,
    steps: int,
    seed: int,
    batch_size: int = BATCH_SIZE,
) -> list[list[Example]]:
    """`steps` seeded batches from `examples` without any example equal to one in `exclude`: epochs
    of a seeded shuffle, reshuffled when used up."""
    if steps < 0:
        raise GradleakError(f"fine-tuning steps must be at least 0, got {steps}")
    private = set(exclude)
    pool = [e for e in examples if e not in private]
    if steps and not pool:
        raise GradleakError("no sentences outside the private batch to fine-tune on")
    size = min(batch_size, len(pool))
    rng = random.Random(seed ^ SEED_SALT)
    order: list[Example] = []
    out: list[list[Example]] = []
    for _ in range(steps):
        if len(order) < size:
            fresh = pool[:]
            rng.shuffle(fresh)
            order.extend(fresh)
        out.append(order[:size])
        del order[:size]
    return out


def _labels(victim: Victim, input_ids: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if victim.task == "lm":
        return input_ids
    if labels is None or bool(((labels < 0) | (labels >= victim.num_labels)).any()):
        raise GradleakError(f"fine-tuning needs labels in 0..{victim.num_labels - 1}")
    return labels


def _loss(victim: Victim, batch) -> torch.Tensor:
    batch = batch.to(victim.device)
    labels = _labels(victim, batch.input_ids, batch.labels)
    return victim.loss(attention_mask=batch.attention_mask, labels=labels, input_ids=batch.input_ids)


def _mean_loss(victim: Victim, batches) -> float:
    victim.model.eval()
    with torch.no_grad():
        return sum(float(_loss(victim, b)) for b in batches) / len(batches)


def finetune(
    victim: Victim,
    examples: Sequence[Example],
    *,
    exclude: Sequence[Example],
    steps: int,
    learning_rate: float,
    seed: int,
    max_length: int = 32,
    batch_size: int = BATCH_SIZE,
) -> FinetuneResult:
    """Train `victim` in place for `steps` SGD steps on batches disjoint from `exclude`."""
    if learning_rate <= 0:
        raise GradleakError(f"fine-tuning learning rate must be positive, got {learning_rate}")
    drawn = finetune_batches(examples, exclude, steps=steps, seed=seed, batch_size=batch_size)
    with_labels = victim.task == "classify"
    batches = [make_batch(b, victim.tokenizer, max_length, with_labels=with_labels) for b in drawn]
    probe = batches[:EVAL_BATCHES]
    before = _mean_loss(victim, probe) if probe else float("nan")
    params = [p for p in victim.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=learning_rate)
    victim.model.train()
    try:
        for step, batch in enumerate(batches):
            opt.zero_grad(set_to_none=True)
            loss = _loss(victim, batch)
            if not math.isfinite(loss.item()):
                raise GradleakError(f"fine-tuning diverged at step {step}: lower its learning rate")
            loss.backward()
            opt.step()
    finally:
        victim.model.eval()
        opt.zero_grad(set_to_none=True)
    after = _mean_loss(victim, probe) if probe else float("nan")
    seen = len({e for b in drawn for e in b})
    result = FinetuneResult(steps, learning_rate, batch_size, seen, before, after)
    log.info("%s", result.note())
    return result
