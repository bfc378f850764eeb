"""A noise-robust exact attack (`exact-robust`): DAGER's span argument turned from a test into a score,
for updates perturbed by noise (absolute Gaussian noise, DP-SGD), where no span has a clean rank.

What it does, step by step (the exact attack's scene, refusals and token set are shared with
`exact`, not copied):

1. Token set: the word-embedding gradient's rows that stand out of the noise (robust z-score), as
   in `exact`'s perturbed mode; positions occupied likewise from the position-embedding gradient.
2. Signal subspaces are *weighted*: every singular direction of the first attention's weight
   gradient above the noise bulk's edge (the edge estimated from the median singular value through
   Marchenko-Pastur and Gavish & Donoho's threshold) is kept, scaled by the share of its energy that
   is signal (`spans.weighted_span_of`). A candidate's distance to that subspace is a score that
   falls smoothly as it aligns with strong directions; nothing passes or fails.
3. Candidates: per position, the best few tokens by that distance (all of the token set where the
   first layer reads tokens without positions: rotary decoders, where a ranked cut would drop true
   tokens; this is what held `exact` back on SmolLM2 under noise).
4. Decoders: a beam search over positions. An extension's score is its context input's distance to
   the second check's weighted subspace, divided by the median distance of random-token extensions
   of the same beam (the null: 1 means "no evidence"); a beam's score is the mean of those ratios
   plus `PRIOR_WEIGHT` times the language prior's mean NLL per token (`attacks.prior`, the text
   decoded from the victim's ids, so any victim works with any prior). A beam ends where its best
   extension is no better than END_RATIO of the null or JUMP times its own level (a batch of one on a
   model that shows its positions fills every occupied position instead); beams are cut at their
   sentence's end (coverage of the token set for a batch of one, else a change point), and the batch
   size's best distinct ones are kept, greedily rewarding coverage of the token set.
5. Encoders (bidirectional contexts: a prefix has no score of its own; BERT's additive embeddings):
   a. Placement by least squares (`occurrences.regress`): the position-embedding gradient's row p is
      the sum of the word-embedding rows of the tokens that occur only at p (both are gradients of
      the same embedding sum), so solving the position rows on the token set's word rows puts each
      such token at its position (coefficient near 1, near 0 elsewhere) to the noise, whose scale
      the rows of tokens outside the set show. A position whose remainder is at the noise's level
      holds exactly its placed tokens; elsewhere any token not placed at such a position may sit.
      On MiniLM at sigma 1e-5 it places every single-position token of a batch of four (tested),
      where the first layer's per-position distances no longer rank the true tokens first.
   b. Lengths: the closing token ([SEP]) occurs at every sequence's end, so its coefficient splits
      over the end positions (`lengths.regressed_lengths`); where the word rows stand well out of
      the noise (LENGTHS_SNR) those ends fix the lengths, else the search tries hypotheses.
   c. `exact`'s encoder search on the weighted subspaces, for SEARCH_SHARE of the time budget.
   d. Refinement (`attacks.refine`): swaps, tail exchanges, substitutions, length and label moves,
      kept where they lower the mismatch between the shared word and position rows and those the
      candidate batch produces (every layer and the label shape that input gradient), with kicks
      (iterated local search) until the budget ends or the mismatch is down to the noise's energy.

What is new against DAGER (Petrov et al., NeurIPS 2024) and TIGER (Kalikman et al., 2026):
DAGER holds each candidate to a fixed span-residual threshold at a rank chosen by a gap, so under
noise it either rejects true tokens or admits everything; its published noise row is that of a
hard test. TIGER optimises continuous token embeddings against the attention-gradient subspace.
Here the search stays discrete (DAGER's candidates and prefix growth, `exact`'s KV-cached checks)
but every test is a score against an estimated, weighted signal subspace normalised by a null
sample, with a language prior in the beam's score (LAMP's idea, Balunovic et al. 2022, applied to
exact-recovery beams). For encoders the embedding gradients' linear sums, which DAGER does not use
and `exact` reads only as exact orthogonality, are solved by least squares to place tokens and
ends under noise, and where the span search stalls the batch is refined discretely against the
whole input gradient (a discrete counterpart of TIGER's continuous refinement; TIGER's own
optimisation of continuous embeddings is not done here).

Why a separate registered attack and not `exact`'s perturbed mode changed: users compare the two on
the same batches (`--attack exact` and `--attack exact-robust` in one sweep or study), and `exact`'s
published rows stay reproducible.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

import torch

from gradleak.attacks.base import AttackOptions, Knowledge, Progress, Reconstruction, register
from gradleak.attacks.context import Candidates, ContextCheck, context_residuals
from gradleak.attacks.encoder_search import assemble_encoder
from gradleak.attacks.exact import (
    NULL_RATIO,
    _labels,
    _layer_inputs,
    _require_gradients,
    _require_room,
    _Scene,
    _scene,
    extension_residuals,
    occupied_positions,
    token_set,
)
from gradleak.attacks.final_tokens import append_final_tokens
from gradleak.attacks.lengths import regressed_lengths
from gradleak.attacks.occurrences import Occurrences, Regression, regress
from gradleak.attacks.prior import LanguagePrior, load_prior
from gradleak.attacks.refine import EmbeddingFit, refine
from gradleak.attacks.spans import residual, weighted_span_of
from gradleak.attacks.structure import gradient_rows, position_embedding, position_free
from gradleak.attacks.tokens import decode, special_template
from gradleak.client import Update
from gradleak.errors import Refusal
from gradleak.victims import Victim

log = logging.getLogger(__name__)

BEAM = 8  # beams per sequence of the batch
SHORTLIST = 2  # extensions per beam kept by distance before the prior scores them
PER_POSITION = 3  # candidates per position per sequence of the batch (ranked by distance), plus EXTRA
EXTRA = 4
NULL = 16  # random-token extensions per position that show what "absent" looks like
END_RATIO = NULL_RATIO  # a beam ends where its best extension's distance is above this x the null's
SETTLE = 3  # positions a beam's ratios take to show their level (before that only END_RATIO cuts)
JUMP = 4.0  # a beam stops where an extension's ratio is JUMP x its median so far (its sentence ended)
LONGEST = 1.3  # a sequence holds at most this many tokens per token of the set (plus two)
USES = 3  # the most occurrences of one token in a sequence
PRIOR_WEIGHT = 0.05  # weight of the prior's mean NLL per token (nats) beside the mean distance ratio
PRIOR_EVERY = 8  # the prior re-ranks the beam every this many positions, and the finished beams (its cost)
COVER = 2.0  # cost of leaving the whole token set out of the chosen sequences (a share of it: its share)
# the word rows' signal-to-noise ratio (`occurrences.Regression.snr`) from which the closing token's
# coefficients fix the lengths (else the encoder search tries length hypotheses). Chosen on MiniLM,
# Rotten Tomatoes, B = 4, seeds 0-7 (a scratch diagnosis): at sigma 1e-5 the ratio was above it and
# the coefficients' ends were mostly exact; at 5e-5 and 1e-4 it was well below, and fixed lengths did
# worse than the hypotheses. The held-out check is `benchmarks/noise.py --first-seed 100`
LENGTHS_SNR = 10.0
SEARCH_SHARE = 0.1  # encoders: the share of the time budget the search gets before `refine` takes over
NO_SIGNAL = 0.9  # mean null-normalised distance of the best beam above which nothing was recovered


class RobustExactAttack:
    name = "exact-robust"
    uses_prior: bool = True  # the run spec's `prior` ranks its beams (and is part of its run's key)

    def reconstruct(
        self,
        victim: Victim,
        update: Update,
        knowledge: Knowledge,
        options: AttackOptions,
        progress: Progress | None = None,
    ) -> Reconstruction:
        start = time.perf_counter()
        if knowledge.batch_size is None:
            raise Refusal(
                "attack 'exact-robust' keeps the batch size's best beams, so it needs the batch size, "
                "which this scenario withholds"
            )
        scene = _scene(victim, update)
        _require_gradients(scene)
        _require_room(scene, knowledge, options)
        _weigh(scene)
        assert scene.span1 is not None and scene.check is not None
        scene.notes.append(
            f"weighted subspaces (directions above the noise bulk's edge, weighted by their signal share): "
            f"first layer {scene.span1.rank}, context check {scene.check.span.rank} of {scene.hidden}"
        )
        prior = None
        if scene.causal:  # the prior ranks decoder beams; the attacker's fixed model: seed 0 always
            prior = load_prior(options.prior, device=str(victim.device), seed=0)
            scene.notes.append(
                f"language prior: {options.prior}"
                + ("" if prior is None else f" (weight {PRIOR_WEIGHT} per nat)")
            )
        else:
            scene.notes.append(
                f"language prior: {options.prior}, not read (encoders are not searched by beams)"
            )
        gen = torch.Generator().manual_seed(options.seed)
        cands, pool, fit = _ranked_candidates(victim, scene, knowledge, progress)
        deadline = start + options.time_budget
        # encoders whose embedding sums were solved: the found batch is refined against them
        refining = not scene.causal and fit is not None and EmbeddingFit.available(victim, scene.grads)
        if scene.causal:
            sequences, best = _beam_decoder(victim, scene, cands, pool, knowledge, gen, prior, deadline)
            if best > NO_SIGNAL:
                scene.notes.append(
                    f"no sequence stands out of the noise (best mean distance {best:.2f} of the null's): "
                    "nothing recovered"
                )
                sequences = []
            if victim.task == "lm" and sequences:
                sequences, note = append_final_tokens(victim, scene.grads, sequences)
                scene.notes.append(note)
        else:
            end = start + (SEARCH_SHARE if refining else 1.0) * options.time_budget
            sequences = _encoder_batch(victim, scene, cands, fit, knowledge, gen, end)
        sequences = sequences[: knowledge.batch_size]
        labels = None
        if victim.task == "classify" and sequences:
            labels = _labels(victim, scene.grads, sequences)
            if refining and fit is not None:
                prefix, suffix = special_template(victim.tokenizer)
                specials = {*prefix, *suffix}
                found, refined, note = refine(
                    victim,
                    scene.grads,
                    sequences,
                    list(labels),
                    [[int(t) for t in toks if int(t) not in specials] for toks in cands.tokens],
                    (len(prefix), len(suffix)),
                    deadline,
                    options.seed,
                    fit.sigma,
                    knowledge.lengths is not None,
                )
                sequences, labels = found, tuple(refined)
                scene.notes.append(note)
        return Reconstruction(
            token_ids=tuple(tuple(s) for s in sequences),
            texts=decode(victim, [list(s) for s in sequences]),
            labels=labels,
            trace=tuple(float(s[0]) if len(s) else float("nan") for s in cands.scores),
            seconds=time.perf_counter() - start,
            notes=tuple(scene.notes),
        )


def _encoder_batch(
    victim: Victim,
    scene: _Scene,
    cands: Candidates,
    fit: Regression | None,
    knowledge: Knowledge,
    gen: torch.Generator,
    end: float,
) -> list[list[int]]:
    """Encoders: `exact`'s search on the weighted subspaces until `end` (SEARCH_SHARE of the time
    budget where `refine` follows), with the lengths the closing token's coefficients give where the
    noise allows."""
    assert scene.check is not None and knowledge.batch_size is not None
    vocab = victim.model.get_input_embeddings().weight.shape[0]
    lengths = None
    if fit is not None and cands.occurrences is not None and knowledge.lengths is None:
        lengths = _regressed_lengths(victim, fit, cands.occurrences, knowledge.batch_size)
    if lengths is not None:
        scene.notes.append(f"lengths read off the closing token's coefficients: {lengths}")
    told = knowledge if lengths is None else replace(knowledge, lengths=tuple(lengths))
    return assemble_encoder(victim, cands, scene.check, 1.0, told, end, (gen, vocab))


def _weigh(scene: _Scene) -> None:
    """The scene's first-layer span and context check as weighted subspaces (module doc, step 2)."""
    scene.noisy = True
    scene.threshold = 1.0
    scene.span1 = weighted_span_of(gradient_rows(scene.grads, scene.first))
    group = scene.groups[0]  # encoders: the first attention's context (the search's fast scorer)
    scene.check = ContextCheck(group[0], weighted_span_of(gradient_rows(scene.grads, group)))


def sequence_scores(
    victim: Victim,
    update: Update,
    sequences: list[list[int]],
    prior: LanguagePrior | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Each whole decoder sequence's score as the beam ranks it (lower: more likely the client's):
    the mean over its positions of the context input's distance to the weighted subspace over the
    median distance of random tokens there (after the same prefix), plus PRIOR_WEIGHT x the prior's
    mean NLL per token of its text."""
    scene = _scene(victim, update)
    _require_gradients(scene)
    if not scene.causal:
        raise Refusal("sequence scores read prefixes: they need a decoder (causal attention)")
    _weigh(scene)
    check = scene.check
    assert check is not None
    gen = torch.Generator().manual_seed(seed)
    vocab = victim.model.get_input_embeddings().weight.shape[0]
    res = context_residuals(victim, check, sequences)
    out = []
    for i, seq in enumerate(sequences):
        ratios = [
            float(res[i, p]) / max(_null(victim, check, seq[:p], gen, vocab), 1e-300) for p in range(len(seq))
        ]
        out.append(_mean(ratios))
    score = torch.tensor(out, dtype=torch.float64)
    if prior is not None:
        score = score + PRIOR_WEIGHT * prior.nll(decode(victim, sequences))
    return score


def _ranked_candidates(
    victim: Victim, scene: _Scene, knowledge: Knowledge, progress: Progress | None
) -> tuple[Candidates, set[int] | None, Regression | None]:
    """Per occupied position, the best PER_POSITION x B + EXTRA tokens of the pool by distance to the
    first layer's weighted subspace; every pool token where the first layer is position-free and the
    pool came from the embedding gradient (the pool is then the batch's tokens: all are needed). Also
    that token set (None where the embedding gradient did not give it)."""
    assert scene.span1 is not None and knowledge.batch_size is not None
    pool = token_set(victim, scene.grads, True)
    from_embedding = pool is not None
    known = None if pool is None else set(pool.tolist())
    if pool is None:
        pool = torch.arange(victim.model.get_input_embeddings().weight.shape[0])
        scene.notes.append("word-embedding gradient not available: the whole vocabulary is ranked")
    else:
        scene.notes.append(
            f"token set of {len(pool)} ids standing out of the word-embedding gradient's noise"
        )
    probe = scene.first[0]
    scene.position_free = position_free(victim, probe)
    n_pos = occupied_positions(victim, scene.grads, True)
    if n_pos is None:
        n_pos = max(knowledge.lengths) if knowledge.lengths else None
    keep = PER_POSITION * knowledge.batch_size + EXTRA
    if scene.position_free:
        res = residual(scene.span1, _layer_inputs(victim, probe, pool, 0))
        order = torch.argsort(res)
        if not from_embedding:
            order = order[:keep]
        limit = n_pos if n_pos is not None else min(victim.model.config.max_position_embeddings, scene.hidden)
        scene.notes.append(f"first-layer inputs are position-free: {len(order)} candidates at every position")
        return Candidates([pool[order]] * limit, [res[order]] * limit), known, None
    found = position_embedding(victim.model)
    if n_pos is None and found is not None and f"{found[0]}.weight" in scene.grads:
        scene.notes.append("no position-embedding row stands out of the noise: nothing recovered")
        return Candidates([], []), known, None
    if n_pos is None:
        raise Refusal(
            "attack 'exact-robust' needs the occupied positions (position-embedding gradient) or the lengths "
            "where the first layer reads positions; this update shares neither"
        )
    if not scene.causal and from_embedding:
        placed = _placed_candidates(victim, scene, pool, n_pos)
        if placed is not None:
            return placed[0], known, placed[1]
    tokens, scores = [], []
    for p in range(n_pos):
        res = residual(scene.span1, _layer_inputs(victim, probe, pool, p))
        order = torch.argsort(res)[:keep]
        tokens.append(pool[order])
        scores.append(res[order])
        if progress is not None:
            progress(p + 1, n_pos, float(res[order[0]]))
    return Candidates(tokens, scores), known, None


def _placed_candidates(
    victim: Victim, scene: _Scene, pool: torch.Tensor, n_pos: int
) -> tuple[Candidates, Regression] | None:
    """Encoders: candidates from the embedding gradients' sums solved by least squares
    (`occurrences.regress`): at a complete position the tokens placed there, elsewhere those and
    every token not placed at a complete position, by coefficient (the search's `required` tokens
    are the placed ones). None where the sums cannot be solved."""
    fit = regress(victim, scene.grads, pool, n_pos)
    if fit is None:
        return None
    occ = fit.occurrences()
    tokens, scores = [], []
    for p in range(n_pos):
        coef = fit.coefficients[:, p]
        keep = [
            k
            for k, t in enumerate(fit.tokens)
            if t in occ.pinned[p] or (not occ.complete[p] and t in occ.unresolved)
        ]
        keep.sort(key=lambda k: -float(coef[k]))
        tokens.append(torch.tensor([fit.tokens[k] for k in keep], dtype=torch.long))
        scores.append(1.0 - coef[keep].clamp(0, 1))
    scene.notes.append(
        f"embedding-gradient sums (least squares, noise scale {fit.sigma:.2g}) place "
        f"{sum(len(s) for s in occ.pinned)} token occurrences; {sum(occ.complete)} of {n_pos} positions "
        f"complete, {len(occ.unresolved)} tokens free to sit at the others"
    )
    return Candidates(tokens, scores, occ), fit


def _regressed_lengths(
    victim: Victim, fit: Regression, occ: Occurrences, batch_size: int
) -> list[int] | None:
    """The sequences' lengths from the closing token's coefficients (`lengths.regressed_lengths`);
    None where the victim has no closing token or it is not in the token set, or where the noise
    is too strong for the coefficients to place the ends (`LENGTHS_SNR`)."""
    prefix, suffix = special_template(victim.tokenizer)
    if not suffix or suffix[-1] not in fit.tokens or fit.snr < LENGTHS_SNR:
        return None
    k = fit.tokens.index(suffix[-1])
    counts = [len(occ.pinned[p]) if occ.complete[p] else None for p in range(len(occ.pinned))]
    return regressed_lengths(fit.coefficients[k].tolist(), counts, batch_size, len(prefix) + len(suffix))


def _null(victim: Victim, check: ContextCheck, prefix: list[int], gen: torch.Generator, vocab: int) -> float:
    """Median distance of random-token extensions of `prefix` (the distance of "absent")."""
    rand = torch.randint(0, vocab, (NULL,), generator=gen).tolist()
    if not prefix:
        return float(context_residuals(victim, check, [[t] for t in rand])[:, 0].median())
    return float(extension_residuals(victim, check, [prefix], [0] * NULL, rand).median())


def _beam_decoder(
    victim: Victim,
    scene: _Scene,
    cands: Candidates,
    pool: set[int] | None,
    knowledge: Knowledge,
    gen: torch.Generator,
    prior: LanguagePrior | None,
    deadline: float,
) -> tuple[list[list[int]], float]:
    """Beam search over positions (module doc, step 4); returns the batch size's best distinct
    sequences and the best one's mean null-normalised distance."""
    check = scene.check
    assert check is not None and knowledge.batch_size is not None
    width = BEAM * knowledge.batch_size
    vocab = victim.model.get_input_embeddings().weight.shape[0]
    first = [int(t) for t in cands.tokens[0]] if cands.tokens else []
    if not first:
        return [], float("inf")
    res = context_residuals(victim, check, [[t] for t in first])[:, 0]
    null0 = max(_null(victim, check, [], gen, vocab), 1e-300)
    beams: list[tuple[list[int], list[float]]] = [
        ([t], [float(r) / null0]) for t, r in zip(first, res, strict=True)
    ]
    beams = _prune(victim, beams, width, prior)
    finished: list[tuple[list[int], list[float]]] = []
    longest = len(cands.tokens)
    # one sequence on a model that shows its positions: it fills every occupied one, so the best
    # extension always continues it (at high noise a true token's ratio nears the null's)
    fixed = knowledge.batch_size == 1 and not scene.position_free
    if pool:  # a sentence's distinct tokens are among the token set: few sentences repeat more
        longest = min(longest, math.ceil(LONGEST * len(pool)) + 2)
    for p in range(1, longest):
        if time.perf_counter() > deadline:
            log.info("robust decoder beam stopped at its time budget at position %d", p)
            break
        toks = [int(t) for t in cands.tokens[p]]
        if not toks or not beams:
            break
        prefixes = [b[0] for b in beams]
        parents = [i for i in range(len(beams)) for _ in toks]
        new = [t for _ in beams for t in toks]
        res = extension_residuals(victim, check, prefixes, parents, new)
        nulls = [
            max(_null(victim, check, pre, gen, vocab), 1e-300) for pre in prefixes[: knowledge.batch_size]
        ]
        null = sorted(nulls)[len(nulls) // 2]
        ratio = (res / null).tolist()
        grown: list[tuple[list[int], list[float]]] = []
        for i, (pre, hist) in enumerate(beams):
            mine = ratio[i * len(toks) : (i + 1) * len(toks)]
            limit = float("inf") if fixed else END_RATIO
            # (the first position's context is its token alone: not typical)
            if len(hist) > SETTLE and not fixed:
                limit = min(limit, JUMP * sorted(hist[1:])[(len(hist) - 1) // 2])
            ext = [
                (pre + [t], hist + [r])
                for t, r in zip(toks, mine, strict=True)
                if r <= limit and _fresh(pre, t)
            ]
            if not ext:  # nothing continues this beam: its sentence ended
                finished.append((pre, hist))
            grown += ext
        beams = _prune(victim, grown, width, prior if p % PRIOR_EVERY == 0 else None)
    finished += beams
    if not finished:
        return [], float("inf")
    if fixed:
        pass
    elif pool and knowledge.batch_size == 1:  # the sentence holds the whole token set: cut by coverage
        finished = [_covering_end(seq, hist, pool) for seq, hist in finished]
    else:
        finished = [_at_end(seq, hist) for seq, hist in finished]
    for seq, hist in finished[:3]:
        log.debug("beam %s ratios %s", seq, [round(r, 3) for r in hist])
    return _choose(victim, finished, prior, knowledge.batch_size, pool)


def _fresh(prefix: list[int], token: int) -> bool:
    """Whether `token` may extend `prefix`: not the last token again, not a bigram the prefix already
    holds, and not a token's USES + 1st use. Under noise, loops ("a b a b ...", "a a a") pass the check
    (their contexts average a few true ones: a position-free first layer cannot tell them apart) but
    natural sentences of this length almost never hold them."""
    if prefix[-1] == token or prefix.count(token) >= USES:
        return False
    last = prefix[-1]
    return not any(a == last and b == token for a, b in zip(prefix, prefix[1:], strict=False))


def _covering_end(seq: list[int], hist: list[float], pool: set[int]) -> tuple[list[int], list[float]]:
    """The prefix of a beam of a batch of one that best trades mean distance ratio against the share
    of the token set it leaves out (COVER each): past the sentence's end the ratios rise and
    nothing is left to cover, before it the token set is not yet covered."""
    best, cut, seen, total = float("inf"), len(seq), set(), 0.0
    for k, (t, r) in enumerate(zip(seq, hist, strict=True)):
        seen.add(t)
        total += r
        score = total / (k + 1) + COVER * len(pool - seen) / len(pool)
        if score < best:
            best, cut = score, k + 1
    return seq[:cut], hist[:cut]


def _at_end(seq: list[int], hist: list[float]) -> tuple[list[int], list[float]]:
    """The beam cut where its sentence ends: a beam that outlived its sentence continues with tokens
    whose distances, though under the growth limit, sit above the sentence's own. A change point in
    the log ratios: the split into a head and a tail of least squared deviation from their means,
    taken where the tail's mean lies at least JUMP above the head's."""
    logs = [math.log(max(r, 1e-12)) for r in hist]
    n = len(logs)
    if n < 3:
        return seq, hist

    def sse(xs: list[float]) -> float:
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs)

    best, cut = sse(logs), n
    for k in range(2, n):
        head, tail = logs[:k], logs[k:]
        if sum(tail) / len(tail) - sum(head) / len(head) < math.log(JUMP):
            continue
        cost = sse(head) + sse(tail)
        if cost < best:
            best, cut = cost, k
    return seq[:cut], hist[:cut]


def _choose(
    victim: Victim,
    finished: list[tuple[list[int], list[float]]],
    prior: LanguagePrior | None,
    batch_size: int,
    pool: set[int] | None,
) -> tuple[list[list[int]], float]:
    """The batch size's best distinct sequences, chosen greedily by mean distance ratio plus prior,
    less COVER x the share of the token set (where the embedding gradient gave it) each one adds to
    those chosen before: every token of the set occurs in some sequence of the batch."""
    unique: dict[tuple[int, ...], list[float]] = {}
    for seq, hist in finished:
        unique.setdefault(tuple(seq), hist)
    seqs = [list(k) for k in unique]
    base = torch.tensor([_mean(h) for h in unique.values()], dtype=torch.float64)
    if prior is not None:
        base = base + PRIOR_WEIGHT * prior.nll(decode(victim, seqs))
    out: list[list[int]] = []
    covered: set[int] = set()
    best = float("inf")
    while len(out) < min(batch_size, len(seqs)):
        score = base.clone()
        if pool:
            gain = torch.tensor(
                [len((set(s) & pool) - covered) / len(pool) for s in seqs], dtype=torch.float64
            )
            score = score - COVER * gain
        for k, s in enumerate(seqs):
            if s in out or any(o[: len(s)] == s for o in out):
                score[k] = float("inf")
        k = int(torch.argmin(score))
        if not torch.isfinite(score[k]):
            break
        out.append(seqs[k])
        covered |= set(seqs[k])
        best = min(best, float(base[k]) if prior is None else _mean(unique[tuple(seqs[k])]))
    return out, best


def _mean(hist: list[float]) -> float:
    return sum(hist) / len(hist)


def _rank(
    victim: Victim, beams: list[tuple[list[int], list[float]]], prior: LanguagePrior | None
) -> list[tuple[list[int], list[float]]]:
    """Beams best first by mean distance ratio plus PRIOR_WEIGHT x the prior's NLL of their text."""
    score = torch.tensor([_mean(h) for _, h in beams], dtype=torch.float64)
    if prior is not None and beams:
        score = score + PRIOR_WEIGHT * prior.nll(decode(victim, [b[0] for b in beams]))
    return [beams[k] for k in torch.argsort(score).tolist()]


def _prune(
    victim: Victim, beams: list[tuple[list[int], list[float]]], width: int, prior: LanguagePrior | None
) -> list[tuple[list[int], list[float]]]:
    """The `width` best beams: SHORTLIST x width by distance, then ranked with the prior."""
    if not beams:
        return []
    beams = sorted(beams, key=lambda b: _mean(b[1]))[: SHORTLIST * width]
    return _rank(victim, beams, prior)[:width]


ROBUST = register(RobustExactAttack())
