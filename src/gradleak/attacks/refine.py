"""Refinement of a recovered encoder batch against the shared embedding gradients.

Once a search has a batch of sequences, the update itself can say which of two close batches is the
client's: the gradient the candidate batch produces at its input embeddings, summed into word rows
(by token) and position rows (by position), must match the shared word- and position-embedding
gradients. That comparison reads every layer of the model (the input gradient of a token depends on
its whole sequence and the label), where the span checks read one layer's inputs; under noise it
averages the noise over every row of the two embedding matrices. What it costs is a forward and a
backward pass per changed sequence.

The moves are local: swap two sequences' tokens at a position, or their tails from it (which keeps
every position's tokens and changes the two lengths), put another candidate in one sequence's
position, drop its token there or put one in (a length one off), flip one sequence's label. Each
position's moves are scored together (only the changed sequences are run; the others'
contributions are cached), the best kept where it lowers the mismatch. Each sequence's
contribution is weighted by a fitted scale (least squares, at least 0): DP-SGD clips each
example's gradient by an unknown factor; without clipping the scales come out near 1.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from gradleak.attacks.context import pad
from gradleak.attacks.structure import position_embedding, word_embedding_name
from gradleak.victims import Victim

log = logging.getLogger(__name__)

CHUNK = 32  # sequences per forward and backward pass
SUBSTITUTES = 6  # candidates per position (by the candidates' order) tried in place of a token
FLOOR = 1.05  # a mismatch within this factor of the noise's energy is explained (its spread: ~1 %)
INSERTS = 2  # of those, the ones tried as an extra token at the position


@dataclass(frozen=True)
class Move:
    changed: dict[int, list[int]]  # sequence index: its new tokens
    labels: dict[int, int]  # sequence index: its new label


class EmbeddingFit:
    """The mismatch between the shared word and position rows and those a candidate batch produces."""

    def __init__(self, victim: Victim, grads: dict[str, torch.Tensor], tokens: set[int], positions: int):
        self.victim = victim
        found = position_embedding(victim.model)
        assert found is not None
        self.rows = sorted(tokens)
        self.at = {t: k for k, t in enumerate(self.rows)}
        self.positions = positions
        words = grads[word_embedding_name(victim.model)].detach().double().cpu()
        place = grads[f"{found[0]}.weight"].detach().double().cpu()[:positions]
        self.target = torch.cat([words[self.rows], place]).flatten()  # (R * d,)
        self.width = words.shape[1]

    @staticmethod
    def available(victim: Victim, grads: dict[str, torch.Tensor]) -> bool:
        found = position_embedding(victim.model)
        return (
            victim.task == "classify"
            and found is not None
            and word_embedding_name(victim.model) in grads
            and f"{found[0]}.weight" in grads
        )

    def contributions(self, seqs: list[list[int]], labels: list[int], batch_size: int) -> torch.Tensor:
        """(n, R * d): each sequence's input gradient (its share of the batch's mean loss) summed into
        the word rows of its tokens and the position rows of its positions."""
        out = torch.zeros(len(seqs), len(self.rows) + self.positions, self.width, dtype=torch.float64)
        embed = self.victim.model.get_input_embeddings()
        for start in range(0, len(seqs), CHUNK):
            part = seqs[start : start + CHUNK]
            ids, mask = pad(self.victim, part)
            x = embed(ids).detach().requires_grad_(True)
            target = torch.tensor(labels[start : start + CHUNK], device=self.victim.device)
            # the batch's loss is the mean over batch_size sequences: each one's share is 1 / batch_size
            loss = self.victim.loss(attention_mask=mask, labels=target, inputs_embeds=x)
            loss = loss * len(part) / batch_size
            (grad,) = torch.autograd.grad(loss, x)
            grad = grad.detach().double().cpu()
            for j, seq in enumerate(part):
                k = start + j
                n = min(len(seq), self.positions)
                idx = torch.tensor([self.at[t] for t in seq[:n]])
                out[k].index_add_(0, idx, grad[j, :n])
                out[k, len(self.rows) : len(self.rows) + n] += grad[j, :n]
        return out.reshape(len(seqs), -1)

    def costs(self, stacks: torch.Tensor) -> torch.Tensor:
        """(H,) the squared mismatch of each (H, B, R * d) stack of contributions, each sequence
        weighted by its least-squares scale (clamped at 0)."""
        y = self.target
        gram = stacks @ stacks.transpose(1, 2)  # (H, B, B)
        b = stacks @ y  # (H, B)
        ridge = 1e-12 * gram.diagonal(dim1=1, dim2=2).amax(-1)[:, None, None]
        eye = torch.eye(gram.shape[1], dtype=gram.dtype) * ridge
        scale = torch.linalg.solve(gram + eye, b.unsqueeze(-1)).squeeze(-1).clamp_min(0)
        return (y @ y) - 2 * (scale * b).sum(-1) + torch.einsum("hi,hij,hj->h", scale, gram, scale)


@dataclass
class _State:
    seqs: list[list[int]]
    labels: list[int]
    current: torch.Tensor  # (B, R * d) each sequence's contribution
    cost: float

    def copy(self) -> _State:
        return _State([list(x) for x in self.seqs], list(self.labels), self.current.clone(), self.cost)


class _Refiner:
    def __init__(
        self,
        victim: Victim,
        fit: EmbeddingFit,
        options: list[list[int]],
        template: tuple[int, int],
        lengths_known: bool,
    ):
        self.victim, self.fit, self.options = victim, fit, options
        self.front, self.back = template
        self.lengths_known = lengths_known
        self.moves = 0
        self.sweeps = 0

    def state(self, seqs: list[list[int]], labels: list[int]) -> _State:
        current = self.fit.contributions(seqs, labels, len(seqs))
        return _State(seqs, labels, current, float(self.fit.costs(current.unsqueeze(0))[0]))

    def apply(self, st: _State, move: Move, cost: float | None = None) -> None:
        n = len(st.seqs)
        for i, x in move.changed.items():
            st.seqs[i] = x
        st.labels = [move.labels.get(i, st.labels[i]) for i in range(n)]
        touched = sorted(set(move.changed) | set(move.labels))
        st.current[touched] = self.fit.contributions(
            [st.seqs[i] for i in touched], [st.labels[i] for i in touched], n
        )
        st.cost = cost if cost is not None else float(self.fit.costs(st.current.unsqueeze(0))[0])

    def moves_at(self, st: _State, p: int) -> list[Move]:
        seqs, n, front, back = st.seqs, len(st.seqs), self.front, self.back
        live = [i for i in range(n) if p < len(seqs[i]) - back]
        pairs = [(live[a], live[b]) for a in range(len(live)) for b in range(a + 1, len(live))]
        out: list[Move] = []
        for i, j in pairs:
            if seqs[i][p] != seqs[j][p]:
                si, sj = list(seqs[i]), list(seqs[j])
                si[p], sj[p] = sj[p], si[p]
                out.append(Move({i: si, j: sj}, {}))
            si, sj = seqs[i][:p] + seqs[j][p:], seqs[j][:p] + seqs[i][p:]  # the tails exchanged
            if len(si) <= self.fit.positions and len(sj) <= self.fit.positions:
                out.append(Move({i: si, j: sj}, {}))
        subs = self.options[p][:SUBSTITUTES] if p < len(self.options) else []
        for i in live:
            for t in subs:
                if t != seqs[i][p]:
                    x = list(seqs[i])
                    x[p] = t
                    out.append(Move({i: x}, {}))
            if self.lengths_known:  # (a tail exchange keeps the lengths the batch has)
                continue
            if len(seqs[i]) - 1 > front + back:  # one token fewer: drop the one at p
                out.append(Move({i: seqs[i][:p] + seqs[i][p + 1 :]}, {}))
            if len(seqs[i]) < self.fit.positions:  # one more: a candidate put in at p
                out += [Move({i: seqs[i][:p] + [t] + seqs[i][p:]}, {}) for t in subs[:INSERTS]]
        if p == front:  # once a sweep: the labels, one flipped or two exchanged
            labels, classes = st.labels, self.victim.num_labels
            out += [Move({}, {i: c}) for i in range(n) for c in range(classes) if c != labels[i]]
            out += [
                Move({}, {i: labels[j], j: labels[i]})
                for i in range(n)
                for j in range(i + 1, n)
                if labels[i] != labels[j]
            ]
        return out

    def descend(self, st: _State, deadline: float) -> None:
        """Sweeps over the positions, the best move at each kept where it helps, until a sweep
        changes nothing or `deadline`."""
        improved = True
        while improved and time.perf_counter() < deadline:
            improved = False
            self.sweeps += 1
            for p in range(self.front, max(len(x) for x in st.seqs)):
                if time.perf_counter() > deadline:
                    break
                cands = self.moves_at(st, p)
                if not cands:
                    continue
                k, cost = _best(self.fit, st.current, st.seqs, st.labels, cands, len(st.seqs))
                if cost < st.cost * (1 - 1e-9):
                    self.apply(st, cands[k], cost)
                    self.moves += 1
                    improved = True

    def kick(self, st: _State, rng: torch.Generator) -> None:
        """Iterated local search's perturbation: two sequences' tails exchanged at a random position,
        or (one time in three) two labels exchanged."""
        n = len(st.seqs)
        if n < 2:
            return
        i, j = torch.randperm(n, generator=rng)[:2].tolist()
        if int(torch.randint(3, (1,), generator=rng)) == 0 and st.labels[i] != st.labels[j]:
            self.apply(st, Move({}, {i: st.labels[j], j: st.labels[i]}))
            return
        short = min(len(st.seqs[i]), len(st.seqs[j])) - self.back
        if short <= self.front:
            return
        p = int(torch.randint(self.front, short, (1,), generator=rng))
        si, sj = st.seqs[i][:p] + st.seqs[j][p:], st.seqs[j][:p] + st.seqs[i][p:]
        self.apply(st, Move({i: si, j: sj}, {}))


def refine(
    victim: Victim,
    grads: dict[str, torch.Tensor],
    seqs: list[list[int]],
    labels: list[int],
    options: list[list[int]],
    template: tuple[int, int],
    deadline: float,
    seed: int = 0,
    sigma: float | None = None,
    lengths_known: bool = False,
) -> tuple[list[list[int]], list[int], str]:
    """Local search over `seqs` and `labels` (see the module doc) until `deadline`: a descent, then
    kicks each followed by a descent, the best batch kept; `options[p]` are the tokens that may sit
    at position p (best first), `template` the number of fixed special tokens in front and behind.
    With the noise's scale `sigma` it stops once the mismatch is down to what the noise alone leaves
    (within FLOOR). Where the lengths are known no move changes the batch's lengths. Returns the
    sequences, labels and a note."""
    tokens = {t for x in seqs for t in x} | {t for o in options for t in o[:SUBSTITUTES]}
    fit = EmbeddingFit(victim, grads, tokens, max(len(x) for x in seqs))
    work = _Refiner(victim, fit, options, template, lengths_known)
    st = work.state([list(x) for x in seqs], list(labels))
    first = st.cost
    work.descend(st, deadline)
    best = st.copy()
    rng = torch.Generator().manual_seed(seed)
    kicks = 0
    floor = float("-inf") if sigma is None else FLOOR * sigma**2 * fit.target.numel()
    while time.perf_counter() < deadline and best.cost > floor:
        st = best.copy()
        work.kick(st, rng)
        work.descend(st, deadline)
        kicks += 1
        if st.cost < best.cost * (1 - 1e-9):
            best = st
    note = (
        f"refined against the embedding gradients: {work.moves} moves in {work.sweeps} sweeps "
        f"({kicks} kicks), mismatch {best.cost / max(first, 1e-300):.3f} of the search's"
    )
    log.info(note)
    return best.seqs, best.labels, note


def _best(
    fit: EmbeddingFit,
    current: torch.Tensor,
    seqs: list[list[int]],
    labels: list[int],
    cands: list[Move],
    n: int,
) -> tuple[int, float]:
    """The index and cost of the lowest-cost move of `cands`."""
    runs: list[list[int]] = []
    run_labels: list[int] = []
    where: list[dict[int, int]] = []
    for move in cands:
        mine = {}
        for i in sorted(set(move.changed) | set(move.labels)):
            mine[i] = len(runs)
            runs.append(move.changed.get(i, seqs[i]))
            run_labels.append(move.labels.get(i, labels[i]))
        where.append(mine)
    fresh = fit.contributions(runs, run_labels, n)
    stacks = current.unsqueeze(0).repeat(len(cands), 1, 1)
    for h, mine in enumerate(where):
        for i, k in mine.items():
            stacks[h, i] = fresh[k]
    costs = fit.costs(stacks)
    k = int(torch.argmin(costs))
    return k, float(costs[k])
