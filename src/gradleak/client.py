"""What a federated client sends: the FedSGD gradient or the FedAvg weight delta."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from gradleak.data import Batch
from gradleak.errors import GradleakError
from gradleak.victims import Victim

log = logging.getLogger(__name__)

# Named groups a client may withhold; patterns match parameter names (fnmatch).
WITHHOLD_GROUPS: dict[str, tuple[str, ...]] = {
    "embeddings": ("*word_embeddings*", "*wte*", "*embed_tokens*"),
    "positions": ("*position_embeddings*", "*wpe*"),
    "head": ("classifier*", "score*", "lm_head*", "*pooler*"),
}


@dataclass(frozen=True)
class Update:
    """What the server receives. `tensors` are gradients (FedSGD) or weight deltas (FedAvg)."""

    tensors: Mapping[str, torch.Tensor]
    kind: str = "fedsgd"  # "fedsgd" or "fedavg"
    learning_rate: float = 1.0
    local_steps: int = 1
    withheld: tuple[str, ...] = field(default=())

    def gradients(self) -> dict[str, torch.Tensor]:
        """The update as a gradient: FedSGD as is, FedAvg as -delta / (lr * steps)."""
        if self.kind == "fedsgd":
            return dict(self.tensors)
        scale = -1.0 / (self.learning_rate * self.local_steps)
        return {k: v * scale for k, v in self.tensors.items()}

    def replace(self, tensors: Mapping[str, torch.Tensor]) -> Update:
        return Update(dict(tensors), self.kind, self.learning_rate, self.local_steps, self.withheld)


def resolve_withheld(model: torch.nn.Module, withhold: Sequence[str]) -> tuple[str, ...]:
    """Parameter names covered by group names (`embeddings`, ...) or fnmatch patterns."""
    names = [n for n, _ in model.named_parameters()]
    out: list[str] = []
    for item in withhold:
        patterns = WITHHOLD_GROUPS.get(item, (item,))
        hits = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
        if not hits:
            raise GradleakError(
                f"withhold {item!r} matches no parameter; groups: {', '.join(WITHHOLD_GROUPS)}"
            )
        out.extend(h for h in hits if h not in out)
    return tuple(out)


def _check_labels(victim: Victim, batch: Batch) -> torch.Tensor:
    if victim.task == "lm":
        return batch.input_ids
    if batch.labels is None:
        raise GradleakError("classification needs labelled data")
    bad = (batch.labels < 0) | (batch.labels >= victim.num_labels)
    if bool(bad.any()):
        raise GradleakError(f"labels must lie in 0..{victim.num_labels - 1} for victim {victim.name}")
    return batch.labels


def batch_gradient(victim: Victim, batch: Batch) -> dict[str, torch.Tensor]:
    """Gradients of the victim's mean loss over the batch, for every trainable parameter."""
    batch = batch.to(victim.device)
    labels = _check_labels(victim, batch)
    params = [(n, p) for n, p in victim.model.named_parameters() if p.requires_grad]
    loss = victim.loss(attention_mask=batch.attention_mask, labels=labels, input_ids=batch.input_ids)
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    out = {}
    for (name, p), g in zip(params, grads, strict=True):
        out[name] = torch.zeros_like(p) if g is None else g.detach()
    if not all(torch.isfinite(g).all() for g in out.values()):
        raise GradleakError("the client's gradient contains NaN or infinite values")
    return out


def fedsgd(victim: Victim, batch: Batch, withhold: Sequence[str] = ()) -> Update:
    """FedSGD: the gradient of the mean loss over the batch, minus withheld parameter groups."""
    withheld = resolve_withheld(victim.model, withhold)
    grads = batch_gradient(victim, batch)
    tensors = {k: v for k, v in grads.items() if k not in withheld}
    return Update(tensors, "fedsgd", 1.0, 1, withheld)


def fedavg(
    victim: Victim,
    batch: Batch,
    *,
    local_steps: int,
    learning_rate: float,
    withhold: Sequence[str] = (),
) -> Update:
    """FedAvg: the weight delta after `local_steps` full-batch SGD steps (the model is restored)."""
    if local_steps < 1:
        raise GradleakError(f"local steps must be at least 1, got {local_steps}")
    if learning_rate <= 0:
        raise GradleakError(f"learning rate must be positive, got {learning_rate}")
    withheld = resolve_withheld(victim.model, withhold)
    params = dict(victim.model.named_parameters())
    start = {k: p.detach().clone() for k, p in params.items()}
    try:
        for _ in range(local_steps):
            grads = batch_gradient(victim, batch)
            with torch.no_grad():
                for k, g in grads.items():
                    params[k].sub_(learning_rate * g)
        delta = {k: (params[k].detach() - start[k]).clone() for k in params if k not in withheld}
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(start[k])
    return Update(delta, "fedavg", learning_rate, local_steps, withheld)
