"""Label inference from the classification head's gradient.

With a mean cross-entropy loss the head's bias gradient is g = mean_i (p_i - y_i). At batch size
1 the true class is the one entry of g that is negative. For larger batches the class counts are
n_c = B (pbar_c - g_c), where pbar is the model's mean prediction; like LLG+ (Wainakh et al.,
2022) we estimate pbar on random token sequences, then round the counts to sum to B.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from gradleak.victims import Victim

log = logging.getLogger(__name__)


def head_parameters(victim: Victim) -> tuple[str | None, str | None]:
    """(weight name, bias name) of the last linear layer mapping to the label space."""
    head: tuple[str, nn.Linear] | None = None
    for name, module in victim.model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == victim.num_labels:
            head = (name, module)
    if head is None:
        return None, None
    name, module = head
    prefix = f"{name}." if name else ""
    return f"{prefix}weight", (f"{prefix}bias" if module.bias is not None else None)


def _mean_prediction(victim: Victim, lengths: list[int], seed: int, samples: int = 8) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    vocab = victim.model.get_input_embeddings().weight.shape[0]
    length = max(lengths)
    ids = torch.randint(0, vocab, (samples, length), generator=gen).to(victim.device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        probs = torch.softmax(victim.logits(attention_mask=mask, input_ids=ids).double(), dim=-1)
    return probs.mean(0).cpu().numpy()


def infer_labels(
    victim: Victim,
    gradients: dict[str, torch.Tensor],
    batch_size: int,
    *,
    lengths: list[int] | None = None,
    seed: int = 0,
) -> tuple[int, ...] | None:
    """The batch's labels as a sorted multiset, or None when the head's bias was not shared."""
    if victim.task != "classify":
        return None
    _, bias = head_parameters(victim)
    if bias is None or bias not in gradients:
        return None
    g = gradients[bias].detach().double().cpu().numpy()
    if batch_size == 1:
        return (int(np.argmin(g)),)
    pbar = _mean_prediction(victim, lengths or [16], seed)
    raw = batch_size * (pbar - g)
    counts = np.clip(np.floor(raw), 0, None).astype(int)
    while counts.sum() < batch_size:
        counts[int(np.argmax(raw - counts))] += 1
    while counts.sum() > batch_size:
        counts[int(np.argmax(counts - raw))] -= 1
    labels = tuple(int(c) for c, n in enumerate(counts) for _ in range(n))
    log.debug("label counts %s from bias gradient %s", counts.tolist(), g.tolist())
    return labels
