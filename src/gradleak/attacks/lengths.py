"""Sequence lengths for the encoder search: what the gradients say about them (`LengthModel`), and
the hypotheses the search tries, closest to the estimate first (`length_hypotheses`)."""

from __future__ import annotations

from dataclasses import dataclass

from gradleak.attacks.base import Knowledge
from gradleak.attacks.context import Candidates
from gradleak.attacks.matching import special_template
from gradleak.victims import Victim

HYPOTHESES = 48  # length lists tried per peel of the encoder search, closest to the estimate first
NODES = 200_000  # search nodes spent enumerating them


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


def length_hypotheses(model: LengthModel, estimate: list[int], frozen: list[int]) -> list[list[int]]:
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
