"""Language modelling: the last token of each sequence, which only the output layer sees.

Under the next-token loss the last position of a sequence predicts nothing, so its token leaves no
trace in the first layers' gradients (no span check can find it) and the prefix assembly stops one
token short. It is the *target* of the position before it, though, and targets enter the output
layer's weight gradient: for a mean cross-entropy over N predicting positions,

    dL/dW_out = (1/N) sum_i (softmax_i - onehot(y_i)) h_i^T,

with h_i the last hidden state at position i. Given the recovered prefixes, a forward pass gives
every h_i and softmax_i (the causal mask makes them independent of the unknown last tokens), so the
softmax part and the known targets' part can be subtracted; what remains is -(1/N) h_last(b) in the
row of each sequence b's last token (plus, where the output layer is tied to the input embedding,
the input-embedding gradient in the rows of tokens that occur as inputs). Each sequence's last
token is the row that this term explains best, taken greedily (two sequences may end in the same
token: their terms add up in one row).
"""

from __future__ import annotations

import logging

import torch

from gradleak.attacks.context import pad
from gradleak.victims import Victim

log = logging.getLogger(__name__)


def output_weight_name(victim: Victim) -> str | None:
    out = victim.model.get_output_embeddings()
    if out is None:
        return None
    weight = out.weight
    return next((n for n, p in victim.model.named_parameters() if p is weight), None)


def append_final_tokens(
    victim: Victim, grads: dict[str, torch.Tensor], prefixes: list[list[int]]
) -> tuple[list[list[int]], str]:
    """The prefixes, each completed by the token its output-layer term explains best; and a note.
    Prefixes are returned unchanged where the output layer's gradient is not shared."""
    name = output_weight_name(victim)
    if victim.task != "lm" or not prefixes or name is None or name not in grads:
        return prefixes, "output-layer gradient not shared: each sequence's last token is not recovered"
    head = victim.model.get_output_embeddings()
    hidden: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, a: hidden.append(a[0].detach()))
    ids, mask = pad(victim, prefixes)
    try:
        with torch.no_grad():
            logits = victim.logits(attention_mask=mask, input_ids=ids)
    finally:
        handle.remove()
    h = hidden[0].double()  # (B, L, d)
    probs = torch.softmax(logits.double(), dim=-1)  # (B, L, V)
    lengths = [len(p) for p in prefixes]
    n = sum(lengths)  # predicting positions of the true sequences: each prefix position predicts one
    valid = mask.bool()
    g = grads[name].detach().double().to(h.device)
    rest = g - torch.einsum("blv,bld->vd", probs * valid[..., None], h) / n
    for b, seq in enumerate(prefixes):  # the known targets: position i predicts seq[i + 1]
        for i in range(len(seq) - 1):
            rest[seq[i + 1]] -= h[b, i] / n
    lasts = torch.stack([h[b, length - 1] / n for b, length in enumerate(lengths)])  # (B, d)
    chosen: list[int | None] = [None] * len(prefixes)
    _clean_rows(rest, lasts, chosen)
    open_ = {b for b, t in enumerate(chosen) if t is None}
    while open_:  # the rest (a last token that also occurs as an input): the best gain in squared norm
        order = sorted(open_)
        term = lasts[order]  # (k, d): row t holds -term for the sequence ending in t
        gain = -2.0 * rest @ term.T - term.pow(2).sum(-1)  # (V, k)
        t, k = divmod(int(torch.argmax(gain)), len(order))
        chosen[order[k]] = t
        rest[t] += lasts[order[k]]
        open_.discard(order[k])
    out = [seq + [int(t)] for seq, t in zip(prefixes, chosen, strict=True)]
    return out, "last tokens from the output layer's gradient (the targets of each sequence's last position)"


def _clean_rows(rest: torch.Tensor, lasts: torch.Tensor, chosen: list[int | None]) -> None:
    """Rows that are exactly a sum of some sequences' -h_last/N (a last token that occurs nowhere as
    an input): least squares over the B terms fits them with coefficients 0 or 1 and no remainder.
    Assigns those sequences in `chosen` and removes their terms from `rest` (in place)."""
    norms = rest.norm(dim=1)
    floor = FLOOR * float(lasts.norm(dim=1).min())
    rows = torch.nonzero(norms > floor).flatten()
    if len(rows) == 0:
        return
    sub = -rest[rows]  # (k, d) = C @ lasts for the clean rows
    coeffs = torch.linalg.lstsq(lasts.T, sub.T).solution.T  # (k, B)
    fit = (sub - coeffs @ lasts).norm(dim=1) / sub.norm(dim=1)
    ones = (coeffs - 1.0).abs() < COEFF_TOL
    zeros = coeffs.abs() < COEFF_TOL
    clean = (fit < FIT_TOL) & (ones | zeros).all(dim=1) & ones.any(dim=1)
    for k in torch.nonzero(clean).flatten().tolist():
        t = int(rows[k])
        for b in torch.nonzero(ones[k]).flatten().tolist():
            if chosen[b] is None:
                chosen[b] = t
                rest[t] += lasts[b]


FLOOR = 0.1  # rows below this fraction of the smallest term are rounding, not a target
FIT_TOL = 0.05  # a clean row is fitted by the terms to this relative remainder
COEFF_TOL = 0.1  # ... with coefficients this close to 0 or 1
