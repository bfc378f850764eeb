"""Which tokens sit at which positions, read off the embedding gradients of encoders whose embedding
LayerNorm starts the residual stream (BERT and its kin: MiniLM, RoBERTa, ...).

There, the gradient g_i reaching the embedding sum e_i = word[t_i] + position[p_i] + type[0] of token
i passes through LayerNorm's Jacobian, which is orthogonal to the all-ones vector and to the centred
input e_i - mean(e_i). The word-embedding gradient row of token v is the sum of g_i over the
occurrences of v, and the position row of p the sum over the batch's tokens at p. So:

- a token whose occurrences all sit at one position p has a row orthogonal to centred(e(v, p)), and
  to no other position's (generically): the row pins it to p, to rounding error;
- the position row of p, minus the rows pinned there, is the sum over the occurrences at p not yet
  explained; if only one token remains there, that rest is orthogonal to its centred input, which
  names it, and its g is subtracted from that token's row in turn.

Peeling these two kinds of step until neither finds anything pins most occurrences of a batch, and
the positions whose position row is fully explained have their exact token set. This is a much
sharper filter than the first layer's span, which for additive embeddings contains every
(token, position) combination once the batch holds more pairs than tokens plus positions.

GPT-2-like decoders add the raw embedding sum to the residual stream, so no such orthogonality
holds there; `holds` checks the property on a probe before the attack relies on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from gradleak.attacks.structure import position_embedding, word_embedding_name
from gradleak.victims import Victim

log = logging.getLogger(__name__)

ORTHO = 1.0  # a row is orthogonal to an input when their cosine is below ORTHO x the update's epsilon
PROBE = 1e3  # the probe's rows must be orthogonal to within PROBE x epsilon (random: ~0.05)
EXPLAINED = 100.0  # a remainder is zero below EXPLAINED x epsilon x the norms that made it


@dataclass(frozen=True)
class Occurrences:
    """Per position: the tokens known to occur there, and whether that set is complete."""

    pinned: list[set[int]]
    complete: list[bool]
    unresolved: set[int]  # tokens with occurrences not yet placed

    def allowed(self, position: int, token: int) -> bool:
        if position >= len(self.pinned):
            return True
        if token in self.pinned[position]:
            return True
        return not self.complete[position] and token in self.unresolved


def _type_row(model: nn.Module, word: nn.Embedding, pos: nn.Embedding | None) -> torch.Tensor | None:
    """Row 0 of a token-type embedding beside the word embedding (BERT), if there is one."""
    parent = next((m for m in model.modules() if any(c is word for c in m.children())), None)
    if parent is None:
        return None
    for child in parent.children():
        if isinstance(child, nn.Embedding) and child is not word and child is not pos:
            return child.weight[0].detach().double().cpu()
    return None


def centred_inputs(victim: Victim, tokens: torch.Tensor, positions: int) -> torch.Tensor:
    """(n_tokens, positions, d) unit vectors along the centred embedding sums, float64."""
    model = victim.model
    word = model.get_input_embeddings()
    found = position_embedding(model)
    pos = found[1] if found is not None else None
    w = word.weight.detach().double().cpu()[tokens]
    e = w[:, None, :].expand(-1, positions, -1).clone()
    if pos is not None:
        e = e + pos.weight.detach().double().cpu()[:positions][None]
    t = _type_row(model, word, pos)
    if t is not None:
        e = e + t
    e = e - e.mean(dim=-1, keepdim=True)
    return e / e.norm(dim=-1, keepdim=True).clamp_min(1e-300)


def holds(victim: Victim) -> bool:
    """Whether the model's word-embedding gradients are orthogonal to the centred embedding sums:
    checked on the gradient of a probe sequence of distinct tokens."""
    model = victim.model
    word = model.get_input_embeddings()
    vocab = word.weight.shape[0]
    ids = (torch.arange(7, device=victim.device) * 7919 + 101) % vocab
    ids = ids.unsqueeze(0)
    mask = torch.ones_like(ids)
    try:
        out = model(**victim.model_inputs(attention_mask=mask, input_ids=ids))
        (grad,) = torch.autograd.grad(out.logits.double().pow(2).sum(), word.weight)
    except (RuntimeError, TypeError, ValueError) as exc:  # pragma: no cover - exotic models
        log.debug("embedding orthogonality probe failed: %s", exc)
        return False
    rows = grad.detach().double().cpu()[ids[0].cpu()]
    c = centred_inputs(victim, ids[0].cpu(), ids.shape[1])
    cos = (rows * c[torch.arange(ids.shape[1]), torch.arange(ids.shape[1])]).sum(-1).abs()
    cos = cos / rows.norm(dim=-1).clamp_min(1e-300)
    eps = torch.finfo(word.weight.dtype).eps
    return bool(cos.max() < PROBE * eps)


def resolve(
    victim: Victim, grads: dict[str, torch.Tensor], pool: torch.Tensor, positions: int
) -> Occurrences | None:
    """Peel the word and position rows into (token, position) occurrences (see the module doc);
    None where the gradients needed are not shared or the model lacks the property."""
    model = victim.model
    wname = word_embedding_name(model)
    found = position_embedding(model)
    if wname not in grads or found is None or f"{found[0]}.weight" not in grads or positions < 1:
        return None
    if not holds(victim):
        return None
    eps = torch.finfo(grads[wname].dtype).eps
    tokens = pool.tolist()
    rows = grads[wname].detach().double().cpu()[pool]  # (n, d)
    prow = grads[f"{found[0]}.weight"].detach().double().cpu()[:positions]  # (P, d)
    c = centred_inputs(victim, pool, positions)  # (n, P, d)
    rem_tok, rem_pos = rows.clone(), prow.clone()
    mass_tok = rows.norm(dim=-1).clone()  # norms that went into each remainder (its rounding scale)
    mass_pos = prow.norm(dim=-1).clone()
    pinned: list[set[int]] = [set() for _ in range(positions)]

    def zero(x: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        return x.norm(dim=-1) <= EXPLAINED * eps * mass

    def place(k: int, p: int, g: torch.Tensor) -> None:
        pinned[p].add(tokens[k])
        n = float(g.norm())
        rem_tok[k] -= g
        rem_pos[p] -= g
        mass_tok[k] += n
        mass_pos[p] += n

    for _round in range(4 * (len(tokens) + positions)):
        changed = False
        # a token whose remaining occurrences share one position
        live_tok = ~zero(rem_tok, mass_tok)
        if live_tok.any():
            idx = torch.nonzero(live_tok).flatten()
            r = rem_tok[idx]
            cos = (c[idx] * r[:, None, :]).sum(-1).abs() / r.norm(dim=-1, keepdim=True).clamp_min(1e-300)
            for j, k in enumerate(idx.tolist()):
                hits = torch.nonzero(cos[j] < ORTHO * eps * (mass_tok[k] / r[j].norm())).flatten()
                if len(hits) == 1:
                    place(k, int(hits[0]), rem_tok[k].clone())
                    changed = True
        # a position whose remaining occurrences are all one token
        live_pos = ~zero(rem_pos, mass_pos)
        live_tok = ~zero(rem_tok, mass_tok)
        for p in torch.nonzero(live_pos).flatten().tolist():
            idx = torch.nonzero(live_tok).flatten()
            if len(idx) == 0:
                break
            r = rem_pos[p]
            cos = (c[idx, p] * r).sum(-1).abs() / r.norm().clamp_min(1e-300)
            hits = torch.nonzero(cos < ORTHO * eps * (mass_pos[p] / r.norm())).flatten()
            if len(hits) == 1:
                place(int(idx[hits[0]]), p, rem_pos[p].clone())
                live_tok = ~zero(rem_tok, mass_tok)
                changed = True
        if not changed:
            break
    complete = zero(rem_pos, mass_pos).tolist()
    unresolved = {tokens[k] for k in torch.nonzero(~zero(rem_tok, mass_tok)).flatten().tolist()}
    log.info(
        "embedding gradients pin %d occurrences; %d of %d positions complete; %d tokens unresolved",
        sum(len(s) for s in pinned),
        sum(complete),
        positions,
        len(unresolved),
    )
    return Occurrences(pinned, complete, unresolved)


# --- under noise: the same sums, solved by least squares -------------------------------------------

PIN = 0.5  # a least-squares coefficient this large places a token at a position
COMPLETE = 4.0  # standard deviations of pure noise's remainder within which a position is fully explained
NOISE_ROWS = 4096  # word-embedding rows outside the token set that show the noise's scale


@dataclass(frozen=True)
class Regression:
    """The position rows as combinations of the token set's word rows: coefficients (tokens x
    positions), each position's remainder over what the noise alone leaves, the noise's scale."""

    tokens: list[int]
    coefficients: torch.Tensor
    excess: torch.Tensor  # per position: remainder norm / the noise's expected remainder norm
    sigma: float
    snr: float  # the token set's median word-row norm over the noise's expected row norm
    freedom: int  # the remainders' degrees of freedom: the width less the token set's size

    def occurrences(self) -> Occurrences:
        """Tokens whose coefficient reaches PIN are placed; a position whose remainder is at the
        noise's level (within COMPLETE standard deviations: the squared remainder of pure noise is
        a chi-square with d - n degrees of freedom, its norm's relative spread 1 / sqrt(2 (d - n)))
        is complete; a token placed at a complete position has all its occurrences there (one
        elsewhere too would have left a remainder at it), every other token may occur at any
        incomplete position."""
        n_pos = self.coefficients.shape[1]
        pinned = [{self.tokens[k] for k in torch.nonzero(self.coefficients[:, p] >= PIN).flatten().tolist()}
                  for p in range(n_pos)]  # fmt: skip
        limit = 1 + COMPLETE / (2 * self.freedom) ** 0.5
        complete = [bool(self.excess[p] <= limit) and bool(pinned[p]) for p in range(n_pos)]
        placed = set().union(*(pinned[p] for p in range(n_pos) if complete[p]))
        return Occurrences(pinned, complete, set(self.tokens) - placed)


def regress(
    victim: Victim, grads: dict[str, torch.Tensor], pool: torch.Tensor, positions: int
) -> Regression | None:
    """Under noise no row is exactly orthogonal to anything, but the sums of the module doc still
    hold: the position row of p is the sum of the word rows of the tokens at p, for every token
    whose occurrences all sit at p (BERT's and GPT-2's embeddings alike: both rows are gradients of
    the same embedding sum). Solved for every position at once by least squares on the token set's
    word rows, a single-position token's coefficient is 1 at its position and near 0 elsewhere, to
    the noise (whose scale the rows of tokens outside the set show); a token at several positions
    splits its coefficient, and leaves a remainder at each. None where the embedding gradients are
    not shared, or the token set spans the hidden width (the sums are then not identifiable)."""
    model = victim.model
    wname = word_embedding_name(model)
    found = position_embedding(model)
    if wname not in grads or found is None or f"{found[0]}.weight" not in grads or positions < 1:
        return None
    words = grads[wname].detach().double().cpu()
    d = words.shape[1]
    if len(pool) >= d or len(pool) == 0:
        return None
    inside = torch.zeros(words.shape[0], dtype=torch.bool)
    inside[pool] = True
    outside = torch.nonzero(~inside).flatten()
    if len(outside) == 0:
        return None
    outside = outside[torch.linspace(0, len(outside) - 1, min(NOISE_ROWS, len(outside))).long()]
    sigma = float(words[outside].norm(dim=1).median()) / (d - 2 / 3) ** 0.5  # the median of a chi_d
    # (a clean update: the rounding's scale)
    sigma = max(sigma, EXPLAINED * torch.finfo(grads[wname].dtype).eps * float(words[pool].norm(dim=1).max()))
    rows = words[pool].T  # (d, n)
    prow = grads[f"{found[0]}.weight"].detach().double().cpu()[:positions].T  # (d, P)
    coef = torch.linalg.lstsq(rows, prow).solution  # (n, P)
    remainder = (prow - rows @ coef).norm(dim=0)
    expected = sigma * (d - len(pool)) ** 0.5 * (1 + (coef**2).sum(dim=0)).sqrt()
    excess = remainder / expected.clamp_min(1e-300)
    snr = float(words[pool].norm(dim=1).median()) / (sigma * d**0.5)
    return Regression(pool.tolist(), coef, excess, sigma, snr, d - len(pool))
