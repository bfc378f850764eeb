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
   sequences by a search (`encoder_search`) on the span residual of the first attention's context
   (its output projection's input) of whole sequences, under length hypotheses (`lengths`).
   Rotary decoders (Llama, Qwen2, Mistral, Gemma: found by a probe, not by name) add positions inside
   the attention, so the first layer reads each token alone: one token set serves every position,
   and the prefix growth finds where sequences end. Its check is cut at MARGIN times the residual of
   the extensions kept last (true ones sit at the update's precision, false ones orders above); a run
   of one repeated token is not grown there (equal values: its context is its first token's).
   Language modelling leaves each sequence's last token out of every span (its position predicts
   nothing): it is read off the output layer's gradient once the prefixes are known (`final_tokens`).
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

from gradleak.attacks.base import AttackOptions, Knowledge, Progress, Reconstruction, register
from gradleak.attacks.context import Candidates, ContextCheck, context_residuals, pad
from gradleak.attacks.encoder_search import assemble_encoder
from gradleak.attacks.ends import hidden_prefixes
from gradleak.attacks.final_tokens import append_final_tokens
from gradleak.attacks.labels import head_parameters, infer_labels
from gradleak.attacks.occurrences import Occurrences, resolve
from gradleak.attacks.spans import Span, noisy_span_of, residual, span_of
from gradleak.attacks.structure import (
    Projection,
    capture_input,
    context_views,
    gradient_rows,
    input_views,
    is_causal,
    layer_blocks,
    lift,
    mixing_projections,
    pick_view,
    position_embedding,
    position_free,
    row_cap,
    stop_module,
    token_local,
    word_embedding_name,
)
from gradleak.attacks.tokens import decode
from gradleak.client import Update
from gradleak.errors import Refusal
from gradleak.victims import Victim

log = logging.getLogger(__name__)

ACCEPT = 1e-3  # largest relative span residual of a present candidate (float64 updates)
ACCEPT_FLOAT32 = 2e-2  # the same for updates computed in float32
MARGIN = 1000.0  # present candidates lie within this factor of the run's typical best residual
CONTEXT_GAP = 4.0  # the context check's span may be cut at a weaker gap (its rows' own rounding)
CHUNK = 4096
CELLS = 2**25  # numbers in one chunk's largest tensor (the decoder check's attention and cache copies)
MAX_PREFIXES = 2048
# the decoder check's cut never falls below this: a cached extension and the client's full sequence can
# differ by float32-level rounding (rotary models in float64), while false extensions sit near 1e-2
CUT_FLOOR = 1e-5
CUT_GAP = 100.0  # a jump this large between consecutive residuals under the cut separates true from false
NULL_SAMPLES = 64  # random tokens per position whose residuals show what "absent" looks like
NULL_RATIO = 0.5  # perturbed updates: a candidate's residual must be below this x the null median
OUTLIER_Z = 8.0  # perturbed updates: rows standing out of the noise by this robust z-score
NOISY_FILL = 0.9  # perturbed updates: a span above this fraction of the width carries no signal


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


@dataclass
class _Scene:
    """What the exact attack's steps share: the update's gradients and where the span checks look."""

    grads: dict[str, torch.Tensor]
    first: tuple[Projection, ...]  # the first attention's input projections (the span checks)
    causal: bool
    groups: list[tuple[Projection, ...]]  # context-check candidates, first choice first
    hidden: int
    notes: list[str]
    span1: Span | None = None
    noisy: bool = False
    threshold: float = ACCEPT
    check: ContextCheck | None = None
    position_free: bool = False  # the first layer reads tokens without positions (rotary models)
    cap: int = 0  # the most dimensions the first view's rows can span (the width; LoRA: the rank)


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
        scene = _scene(victim, update)
        _require_gradients(scene)
        _require_room(scene, knowledge, options)
        _first_span(scene, knowledge, options)
        if scene.noisy and scene.span1.rank >= NOISY_FILL * scene.hidden:  # type: ignore[union-attr]
            scene.notes.append("no signal stands out of the noise: nothing recovered")
            return Reconstruction((), (), None, (), time.perf_counter() - start, tuple(scene.notes))
        _choose_context_check(scene, options)
        scene.threshold = _threshold(update) if not scene.noisy else 1.0
        gen = torch.Generator().manual_seed(options.seed)
        candidates = _candidates(victim, scene, knowledge, gen, progress)
        sequences = _sequences(victim, scene, candidates, knowledge, gen, start + options.time_budget)
        labels = None
        if victim.task == "classify" and sequences:
            labels = _labels(victim, scene.grads, sequences)
        return Reconstruction(
            token_ids=tuple(tuple(s) for s in sequences),
            texts=decode(victim, [list(s) for s in sequences]),
            labels=labels,
            trace=tuple(float(s[0]) if len(s) else float("nan") for s in candidates.scores),
            seconds=time.perf_counter() - start,
            notes=tuple(scene.notes),
        )


def _scene(victim: Victim, update: Update) -> _Scene:
    """Where the checks look: the first attention's input projections, and the context check's
    groups (encoders: the attention's own context first, which the search can score fast, the MLP
    input where that span shows no clean rank; decoders: the MLP input)."""
    notes: list[str] = []
    if update.kind == "fedavg" and update.local_steps > 1:
        notes.append(
            "FedAvg with several local steps: the delta mixes gradients at several weights, "
            "so the span argument holds only approximately"
        )
    grads = update.gradients()
    views = input_views(victim, 0)
    first = pick_view(grads, views)
    if not token_local(victim, first[0]):
        raise Refusal(
            f"the exact attack needs a gradient that reads each token on its own (the first attention's "
            f"input projections, or LoRA factors on them); the first trained map, {first[0].name}, reads "
            "tokens in their context (LoRA on the MLP only), so no candidate token can be checked alone"
        )
    causal = is_causal(victim)
    second = pick_view(grads, context_views(victim, 0))
    mixing = mixing_projections(victim, 0)
    shared = not causal and mixing[0].reads is None and all(p.name in grads for p in mixing)
    groups = (
        [mixing, second]
        if shared and all(p.name in grads for p in second)
        else [mixing if shared else second]
    )
    if first is not views[0]:
        notes.append(
            f"first-layer span from {first[0].name}: the input seen through the LoRA factor it reads "
            "(the A factors' gradient is zero, as while B = 0, or shows no clean rank, as float32 weights "
            f"blur A's small change after the first round), at most {row_cap(victim, first)} dimensions"
        )
    return _Scene(grads, first, causal, groups, victim.hidden_size, notes, cap=row_cap(victim, first))


def _require_gradients(scene: _Scene) -> None:
    """Refuse where the client withheld a gradient the span checks need."""
    for p in (*scene.first, *scene.groups[-1]):
        if p.name not in scene.grads:
            raise Refusal(f"the exact attack needs the gradient of {p.name}, which the client withheld")


def _room(cap: int, hidden: int) -> str:
    """What bounds a span: the hidden width, or (LoRA) the adapters' rows."""
    if cap and cap < hidden:
        return f"{cap} dimensions (the LoRA factors' rows: the rank r bounds what they span)"
    return f"the hidden width {hidden}"


def _require_room(scene: _Scene, knowledge: Knowledge, options: AttackOptions) -> None:
    """Refuse (unless forced) a batch whose known token count reaches the hidden width (or the
    rows a LoRA view can span)."""
    limit = min(scene.cap or scene.hidden, scene.hidden)
    if knowledge.lengths is not None and sum(knowledge.lengths) >= limit and not options.force:
        raise Refusal(
            f"the batch holds {sum(knowledge.lengths)} tokens, at or above {_room(scene.cap, scene.hidden)}: "
            "span checks cannot separate them (use --force to try anyway)"
        )


def _first_span(scene: _Scene, knowledge: Knowledge, options: AttackOptions) -> None:
    """The first layer's span, and whether the update is treated as noisy. A perturbed update (the
    server knows the protocol) is noisy even where a gap shows: fixed thresholds tuned to rounding
    error would let noise-level false candidates through. Without a clean rank and unforced: refuse."""
    hidden = scene.hidden
    span1 = span_of(gradient_rows(scene.grads, scene.first))
    noisy = knowledge.perturbed or (span1.full and options.force)
    if span1.full and not noisy:
        raise Refusal(
            f"the first layer's gradient has no clear rank below {_room(scene.cap, hidden)} "
            f"(rank {span1.rank}, gap {span1.gap:.3g}): the batch's token count reaches it, "
            "or the update is perturbed; span checks cannot hold (use --force to try anyway)"
        )
    # the rank: by the gap where one shows (noise still below rounding), else above the noise bulk
    how = "at its singular-value gap"
    if noisy and span1.full:
        span1 = noisy_span_of(gradient_rows(scene.grads, scene.first))
        how = "above the noise bulk"
    if noisy:
        scene.notes.append(
            f"perturbed update: first-layer rank {span1.rank} of {hidden} cut {how}, "
            "candidates ranked against random tokens"
        )
    scene.span1, scene.noisy = span1, noisy


def _choose_context_check(scene: _Scene, options: AttackOptions) -> None:
    """The context check (`_context_check`); one whose span fills the width passes every arrangement:
    refused unless forced (then said in the notes)."""
    check = _context_check(scene.grads, scene.groups, scene.noisy)
    if check.span.full and not scene.noisy:
        group = next(g for g in scene.groups if g[0] == check.proj)
        cap = min(
            check.span.dim, sum(int(scene.grads[p.name].shape[1 if p.transposed else 0]) for p in group)
        )
        message = (
            f"the context check's gradient ({check.proj.name}) has no clear rank below "
            f"{_room(cap, scene.hidden)} (rank {check.span.rank}, gap {check.span.gap:.3g}): the batch's "
            "tokens reach it, so every arrangement of the candidates would pass it"
        )
        if not options.force:
            raise Refusal(message + " (use --force to try anyway)")
        scene.notes.append(message)
    scene.check = check


def _candidates(
    victim: Victim,
    scene: _Scene,
    knowledge: Knowledge,
    gen: torch.Generator,
    progress: Progress | None,
) -> Candidates:
    """Per occupied position, the tokens whose first-layer input lies in the span (from the token set
    where the word-embedding gradient shows it, else the vocabulary); clean updates: tightened, and
    restricted to what the embedding gradients allow (encoders)."""
    grads, noisy, notes, span1 = scene.grads, scene.noisy, scene.notes, scene.span1
    assert span1 is not None
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
    probe = scene.first[0]
    scene.position_free = position_free(victim, probe)
    limit = n_pos if n_pos is not None else victim.model.config.max_position_embeddings
    if scene.position_free and n_pos is None:  # positions enter inside attention: the assembly finds ends
        limit = min(limit, scene.hidden)
        notes.append("first-layer inputs are position-free (rotary positions): one token set for all")
    candidates = Candidates([], [])
    vocab_size = victim.model.get_input_embeddings().weight.shape[0]
    once: tuple[torch.Tensor, torch.Tensor] | None = None
    for p in range(limit):
        null = torch.randint(0, vocab_size, (NULL_SAMPLES,), generator=gen) if noisy else None
        if once is None:
            toks, scores = position_candidates(victim, probe, span1, pool, p, scene.threshold, null)
            if scene.position_free:
                if not noisy:  # one set for all positions: cut in the gap between true and false tokens
                    keep = scores < _split_at_gap(scores, scene.threshold)
                    toks, scores = toks[keep], scores[keep]
                once = (toks, scores)
        else:
            toks, scores = once
        if noisy and knowledge.batch_size is not None:  # ranked: the best few per position
            toks, scores = toks[: 4 * knowledge.batch_size + 4], scores[: 4 * knowledge.batch_size + 4]
        if len(toks) == 0 and n_pos is None:
            break
        candidates.tokens.append(toks)
        candidates.scores.append(scores)
        if progress is not None:
            progress(p + 1, limit, float(scores[0]) if len(scores) else float("nan"))
    if not noisy and not scene.position_free:  # (position-free sets were cut at their gap above)
        candidates = _tighten(candidates, scene.threshold)
        occ = None if scene.causal or vocab_pool else resolve(victim, grads, pool, len(candidates.tokens))
        if occ is not None:
            candidates = _restrict(candidates, occ)
            notes.append(
                f"embedding gradients place {sum(len(s) for s in occ.pinned)} token occurrences; "
                f"{sum(occ.complete)} of {len(occ.complete)} positions complete"
            )
    log.info(
        "rank %d/%d, %d positions, candidates per position %s",
        span1.rank,
        scene.hidden,
        len(candidates.tokens),
        [len(t) for t in candidates.tokens],
    )
    return candidates


def _sequences(
    victim: Victim,
    scene: _Scene,
    candidates: Candidates,
    knowledge: Knowledge,
    gen: torch.Generator,
    deadline: float,
) -> list[list[int]]:
    """Assemble the candidates into sequences (decoders: prefix growth; encoders: the search) until
    `deadline`, at most the batch size of them, plus (decoder classifiers) sentences hidden as
    prefixes of others; the notes say what held recovery back."""
    check, notes, span1 = scene.check, scene.notes, scene.span1
    assert check is not None and span1 is not None
    vocab_size = victim.model.get_input_embeddings().weight.shape[0]
    null_gen = (gen, vocab_size) if scene.noisy else None
    if scene.causal:
        sequences = _assemble_decoder(
            victim, candidates, check, scene.threshold, knowledge, deadline, null_gen, scene.position_free
        )
    else:
        sequences = assemble_encoder(
            victim, candidates, check, scene.threshold, knowledge, deadline, null_gen
        )
    if scene.causal and victim.task == "lm" and sequences:
        if knowledge.batch_size is not None:
            sequences = sequences[: knowledge.batch_size]
        sequences, note = append_final_tokens(victim, scene.grads, sequences)
        notes.append(note)
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
    if scene.causal and not scene.noisy and victim.task == "classify" and knowledge.batch_size is not None:
        missing = knowledge.batch_size - len(sequences)
        hidden = hidden_prefixes(victim, scene.grads, sequences, missing, scene.threshold)
        if hidden:
            notes.append(f"{len(hidden)} sentence(s) found as prefixes of others (pooled-position check)")
            sequences = sequences + hidden
    return sequences


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


def _cached_prefix_run(victim: Victim, proj: Projection, ids: torch.Tensor, cache=None, offset: int = 0):
    """Run `ids` (n, k) at positions offset.. through the model up to `proj` with a KV cache; return
    (captured input, cache)."""
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache(config=victim.model.config)
    n, k = ids.shape
    mask = torch.ones((n, offset + k), dtype=torch.long, device=victim.device)
    pos = torch.arange(offset, offset + k, device=victim.device).expand(n, k)
    module = stop_module(victim, proj)
    captured: list[torch.Tensor] = []

    def hook(mod, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _CacheStop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            victim.model(
                input_ids=ids.to(victim.device), attention_mask=mask, position_ids=pos,
                cache=cache, use_cache=True,
            )  # fmt: skip
    except _CacheStop:
        pass
    finally:
        handle.remove()
    if cache.get_seq_length() != offset + k:  # a model that ignores the cache saw the new tokens alone
        raise ValueError(f"the model did not use the KV cache ({cache.get_seq_length()} != {offset + k})")
    return lift(victim, proj, captured[0]), cache


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

        config = victim.model.config
        heads = int(getattr(config, "num_attention_heads", 1) or 1)
        width = victim.hidden_size
        # memory in bounds for long prefixes: the prefixes' attention scores and the new tokens' copies
        # of the cache, each at most about CELLS numbers a chunk
        n_pre = max(1, CELLS // (p * (p * heads + width)))
        keys, values = [], []
        for start in range(0, len(prefixes), n_pre):
            _, cache = _cached_prefix_run(victim, check.proj, torch.tensor(prefixes[start : start + n_pre]))
            keys.append(cache.layers[0].keys)
            values.append(cache.layers[0].values)
        all_keys, all_values = torch.cat(keys), torch.cat(values)
        n_new = max(1, min(CHUNK, CELLS // (p * width)))
        out = []
        for start in range(0, len(tokens), n_new):
            idx = torch.tensor(parents[start : start + n_new], device=all_keys.device)
            sub = DynamicCache(config=config)
            sub.update(all_keys[idx], all_values[idx], 0)
            new = torch.tensor(tokens[start : start + n_new]).unsqueeze(1)
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
    repeat_blind: bool = False,
) -> list[list[int]]:
    """Grow prefixes position by position; keep extensions whose last second-layer input is in span
    (with `null`: ranked against random-token extensions of the same prefixes, beam of 4B), until
    `deadline` (a time.perf_counter() value) passes.

    `repeat_blind` (position-free first layers): a run of one repeated token has the context of its
    first token at every position (equal values, attention weights summing to one), so the check
    holds no evidence for it; such runs are not grown."""
    if not cands.tokens or len(cands.tokens[0]) == 0:
        return []
    prefixes: list[list[int]] = [[int(t)] for t in cands.tokens[0]]
    scores: list[float] = [0.0] * len(prefixes)
    finished: list[tuple[list[int], float]] = []
    beam = MAX_PREFIXES if null is None or knowledge.batch_size is None else 4 * knowledge.batch_size
    scale: list[float] = []  # clean updates: the typical residual of the extensions kept last

    def cut(p: int, prefixes: list[list[int]]) -> float:
        if null is None and scale:  # true extensions sit at the update's precision, false ones far above
            return min(threshold, max(MARGIN * scale[-1], CUT_FLOOR))
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
        if scores:
            scale.append(min(scores))  # the best first token is a true one
    for p in range(1, len(cands.tokens)):
        toks = [int(t) for t in cands.tokens[p]]
        if not toks:
            break
        if time.perf_counter() > deadline:
            log.info("decoder assembly stopped at its time budget at position %d of %d", p, len(cands.tokens))
            break  # the prefixes so far are the answer: partial sequences, scored as such
        pairs = [
            (i, t)
            for i, pre in enumerate(prefixes)
            for t in toks
            if not (repeat_blind and all(x == t for x in pre))
        ]
        ext = [prefixes[i] + [t] for i, t in pairs]
        if not ext:
            break
        parent = [i for i, _ in pairs]
        res = extension_residuals(victim, check, prefixes, parent, [t for _, t in pairs])
        limit = cut(p, prefixes)
        if null is None:
            limit = _split_at_gap(res, limit)
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
        kept = sorted(float(res[k]) for k in torch.argsort(res)[: len(new)].tolist())
        if kept:  # precision drifts along the sequence: follow the kept extensions' median
            scale.append(max(scale[0], kept[len(kept) // 2]) if scale else kept[len(kept) // 2])
        prefixes, scores = new, new_scores
    finished.extend(zip(prefixes, scores, strict=True))
    finished.sort(key=lambda f: f[1])
    return [f[0] for f in finished]


def _split_at_gap(res: torch.Tensor, limit: float) -> float:
    """The cut lowered into the widest gap (at least CUT_GAP) between consecutive residuals under it, not
    below CUT_FLOOR:
    along long sequences the true extensions' residuals drift up and the false ones' down (the span
    fills more of the space) until a fixed margin above the true ones would reach the false ones."""
    under = torch.sort(res[res < limit]).values.double()
    if len(under) < 2:
        return limit
    ratios = under[1:] / under[:-1].clamp_min(1e-300)
    k = int(torch.argmax(ratios))
    if float(ratios[k]) < CUT_GAP:
        return limit
    return max(CUT_FLOOR, float(torch.sqrt(under[k] * under[k + 1])))  # never below rounding level


# ------------------------------------------------------------------ labels


def _labels(victim: Victim, grads: dict[str, torch.Tensor], seqs: list[list[int]]) -> tuple[int, ...] | None:
    weight, _ = head_parameters(victim)
    if weight is None or weight not in grads:
        return infer_labels(victim, grads, len(seqs))
    head = victim.model.get_submodule(weight.rsplit(".", 1)[0])
    feats: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda m, a: feats.append(a[0].detach()))
    ids, mask = pad(victim, seqs)
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
