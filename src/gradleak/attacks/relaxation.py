"""Relaxed starts for the encoder search: a continuous relaxation of the token choice, descended by
gradient, then rounded.

Coordinate descent over whole tokens from an arbitrary start sees little of the span residual's
landscape: with most of a sequence wrong, every position's context lies far from the span and one
substitution barely moves it. Here each open position holds a distribution over its candidates
instead; its query, key and value are the distribution's mixtures of the candidates' (from the
scorer's table), so the attention contexts, and their distance to the span, are differentiable in
the distributions' logits. Adam descends the summed squared relative residuals, with an entropy
penalty that grows over the run to push each distribution towards one token; the rounded result
(each position's most likely token) starts the discrete search, which finishes what is left.

Sequences are independent here (no token is required of any of them), so a sequence of the right
length converges the same whether the other slots' lengths are right or not.
"""

from __future__ import annotations

import math

import torch

from gradleak.attacks.scorer import AttentionScorer

STEPS = 150  # Adam steps of the relaxation
RATE = 0.3  # Adam's learning rate on the logits
INIT = 0.1  # spread of the random initial logits (the restarts' diversity)
ENTROPY = 0.01  # weight of the entropy penalty at the end of the run (it grows linearly from 0)


def relaxed_start(
    scorer: AttentionScorer,
    choices: list[list[list[int]]],
    generator: torch.Generator,
) -> list[list[int]]:
    """Sequences with, at each position p of sequence i, one of choices[i][p] (a single choice is a
    fixed token): the rounding of the relaxation described in the module doc."""
    n, width = len(choices), max(len(c) for c in choices)
    most = max(len(options) for c in choices for options in c)
    scorer._ensure([(t, p) for c in choices for p, options in enumerate(c) for t in options])
    idx = torch.zeros((n, width, most), dtype=torch.long)
    valid = torch.zeros((n, width, most), dtype=torch.bool)
    for i, c in enumerate(choices):
        for p, options in enumerate(c):
            idx[i, p, : len(options)] = torch.tensor([scorer.index[(t, p)] for t in options])
            valid[i, p, : len(options)] = True
    mask = valid[..., 0]
    q_all, k_all, v_all = (m[idx] for m in scorer.f32)  # (n, L, C, d)
    comp = scorer.span.complement.to(torch.float32)
    heads = scorer.heads
    dh = q_all.shape[-1] // heads
    logits = (torch.randn((n, width, most), generator=generator) * INIT).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=RATE)
    keys = ~mask[:, None, None, :]
    with torch.enable_grad():
        for step in range(STEPS):
            w = logits.masked_fill(~valid, -1e9).softmax(dim=-1)  # (n, L, C)
            q, k, v = (
                torch.einsum("nlc,nlcd->nld", w, m).view(n, width, heads, dh).transpose(1, 2)
                for m in (q_all, k_all, v_all)
            )
            scores = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(keys, float("-inf"))
            ctx = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, width, -1)
            res = (ctx @ comp).pow(2).sum(dim=-1) / ctx.pow(2).sum(dim=-1).clamp_min(1e-30)
            entropy = -(w * (w + 1e-12).log()).sum(dim=-1)
            loss = ((res + ENTROPY * step / STEPS * entropy) * mask).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    best = logits.detach().masked_fill(~valid, -1e9).argmax(dim=-1)
    return [[c[p][int(best[i, p])] for p in range(len(c))] for i, c in enumerate(choices)]
