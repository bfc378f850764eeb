"""Sequence lengths the server infers from the update, for attacks that need them (gradient matching)
when the scenario withholds them: the exact attack's reading of the gradients, without its search.

- The longest length: the last non-zero row of the position-embedding gradient (positions no token
  reached get no gradient). At batch size 1 that is the length, exactly.
- Possible lengths (encoders whose template closes with a special token, BERT's [SEP]): the
  positions where the embedding gradients place the closing token (`occurrences.resolve`, where the
  word-embedding gradient is shared), and those where the closing token's first-layer input lies in
  the span of the first layer's attention-projection gradients (where that span has a clean rank),
  as in the exact attack.
- The batch's token count: the rank of the gradient of the first attention's output projection,
  which reads one distinct context per token (encoders); in a decoder, tokens with the same prefix
  share a context, so the rank is a lower bound there.

From these, B lengths: every possible length once (the longest always), the remaining slots at the
shortest possible length, raised towards the token count where it shows (`lengths._fill`), else
left at the shortest length found (as the exact attack's length model does); the note says which.
Where more lengths show than there are sequences, those the embedding gradients place come first
(the span check lets near-combinations through). Where not even the longest shows (no
position-embedding gradient, or no batch size), the lengths cannot be inferred: a `Refusal`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from gradleak.attacks.base import Knowledge
from gradleak.attacks.exact import _threshold, occupied_positions, position_candidates, token_set
from gradleak.attacks.lengths import _fill
from gradleak.attacks.occurrences import resolve
from gradleak.attacks.spans import span_of
from gradleak.attacks.structure import (
    attention_projections,
    context_projections,
    gradient_rows,
    is_causal,
    mixing_projections,
)
from gradleak.attacks.tokens import special_template
from gradleak.client import Update
from gradleak.errors import Refusal
from gradleak.victims import Victim

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferredLengths:
    lengths: tuple[int, ...]  # per sequence, specials included, longest first
    exact: bool  # every length is read off the gradients (not filled in by an assumption)
    how: str  # one line for the reconstruction's notes


def infer_lengths(victim: Victim, update: Update, knowledge: Knowledge, attack: str = "") -> InferredLengths:
    """B sequence lengths (specials included) as well as the update's structure shows them; the given
    ones where the scenario gives them. Raises `Refusal` where they cannot be inferred."""
    who = f"attack {attack!r}" if attack else "the attack"
    if knowledge.lengths is not None:
        return InferredLengths(tuple(knowledge.lengths), True, "sequence lengths given")
    if knowledge.batch_size is None:
        raise Refusal(f"{who} needs the sequence lengths, which this scenario withholds, and cannot infer "
                      "them without the batch size")  # fmt: skip
    bsz = knowledge.batch_size
    grads = update.gradients()
    longest = occupied_positions(victim, grads, noisy=knowledge.perturbed)
    prefix, suffix = special_template(victim.tokenizer)
    shortest = max(1, len(prefix) + len(suffix))
    source = "the position-embedding gradient"
    if longest is None and not knowledge.perturbed:  # positions withheld: where the closing token shows
        try:
            limit = victim.model.config.max_position_embeddings
            longest = max(_closing_ends(victim, update, grads, shortest, limit, suffix), default=None)
            source = "the closing token's span check"
        except Refusal as exc:
            log.debug("no span check for the longest length: %s", exc)
    if not longest:
        raise Refusal(
            f"{who} needs the sequence lengths, which this scenario withholds, and they cannot be inferred "
            "from this update: no position-embedding gradient or closing token shows the occupied positions"
        )
    if bsz == 1:
        how = f"length inferred from {source}: {longest} (batch size 1: exact)"
        return InferredLengths((longest,), True, how)
    ends, certain, total, causal = _ends_and_total(
        victim, update, grads, longest, shortest, suffix, knowledge.perturbed
    )
    if total is not None and total < longest + (bsz - 1) * shortest:
        total = None  # fewer than the batch's template tokens: the rank is not the token count
    possible = sorted(ends) if ends else list(range(shortest, longest + 1))
    ranked = sorted(ends, key=lambda n: (n != longest, n not in certain, -n))  # the longest, placed ones
    lower = sorted(ranked[:bsz], reverse=True) if ends else [longest]
    seen = f"possible lengths {sorted(ends)}" if ends else f"longest {longest}"
    if total is not None and total >= sum(lower) and not causal:
        lengths = _fill(lower, bsz, total, possible, [longest], [0] * longest, [False] * longest)
        exact = len(ends) == bsz and sum(ends) == total
        how = f"{seen}, {total} tokens in all"
    elif total is not None and causal:
        # a decoder's rank counts distinct prefixes: at least the token count; spread over the rest
        rest = max(0, total - longest)
        each = min(longest, max(shortest, round(rest / (bsz - 1))))
        lengths = sorted([*lower, *([each] * (bsz - len(lower)))], reverse=True)
        exact = False
        how = f"{seen}, at least {total} tokens in all (distinct prefixes), the rest spread evenly"
    else:
        fill = min(lower)
        lengths = sorted([*lower, *([fill] * (bsz - len(lower)))], reverse=True)
        exact = len(ends) == bsz
        if exact:
            how = f"{seen}: one per sequence"
        elif len(ends) > bsz:
            how = f"{seen}: more than sequences, the longest and those the embedding gradients place kept"
        else:
            how = f"{seen}; no token count shows, the other {bsz - len(lower)} set to the shortest ({fill})"
    lengths = sorted(lengths, reverse=True)[:bsz]
    return InferredLengths(
        tuple(lengths), exact, f"lengths inferred from the gradients: {list(lengths)} ({how})"
    )


def _closing_ends(
    victim: Victim,
    update: Update,
    grads: dict[str, torch.Tensor],
    shortest: int,
    longest: int,
    suffix: tuple[int, ...],
) -> set[int]:
    """Lengths n in shortest..longest whose closing token at position n - 1 passes the first layer's
    span check (none where the template has no closing token or the span has no clean rank)."""
    first = attention_projections(victim, 0)
    if not suffix or not all(p.name in grads for p in first):
        return set()
    span = span_of(gradient_rows(grads, first))
    if span.full:
        return set()
    close = torch.tensor([suffix[-1]])
    threshold = _threshold(update)
    return {
        p + 1
        for p in range(shortest - 1, longest)
        if len(position_candidates(victim, first[0], span, close, p, threshold)[0])
    }


def _ends_and_total(
    victim: Victim,
    update: Update,
    grads: dict[str, torch.Tensor],
    longest: int,
    shortest: int,
    suffix: tuple[int, ...],
    noisy: bool,
) -> tuple[set[int], set[int], int | None, bool]:
    """Lengths a sequence may have (where the embedding gradients place the closing token: also
    returned apart, as certain; or where it passes the first layer's span check), the rank of the
    first attention's context gradient (None where it has no clean rank), and whether the model is
    causal."""
    causal = False
    ends: set[int] = {longest} if suffix else set()
    certain: set[int] = set()
    total = None
    if noisy:  # noise hides the spans' edges: the longest length only
        return ends, certain, total, causal
    try:
        causal = is_causal(victim)
        pool = None if causal else token_set(victim, grads)
        if suffix and pool is not None:  # the embedding gradients place the closing tokens
            occ = resolve(victim, grads, pool, longest)
            if occ is not None:
                certain = {p + 1 for p in range(shortest - 1, longest) if suffix[-1] in occ.pinned[p]}
                ends |= certain
        ends |= _closing_ends(victim, update, grads, shortest, longest, suffix)
        group = mixing_projections(victim, 0)
        if not all(p.name in grads for p in group):
            group = context_projections(victim, 0)
        if all(p.name in grads for p in group):
            context = span_of(gradient_rows(grads, group))
            total = None if context.full else context.rank
    except Refusal as exc:  # a model whose structure the span checks do not understand
        log.debug("no span checks for the lengths: %s", exc)
    return ends, certain, total, causal
