"""Assembly of encoder sequences: assign each position's candidates to sequences so that every
sequence's contexts lie in the context check's span.

Coordinate descent over positions (Hungarian assignment of a position's tokens to the live
sequences, required tokens held, all else fixed), head swaps between sequences and token exchanges
within one, from relaxed starts (`relaxation.relaxed_start`, where the embedding gradients place
tokens and the relaxation is small) or seeded ones, and iterated-local-search shakes. Substitutions
are scored incrementally where the check is the first attention's context (`scorer.AttentionScorer`).
Lengths are hypotheses (`lengths.length_hypotheses`); a sequence whose contexts all lie in the span
is a true one, so solved sequences (and sentences one edit away from an unsolved slot) are frozen as
they appear and the rest searched again.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from gradleak.attacks.base import Knowledge
from gradleak.attacks.context import Candidates, ContextCheck, context_residuals
from gradleak.attacks.lengths import encoder_lengths, length_hypotheses
from gradleak.attacks.relaxation import relaxed_start
from gradleak.attacks.scorer import AttentionScorer
from gradleak.attacks.structure import attention_projections, mixing_projections
from gradleak.attacks.tokens import special_template
from gradleak.victims import Victim

log = logging.getLogger(__name__)

RESTARTS = 12  # seeded starts of the encoder search, while its time budget lasts
SETTLED = 1e-3  # a sequence whose span residual at a position is below SETTLED * threshold is settled there
SOLVED = 1e-3  # a sequence whose summed residual is below SOLVED * threshold is left alone by swaps
COPY = 1e3  # search cost of making a slot a copy of another sequence
SLICE = 2.0  # seconds a length hypothesis gets at least (a third of what is left at most otherwise)
SHAKE = 0.25  # share of free tokens an iterated-local-search restart redraws
STALL = 0.03  # a descent stops when a round lowers its cost by less than this share (and solves nothing)
VERIFY = 4  # moves ranked best by the sketched estimate that are scored exactly
PER_HYPOTHESIS = 3  # restarts of the encoder search per length hypothesis (lengths unknown)
# largest relaxation (open rows x positions x candidates at the busiest position) a start uses. Past
# it each relaxation takes seconds and the search did worse with it: MiniLM, CoLA B = 32 (near the
# width; 32 x 32 x 51), lengths known, 3 batches, 30 s: ROUGE-1 47.9 with relaxed starts, 70.9
# without. CoLA B = 16 (16 x 27 x 27) and every B = 8 batch measured lie below it and gain from it.
RELAX_CELLS = 25_000


class _EncoderSearch:
    """Assign each position's candidates to sequences so that every sequence's contexts lie in the
    check's span (see `assemble_encoder`)."""

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

    def best(self, trial: list[list[int]], before: torch.Tensor, group: int = 1) -> int | None:
        """Index of the group of `group` consecutive trial sequences that lowers the summed cost
        most below `before` (one value per group), or None. With a scorer the groups are ranked by
        sketched estimates and the best VERIFY scored exactly (sketched and exact residuals differ
        by a factor, so the gain is judged on exact ones); without one every group is scored."""
        n = len(trial) // group
        if self.scorer is None:
            picked = list(range(n))
        else:
            est = self.scorer.estimates(trial).sum(dim=1).reshape(n, group).sum(dim=1)
            picked = torch.argsort(est)[:VERIFY].tolist()
        exact = self.cost([trial[k * group + j] for k in picked for j in range(group)])
        exact = exact.reshape(len(picked), group).sum(dim=1)
        gain = before[picked] - exact
        j = int(torch.argmax(gain))
        return picked[j] if float(gain[j]) > 1e-12 else None

    def solved(self, seqs: list[list[int]]) -> list[bool]:
        """Whether each sequence's contexts all lie in the span (to the update's rounding)."""
        res = self.residuals(seqs)
        res = torch.where(torch.isinf(res), torch.zeros_like(res), res)
        return [bool(r.max() < SETTLED * self.threshold) for r in res]

    def edited(self, seq: list[int]) -> list[int] | None:
        """A solved sequence one token shorter or longer than `seq` (a token dropped, or a candidate
        inserted, the tokens after it shifted), if there is one: a slot of the wrong length often
        settles on its neighbour's sentence with a token too many or too few, which the hypothesis
        with the right lengths would otherwise have to find again from scratch."""
        pre, suf = len(self.prefix), len(self.suffix)
        n_pos, allowed = len(self.options), self.allowed

        def fits(x: list[int], start: int) -> bool:
            return len(x) <= n_pos and all(x[q] in allowed[q] for q in range(start, len(x) - suf))

        trial = [x for p in range(pre, len(seq) - suf) if fits(x := seq[:p] + seq[p + 1 :], p)]
        for p in range(pre, min(len(seq) - suf + 1, n_pos)):
            trial += [x for t in self.options[p] if fits(x := seq[:p] + [t] + seq[p:], p)]
        if not trial:
            return None
        if self.scorer is not None and len(trial) > VERIFY:
            trial = [trial[k] for k in torch.argsort(self.scorer.estimates(trial).sum(dim=1))[:VERIFY]]
        return next((x for x, ok in zip(trial, self.solved(trial), strict=True) if ok), None)

    def run(
        self, lengths: list[int], frozen: list[list[int]], restarts: int
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
            seqs, total = state.descend(seqs)
            if best is None or total < best[1]:
                best = (seqs, total)
            if any(
                ok and x not in seqs[:i]
                for i, (x, ok) in enumerate(zip(seqs, self.solved(seqs), strict=True))
                if i >= len(frozen)
            ):
                break  # a new sequence (not a copy) is solved
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
        while len(search.options) < width:  # known lengths may reach past the positions found occupied
            search.options.append([])
            search.allowed.append(set())
        opts = search.options
        self.free = [
            [i for i in range(n) if p < self.lengths[i] and not self.fixed[i][p]] for p in range(width)
        ]
        held = [{f[p] for f in frozen if p < len(f)} for p in range(width)]
        self.must = [
            [t for t in m if t not in held[p]]
            for p, m in enumerate(required(search.cands, opts[:width], self.free, search.specials))
        ]

    def start(self, rng: np.random.Generator | None) -> list[list[int]]:
        """A start for the open sequences: relaxed (`relaxation.relaxed_start`) where a scorer and a
        placement allow and the relaxation is small enough (RELAX_CELLS), else each position's
        required tokens first and the rest in turn."""
        cells = (self.n - self.n_frozen) * self.width * max((len(o) for o in self.s.options), default=0)
        if self.s.scorer is not None and self.s.cands.occurrences is not None and cells <= RELAX_CELLS:
            # (without a placement the candidates are most of the vocabulary: too many to relax)
            return self.relaxed(rng)
        seqs = [list(s) for s in self.base]
        for p in range(self.width):
            toks = self.s.options[p]
            if not toks or not self.free[p]:
                continue
            order = rng.permutation(len(self.free[p])) if rng is not None else np.arange(len(self.free[p]))
            rest = [t for t in toks if t not in self.must[p]]
            if rng is not None and rest and self.s.cands.occurrences is not None:
                # with a placement the rest are unplaced tokens in no useful order; without one
                # (withheld embeddings, noise) they come ranked, and the best ranked start
                rest = [rest[k] for k in rng.permutation(len(rest))]
            fill = [*self.must[p], *rest] or toks
            for k, r in enumerate(order):
                seqs[self.free[p][r]][p] = fill[k % len(fill)]
        return seqs

    def relaxed(self, rng: np.random.Generator | None) -> list[list[int]]:
        """The open sequences from a relaxed start; where the open sequences alive at a position
        must hold as many required tokens as they are, those are their only choices there."""
        assert self.s.scorer is not None
        choices = []
        for i in range(self.n_frozen, self.n):
            row, options = self.base[i], []
            for p in range(len(row)):
                if self.fixed[i][p] or not self.s.options[p]:
                    options.append([row[p]])
                elif self.must[p] and len(self.must[p]) >= len(self.free[p]):
                    options.append(self.must[p])  # the open sequences here hold the required tokens
                else:
                    options.append(self.s.options[p])
            choices.append(options)
        seed = int((rng or self.s.rng).integers(2**31))
        found = relaxed_start(self.s.scorer, choices, torch.Generator().manual_seed(seed))
        return [list(s) for s in self.base[: self.n_frozen]] + found

    def shake(self, seqs: list[list[int]], rng: np.random.Generator) -> list[list[int]]:
        """A copy of `seqs` with a share SHAKE of the open sequences' free tokens redrawn."""
        out = [list(x) for x in seqs]
        for p in range(self.width):
            if not self.s.options[p]:
                continue
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
        done = {
            i
            for i in range(self.n)
            if float(torch.nan_to_num(now[i], posinf=0.0).max()) < settled and seqs[i] not in seqs[:i]
        }
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
            for r, t in enumerate(assign(c, toks, must, distinct=spread)):
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
        k = s.best(trial, torch.tensor([float(current[a] + current[b]) for a, b, _ in moves]), group=2)
        if k is None:
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
            k = s.best(trial, current[i].repeat(len(trial)))
            if k is not None:
                seqs[i] = trial[k]
                changed = True
        return changed

    def descend(self, seqs: list[list[int]], cover: bool = True) -> tuple[list[list[int]], float]:
        """Rounds of sweeps, a crossover and swaps until none moves, or a round gains less than
        STALL of the cost without solving another sequence (a descent into a poor basin gives up)."""
        last, solved = float("inf"), 0
        for _round in range(2 * self.n):
            if time.perf_counter() > self.s.deadline:
                break
            for _sweep in range(8):
                if not self.sweep(seqs, cover):
                    break
            cost = self.s.cost(seqs)
            now, n_solved = float(cost.sum()), int((cost < SOLVED * self.s.threshold).sum())
            if now > (1 - STALL) * last and n_solved <= solved:
                break
            last, solved = now, n_solved
            moved = self.crossover(seqs, cost)
            moved = self.swap(seqs) or moved
            if not moved:
                break
        return seqs, self.total(seqs)

    def total(self, seqs: list[list[int]]) -> float:
        """Summed residuals, plus COPY for every sequence that repeats an earlier one."""
        repeats = sum(1 for i, x in enumerate(seqs) if x in seqs[:i])
        return float(self.s.cost(seqs).sum()) + COPY * repeats


def assemble_encoder(
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

    Lengths are a hypothesis (`length_hypotheses`: the best one, closest to the estimate, drawn
    again after every run, with each length that a run tried without solving a sequence of it
    counting against it). A sequence whose contexts all lie in the span is a true one, so solved
    sequences are frozen as soon as they appear ("peeled"), and the hypotheses for the remaining
    slots are drawn with what is left: fewer slots, fewer tokens, and, where the span's rank gives
    the batch's token count, a known sum of the remaining lengths."""
    prefix, suffix = special_template(victim.tokenizer)
    if len(cands.tokens) < len(prefix) + len(suffix):
        return []  # not even the template's positions are occupied
    total = None
    if null is None and knowledge.lengths is None and check.proj in mixing_projections(victim, 0):
        total = check.span.rank  # distinct contexts: one per token of the batch (while below the width)
    model = encoder_lengths(victim, cands, knowledge, total)
    log.debug("length model: %s", model)
    search = _EncoderSearch(victim, cands, check, threshold, deadline)
    frozen: list[list[int]] = []
    estimate = list(model.estimate)
    failed: dict[int, int] = {}  # per length, the runs that tried it and solved no sequence of it
    best: tuple[list[list[int]], float] | None = None
    first = True
    while len(frozen) < len(model.estimate):
        if not first and time.perf_counter() > deadline:
            log.info("encoder search stopped at its time budget with %d sequences solved", len(frozen))
            break
        lengths = length_hypotheses(model, estimate, [len(s) for s in frozen], failed)[0]
        now = time.perf_counter()
        search.deadline = min(deadline, now + max(SLICE, (deadline - now) / 3))  # let others be tried too
        seqs, total_cost = search.run(lengths, frozen, RESTARTS if model.known else PER_HYPOTHESIS)
        search.deadline = deadline
        first = False
        log.debug("lengths %s beside %d solved: residual %.3g", lengths, len(frozen), total_cost)
        if best is None or total_cost < best[1]:
            best = (seqs, total_cost)
        done: dict[int, list[int]] = {}  # slot: the sequence solved in it
        for i, (s, ok) in enumerate(zip(seqs, search.solved(seqs), strict=True)):
            if ok and s not in frozen and s not in done.values():  # a copy is not another sentence
                done[i] = s
        for n in set(lengths):
            if not any(len(s) == n for s in done.values()):
                failed[n] = failed.get(n, 0) + 1
        if not model.known:
            for i, s in enumerate(seqs):
                if i not in done and (e := search.edited(s)) and e not in frozen and e not in done.values():
                    done[i] = e
                    log.debug("slot %d of length %d solved by one edit (length %d)", i, len(s), len(e))
        if not done:
            continue  # the next hypothesis: this one's lengths now count against it
        frozen += list(done.values())
        # the slots left: the hypothesis's lengths (the edited slots' too), and their estimates
        estimate = [n for i, n in enumerate(estimate) if i not in done]
        best = None
    if len(frozen) == len(model.estimate) or best is None:
        return frozen
    return frozen + search.polish(best[0], frozen)


def required(
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


def assign(cost: np.ndarray, toks: list[int], must: list[int], distinct: bool = False) -> list[int]:
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
