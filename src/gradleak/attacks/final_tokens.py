"""Language modelling: the last token of each sequence, which only the output layer sees.

Under the next-token loss the last position of a sequence predicts nothing, so its token leaves no
trace in the first layers' gradients (no span check can find it) and the prefix assembly stops one
token short. It is the *target* of the position before it, though. With the prefixes recovered,
every part of the client's loss that does not depend on the unknown last tokens y_b can be
recomputed and its gradient taken with respect to the output weight: the known targets' terms, and
the log-sum-exp of each last predicting position. What remains of the shared gradient is, for a
mean over N predicting positions,

    -(1/N) sum_b [ onehot(y_b) h_b^T + (the input-side gradient of <h_b, W_out[y_b]>) ],

with h_b the last hidden state of sequence b. The first part puts -h_b/N in row y_b; the second
lives only in the rows of input tokens (where the output layer is tied to the input embedding) and
is small. A row that least squares over the B terms fits with coefficients 0 and 1 is the last
token of the sequences with coefficient 1 (several sequences may end in the same token); what is
left is assigned by the largest gain in squared norm.
"""

from __future__ import annotations

import torch

from gradleak.attacks.context import pad
from gradleak.victims import Victim


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
    weight = victim.model.get_parameter(name)
    head = victim.model.get_output_embeddings()
    hidden: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, a: hidden.append(a[0]))
    ids, mask = pad(victim, prefixes)
    lengths = [len(p) for p in prefixes]
    n = sum(lengths)  # predicting positions of the true sequences: each prefix position predicts one
    try:
        with torch.enable_grad():
            logits = victim.logits(attention_mask=mask, input_ids=ids)
            targets = n - len(prefixes)  # the known targets: position i of a prefix predicts i + 1
            known = victim.loss(attention_mask=mask, labels=ids, input_ids=ids) * targets if targets else 0.0
            lasts_lse = sum(torch.logsumexp(logits[b, k - 1], -1) for b, k in enumerate(lengths))
            # everything of the loss that does not depend on the unknown last tokens, as the client's
            # mean over n predicting positions: the known targets' terms and the last positions' softmax
            (fixed,) = torch.autograd.grad((known + lasts_lse) / n, [weight])
    finally:
        handle.remove()
    h = hidden[0].detach().double()
    rest = grads[name].detach().double().to(h.device) - fixed.detach().double()
    lasts = torch.stack([h[b, length - 1] / n for b, length in enumerate(lengths)])  # (B, d)
    chosen: list[int | None] = [None] * len(prefixes)
    _clean_rows(rest, lasts, chosen, FIT_TOL, COEFF_TOL)
    # a last token that also occurs as an input: its row adds that input's embedding gradient, which
    # the terms do not fit, but their coefficients still come out near 0 and 1
    if any(t is None for t in chosen):
        _clean_rows(rest, lasts, chosen, float("inf"), LOOSE_COEFF_TOL)
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


def _clean_rows(
    rest: torch.Tensor, lasts: torch.Tensor, chosen: list[int | None], fit_tol: float, coeff_tol: float
) -> None:
    """Rows that are exactly a sum of some sequences' -h_last/N (a last token that occurs nowhere as
    an input): least squares over the B terms fits them with coefficients 0 or 1 and no remainder
    (within `fit_tol` and `coeff_tol`), rows that come closest to 0 and 1 first. Assigns those sequences
    in `chosen` and removes their terms from `rest` (in place)."""
    norms = rest.norm(dim=1)
    floor = FLOOR * float(lasts.norm(dim=1).min())
    rows = torch.nonzero(norms > floor).flatten()
    if len(rows) == 0:
        return
    sub = -rest[rows]  # (k, d) = C @ lasts for the clean rows
    coeffs = torch.linalg.lstsq(lasts.T, sub.T).solution.T  # (k, B)
    fit = (sub - coeffs @ lasts).norm(dim=1) / sub.norm(dim=1)
    open_ = torch.tensor([t is None for t in chosen])
    ones = ((coeffs - 1.0).abs() < coeff_tol) & open_
    zeros = coeffs.abs() < coeff_tol
    clean = (fit < fit_tol) & (ones | zeros).all(dim=1) & ones.any(dim=1)
    off = (coeffs - coeffs.round()).abs().amax(dim=1)
    for k in sorted(torch.nonzero(clean).flatten().tolist(), key=lambda k: float(off[k])):
        t = int(rows[k])
        for b in torch.nonzero(ones[k]).flatten().tolist():
            if chosen[b] is None:
                chosen[b] = t
                rest[t] += lasts[b]


FLOOR = 0.1  # rows below this fraction of the smallest term are rounding, not a target
FIT_TOL = 0.05  # a clean row is fitted by the terms to this relative remainder
COEFF_TOL = 0.1  # ... with coefficients this close to 0 or 1
LOOSE_COEFF_TOL = 0.25  # rows that also hold an input's gradient: coefficients alone, this close
