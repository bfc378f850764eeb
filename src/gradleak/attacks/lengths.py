"""Sequence lengths for the encoder search: what the gradients say about them (`LengthModel`), and
the hypotheses the search tries, closest to the estimate first (`length_hypotheses`)."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from gradleak.attacks.base import Knowledge
from gradleak.attacks.context import Candidates
from gradleak.attacks.tokens import special_template
from gradleak.victims import Victim

HYPOTHESES = 48  # length lists `length_hypotheses` returns, best first (the search takes the first)
NODES = 200_000  # search nodes spent enumerating them
FAILED = 2.0  # cost of a length (in squared moves) per run that tried it and solved no sequence of it


@dataclass(frozen=True)
class LengthModel:
    """What the gradients say about the sequences' lengths (longest first where a list)."""

    estimate: list[int]  # a first guess
    ends: list[int]  # lengths a sequence may have: the closing token may sit at length - 1
    certain: list[int]  # lengths some sequence has: the embedding gradients place a closing token there
    need: list[int]  # live sequences each position needs at least (a hard bound)
    total: int | None  # the batch's token count, where the context span's rank shows it
    known: bool = False  # the lengths were given


def encoder_lengths(
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
    possible = sorted({e for e in [*ends, n_pos] if e >= shortest})
    if target is not None and total is not None and possible:
        complete = occ.complete if occ is not None else [False] * n_pos
        lengths = _fill(lengths, target, total, possible, [*certain, n_pos], need, complete)
    while target is not None and len(lengths) < target:
        # (no token count) slots nothing else accounts for: the shortest length so far
        lengths.append(min(lengths))
    lengths = sorted(lengths, reverse=True)[: target or len(lengths)]
    # hard lower bounds only: without a placement, candidate counts overstate the tokens at a position
    bound = need if occ is not None else [1] * n_pos
    return LengthModel(sorted(lengths, reverse=True), sorted(set(ends) | {n_pos}), certain, bound, total)


def _fill(
    lengths: list[int],
    target: int,
    total: int,
    ends: list[int],
    held: list[int],
    need: list[int],
    complete: list[bool],
) -> list[int]:
    """`target` lengths adding up to `total` (where steps between possible `ends` allow) from the
    lower bounds `lengths`: missing slots start at the shortest end, then the shortest open slot is
    raised to its next end, again and again (water-filling: a batch's excess tokens are spread over
    its short sequences, whose ends the gradients place least well). One slot per `held` length (a
    certain end, the longest) stays; raises through a complete position whose token count is already
    met (only a token occurring twice there would allow it) come last."""
    out = sorted(lengths, reverse=True)[:target]
    out += [ends[0]] * (target - len(out))
    keep = list(held)
    movable = []
    for j, n in enumerate(out):
        if n in keep:
            keep.remove(n)
        else:
            movable.append(j)
    while sum(out) < total:
        live = [sum(1 for n in out if n > p) for p in range(len(need))]
        options = []
        for j in movable:
            nxt = next((e for e in ends if e > out[j]), None)
            if nxt is None or sum(out) + nxt - out[j] > total:
                continue
            crosses = any(complete[p] and live[p] >= need[p] for p in range(out[j], min(nxt, len(need))))
            options.append((crosses, out[j], j, nxt))
        if not options:
            break
        _, _, j, e = min(options)
        out[j] = e
    return sorted(out, reverse=True)


def length_hypotheses(
    model: LengthModel, estimate: list[int], frozen: list[int], failed: dict[int, int] | None = None
) -> list[list[int]]:
    """Length lists for the open slots (as many as `estimate`), longest first, closest to `estimate`
    first (smallest summed squared moves: an excess is more often spread over slots than piled on
    one): every length a possible end, every position left with the live sequences it needs beside
    the `frozen` (solved) ones, every certain end not ended by a frozen sequence used, and the
    lengths adding up to the token count left where it is known. Each length costs FAILED more for
    every earlier run that tried it and solved no sequence of it (`failed`): a run finds a sequence
    of the right length most of the time, so a length that keeps failing is likely wrong.
    Enumerated best first (A*, the bound being the least squared moves that reach the total)."""
    k = len(estimate)
    if model.known or k == 0:
        return [estimate]
    est = sorted(estimate, reverse=True)
    n_pos = len(model.need)
    live = [sum(1 for n in frozen if n > p) for p in range(n_pos)]
    short = [max(0, model.need[p] - live[p]) for p in range(n_pos)]
    minimal = [1 + max([p for p in range(n_pos) if short[p] > j], default=0) for j in range(k)]
    cover = {e for e in model.certain if e not in frozen} | ({n_pos} if n_pos not in frozen else set())
    ends = sorted(set(model.ends), reverse=True)
    left = None if model.total is None else model.total - sum(frozen)
    out = _best_first(est, ends, minimal, cover, left, n_pos, failed or {})
    if not out and left is not None:  # nothing adds up to the count: drop it
        out = _best_first(est, ends, minimal, cover, None, n_pos, failed or {})
    return out or [est]


def _best_first(
    est: list[int],
    ends: list[int],
    minimal: list[int],
    cover: set[int],
    total: int | None,
    n_pos: int,
    failed: dict[int, int],
) -> list[list[int]]:
    """Up to HYPOTHESES non-increasing length lists in order of summed squared distance to `est`
    plus FAILED per failed try of each length (then fewest slots moved): A* over slots, each a
    possible end at or above its minimum."""
    k = len(est)
    suffix = [sum(est[j:]) for j in range(k + 1)]

    def bound(j: int, acc: int) -> float:
        if total is None:
            return 0.0
        d = total - acc - suffix[j]
        if j == k:
            return 0.0 if d == 0 else float("inf")
        return d * d / (k - j)

    heap: list[tuple[float, int, int, tuple[int, ...]]] = [(bound(0, 0), 0, 0, ())]
    out: list[list[int]] = []
    pushed = 0
    while heap and len(out) < HYPOTHESES and pushed < NODES:
        f, moved, acc, chosen = heapq.heappop(heap)
        j = len(chosen)
        if j == k:
            if cover <= set(chosen):
                out.append(list(chosen))
            continue
        cost = f - bound(j, acc)
        prev = chosen[-1] if chosen else n_pos
        missing = [e for e in cover if e not in chosen]
        if len(missing) > k - j:
            continue
        rest = k - j - 1
        for e in ends:
            if e > prev or e < minimal[j]:
                continue
            if any(m > e for m in missing if m != e):
                continue  # a certain end longer than every slot left
            if total is not None and not (acc + e + sum(minimal[j + 1 :]) <= total <= acc + e + rest * e):
                continue
            g = cost + (e - est[j]) ** 2 + FAILED * failed.get(e, 0)
            h = bound(j + 1, acc + e)
            if h == float("inf"):
                continue
            heapq.heappush(heap, (g + h, moved + (e != est[j]), acc + e, (*chosen, e)))
            pushed += 1
    return out


def regressed_lengths(
    closing: list[float], counts: list[int | None], batch_size: int, shortest: int
) -> list[int]:
    """Sequence lengths under noise, from the embedding gradients' sums solved by least squares
    (`occurrences.regress`): the closing token's coefficient at each position (`closing`: it splits
    its coefficient over the positions where sequences end, and is near 0 elsewhere) and, where a
    position's tokens are all placed, how many distinct tokens sit there (`counts`, None elsewhere:
    at least that many sequences are live there). The last occupied position ends a sequence; the
    other ends are taken by falling coefficient wherever they leave every counted position enough
    live sequences (an end may repeat where fewer positions qualify). Longest first."""
    n_pos = len(closing)
    ends = [n_pos - 1]

    def fits(e: int) -> bool:
        return all(
            sum(1 for x in [*ends, e] if x < q) <= batch_size - c
            for q, c in enumerate(counts)
            if c is not None
        )

    order = sorted(range(shortest, n_pos - 1), key=lambda p: -closing[p])  # a token besides the template
    for p in order:
        if len(ends) >= batch_size:
            break
        if closing[p] > 0 and fits(p):
            ends.append(p)
    while len(ends) < batch_size:  # too few positions qualify: sequences of one length
        ends.append(max((e for e in ends if fits(e)), default=n_pos - 1))
    return sorted((e + 1 for e in ends), reverse=True)
