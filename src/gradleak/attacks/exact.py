"""Exact recovery from the structure of transformer gradients (the idea of DAGER, Petrov et al.,
NeurIPS 2024), for decoders and encoders, with labels, lengths and batch contents unknown.

1. Token set: the non-zero rows of the word-embedding gradient, when it is shared (and sparse).
2. Occupied positions: the non-zero rows of the position-embedding gradient.
3. Span checks: the first layer's attention projections (query/key/value) have weight gradients
   whose rows span the layer inputs that occurred; a candidate (token, position) passes when its
   layer input lies in that span.
4. Encoders whose embedding LayerNorm starts the residual stream (BERT, MiniLM): the embedding
   gradients place most (token, position) occurrences exactly (see `occurrences`), which the first
   layer's span cannot do once a batch holds more pairs than tokens plus positions.
5. Assembly: decoders grow prefixes position by position; the causal mask makes the second
   layer's input at a position a function of the prefix alone, so the second layer's span
   separates true prefixes from false ones. Encoders assign the per-position candidates to
   sequences by a search (coordinate descent with Hungarian assignment at each position, head
   swaps between sequences, token exchanges within one) on the second layer's span residual of
   whole sequences.
6. Labels: with the sequences known, the head's weight gradient is a linear function of the
   per-example (p_i - y_i), which least squares recovers exactly.

Perturbed updates (the server knows the protocol adds noise, prunes or quantises; or --force where
the span has no clean rank): the rank is chosen by energy above the noise bulk (Gavish-Donoho
threshold), token and position sets are the rows that stand out of the noise (robust z-score),
and every candidate is ranked against a null sample of random tokens at the same position rather
than held to a fixed threshold, so recovery degrades with the noise instead of stopping.
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
from gradleak.attacks.occurrences import Occurrences, resolve
from gradleak.attacks.scorer import AttentionScorer
from gradleak.attacks.spans import Span, noisy_span_of, residual, span_of
from gradleak.attacks.structure import (
    Projection,
    attention_projections,
    capture_input,
    context_projections,
    gradient_rows,
    is_causal,
    layer_blocks,
    mixing_projections,
    position_embedding,
    word_embedding_name,
)
from gradleak.client import Update
from gradleak.errors import GradleakError
from gradleak.victims import Victim

log = logging.getLogger(__name__)

ACCEPT = 1e-3  # largest relative span residual of a present candidate (float64 updates)
ACCEPT_FLOAT32 = 2e-2  # the same for updates computed in float32
MARGIN = 1000.0  # present candidates lie within this factor of the run's typical best residual
CONTEXT_GAP = 4.0  # the context check's span may be cut at a weaker gap (its rows' own rounding)
CHUNK = 4096
MAX_PREFIXES = 2048
RESTARTS = 12  # seeded starts of the encoder search, while its time budget lasts
SETTLED = 1e-3  # a sequence whose span residual at a position is below SETTLED * threshold is settled there
SOLVED = 1e-3  # a restart whose total residual is below SOLVED * threshold * B needs no other
NULL_SAMPLES = 64  # random tokens per position whose residuals show what "absent" looks like
NULL_RATIO = 0.5  # perturbed updates: a candidate's residual must be below this x the null median
OUTLIER_Z = 8.0  # perturbed updates: rows standing out of the noise by this robust z-score
NOISY_FILL = 0.9  # perturbed updates: a span above this fraction of the width carries no signal


@dataclass(frozen=True)
class Candidates:
    """Per occupied position: candidate token ids and their first-layer span residuals."""

    tokens: list[torch.Tensor]
    scores: list[torch.Tensor]
    occurrences: Occurrences | None = None  # what the embedding gradients place (encoders)


def _threshold(update: Update) -> float:
    dtype = next(iter(update.tensors.values())).dtype
    return ACCEPT if dtype == torch.float64 else ACCEPT_FLOAT32


def outlier_rows(rows: torch.Tensor) -> torch.Tensor:
    """Indices of the rows (n, d) whose norm stands out of the bulk: robust z-score (median and
    MAD of the row norms) above OUTLIER_Z. In a noisy gradient most rows are noise alone."""
    norms = rows.detach().double().norm(dim=1).cpu()
    med = norms.median()
    mad = (norms - med).abs().median().clamp_min(1e-300) * 1.4826
    return torch.nonzero((norms - med) / mad > OUTLIER_Z).flatten()


def token_set(victim: Victim, grads: dict[str, torch.Tensor], noisy: bool = False) -> torch.Tensor | None:
    """Token ids with a non-zero word-embedding gradient (standing out of the noise when `noisy`),
    or None if it is withheld or dense."""
    name = word_embedding_name(victim.model)
    if name not in grads:
        return None
    if noisy:
        present = outlier_rows(grads[name])
        return present if 0 < len(present) <= grads[name].shape[0] // 2 else None
    rows = grads[name].detach().abs().sum(dim=1)
    present = torch.nonzero(rows > 0).flatten().cpu()
    if len(present) == 0 or len(present) > rows.numel() // 2:
        return None  # tied with the output layer (language modelling): not informative
    return present


def occupied_positions(victim: Victim, grads: dict[str, torch.Tensor], noisy: bool = False) -> int | None:
    found = position_embedding(victim.model)
    if found is None:
        return None
    name = f"{found[0]}.weight"
    if name not in grads:
        return None
    if noisy:
        rows = outlier_rows(grads[name])
        return int(rows.max()) + 1 if len(rows) else None
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
    victim: Victim,
    probe: Projection,
    span: Span,
    pool: torch.Tensor,
    position: int,
    threshold: float,
    null: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates at `position` whose layer input lies within `threshold` of the span, and, with a
    `null` sample of random token ids, below NULL_RATIO times the null's median residual."""
    res = residual(span, _layer_inputs(victim, probe, pool, position))
    if null is not None:
        ref = residual(span, _layer_inputs(victim, probe, null, position)).median()
        threshold = min(threshold, NULL_RATIO * float(ref))
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
        causal = is_causal(victim)
        second = context_projections(victim, 0)
        # encoders: the attention's own context is checked first (the search can score it fast), the
        # MLP input where that span shows no clean rank
        mixing = mixing_projections(victim, 0)
        shared = not causal and all(p.name in grads for p in mixing)
        groups = (
            [mixing, second]
            if shared and all(p.name in grads for p in second)
            else [mixing if shared else second]
        )
        for p in (*first, *groups[-1]):
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
        # a perturbed update (the server knows the protocol) is treated as noisy even where a gap shows:
        # fixed thresholds tuned to rounding error would let noise-level false candidates through
        noisy = knowledge.perturbed or (span1.full and options.force)
        if span1.full and not noisy:
            raise GradleakError(
                f"the first layer's gradient has no clear rank below the hidden width {hidden} "
                f"(rank {span1.rank}, gap {span1.gap:.3g}): the batch's token count reaches the width, "
                "or the update is perturbed; span checks cannot hold (use --force to try anyway)"
            )
        # the rank: by the gap where one shows (noise still below rounding), else above the noise bulk
        how = "at its singular-value gap"
        if noisy and span1.full:
            span1 = noisy_span_of(gradient_rows(grads, first))
            how = "above the noise bulk"
        if noisy:
            notes.append(
                f"perturbed update: first-layer rank {span1.rank} of {hidden} cut {how}, "
                "candidates ranked against random tokens"
            )
            if span1.rank >= NOISY_FILL * hidden:
                notes.append("no signal stands out of the noise: nothing recovered")
                return Reconstruction((), (), None, (), time.perf_counter() - start, tuple(notes))
        check = _context_check(grads, groups, noisy)
        if check.span.full and not noisy:
            message = (
                f"the context check's gradient ({check.proj.name}) has no clear rank below the hidden "
                f"width {hidden} (rank {check.span.rank}, gap {check.span.gap:.3g}): the batch's tokens "
                "reach the width, so every arrangement of the candidates would pass it"
            )
            if not options.force:
                raise GradleakError(message + " (use --force to try anyway)")
            notes.append(message)
        threshold = _threshold(update) if not noisy else 1.0
        pool = token_set(victim, grads, noisy or knowledge.perturbed)
        vocab_pool = pool is None
        if pool is None:
            vocab = victim.model.get_input_embeddings().weight.shape[0]
            pool = torch.arange(vocab)
            notes.append("word-embedding gradient not available: the whole vocabulary is the candidate set")
        else:
            notes.append(f"token set of {len(pool)} ids from the word-embedding gradient")
        n_pos = occupied_positions(victim, grads, noisy or knowledge.perturbed)
        if n_pos is None:
            n_pos = max(knowledge.lengths) if knowledge.lengths else None
        limit = n_pos if n_pos is not None else victim.model.config.max_position_embeddings
        candidates = Candidates([], [])
        gen = torch.Generator().manual_seed(options.seed)
        vocab_size = victim.model.get_input_embeddings().weight.shape[0]
        for p in range(limit):
            null = torch.randint(0, vocab_size, (NULL_SAMPLES,), generator=gen) if noisy else None
            toks, scores = position_candidates(victim, probe, span1, pool, p, threshold, null)
            if noisy and knowledge.batch_size is not None:  # ranked: the best few per position
                toks, scores = toks[: 4 * knowledge.batch_size + 4], scores[: 4 * knowledge.batch_size + 4]
            if len(toks) == 0 and n_pos is None:
                break
            candidates.tokens.append(toks)
            candidates.scores.append(scores)
            if progress is not None:
                progress(p + 1, limit, float(scores[0]) if len(scores) else float("nan"))
        if not noisy:
            candidates = _tighten(candidates, threshold)
            occ = None if causal or vocab_pool else resolve(victim, grads, pool, len(candidates.tokens))
            if occ is not None:
                candidates = _restrict(candidates, occ)
                notes.append(
                    f"embedding gradients place {sum(len(s) for s in occ.pinned)} token occurrences; "
                    f"{sum(occ.complete)} of {len(occ.complete)} positions complete"
                )
        log.info(
            "rank %d/%d, %d positions, candidates per position %s",
            span1.rank,
            hidden,
            len(candidates.tokens),
            [len(t) for t in candidates.tokens],
        )
        assemble = _assemble_decoder if causal else _assemble_encoder
        null_gen = (gen, vocab_size) if noisy else None
        sequences = assemble(
            victim, candidates, check, threshold, knowledge, start + options.time_budget, null_gen
        )
        empty = sum(1 for t in candidates.tokens if len(t) == 0)
        if empty:
            notes.append(
                f"{empty} of {len(candidates.tokens)} occupied positions have no candidate in the first "
                f"layer's span (rank {span1.rank}): some tokens' gradients fall below its cut"
            )
        if not sequences:
            why = (
                "; with one block only the positions that reach the loss (a classifier's pooled one) "
                "leave a trace there"
                if len(layer_blocks(victim.model)) == 1
                else ""
            )
            notes.append(
                f"no sequence passes the context check (its span has rank {check.span.rank} for "
                f"{len(candidates.tokens)} positions){why}"
            )
        if knowledge.batch_size is not None and len(sequences) > knowledge.batch_size:
            sequences = sequences[: knowledge.batch_size]
        labels = None
        if victim.task == "classify" and sequences:
            labels = _labels(victim, grads, sequences)
        return Reconstruction(
            token_ids=tuple(tuple(s) for s in sequences),
            texts=decode(victim, [list(s) for s in sequences]),
            labels=labels,
            trace=tuple(float(s[0]) if len(s) else float("nan") for s in candidates.scores),
            seconds=time.perf_counter() - start,
            notes=tuple(notes),
        )


def _context_check(
    grads: dict[str, torch.Tensor], groups: list[tuple[Projection, ...]], noisy: bool
) -> ContextCheck:
    """The context check on the first group whose span shows a clean rank; where none does (float32
    rounding may blur the drop), the last group's span cut at the weaker CONTEXT_GAP, which may be
    full too. Perturbed updates: the first group's span above the noise bulk."""
    if noisy:
        return ContextCheck(groups[0][0], noisy_span_of(gradient_rows(grads, groups[0])))
    for group in groups:
        span = span_of(gradient_rows(grads, group))
        if not span.full:
            return ContextCheck(group[0], span)
    return ContextCheck(groups[-1][0], span_of(gradient_rows(grads, groups[-1]), min_gap=CONTEXT_GAP))


def _tighten(cands: Candidates, threshold: float) -> Candidates:
    """Keep candidates within MARGIN of the typical best residual: true rows sit at the precision
    of the update, false ones that pass the coarse threshold mostly sit orders of magnitude above.
    (Near-linear combinations of true rows can pass too; the assembly's context check sorts them.)"""
    best = [float(s[0]) for s in cands.scores if len(s)]
    if not best:
        return cands
    cut = min(threshold, max(MARGIN * float(np.median(best)), 1e-13))
    tokens, scores = [], []
    for t, s in zip(cands.tokens, cands.scores, strict=True):
        keep = s < cut
        tokens.append(t[keep])
        scores.append(s[keep])
    return Candidates(tokens, scores)


def _restrict(cands: Candidates, occ: Occurrences) -> Candidates:
    """Keep the candidates the embedding gradients allow at each position, and add the tokens they
    place there that the span check missed (in front: they are certain)."""
    tokens, scores = [], []
    for p, (t, s) in enumerate(zip(cands.tokens, cands.scores, strict=True)):
        keep = torch.tensor([occ.allowed(p, int(x)) for x in t], dtype=torch.bool)
        kt, ks = t[keep] if len(t) else t, s[keep] if len(s) else s
        extra = sorted(occ.pinned[p] - set(kt.tolist())) if p < len(occ.pinned) else []
        if extra:
            kt = torch.cat([torch.tensor(extra, dtype=kt.dtype), kt])
            ks = torch.cat([torch.zeros(len(extra), dtype=ks.dtype), ks])
        tokens.append(kt)
        scores.append(ks)
    return Candidates(tokens, scores, occ)


# ------------------------------------------------------------------ context residuals


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


def _cached_prefix_run(victim: Victim, proj: Projection, ids: torch.Tensor, cache=None, offset: int = 0):
    """Run `ids` (n, k) at positions offset.. through the model up to `proj` with a KV cache; return
    (captured input, cache)."""
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache(config=victim.model.config)
    n, k = ids.shape
    mask = torch.ones((n, offset + k), dtype=torch.long, device=victim.device)
    pos = torch.arange(offset, offset + k, device=victim.device).expand(n, k)
    module = victim.model.get_submodule(proj.name.rsplit(".", 1)[0])
    captured: list[torch.Tensor] = []

    def hook(mod, args):
        captured.append(args[0].detach())
        raise _CacheStop

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            victim.model(
                input_ids=ids.to(victim.device), attention_mask=mask, position_ids=pos,
                past_key_values=cache, use_cache=True,
            )  # fmt: skip
    except _CacheStop:
        pass
    finally:
        handle.remove()
    return captured[0], cache


class _CacheStop(Exception):
    pass


def extension_residuals(
    victim: Victim, check: ContextCheck, prefixes: list[list[int]], parents: list[int], tokens: list[int]
) -> torch.Tensor:
    """Span residuals of the context input at the new position of prefixes[parents[k]] + [tokens[k]]:
    the prefixes' keys and values are computed once (KV cache) and only the new tokens run, which is
    what the causal mask allows. Falls back to whole sequences where the model has no such cache."""
    p = len(prefixes[0])
    try:
        from transformers import DynamicCache

        _, cache = _cached_prefix_run(victim, check.proj, torch.tensor(prefixes))
        layer = cache.layers[0]
        out = []
        for start in range(0, len(tokens), CHUNK):
            idx = torch.tensor(parents[start : start + CHUNK], device=layer.keys.device)
            sub = DynamicCache(config=victim.model.config)
            sub.update(layer.keys[idx], layer.values[idx], 0)
            new = torch.tensor(tokens[start : start + CHUNK]).unsqueeze(1)
            x, _ = _cached_prefix_run(victim, check.proj, new, sub, offset=p)
            out.append(residual(check.span, x[:, 0].cpu()))
        return torch.cat(out)
    except (AttributeError, TypeError, ValueError, IndexError, RuntimeError) as exc:  # no usable cache
        log.debug("no KV cache for the decoder check (%s): whole sequences", exc)
        seqs = [prefixes[i] + [t] for i, t in zip(parents, tokens, strict=True)]
        return context_residuals(victim, check, seqs)[:, p]


def _assemble_decoder(
    victim: Victim,
    cands: Candidates,
    check: ContextCheck,
    threshold: float,
    knowledge: Knowledge,
    deadline: float,
    null: tuple[torch.Generator, int] | None = None,
) -> list[list[int]]:
    """Grow prefixes position by position; keep extensions whose last second-layer input is in span
    (with `null`: ranked against random-token extensions of the same prefixes, beam of 4B)."""
    if not cands.tokens or len(cands.tokens[0]) == 0:
        return []
    prefixes: list[list[int]] = [[int(t)] for t in cands.tokens[0]]
    scores: list[float] = [0.0] * len(prefixes)
    finished: list[tuple[list[int], float]] = []
    beam = MAX_PREFIXES if null is None or knowledge.batch_size is None else 4 * knowledge.batch_size

    def cut(p: int, prefixes: list[list[int]]) -> float:
        if null is None or not prefixes:
            return threshold
        gen, vocab = null
        rand = torch.randint(0, vocab, (NULL_SAMPLES,), generator=gen).tolist()
        if p == 0:
            trial = [[t] for t in rand]
            return min(threshold, NULL_RATIO * float(context_residuals(victim, check, trial)[:, 0].median()))
        parents = [k % len(prefixes) for k in range(len(rand))]
        res = extension_residuals(victim, check, prefixes, parents, rand)
        return min(threshold, NULL_RATIO * float(res.median()))

    if len(prefixes) > 0:
        res = context_residuals(victim, check, prefixes)[:, 0]
        limit0 = cut(0, prefixes)
        keep = [i for i in range(len(prefixes)) if res[i] < limit0]
        prefixes = [prefixes[i] for i in keep]
        scores = [float(res[i]) for i in keep]
    for p in range(1, len(cands.tokens)):
        toks = [int(t) for t in cands.tokens[p]]
        if not toks:
            break
        ext = [pre + [t] for pre in prefixes for t in toks]
        if not ext:
            break
        parent = [i for i in range(len(prefixes)) for _ in toks]
        res = extension_residuals(victim, check, prefixes, parent, [t for _ in prefixes for t in toks])
        limit = cut(p, prefixes)
        alive = set()
        new, new_scores = [], []
        for k in torch.argsort(res).tolist():
            if res[k] >= limit or len(new) >= beam:
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


@dataclass(frozen=True)
class LengthModel:
    """What the gradients say about the sequences' lengths (longest first where a list)."""

    estimate: list[int]  # a first guess
    ends: list[int]  # lengths a sequence may have: the closing token may sit at length - 1
    certain: list[int]  # lengths some sequence has: the embedding gradients place a closing token there
    need: list[int]  # live sequences each position needs at least (a hard bound)
    total: int | None  # the batch's token count, where the context span's rank shows it
    known: bool = False  # the lengths were given


def _encoder_lengths(
    victim: Victim, cands: Candidates, knowledge: Knowledge, total: int | None = None
) -> LengthModel:
    """Sequence lengths: known, or read off the positions where the closing special token occurs."""
    if knowledge.lengths is not None:
        known = sorted(knowledge.lengths, reverse=True)
        return LengthModel(known, sorted(set(known)), sorted(set(known)), [], sum(known), known=True)
    prefix, suffix = special_template(victim.tokenizer)
    n_pos = len(cands.tokens)
    shortest = len(prefix) + len(suffix)  # the template alone
    occ = cands.occurrences
    ends: list[int] = []
    lengths: list[int] = []
    certain: list[int] = []
    need = [len(t) for t in cands.tokens]  # live sequences each position needs at least
    if suffix:
        close = suffix[-1]
        ends = [p + 1 for p in range(shortest - 1, n_pos) if close in set(cands.tokens[p].tolist())]
        lengths = list(ends)
        if occ is not None:  # ends the embedding gradients place are certain; others only possible
            certain = [p + 1 for p in range(shortest - 1, n_pos) if close in occ.pinned[p]]
            lengths = certain + ([] if n_pos in certain else [n_pos])  # the longest ends at the last
            # an incomplete position holds at least two tokens not yet placed besides its placed ones
            need = [len(occ.pinned[p]) + (0 if occ.complete[p] else 2) for p in range(n_pos)]
    if not ends:
        ends = [n_pos]
    if not lengths:
        lengths = [max(ends)]
    lengths = sorted(lengths, reverse=True)
    # every position needs at least as many live sequences as it has distinct tokens; walking from
    # the end, cover a shortfall with the shortest length that reaches the position
    for p in reversed(range(n_pos)):
        while sum(1 for n in lengths if n > p) < need[p]:
            if knowledge.batch_size is not None and len(lengths) >= knowledge.batch_size:
                break
            lengths.append(min(e for e in [*ends, n_pos] if e > p))
    target = knowledge.batch_size
    if total is not None and total < shortest * max(len(lengths), target or 0):
        total = None
    while target is not None and len(lengths) < target:
        # slots nothing else accounts for: the even share of the tokens left (the longest possible
        # end below it), else the shortest length so far
        missing = target - len(lengths)
        share = (total - sum(lengths)) // missing if total is not None else min(lengths)
        lengths.append(max([e for e in [*ends, n_pos] if shortest <= e <= share], default=min(lengths)))
    lengths = sorted(lengths, reverse=True)[: target or len(lengths)]
    # hard lower bounds only: without a placement, candidate counts overstate the tokens at a position
    bound = need if occ is not None else [1] * n_pos
    return LengthModel(sorted(lengths, reverse=True), sorted(set(ends) | {n_pos}), certain, bound, total)


COPY = 1e3  # search cost of making a slot a copy of another sequence
SLICE = 2.0  # seconds a length hypothesis gets at least (a third of what is left at most otherwise)
SHAKE = 0.25  # share of free tokens an iterated-local-search restart redraws
PER_HYPOTHESIS = 3  # restarts of the encoder search per length hypothesis (lengths unknown)
HYPOTHESES = 48  # length lists tried per peel of the encoder search, closest to the estimate first
NODES = 200_000  # search nodes spent enumerating them


def _length_hypotheses(model: LengthModel, estimate: list[int], frozen: list[int]) -> list[list[int]]:
    """Length lists for the open slots (as many as `estimate`), longest first, closest to `estimate`
    first: every length a possible end, every position left with the live sequences it needs beside
    the `frozen` (solved) ones, every certain end not ended by a frozen sequence used, and the
    lengths adding up to the token count left where it is known."""
    k = len(estimate)
    if model.known or k == 0:
        return [estimate]
    n_pos = len(model.need)
    live = [sum(1 for n in frozen if n > p) for p in range(n_pos)]
    short = [max(0, model.need[p] - live[p]) for p in range(n_pos)]
    minimal = [1 + max([p for p in range(n_pos) if short[p] > j], default=0) for j in range(k)]
    cover = {e for e in model.certain if e not in frozen} | ({n_pos} if n_pos not in frozen else set())
    ends = sorted(set(model.ends), reverse=True)

    def enumerate_within(
        radius: int, total: int | None, floor: bool, found: dict[tuple[int, ...], int]
    ) -> None:
        nodes = 0

        def dfs(j: int, prev: int, acc: int, dist: int, chosen: list[int]) -> None:
            nonlocal nodes
            nodes += 1
            if nodes > NODES or len(found) >= 4 * HYPOTHESES:
                return
            if j == k:
                if (total is None or acc == total) and cover <= set(chosen):
                    found.setdefault(tuple(chosen), dist)
                return
            missing = [e for e in cover if e not in chosen]
            if len(missing) > k - j:
                return
            for e in ends:
                if e > prev or e < minimal[j] or abs(e - estimate[j]) > radius:
                    continue
                if floor and e < estimate[j]:
                    continue
                if any(m > e for m in missing if m != e):
                    continue  # a certain end longer than every slot left
                rest = k - j - 1
                if total is not None and not (acc + e + sum(minimal[j + 1 :]) <= total <= acc + e + rest * e):
                    continue
                dfs(j + 1, e, acc + e, dist + abs(e - estimate[j]), [*chosen, e])

        dfs(0, n_pos, 0, 0, [])

    left = None if model.total is None else model.total - sum(frozen)
    # the estimate covers each position's need with the shortest lengths that reach it, so it is
    # (nearly always) a lower bound slot by slot: lengths at or above it are tried first
    # (the fallback without the total only where nothing adds up to it)
    out: list[list[int]] = []
    for total, floor in [(left, True), (left, False), (None, False)] if left is not None else [(None, False)]:
        if total is None and out:
            break
        found: dict[tuple[int, ...], int] = {}
        for radius in (0, 1, 2, 3, 5, 8, 13, n_pos):
            enumerate_within(radius, total, floor, found)
            if len(found) >= HYPOTHESES:
                break
        # fewest slots moved first, then the smallest moves
        ranked = sorted(
            found, key=lambda h: (sum(a != b for a, b in zip(h, estimate, strict=True)), found[h], h)
        )
        out += [list(h) for h in ranked if list(h) not in out]
        if len(out) >= HYPOTHESES:
            break
    return out[:HYPOTHESES] or [sorted(estimate, reverse=True)]


class _EncoderSearch:
    """Assign each position's candidates to sequences so that every sequence's contexts lie in the
    check's span (see `_assemble_encoder`)."""

    def __init__(
        self, victim: Victim, cands: Candidates, check: ContextCheck, threshold: float, deadline: float
    ) -> None:
        self.victim, self.cands, self.check = victim, cands, check
        self.threshold, self.deadline = threshold, deadline
        prefix, suffix = special_template(victim.tokenizer)
        self.prefix, self.suffix = prefix, suffix
        self.specials = set(prefix) | set(suffix)
        self.options = []
        for p in range(len(cands.tokens)):
            toks = [int(t) for t in cands.tokens[p]]
            self.options.append([t for t in toks if t not in self.specials] or toks)
        self.allowed = [set(o) for o in self.options]
        self.scorer = None
        if check.proj in mixing_projections(victim, 0):
            tokens_at = [sorted(set(o) | self.specials) for o in self.options]
            first = attention_projections(victim, 0)
            self.scorer = AttentionScorer.build(victim, first, check.proj, check.span, tokens_at)
        log.debug("encoder search scores %s", "incrementally" if self.scorer else "with the model")
        self.rng = np.random.default_rng(0)

    def residuals(self, seqs: list[list[int]]) -> torch.Tensor:
        if self.scorer is not None:
            return self.scorer.residuals(seqs)
        return context_residuals(self.victim, self.check, seqs)

    def cost(self, seqs: list[list[int]]) -> torch.Tensor:
        res = self.residuals(seqs)
        return torch.where(torch.isinf(res), torch.zeros_like(res), res).sum(dim=1)

    def solved(self, seqs: list[list[int]]) -> list[bool]:
        """Whether each sequence's contexts all lie in the span (to the update's rounding)."""
        res = self.residuals(seqs)
        res = torch.where(torch.isinf(res), torch.zeros_like(res), res)
        return [bool(r.max() < SETTLED * self.threshold) for r in res]

    def run(
        self, lengths: list[int], frozen: list[list[int]], restarts: int, cover: bool = True
    ) -> tuple[list[list[int]], float]:
        """The best of `restarts` descents for open slots of these lengths beside the `frozen`
        sequences; stops early once a restart solves a sequence."""
        state = _SearchState(self, lengths, frozen)
        best: tuple[list[list[int]], float] | None = None
        for restart in range(restarts):
            if best is not None and time.perf_counter() > self.deadline:
                break
            if restart % 2 == 0 or best is None:
                seqs = state.start(self.rng if restart else None)
            else:  # iterated local search: shake the best state's open sequences and descend again
                seqs = state.shake(best[0], self.rng)
            if len(seqs) == 1 and not frozen and not any(len(o) > 1 for o in self.options):
                return seqs, float(self.cost(seqs).sum())
            seqs, total = state.descend(seqs, cover)
            if best is None or total < best[1]:
                best = (seqs, total)
            if any(self.solved(seqs[len(frozen) :])):
                break
        assert best is not None
        return best[0][len(frozen) :], best[1]

    def polish(self, seqs: list[list[int]], frozen: list[list[int]]) -> list[list[int]]:
        """A false candidate may have been forced into some sequence by the covering constraint:
        descend once more without it, and keep the result if it is better."""
        state = _SearchState(self, [len(s) for s in seqs], frozen)
        before = state.total([*frozen, *seqs])
        out, after = state.descend([*(list(s) for s in frozen), *(list(s) for s in seqs)], cover=False)
        out = out[len(frozen) :] if after < before else seqs
        return [x for i, x in enumerate(out) if x not in frozen and x not in out[:i]]  # no copies


class _SearchState:
    """One length hypothesis of the encoder search: rows are the frozen sequences (held fixed) and
    the open slots; moves are Hungarian re-assignments per position, head swaps and exchanges."""

    def __init__(self, search: _EncoderSearch, lengths: list[int], frozen: list[list[int]]) -> None:
        self.s = search
        self.n_frozen = len(frozen)
        self.lengths = [len(f) for f in frozen] + list(lengths)
        n, width = len(self.lengths), max(self.lengths)
        self.n, self.width = n, width
        self.base = [list(f) for f in frozen] + [[0] * length for length in lengths]
        self.fixed = [[True] * len(f) for f in frozen] + [[False] * length for length in lengths]
        for i in range(self.n_frozen, n):
            length = self.lengths[i]
            for k, t in enumerate(search.prefix):
                self.base[i][k], self.fixed[i][k] = t, True
            for k, t in enumerate(search.suffix):
                self.base[i][length - len(search.suffix) + k] = t
                self.fixed[i][length - len(search.suffix) + k] = True
        opts = search.options
        self.free = [
            [i for i in range(n) if p < self.lengths[i] and not self.fixed[i][p]] for p in range(width)
        ]
        held = [{f[p] for f in frozen if p < len(f)} for p in range(width)]
        self.must = [
            [t for t in m if t not in held[p]]
            for p, m in enumerate(_required(search.cands, opts[:width], self.free, search.specials))
        ]

    def start(self, rng: np.random.Generator | None) -> list[list[int]]:
        seqs = [list(s) for s in self.base]
        for p in range(self.width):
            toks = self.s.options[p]
            if not toks or not self.free[p]:
                continue
            order = rng.permutation(len(self.free[p])) if rng is not None else np.arange(len(self.free[p]))
            rest = [t for t in toks if t not in self.must[p]]
            if rng is not None and rest:
                rest = [rest[k] for k in rng.permutation(len(rest))]
            fill = [*self.must[p], *rest] or toks
            for k, r in enumerate(order):
                seqs[self.free[p][r]][p] = fill[k % len(fill)]
        return seqs

    def shake(self, seqs: list[list[int]], rng: np.random.Generator) -> list[list[int]]:
        """A copy of `seqs` with a share SHAKE of the open sequences' free tokens redrawn."""
        out = [list(x) for x in seqs]
        for p in range(self.width):
            for i in self.free[p]:
                if rng.random() < SHAKE:
                    out[i][p] = int(rng.choice(self.s.options[p]))
        return out

    def sweep(self, seqs: list[list[int]], cover: bool = True) -> bool:
        """Hungarian re-assignment of each position's tokens, all else fixed; with `cover` the
        required tokens are each held by some live sequence."""
        s, changed = self.s, False
        settled = SETTLED * s.threshold
        now = s.residuals(seqs)
        # sequences in span everywhere keep their tokens (and cover what they hold)
        done = {i for i in range(self.n) if float(torch.nan_to_num(now[i], posinf=0.0).max()) < settled}
        for p in range(self.width):
            if time.perf_counter() > s.deadline:
                break
            rows, toks = [i for i in self.free[p] if i not in done], s.options[p]
            if not rows or not toks or (len(toks) == 1 and all(seqs[i][p] == toks[0] for i in rows)):
                continue
            if not changed and all(float(now[i, p]) < settled for i in rows):
                continue  # every live sequence is in span here (residuals valid until a change)
            held = {seqs[i][p] for i in self.free[p] if i in done}
            must = [t for t in self.must[p] if t not in held] if cover else []
            if s.scorer is not None:
                c = s.scorer.substitutions([seqs[i] for i in rows], p, toks).numpy()
            else:
                trial = []
                for i in rows:
                    for t in toks:
                        x = list(seqs[i])
                        x[p] = t
                        trial.append(x)
                c = s.cost(trial).reshape(len(rows), len(toks)).numpy()
            c = c + self.copies(seqs, rows, p, toks)
            spread = cover and s.cands.occurrences is None
            for r, t in enumerate(_assign(c, toks, must, distinct=spread)):
                if seqs[rows[r]][p] != t:
                    seqs[rows[r]][p] = t
                    changed = True
        return changed

    def copies(self, seqs: list[list[int]], rows: list[int], p: int, toks: list[int]) -> np.ndarray:
        """(rows, toks) penalty COPY where the substitution would make a row a copy of another
        sequence: a copy of a solved sentence lies in the span too, but a batch rarely holds one
        sentence twice, and letting a slot settle on a copy would hide the sentence it stands for."""
        out = np.zeros((len(rows), len(toks)))
        index = {t: k for k, t in enumerate(toks)}
        for r, i in enumerate(rows):
            for j in range(self.n):
                if j == i or self.lengths[j] != self.lengths[i] or seqs[j][p] not in index:
                    continue
                a, b = seqs[i], seqs[j]
                if a[:p] == b[:p] and a[p + 1 :] == b[p + 1 :]:
                    out[r, index[b[p]]] = COPY
        return out

    def crossover(self, seqs: list[list[int]], current: torch.Tensor) -> bool:
        """The best swap of heads (positions before p) between two open sequences, if it helps: it
        moves a sentence's start to the length slot it belongs to, which single-position moves
        cannot."""
        s = self.s
        if time.perf_counter() > s.deadline:
            return False
        moves, trial = [], []
        solved = [float(current[i]) < SOLVED * s.threshold for i in range(self.n)]
        for a in range(self.n_frozen, self.n):
            for b in range(a + 1, self.n):
                if solved[a] and solved[b]:
                    continue  # two sequences in span: no head swap between them can help
                for p in range(2, min(self.lengths[a], self.lengths[b])):
                    if seqs[a][:p] == seqs[b][:p]:
                        continue
                    x, y = seqs[b][:p] + seqs[a][p:], seqs[a][:p] + seqs[b][p:]
                    if x in seqs or y in seqs:
                        continue  # it would copy another sequence
                    moves.append((a, b, p))
                    trial.extend((x, y))
        if not moves:
            return False
        c = s.cost(trial).reshape(len(moves), 2)
        gain = torch.tensor([float(current[a] + current[b]) for a, b, _ in moves]) - c.sum(dim=1)
        k = int(torch.argmax(gain))
        if float(gain[k]) <= 1e-12:
            return False
        a, b, _ = moves[k]
        seqs[a], seqs[b] = trial[2 * k], trial[2 * k + 1]
        return True

    def sole(self, seqs: list[list[int]], i: int, p: int) -> bool:
        """Whether sequence i holds the only copy of a token position p requires."""
        t = seqs[i][p]
        return t in self.must[p] and not any(seqs[j][p] == t for j in self.free[p] if j != i)

    def swap(self, seqs: list[list[int]]) -> bool:
        """In each sequence not yet in span, the best exchange of two of its tokens, if it helps: a
        word order that single-position moves cannot reach without passing a worse state. (A
        sequence's residuals depend on that sequence alone, so one pass scores them all.)"""
        s, changed = self.s, False
        now = s.residuals(seqs)
        current = torch.where(torch.isinf(now), torch.zeros_like(now), now).sum(dim=1)
        for i in range(self.n_frozen, self.n):
            if time.perf_counter() > s.deadline:
                break
            if float(current[i]) < SOLVED * s.threshold:
                continue
            seq, fixed, allowed = seqs[i], self.fixed[i], s.allowed
            loose = [float(now[i, p]) >= SETTLED * s.threshold for p in range(self.lengths[i])]
            pairs = [
                (p, q)
                for p in range(self.lengths[i])
                for q in range(p + 1, self.lengths[i])
                if not fixed[p] and not fixed[q] and seq[p] != seq[q] and (loose[p] or loose[q])
                and seq[q] in allowed[p] and seq[p] in allowed[q]
                and not self.sole(seqs, i, p) and not self.sole(seqs, i, q)
            ]  # fmt: skip
            if not pairs:
                continue
            trial = []
            for p, q in pairs:
                t = list(seq)
                t[p], t[q] = t[q], t[p]
                if t not in seqs:  # not a copy of another sequence
                    trial.append(t)
            if not trial:
                continue
            c = s.cost(trial)
            k = int(torch.argmin(c))
            if float(c[k]) < float(current[i]) - 1e-12:
                seqs[i] = trial[k]
                changed = True
        return changed

    def descend(self, seqs: list[list[int]], cover: bool = True) -> tuple[list[list[int]], float]:
        for _round in range(2 * self.n):
            if time.perf_counter() > self.s.deadline:
                break
            for _sweep in range(8):
                if not self.sweep(seqs, cover):
                    break
            moved = self.crossover(seqs, self.s.cost(seqs))
            moved = self.swap(seqs) or moved
            if not moved:
                break
        return seqs, self.total(seqs)

    def total(self, seqs: list[list[int]]) -> float:
        """Summed residuals, plus COPY for every sequence that repeats an earlier one."""
        repeats = sum(1 for i, x in enumerate(seqs) if x in seqs[:i])
        return float(self.s.cost(seqs).sum()) + COPY * repeats


def _assemble_encoder(
    victim: Victim,
    cands: Candidates,
    check: ContextCheck,
    threshold: float,
    knowledge: Knowledge,
    deadline: float,
    null: tuple[torch.Generator, int] | None = None,
) -> list[list[int]]:
    """Assign each position's candidates to sequences so that every sequence's contexts lie in the
    span: coordinate descent over positions (Hungarian assignment of that position's tokens to the
    live sequences, all else fixed) with head swaps and exchanges, from seeded starts, until
    `deadline` (a time.perf_counter() value) passes.

    Lengths are a hypothesis (`_length_hypotheses`, closest to the estimate first). A sequence
    whose contexts all lie in the span is a true one, so solved sequences are frozen as soon as
    they appear ("peeled"), and the hypotheses for the remaining slots are drawn again with what
    is left: fewer slots, fewer tokens, and, where the span's rank gives the batch's token count,
    a known sum of the remaining lengths."""
    prefix, suffix = special_template(victim.tokenizer)
    if len(cands.tokens) < len(prefix) + len(suffix):
        return []  # not even the template's positions are occupied
    total = None
    if null is None and knowledge.lengths is None and check.proj in mixing_projections(victim, 0):
        total = check.span.rank  # distinct contexts: one per token of the batch (while below the width)
    model = _encoder_lengths(victim, cands, knowledge, total)
    log.debug("length model: %s", model)
    search = _EncoderSearch(victim, cands, check, threshold, deadline)
    frozen: list[list[int]] = []
    estimate = list(model.estimate)
    hypotheses = _length_hypotheses(model, estimate, [])
    best: tuple[list[list[int]], float] | None = None
    h = 0
    first = True
    while h < len(hypotheses) and len(frozen) < len(model.estimate):
        if not first and time.perf_counter() > deadline:
            log.info("encoder search stopped at its time budget with %d sequences solved", len(frozen))
            break
        lengths = hypotheses[h]
        now = time.perf_counter()
        search.deadline = min(deadline, now + max(SLICE, (deadline - now) / 3))  # let others be tried too
        seqs, total_cost = search.run(lengths, frozen, RESTARTS if model.known else PER_HYPOTHESIS)
        search.deadline = deadline
        first = False
        log.debug("lengths %s beside %d solved: residual %.3g", lengths, len(frozen), total_cost)
        if best is None or total_cost < best[1]:
            best = (seqs, total_cost)
        done: list[list[int]] = []
        for s, ok in zip(seqs, search.solved(seqs), strict=True):
            if ok and s not in frozen and s not in done:  # a copy is not another sentence
                done.append(s)
        if not done:
            h += 1
            if h == len(hypotheses) and time.perf_counter() < deadline:
                h = 0  # every hypothesis tried: again, from other random starts, while time is left
            continue
        frozen += done
        lengths, estimate = list(lengths), list(estimate)
        for s in done:  # the slots left: the hypothesis's lengths, and their estimates, less the solved
            k = lengths.index(len(s))
            del lengths[k], estimate[k]
        best = None
        hypotheses, h = _length_hypotheses(model, estimate, [len(s) for s in frozen]), 0
    if len(frozen) == len(model.estimate) or best is None:
        return frozen
    return frozen + search.polish(best[0], frozen)


def _required(
    cands: Candidates, options: list[list[int]], free: list[list[int]], specials: set[int]
) -> list[list[int]]:
    """Per position, the tokens some live sequence must hold there: those the embedding gradients
    place (certain), or without a placement every candidate where there are no more than rows."""
    out = []
    occ = cands.occurrences
    for p, toks in enumerate(options):
        if occ is not None:
            pinned = occ.pinned[p] if p < len(occ.pinned) else set()
            out.append([t for t in toks if t in pinned and t not in specials])
        else:
            out.append(list(toks) if len(toks) <= len(free[p]) else [])
    return out


def _assign(cost: np.ndarray, toks: list[int], must: list[int], distinct: bool = False) -> list[int]:
    """Tokens for the rows of `cost` (rows x toks) at least cost such that every token in `must`
    is held by some row (as far as there are rows): each required token takes one row, every other
    row takes its own best token. With nothing required and `distinct`, rows take distinct tokens
    where there are enough (without a placement, a sparser filling is the better guess)."""
    rows = cost.shape[0]
    index = {t: k for k, t in enumerate(toks)}
    required = [index[t] for t in must if t in index][:rows]
    best = cost.argmin(axis=1)
    if distinct and not required and len(toks) >= rows:
        r_idx, c_idx = linear_sum_assignment(cost)
        return [toks[int(k)] for _, k in sorted(zip(r_idx, c_idx, strict=True))]
    if not required:
        return [toks[int(k)] for k in best]
    spare = rows - len(required)
    columns = np.concatenate(
        [cost[:, required], np.repeat(cost.min(axis=1, keepdims=True), spare, axis=1)], axis=1
    )
    r_idx, c_idx = linear_sum_assignment(columns)
    out = [toks[int(k)] for k in best]
    for r, c in zip(r_idx, c_idx, strict=True):
        out[r] = toks[required[c]] if c < len(required) else toks[int(best[r])]
    return out


# ------------------------------------------------------------------ labels


def _labels(victim: Victim, grads: dict[str, torch.Tensor], seqs: list[list[int]]) -> tuple[int, ...] | None:
    weight, _ = head_parameters(victim)
    if weight is None or weight not in grads:
        return infer_labels(victim, grads, len(seqs))
    head = victim.model.get_submodule(weight.rsplit(".", 1)[0])
    feats: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, a: feats.append(a[0].detach()))
    ids, mask = _pad(victim, seqs)
    try:
        with torch.no_grad():
            victim.logits(attention_mask=mask, input_ids=ids)
    finally:
        handle.remove()
    h = feats[0]
    if h.dim() == 3:  # GPT-2 scores every position and pools the last real token
        last = mask.sum(1) - 1
        h = h[torch.arange(len(seqs)), last]
    g = grads[weight].detach().double()  # (C, hidden) = mean_i (p_i - y_i) h_i^T
    coeffs = torch.linalg.lstsq(h.double().T, (g * len(seqs)).T).solution  # (B, C)
    # row i is c_i (p_i - y_i) with c_i > 0 (c_i = 1, or a per-example clipping factor): its one
    # negative entry is the label, whatever the scale
    return tuple(int(c) for c in coeffs.argmin(-1))


EXACT = register(ExactAttack())
