"""Gradient matching: DLG (L2), TAG (L2 + alpha L1) and the cosine attack of LAMP.

The attacker optimises dummy word embeddings (and soft labels, when it cannot infer them) so that
the gradient they produce matches the shared one; tokens are then read off as the vocabulary
entries nearest (by cosine) to the optimised embeddings. Special tokens that the tokenizer
always adds (BERT's [CLS] ... [SEP]) are known to the server and kept fixed. Parameters whose
shared gradient is identically zero are left out of the distance: the gradient of the attention
key bias, for one, is always zero (softmax is shift invariant) and would pin the cosine distance
at a floor. Where the scenario withholds the sequence lengths, they are inferred from the update
(`infer.infer_lengths`: the position-embedding gradient, the closing token's span check, the context
span's rank) and the reconstruction's notes say what was inferred.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

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
        knowledge.require(self.name, batch_size=True)
        if victim.task != "classify":
            raise Refusal(
                f"attack {self.name!r} needs a classification task; use --attack exact for --task lm"
            )
        assert knowledge.batch_size is not None
        notes: list[str] = []
        if knowledge.lengths is None:  # withheld: read off the gradients as the exact attack does
            inferred = infer_lengths(victim, update, knowledge, self.name)
            notes.append(inferred.how)
            lengths = list(inferred.lengths)
        else:
            lengths = list(knowledge.lengths)
        bsz, max_len = knowledge.batch_size, max(lengths)
        model, device, dtype = victim.model, victim.device, victim.dtype
        gen = torch.Generator().manual_seed(options.seed)

        shared = update.gradients()
        params = dict(model.named_parameters())
        names = [n for n, g in shared.items() if n in params and bool(g.abs().sum() > 0)]
        emb = model.get_input_embeddings().weight.detach()
        names = [n for n in names if params[n] is not model.get_input_embeddings().weight]
        if not names:
            raise Refusal(f"attack {self.name!r}: no usable gradient was shared")
        true = [shared[n].to(device=device, dtype=dtype) for n in names]

        labels = knowledge.labels
        if labels is None:
            labels = infer_labels(victim, shared, bsz, lengths=lengths, seed=options.seed)
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
        fixed_emb = emb[fixed_ids]
        scale = float(emb.std())
        dummy = (torch.randn(bsz, max_len, emb.shape[1], generator=gen) * scale).to(device, dtype)
        dummy.requires_grad_(True)
        mean_norm = float(emb.norm(dim=1).mean())
        keep = fixed.unsqueeze(-1)
        param_list = [params[n] for n in names]

        def objective() -> torch.Tensor:
            embeds = torch.where(keep, fixed_emb, dummy)
            target = (
                torch.softmax(soft_labels, -1)
                if soft_labels is not None
                else torch.tensor(labels, device=device)
            )
            loss = victim.loss(attention_mask=mask, labels=target, inputs_embeds=embeds)
            grads = torch.autograd.grad(loss, param_list, create_graph=True)
            value = self.distance(list(grads), true, options)
            if self.norm_regulariser:
                free = dummy[(mask.bool() & ~fixed)]
                value = value + options.norm_weight * (free.norm(dim=-1).mean() - mean_norm) ** 2
            return value

        variables = [dummy] + ([soft_labels] if soft_labels is not None else [])
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
                value = objective()
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
            if progress is not None:
                progress(step + 1, options.iterations, value)

        allowed = candidate_mask(victim.tokenizer, emb.shape[0], device)
        unit = torch.nn.functional.normalize(emb.to(dtype), dim=-1)
        sims = torch.nn.functional.normalize(best[1], dim=-1) @ unit.T
        sims[..., ~allowed] = -2.0
        nearest = sims.argmax(-1)
        token_ids = []
        for i, n in enumerate(lengths):
            row = torch.where(fixed[i], fixed_ids[i], nearest[i])[:n]
            token_ids.append([int(t) for t in row])
        out_labels = labels
        if soft_labels is not None:
            out_labels = tuple(int(c) for c in soft_labels.detach().argmax(-1))
        return Reconstruction(
            token_ids=tuple(tuple(t) for t in token_ids),
            texts=decode(victim, token_ids),
            labels=tuple(out_labels) if out_labels is not None else None,
            trace=tuple(trace),
            seconds=time.perf_counter() - start,
            notes=tuple(notes),
        )


DLG = register(GradientMatching("dlg", _l2))
TAG = register(GradientMatching("tag", _tag))
COS = register(GradientMatching("cos", _cos, norm_regulariser=True))
