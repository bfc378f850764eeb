"""The first attention's input subspace as a term of gradient matching (`lamp-span`).

A linear map applied token-wise has the weight gradient sum_i delta_i x_i^T, so the rows of the
first attention's query/key/value gradients span the inputs x_i of the private tokens (`spans`).
Gradient matching by distance sees little of that: the gradient's singular values fall steeply
(bert-tiny, an 18-token CoLA sentence: the first query's second is 3.4e-2 of its first, the next
sixteen 6e-4 to 2e-5, the span's edge at 3e-8; `tests/test_subspace.py`), so a dummy whose inputs
leave the span in the small directions moves a cosine or L2 distance by about the squares of those
ratios. The continuous optimum of `lamp` then matches the gradient while several tokens are wrong
(a mixture of embeddings that only the small directions would tell apart: CoLA seed 108 in the same
test, where `lamp` falls short and `lamp-span` recovers the sentence).

This term is the mean over the dummy's free positions of the squared relative distance of their
first-attention inputs to that span: 0 at the private tokens whatever the singular values, 0.42
at random tokens in their places (bert-tiny, 18 tokens: the positions' embeddings lie in the span;
`tests/test_subspace.py`). It is the idea issue 20 cites from TIGER (Kalikman et al., 2026:
optimise token embeddings against the attention-gradient subspace; its code not read here) added to
LAMP's objective; DAGER (Petrov et al., 2024) tests discrete candidates against the same span.

The term is left out, and the reconstruction's notes say so, where the span carries nothing the
distance lacks: a clean update whose span fills the width (batch tokens >= the width), and a
perturbed one. Under noise only the directions above the noise bulk are known, and a true token's
input has parts below it, so a term against that span (`spans.weighted_span_of`'s, as
`exact-robust` reads it) pulls the inputs into too few directions: on bert-tiny, CoLA, B = 1, it
lowered ROUGE-1 from `lamp`'s 84.4 to 50.0 at sigma 1e-6 and from 50.0 to 20.0 at 1e-5 (sections
`noise_lamp_span`, run at commit 5ccc4d0, and `noise_lamp_small` of benchmarks/RESULTS.md: `python
benchmarks/noise.py --victims bert-tiny --attacks lamp-span --data cola --batch-sizes 1 --sigmas
1e-6,1e-5 --multipliers '' --tag-batches 2 --tag-iterations 300 --threads 1`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradleak.attacks.base import Knowledge
from gradleak.attacks.matching import Matching
from gradleak.attacks.spans import span_of
from gradleak.attacks.structure import gradient_rows, input_views, pick_view, stop_module
from gradleak.client import Update


class _Stop(Exception):
    """Raised by the hook once the first attention's input is captured: the rest of the pass is not needed."""


@dataclass(frozen=True)
class SpanTerm:
    module: nn.Module  # where the first attention's input is captured (its query/key/value read it)
    basis: torch.Tensor  # (width, rank) orthonormal

    def inputs(self, problem: Matching, dummy: torch.Tensor) -> torch.Tensor:
        """(B, L, width): the first attention's inputs for the dummy, differentiable in it."""
        captured: list[torch.Tensor] = []

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _Stop

        victim = problem.victim
        handle = self.module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            inputs = victim.model_inputs(attention_mask=problem.mask, inputs_embeds=problem.embeds(dummy))
            victim.model(**inputs)
        except _Stop:
            pass
        finally:
            handle.remove()
        return captured[0]

    def __call__(self, problem: Matching, dummy: torch.Tensor) -> torch.Tensor:
        """The mean over free positions of 1 - |basis^T x|^2 / |x|^2 (the squared relative distance)."""
        x = self.inputs(problem, dummy)[problem.mask.bool() & ~problem.fixed]
        inside = (x @ self.basis.to(x.dtype)).pow(2).sum(-1)
        return (1.0 - inside / x.pow(2).sum(-1).clamp_min(1e-30)).mean()


def span_term(problem: Matching, update: Update, knowledge: Knowledge) -> tuple[SpanTerm | None, str]:
    """The term for this problem's update and a note saying what it reads, or None and a note saying
    why it is left out (a perturbed update, or a clean one whose first-layer span fills the width).
    Raises `Refusal` (from `structure`) for a model whose first attention it cannot find."""
    if knowledge.perturbed:
        return None, "span term off: the update is perturbed (the span's weak directions are under the noise)"
    victim = problem.victim
    grads = update.gradients()
    view = pick_view(grads, input_views(victim, 0))
    if any(p.reads is not None or p.name not in grads for p in view):
        return None, "span term off: the first attention's input shows in no shared gradient"
    span = span_of(gradient_rows(grads, view))
    if span.full:
        return None, f"span term off: the first layer's gradient spans its whole width ({span.dim})"
    note = f"span term: first-attention inputs against the gradient's span (rank {span.rank}/{span.dim})"
    basis = span.basis.to(device=victim.device, dtype=victim.dtype)
    return SpanTerm(stop_module(victim, view[0]), basis), note
