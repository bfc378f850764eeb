"""Sentences that are prefixes of other sentences of the batch, which a decoder's span checks cannot
see: under a causal mask every layer input of "chris was handed" is also one of "chris was handed
sandy a note", so prefix-by-prefix assembly finds only the longer one.

A sequence classifier reads only its pooled (last) position. In the last block nothing after the
MLP reads a position but the head, so the MLP's weight gradient holds the MLP inputs of the pooled
positions only: one row per sequence, a span of rank at most the batch size. A prefix of a recovered
sentence that is itself a sentence of the batch has its last MLP input in that span; a prefix that
is not, generically not. Language models, whose loss reads every position, fill that span with every
token's row, and the check declines them.
"""

from __future__ import annotations

import logging

import torch

from gradleak.attacks.context import pad
from gradleak.attacks.spans import residual, span_of
from gradleak.attacks.structure import capture_input, context_projections, gradient_rows, layer_blocks
from gradleak.errors import Refusal
from gradleak.victims import Victim

log = logging.getLogger(__name__)


def hidden_prefixes(
    victim: Victim,
    grads: dict[str, torch.Tensor],
    seqs: list[list[int]],
    missing: int,
    threshold: float,
) -> list[list[int]]:
    """Up to `missing` proper prefixes of `seqs` whose last position's input to the last block's MLP
    lies in the span of that MLP's weight gradient (best first); none where the span holds more
    rows than the batch's pooled positions, or the gradient is not shared."""
    if missing < 1 or not seqs:
        return []
    last = len(layer_blocks(victim.model)) - 1
    try:
        group = context_projections(victim, last)
    except Refusal:  # no map after the last attention trains (LoRA on the attention only)
        return []
    if any(p.name not in grads for p in group):
        return []
    span = span_of(gradient_rows(grads, group))
    if span.full or span.rank > len(seqs) + missing:
        return []  # every position reaches the loss (a language model): no end check
    found = {tuple(s) for s in seqs}
    trial = sorted({tuple(s[:k]) for s in seqs for k in range(1, len(s))} - found)
    if not trial:
        return []
    ids, mask = pad(victim, [list(t) for t in trial])
    x = capture_input(victim, group[0], ids, attention_mask=mask).cpu()
    ends = torch.tensor([len(t) - 1 for t in trial])
    res = residual(span, x[torch.arange(len(trial)), ends])
    order = [k for k in torch.argsort(res).tolist() if float(res[k]) < threshold][:missing]
    if order:
        log.info("%d sentence(s) found as prefixes of others by the pooled-position check", len(order))
    return [list(trial[k]) for k in order]
