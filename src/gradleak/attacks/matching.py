"""Gradient matching: DLG (L2), TAG (L2 + alpha L1) and the cosine attack of LAMP.

The attacker optimises dummy word embeddings (and soft labels, when it cannot infer them) so that
the gradient they produce matches the shared one; tokens are then read off as the vocabulary
entries nearest (by cosine) to the optimised embeddings. Special tokens that the tokenizer
always adds (BERT's [CLS] ... [SEP]) are known to the server and kept fixed. Parameters whose
shared gradient is identically zero are left out of the distance, and so are those whose gradient
the model makes vanish whatever the input: the attention key bias's (softmax is shift invariant) is
float rounding noise, whose direction would swamp LAMP's per-tensor cosine. Where the scenario
withholds the sequence lengths, they are inferred from the update (`infer.infer_lengths`: the
position-embedding gradient, the closing token's span check, the context span's rank) and the
reconstruction's notes say what was inferred.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from gradleak.attacks.base import (
    AttackOptions,
    Knowledge,
    Progress,
    Reconstruction,
    register,
)
from gradleak.attacks.infer import infer_lengths
from gradleak.attacks.labels import infer_labels
from gradleak.attacks.tokens import candidate_mask, decode, special_template
from gradleak.client import Update
from gradleak.errors import Refusal
from gradleak.victims import Victim

log = logging.getLogger(__name__)

Distance = Callable[[list[torch.Tensor], list[torch.Tensor], AttackOptions], torch.Tensor]


def _l2(dummy: list[torch.Tensor], true: list[torch.Tensor], opts: AttackOptions) -> torch.Tensor:
    return sum(((d - t) ** 2).sum() for d, t in zip(dummy, true, strict=True))


def _tag(dummy: list[torch.Tensor], true: list[torch.Tensor], opts: AttackOptions) -> torch.Tensor:
    l1 = sum((d - t).abs().sum() for d, t in zip(dummy, true, strict=True))
    return _l2(dummy, true, opts) + opts.tag_alpha * l1


def _cos(dummy: list[torch.Tensor], true: list[torch.Tensor], opts: AttackOptions) -> torch.Tensor:
    dot = sum((d * t).sum() for d, t in zip(dummy, true, strict=True))
    nd = torch.sqrt(sum((d * d).sum() for d in dummy))
    nt = torch.sqrt(sum((t * t).sum() for t in true))
    return 1.0 - dot / (nd * nt + 1e-30)


def layerwise_cos(dummy: list[torch.Tensor], true: list[torch.Tensor], opts: AttackOptions) -> torch.Tensor:
    """LAMP's cosine distance: 1 - cos per parameter tensor, averaged over the tensors, so that small
    tensors count as much as large ones (`_cos` takes one cosine of the whole concatenated gradient,
    which the largest tensors dominate)."""
    total = sum(1.0 - (d * t).sum() / (d.norm() * t.norm() + 1e-30) for d, t in zip(dummy, true, strict=True))
    return total / len(true)


@dataclass(frozen=True)
class Matching:
    """The gradient-matching problem of one update: the shared gradients to match, the sequences'
    shape (lengths, the template's fixed special tokens) and the labels (given, inferred or optimised
    as soft labels). Dummies are (B, max length, hidden) embeddings; fixed positions ignore theirs."""

    victim: Victim
    params: tuple[torch.nn.Parameter, ...]  # the parameters whose gradients are matched
    true: tuple[torch.Tensor, ...]  # their shared gradients
    lengths: tuple[int, ...]
    labels: tuple[int, ...] | None
    soft_labels: torch.Tensor | None  # (B, labels) logits, optimised where labels are not known
    mask: torch.Tensor  # (B, L) attention mask
    fixed: torch.Tensor  # (B, L) positions of the template's special tokens
    fixed_ids: torch.Tensor  # (B, L) their ids
    embedding: torch.Tensor  # the victim's word-embedding matrix
    notes: tuple[str, ...]
    allowed: torch.Tensor  # (vocabulary,) the tokens a reconstruction may contain (`candidate_mask`)

    @property
    def mean_norm(self) -> float:
        return float(self.embedding.norm(dim=1).mean())

    def random_dummy(self, gen: torch.Generator, count: int | None = None) -> torch.Tensor:
        """Gaussian embeddings at the embedding matrix's scale: (B, L, hidden), or (count, B, L, hidden)."""
        shape = (*(() if count is None else (count,)), *self.mask.shape, self.embedding.shape[1])
        dummy = torch.randn(shape, generator=gen) * float(self.embedding.std())
        return dummy.to(self.victim.device, self.victim.dtype)

    def embeds(self, dummy: torch.Tensor) -> torch.Tensor:
        """The dummy with the template's special tokens in their fixed places."""
        return torch.where(self.fixed.unsqueeze(-1), self.embedding[self.fixed_ids], dummy)

    def gradients(self, dummy: torch.Tensor, *, create_graph: bool) -> list[torch.Tensor]:
        """The gradient the dummy batch (with the current labels) produces, of the matched parameters."""
        target = (
            torch.softmax(self.soft_labels, -1)
            if self.soft_labels is not None
            else torch.tensor(self.labels, device=self.victim.device)
        )
        loss = self.victim.loss(attention_mask=self.mask, labels=target, inputs_embeds=self.embeds(dummy))
        return list(torch.autograd.grad(loss, self.params, create_graph=create_graph))

    def norm_penalty(self, dummy: torch.Tensor) -> torch.Tensor:
        """LAMP's embedding-norm regulariser: the free positions' mean norm against the vocabulary's."""
        free = dummy[self.mask.bool() & ~self.fixed]
        return (free.norm(dim=-1).mean() - self.mean_norm) ** 2

    def nearest(self, dummy: torch.Tensor) -> torch.Tensor:
        """(B, L) ids: each free position's vocabulary entry nearest by cosine (special and placeholder
        tokens left out), the template's ids at the fixed positions."""
        unit = torch.nn.functional.normalize(self.embedding.to(dummy.dtype), dim=-1)
        sims = torch.nn.functional.normalize(dummy.detach(), dim=-1) @ unit.T
        sims[..., ~self.allowed] = -2.0
        return torch.where(self.fixed, self.fixed_ids, sims.argmax(-1))

    def token_rows(self, ids: torch.Tensor) -> list[list[int]]:
        """Each sequence's ids, cut to its length."""
        return [[int(t) for t in ids[i, :n]] for i, n in enumerate(self.lengths)]

    def current_labels(self) -> tuple[int, ...] | None:
        if self.soft_labels is not None:
            return tuple(int(c) for c in self.soft_labels.detach().argmax(-1))
        return self.labels

    def reconstruction(self, dummy: torch.Tensor, trace: list[float], start: float,
                       notes: tuple[str, ...] = ()) -> Reconstruction:  # fmt: skip
        """The tokens nearest the dummy, decoded, with the labels and the trace."""
        token_ids = self.token_rows(self.nearest(dummy))
        labels = self.current_labels()
        return Reconstruction(
            token_ids=tuple(tuple(t) for t in token_ids),
            texts=decode(self.victim, token_ids),
            labels=tuple(labels) if labels is not None else None,
            trace=tuple(trace),
            seconds=time.perf_counter() - start,
            notes=(*self.notes, *notes),
        )


def prepare(
    attack: str, victim: Victim, update: Update, knowledge: Knowledge, gen: torch.Generator
) -> Matching:
    """The matching problem of `update`: lengths and labels given or inferred, the shared gradients to
    match (those not identically zero, the word embeddings' left out), the template. Raises `Refusal`
    where the scenario does not allow gradient matching."""
    knowledge.require(attack, batch_size=True)
    if victim.task != "classify":
        raise Refusal(f"attack {attack!r} needs a classification task; use --attack exact for --task lm")
    assert knowledge.batch_size is not None
    notes: list[str] = []
    if knowledge.lengths is None:  # withheld: read off the gradients as the exact attack does
        inferred = infer_lengths(victim, update, knowledge, attack)
        notes.append(inferred.how)
        lengths = list(inferred.lengths)
    else:
        lengths = list(knowledge.lengths)
    bsz, max_len = knowledge.batch_size, max(lengths)
    model, device, dtype = victim.model, victim.device, victim.dtype

    shared = update.gradients()
    params = dict(model.named_parameters())
    names = [n for n, g in shared.items() if n in params and bool(g.abs().sum() > 0)]
    emb = model.get_input_embeddings().weight.detach()
    names = [n for n in names if params[n] is not model.get_input_embeddings().weight]
    if not names:
        raise Refusal(f"attack {attack!r}: no usable gradient was shared")
    true = tuple(shared[n].to(device=device, dtype=dtype) for n in names)

    labels = knowledge.labels
    if labels is None:
        labels = infer_labels(victim, shared, bsz, lengths=lengths, seed=int(gen.initial_seed()))
        if labels is not None:
            notes.append("labels inferred from the head's bias gradient")
    soft_labels: torch.Tensor | None = None
    if labels is None:
        soft_labels = torch.randn(bsz, victim.num_labels, generator=gen).to(device, dtype)
        soft_labels.requires_grad_(True)
        notes.append("labels optimised as soft labels")

    prefix, suffix = special_template(victim.tokenizer)
    mask = torch.zeros(bsz, max_len, dtype=torch.long, device=device)
    fixed = torch.zeros(bsz, max_len, dtype=torch.bool, device=device)
    fixed_ids = torch.zeros(bsz, max_len, dtype=torch.long, device=device)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        for k, t in enumerate(prefix):
            fixed[i, k], fixed_ids[i, k] = True, t
        for k, t in enumerate(suffix):
            fixed[i, n - len(suffix) + k], fixed_ids[i, n - len(suffix) + k] = True, t
    problem = Matching(
        victim=victim,
        params=tuple(params[n] for n in names),
        true=true,
        lengths=tuple(lengths),
        labels=None if labels is None else tuple(labels),
        soft_labels=soft_labels,
        mask=mask,
        fixed=fixed,
        fixed_ids=fixed_ids,
        embedding=emb,
        notes=tuple(notes),
        allowed=candidate_mask(victim.tokenizer, emb.shape[0], emb.device),
    )
    return _without_vanishing(problem, names, attack)


def _without_vanishing(problem: Matching, names: list[str], attack: str) -> Matching:
    """The problem without the parameters whose gradient the model makes vanish whatever the input:
    the attention key bias, for one (softmax is shift invariant), gets a gradient of float rounding
    noise (~1e-11 on bert-tiny, where every other tensor's is above 1e-5), not exactly zero. A
    cosine distance taken per tensor (`layerwise_cos`) would weigh that noise's direction as much as
    any real tensor, and its derivative, scaled by 1 / the noise's norm, would swamp the step. Found
    by a probe: the gradient of a random dummy (its own generator: the attack's random stream is
    untouched), a tensor left out where its norm is below the dtype's epsilon times the largest's."""
    probe = problem.random_dummy(torch.Generator().manual_seed(0))
    norms = [float(g.norm()) for g in problem.gradients(probe, create_graph=False)]
    floor = torch.finfo(problem.victim.dtype).eps * max(norms)
    keep = [i for i, v in enumerate(norms) if v > floor]
    if len(keep) == len(norms):
        return problem
    left_out = ", ".join(n for i, n in enumerate(names) if i not in keep)
    log.info("%s: the gradient of %s vanishes whatever the input: left out", attack, left_out)
    if not keep:
        raise Refusal(f"attack {attack!r}: no usable gradient was shared")
    return replace(
        problem, params=tuple(problem.params[i] for i in keep), true=tuple(problem.true[i] for i in keep)
    )


StepHook = Callable[[int, torch.Tensor], None]  # (step, dummy): may change the dummy in place


def optimise(
    problem: Matching,
    dummy: torch.Tensor,
    objective: Callable[[torch.Tensor], torch.Tensor],
    options: AttackOptions,
    progress: Progress | None = None,
    after_step: StepHook | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Descend `objective(dummy)` (and the soft labels, where they are optimised) for
    `options.iterations` steps, the learning rate halved at 50, 75 and 90 % of the run; `after_step`
    runs after each step. Returns the dummy of the lowest objective seen and the objective's trace."""
    dummy.requires_grad_(True)
    variables = [dummy] + ([problem.soft_labels] if problem.soft_labels is not None else [])
    trace: list[float] = []
    best = (float("inf"), dummy.detach().clone())
    if options.optimizer == "lbfgs":
        opt: torch.optim.Optimizer = torch.optim.LBFGS(variables, lr=options.learning_rate * 100)
    else:
        opt = torch.optim.Adam(variables, lr=options.learning_rate)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[int(options.iterations * f) for f in (0.5, 0.75, 0.9)], gamma=0.5
    )
    for step in range(options.iterations):

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = objective(dummy)
            # only the dummies' gradients: value.backward() would also write .grad into the
            # victim's parameters (a second backward through the double-backward graph, and
            # state left on a model the caller may share)
            for var, grad in zip(variables, torch.autograd.grad(value, variables), strict=True):
                var.grad = grad
            return value

        value = float(opt.step(closure).detach())
        sched.step()
        trace.append(value)
        if value < best[0]:
            best = (value, dummy.detach().clone())
        if after_step is not None:
            after_step(step, dummy)
        if progress is not None:
            progress(step + 1, options.iterations, value)
    return best[1], trace


@dataclass(frozen=True)
class GradientMatching:
    name: str
    distance: Distance
    norm_regulariser: bool = False

    def reconstruct(
        self,
        victim: Victim,
        update: Update,
        knowledge: Knowledge,
        options: AttackOptions,
        progress: Progress | None = None,
    ) -> Reconstruction:
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(options.seed)
        problem = prepare(self.name, victim, update, knowledge, gen)

        def objective(dummy: torch.Tensor) -> torch.Tensor:
            value = self.distance(problem.gradients(dummy, create_graph=True), list(problem.true), options)
            if self.norm_regulariser:
                value = value + options.norm_weight * problem.norm_penalty(dummy)
            return value

        best, trace = optimise(problem, problem.random_dummy(gen), objective, options, progress)
        return problem.reconstruction(best, trace, start)


DLG = register(GradientMatching("dlg", _l2))
TAG = register(GradientMatching("tag", _tag))
COS = register(GradientMatching("cos", _cos, norm_regulariser=True))
