"""What a federated client sends: the FedSGD gradient or the FedAvg weight delta."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

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

# ---------------------------------------------------------------- what is shared
# A client that shares only part of the model: groups select parameter names, structurally where the
# architecture allows it; any other item is an fnmatch pattern. `last:K` takes a block count.

_EMBEDDING_PATTERNS = (
    *WITHHOLD_GROUPS["embeddings"],
    *WITHHOLD_GROUPS["positions"],
    "*token_type_embeddings*",
    "*embeddings.LayerNorm*",
)


def _param_names(model: nn.Module, modules: Iterable[nn.Module]) -> list[str]:
    wanted = {id(p) for m in modules for p in m.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in wanted]


def _is_linear_map(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's Conv1D


def _attention(model: nn.Module, count: int | None) -> list[str]:
    """The linear maps inside attention modules (BERT's query/key/value/output.dense, GPT-2's
    attn.c_attn/c_proj): modules whose class name ends in `Attention`, found from the module tree."""
    attention = [m for m in model.modules() if type(m).__name__.endswith("Attention")]
    maps = [s for m in attention for s in m.modules() if _is_linear_map(s)]
    return _param_names(model, maps)


def _embeddings(model: nn.Module, count: int | None) -> list[str]:
    """Word, position and token-type embeddings and the embedding LayerNorm."""
    word = model.get_input_embeddings().weight
    return [
        n
        for n, p in model.named_parameters()
        if p is word or any(fnmatch.fnmatch(n, pat) for pat in _EMBEDDING_PATTERNS)
    ]


def _head(model: nn.Module, count: int | None) -> list[str]:
    patterns = WITHHOLD_GROUPS["head"]
    return [n for n, _ in model.named_parameters() if any(fnmatch.fnmatch(n, p) for p in patterns)]


def transformer_blocks(model: nn.Module) -> tuple[str, int]:
    """(name, length) of the model's list of layers: its longest `nn.ModuleList`
    (`bert.encoder.layer`, `transformer.h`)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise GradleakError("the model has no list of layers: last:K cannot apply")
    name, blocks = max(lists, key=lambda item: len(item[1]))
    return name, len(blocks)


def _last(model: nn.Module, count: int | None) -> list[str]:
    """The parameters of the last `count` transformer blocks."""
    assert count is not None
    name, depth = transformer_blocks(model)
    if count > depth:
        raise GradleakError(f"share last:{count}: the model has only {depth} blocks")
    prefixes = tuple(f"{name}.{i}." for i in range(depth - count, depth))
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes)]


@dataclass(frozen=True)
class ShareGroup:
    select: Callable[[nn.Module, int | None], list[str]]  # (model, K of `NAME:K`) -> parameter names
    counted: bool = False  # written NAME:K


SHARE_GROUPS: dict[str, ShareGroup] = {
    "attention": ShareGroup(_attention),
    "embeddings": ShareGroup(_embeddings),
    "head": ShareGroup(_head),
    "last": ShareGroup(_last, counted=True),
}


def parse_share(item: str) -> tuple[ShareGroup | None, int | None]:
    """(group, K) of a share item, (None, None) for an fnmatch pattern; a malformed `last:K` is a
    one-line error."""
    name, colon, arg = item.partition(":")
    group = SHARE_GROUPS.get(name)
    if group is None:
        return None, None
    if group.counted != bool(colon):
        form = f"{name}:K" if group.counted else name
        raise GradleakError(f"share {item!r}: write {form}")
    if not group.counted:
        return group, None
    if not arg.isdigit() or int(arg) < 1:
        raise GradleakError(f"share {item!r}: K must be a positive integer")
    return group, int(arg)


def resolve_shared(model: nn.Module, share: Sequence[str]) -> tuple[str, ...]:
    """Parameter names selected by share groups (attention, embeddings, head, last:K) or patterns."""
    names = [n for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    for item in share:
        group, count = parse_share(item)
        if group is not None:
            hits = group.select(model, count)
        else:
            hits = [n for n in names if fnmatch.fnmatch(n, item)]
        if not hits:
            raise GradleakError(f"share {item!r} matches no parameter; groups: {', '.join(SHARE_GROUPS)}")
        chosen.update(hits)
    return tuple(n for n in names if n in chosen)


def withheld_names(
    model: nn.Module, *, share: Sequence[str] = (), withhold: Sequence[str] = ()
) -> tuple[str, ...]:
    """What the client keeps back: with `share`, every parameter it does not select (in model order);
    then whatever `withhold` names. Sharing nothing at all is a one-line error."""
    withheld = list(resolve_withheld(model, withhold))
    if not share:
        return tuple(withheld)
    shared = set(resolve_shared(model, share))
    names = [n for n, _ in model.named_parameters()]
    out = [n for n in names if n not in shared]
    out.extend(n for n in withheld if n not in out)
    if len(out) == len(names):
        raise GradleakError(f"the client shares nothing: withhold covers all of share {list(share)}")
    return tuple(out)


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


def fedsgd(
    victim: Victim, batch: Batch, withhold: Sequence[str] = (), *, share: Sequence[str] = ()
) -> Update:
    """FedSGD: the gradient of the mean loss over the batch: only `share` (everything when empty),
    minus withheld parameter groups."""
    withheld = withheld_names(victim.model, share=share, withhold=withhold)
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
    share: Sequence[str] = (),
    local_batch: int | None = None,
) -> Update:
    """FedAvg: the weight delta after `local_steps` SGD steps (the model is restored); only `share`
    (everything when empty), minus withheld parameter groups. Each step takes the whole batch, or with
    `local_batch` the next mini-batch of that many sequences in order (as DAGER's FedAvg: an epoch is
    ceil(B / local_batch) steps). Only trainable parameters move and have a delta (as `batch_gradient`
    has their gradients only): a frozen one (the base under `--peft`) is neither sent nor copied."""
    if local_steps < 1:
        raise GradleakError(f"local steps must be at least 1, got {local_steps}")
    if learning_rate <= 0:
        raise GradleakError(f"learning rate must be positive, got {learning_rate}")
    if local_batch is not None and local_batch < 1:
        raise GradleakError(f"local mini-batch size must be at least 1, got {local_batch}")
    size = batch.size if local_batch is None else min(local_batch, batch.size)
    parts = [batch.rows(i, i + size) for i in range(0, batch.size, size)]
    withheld = withheld_names(victim.model, share=share, withhold=withhold)
    params = {k: p for k, p in victim.model.named_parameters() if p.requires_grad}
    start = {k: p.detach().clone() for k, p in params.items()}
    try:
        for step in range(local_steps):
            grads = batch_gradient(victim, parts[step % len(parts)])
            with torch.no_grad():
                for k, g in grads.items():
                    params[k].sub_(learning_rate * g)
        delta = {k: (params[k].detach() - start[k]).clone() for k in params if k not in withheld}
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(start[k])
    return Update(delta, "fedavg", learning_rate, local_steps, withheld)
