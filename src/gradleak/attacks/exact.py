"""Exact recovery from the structure of transformer gradients (the idea of DAGER, Petrov et al.,
NeurIPS 2024), for decoders and encoders, with labels, lengths and batch contents unknown.

1. Token set: the non-zero rows of the word-embedding gradient, when it is shared (and sparse).
2. Occupied positions: the non-zero rows of the position-embedding gradient.
3. Span checks: the first layer's attention projections (query/key/value) have weight gradients
   whose rows span the layer inputs that occurred; a candidate (token, position) passes when its
   layer input lies in that span.
4. Assembly: decoders grow prefixes position by position; the causal mask makes the second
   layer's input at a position a function of the prefix alone, so the second layer's span
   separates true prefixes from false ones. Encoders assign the per-position candidates to
   sequences by a search (greedy prefixes, then coordinate descent with Hungarian assignment at
   each position) on the second layer's span residual of whole sequences.
5. Labels: with the sequences known, the head's weight gradient is a linear function of the
   per-example (p_i - y_i), which least squares recovers exactly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from gradleak.attacks.base import AttackOptions, Knowledge, Progress, Reconstruction, register
from gradleak.attacks.labels import head_parameters, infer_labels
from gradleak.attacks.matching import decode, special_template
from gradleak.attacks.spans import Span, residual, span_of
from gradleak.attacks.structure import (
    Projection,
    attention_projections,
    capture_input,
    context_projections,
    gradient_rows,
    position_embedding,
    word_embedding_name,
)
from gradleak.client import Update
from gradleak.errors import GradleakError
from gradleak.victims import Victim

log = logging.getLogger(__name__)

ACCEPT = 1e-3  # relative span residual under which a candidate counts as present (float64 updates)
ACCEPT_FLOAT32 = 2e-2  # the same for updates computed in float32
CHUNK = 4096
MAX_PREFIXES = 2048


@dataclass(frozen=True)
class Candidates:
    """Per occupied position: candidate token ids and their first-layer span residuals."""

    tokens: list[torch.Tensor]
    scores: list[torch.Tensor]


def _threshold(update: Update) -> float:
    dtype = next(iter(update.tensors.values())).dtype
    return ACCEPT if dtype == torch.float64 else ACCEPT_FLOAT32


def token_set(victim: Victim, grads: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Token ids with a non-zero word-embedding gradient, or None if it is withheld or dense."""
    name = word_embedding_name(victim.model)
    if name not in grads:
        return None
    rows = grads[name].detach().abs().sum(dim=1)
    present = torch.nonzero(rows > 0).flatten().cpu()
    if len(present) == 0 or len(present) > rows.numel() // 2:
        return None  # tied with the output layer (language modelling): not informative
    return present


def occupied_positions(victim: Victim, grads: dict[str, torch.Tensor]) -> int | None:
    found = position_embedding(victim.model)
    if found is None:
        return None
    name = f"{found[0]}.weight"
    if name not in grads:
        return None
    rows = torch.nonzero(grads[name].detach().abs().sum(dim=1) > 0).flatten()
    return int(rows.max()) + 1 if len(rows) else 0


def _layer_inputs(victim: Victim, probe: Projection, tokens: torch.Tensor, position: int) -> torch.Tensor:
    out = []
    for start in range(0, len(tokens), CHUNK):
        ids = tokens[start : start + CHUNK].to(victim.device).unsqueeze(1)
        pos = torch.full_like(ids, position)
        out.append(capture_input(victim, probe, ids, position_ids=pos)[:, 0].cpu())
    return torch.cat(out)


def position_candidates(
    victim: Victim, probe: Projection, span: Span, pool: torch.Tensor, position: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    res = residual(span, _layer_inputs(victim, probe, pool, position))
    keep = res < threshold
    order = torch.argsort(res[keep])
    return pool[keep][order], res[keep][order]


class ExactAttack:
    name = "exact"

    def reconstruct(
        self,
        victim: Victim,
        update: Update,
        knowledge: Knowledge,
        options: AttackOptions,
        progress: Progress | None = None,
    ) -> Reconstruction:
        start = time.perf_counter()
        notes: list[str] = []
        if update.kind == "fedavg" and update.local_steps > 1:
            notes.append(
                "FedAvg with several local steps: the delta mixes gradients at several weights, "
                "so the span argument holds only approximately"
            )
        grads = update.gradients()
        first = attention_projections(victim, 0)
        second = context_projections(victim, 0)
        for p in (*first, *second):
            if p.name not in grads:
                raise GradleakError(
                    f"the exact attack needs the gradient of {p.name}, which the client withheld"
                )
        hidden = victim.hidden_size
        if knowledge.lengths is not None and sum(knowledge.lengths) >= hidden and not options.force:
            raise GradleakError(
                f"the batch holds {sum(knowledge.lengths)} tokens, at or above the hidden width "
                f"{hidden}: span checks cannot separate them (use --force to try anyway)"
            )
        span1 = span_of(gradient_rows(grads, first))
        probe = first[0]
        check = ContextCheck(second[0], span_of(gradient_rows(grads, second)))
        if span1.full and not options.force:
            raise GradleakError(
                f"the first layer's gradient has no clear rank below the hidden width {hidden} "
                f"(rank {span1.rank}, gap {span1.gap:.3g}): the batch's token count reaches the width, "
                "or the update is perturbed; span checks cannot hold (use --force to try anyway)"
            )
        threshold = _threshold(update)
        pool = token_set(victim, grads)
        if pool is None:
            vocab = victim.model.get_input_embeddings().weight.shape[0]
            pool = torch.arange(vocab)
            notes.append("word-embedding gradient not available: the whole vocabulary is the candidate set")
        else:
            notes.append(f"token set of {len(pool)} ids from the word-embedding gradient")
        n_pos = occupied_positions(victim, grads)
        if n_pos is None:
            n_pos = max(knowledge.lengths) if knowledge.lengths else None
        limit = n_pos if n_pos is not None else victim.model.config.max_position_embeddings
        candidates = Candidates([], [])
        for p in range(limit):
            toks, scores = position_candidates(victim, probe, span1, pool, p, threshold)
            if len(toks) == 0 and n_pos is None:
                break
            candidates.tokens.append(toks)
            candidates.scores.append(scores)
            if progress is not None:
                progress(p + 1, limit, float(scores[0]) if len(scores) else float("nan"))
        log.info(
            "rank %d/%d, %d positions, candidates per position %s",
            span1.rank,
            hidden,
            len(candidates.tokens),
            [len(t) for t in candidates.tokens],
        )
        assemble = _assemble_decoder if victim.is_decoder else _assemble_encoder
        sequences = assemble(victim, candidates, check, threshold, knowledge)
        if knowledge.batch_size is not None and len(sequences) > knowledge.batch_size:
            sequences = sequences[: knowledge.batch_size]
        labels = None
        if victim.task == "classify" and sequences:
            labels = _labels(victim, grads, sequences, knowledge)
        return Reconstruction(
            token_ids=tuple(tuple(s) for s in sequences),
            texts=decode(victim, [list(s) for s in sequences]),
            labels=labels,
            trace=tuple(float(s[0]) if len(s) else float("nan") for s in candidates.scores),
            seconds=time.perf_counter() - start,
            notes=tuple(notes),
        )


# ------------------------------------------------------------------ second-layer residuals


def _pad(victim: Victim, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    pad = victim.tokenizer.pad_token_id or 0
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids.to(victim.device), mask.to(victim.device)


@dataclass(frozen=True)
class ContextCheck:
    """The span of a projection whose input depends on each token's context."""

    proj: Projection
    span: Span


def context_residuals(victim: Victim, check: ContextCheck, seqs: list[list[int]]) -> torch.Tensor:
    """(n, L) residuals of each sequence's context-dependent inputs (inf at padding)."""
    out = []
    for start in range(0, len(seqs), 256):
        part = seqs[start : start + 256]
        ids, mask = _pad(victim, part)
        x = capture_input(victim, check.proj, ids, attention_mask=mask).cpu()
        res = residual(check.span, x)
        res[mask.cpu() == 0] = float("inf")
        out.append(res)
    width = max(len(s) for s in seqs)
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=float("inf")) for r in out])


def _assemble_decoder(
    victim: Victim, cands: Candidates, check: ContextCheck, threshold: float, knowledge: Knowledge
) -> list[list[int]]:
    """Grow prefixes position by position; keep extensions whose last second-layer input is in span."""
    if not cands.tokens or len(cands.tokens[0]) == 0:
        return []
    prefixes: list[list[int]] = [[int(t)] for t in cands.tokens[0]]
    scores: list[float] = [0.0] * len(prefixes)
    finished: list[tuple[list[int], float]] = []
    if len(prefixes) > 0:
        res = context_residuals(victim, check, prefixes)[:, 0]
        keep = [i for i in range(len(prefixes)) if res[i] < threshold]
        prefixes = [prefixes[i] for i in keep]
        scores = [float(res[i]) for i in keep]
    for p in range(1, len(cands.tokens)):
        toks = [int(t) for t in cands.tokens[p]]
        if not toks:
            break
        ext = [pre + [t] for pre in prefixes for t in toks]
        parent = [i for i in range(len(prefixes)) for _ in toks]
        res = context_residuals(victim, check, ext)[:, p]
        alive = set()
        new, new_scores = [], []
        for k in torch.argsort(res).tolist():
            if res[k] >= threshold or len(new) >= MAX_PREFIXES:
                break
            new.append(ext[k])
            new_scores.append(max(scores[parent[k]], float(res[k])))
            alive.add(parent[k])
        for i, pre in enumerate(prefixes):
            if i not in alive:
                finished.append((pre, scores[i]))
        prefixes, scores = new, new_scores
    finished.extend(zip(prefixes, scores, strict=True))
    finished.sort(key=lambda f: f[1])
    return [f[0] for f in finished]


# ------------------------------------------------------------------ encoders


def _encoder_lengths(victim: Victim, cands: Candidates, knowledge: Knowledge) -> list[int]:
    """Sequence lengths: known, or read off the positions where the closing special token occurs."""
    if knowledge.lengths is not None:
        return sorted(knowledge.lengths, reverse=True)
    _, suffix = special_template(victim.tokenizer)
    n_pos = len(cands.tokens)
    ends = []
    if suffix:
        close = suffix[-1]
        ends = [p + 1 for p in range(n_pos) if close in set(cands.tokens[p].tolist())]
    if not ends:
        ends = [n_pos]
    lengths = sorted(ends, reverse=True)
    # every position must have at least as many live sequences as distinct tokens found there
    for p in range(n_pos):
        need = len(cands.tokens[p])
        while sum(1 for n in lengths if n > p) < need:
            longer = [n for n in set(lengths) if n > p]
            lengths.append(min(longer) if longer else n_pos)
    target = knowledge.batch_size
    while target is not None and len(lengths) < target:
        lengths.append(max(lengths))
    return sorted(lengths, reverse=True)


def _assemble_encoder(
    victim: Victim, cands: Candidates, check: ContextCheck, threshold: float, knowledge: Knowledge
) -> list[list[int]]:
    lengths = _encoder_lengths(victim, cands, knowledge)
    prefix, suffix = special_template(victim.tokenizer)
    n = len(lengths)
    seqs = [[0] * length for length in lengths]
    fixed = [[False] * length for length in lengths]
    for i, length in enumerate(lengths):
        for k, t in enumerate(prefix):
            seqs[i][k], fixed[i][k] = t, True
        for k, t in enumerate(suffix):
            seqs[i][length - len(suffix) + k], fixed[i][length - len(suffix) + k] = t, True
    specials = set(prefix) | set(suffix)

    def options_at(p: int) -> list[int]:
        toks = [int(t) for t in cands.tokens[p] if int(t) not in specials] if p < len(cands.tokens) else []
        return toks or [int(t) for t in cands.tokens[p]] if p < len(cands.tokens) else []

    def free(p: int) -> list[int]:
        return [i for i in range(n) if p < lengths[i] and not fixed[i][p]]

    # initial assignment: distinct tokens spread over the live sequences, best first
    for p in range(max(lengths)):
        rows, toks = free(p), options_at(p)
        for k, i in enumerate(rows):
            if toks:
                seqs[i][p] = toks[k % len(toks)]
    if n == 1:
        return seqs
    for _sweep in range(4):
        changed = False
        for p in range(max(lengths)):
            rows, toks = free(p), options_at(p)
            if len(rows) < 2 or not toks:
                continue
            trial = []
            for i in rows:
                for t in toks:
                    s = list(seqs[i])
                    s[p] = t
                    trial.append(s)
            res = context_residuals(victim, check, trial)
            res = torch.where(torch.isinf(res), torch.zeros_like(res), res)
            cost = torch.log(res.clamp_min(1e-30)).mean(dim=1).reshape(len(rows), len(toks)).numpy()
            # each token must be used at least once: tile columns to cover every live row
            reps = -(-len(rows) // len(toks))
            tiled = np.tile(cost, (1, reps))
            r_idx, c_idx = linear_sum_assignment(tiled)
            for r, c in zip(r_idx, c_idx, strict=True):
                t = toks[c % len(toks)]
                if seqs[rows[r]][p] != t:
                    seqs[rows[r]][p] = t
                    changed = True
        if not changed:
            break
    return seqs


# ------------------------------------------------------------------ labels


def _labels(
    victim: Victim, grads: dict[str, torch.Tensor], seqs: list[list[int]], knowledge: Knowledge
) -> tuple[int, ...] | None:
    weight, _ = head_parameters(victim)
    if weight is None or weight not in grads:
        return infer_labels(victim, grads, len(seqs))
    head = victim.model.get_submodule(weight.rsplit(".", 1)[0])
    feats: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, a: feats.append(a[0].detach()))
    ids, mask = _pad(victim, seqs)
    try:
        with torch.no_grad():
            logits = victim.logits(attention_mask=mask, input_ids=ids)
    finally:
        handle.remove()
    h = feats[0]
    if h.dim() == 3:  # GPT-2 scores every position and pools the last real token
        last = mask.sum(1) - 1
        h = h[torch.arange(len(seqs)), last]
        if logits.dim() == 3:
            logits = logits[torch.arange(len(seqs)), last]
    probs = torch.softmax(logits.double(), -1)
    g = grads[weight].detach().double()  # (C, hidden) = mean_i (p_i - y_i) h_i^T
    coeffs = torch.linalg.lstsq(h.double().T, (g * len(seqs)).T).solution  # (B, C)
    y = probs - coeffs
    return tuple(int(c) for c in y.argmax(-1))


EXACT = register(ExactAttack())
