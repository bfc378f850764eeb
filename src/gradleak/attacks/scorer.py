"""Fast span residuals of the first block's attention context, for the encoder search.

The input of the first attention's output projection at a position is the attention's context
there: per head, softmax(q k^T / sqrt(d)) v over the sequence's positions. Its weight gradient's rows
span the contexts that occurred, so a sequence whose contexts all lie in that span is (generically)
a true one. The search scores many sequences that differ in one token; running the model for each
repeats the query/key/value projections of every token. Those depend on the (token, position) pair
alone (the layer input is LayerNorm(word + position + type)), so `AttentionScorer` computes them
once per pair and only the attention itself per sequence; a substitution of one token updates the
other positions' softmax sums by one term each (`substitutions`), and its distance to the span is
estimated on a random sketch of the span's complement.

It re-implements standard scaled dot-product attention, so it checks itself against the model on
probe sequences when built and declines (returns None) where they differ: relative position
biases, other scalings, fused layouts it does not know.
"""

from __future__ import annotations

import logging
import math

import torch

from gradleak.attacks.context import pad
from gradleak.attacks.spans import Span, residual
from gradleak.attacks.structure import Projection, capture_input
from gradleak.victims import Victim

log = logging.getLogger(__name__)

AGREE = 1e-3  # the re-implementation must match the model's contexts to this relative error
CHUNK = 256  # sequences per batched evaluation
SKETCH = 64  # dimensions of the span complement's random projection that substitutions are ranked in


class AttentionScorer:
    """Span residuals (n, L) of whole sequences' attention contexts; see the module doc."""

    def __init__(self, victim: Victim, qkv: tuple[Projection, ...], span: Span, heads: int) -> None:
        self.victim = victim
        self.qkv = qkv
        self.span = span
        self.heads = heads
        self.index: dict[tuple[int, int], int] = {}
        self.dtype = next(victim.model.parameters()).dtype
        d = victim.hidden_size
        # the search ranks substitutions by their distance to the span, which a random projection
        # of the span's complement to SKETCH dimensions preserves to about 1/sqrt(SKETCH) (Johnson-
        # Lindenstrauss): true tokens sit orders of magnitude below false ones either way
        comp = span.complement
        if comp.shape[1] > SKETCH:
            gen = torch.Generator().manual_seed(0)
            comp = comp @ (
                torch.randn(comp.shape[1], SKETCH, generator=gen, dtype=torch.float64) / SKETCH**0.5
            )
        self.sketch = comp.contiguous()
        self.sketch32 = self.sketch.to(torch.float32)
        self.q = torch.zeros((0, d), dtype=torch.float64)
        self.k = torch.zeros((0, d), dtype=torch.float64)
        self.v = torch.zeros((0, d), dtype=torch.float64)
        self.f32 = (self.q.float(), self.k.float(), self.v.float())  # the tables in float32, for ranking

    @classmethod
    def build(
        cls,
        victim: Victim,
        qkv: tuple[Projection, ...],
        context: Projection,
        span: Span,
        tokens_at: list[list[int]],
    ) -> AttentionScorer | None:
        """A scorer for sequences of the tokens tokens_at[p] at positions p (others are added when
        first met), or None where the model's first attention is not the standard one."""
        config = victim.model.config
        heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
        if not heads or not tokens_at or not all(tokens_at) or victim.hidden_size % int(heads):
            return None
        scorer = cls(victim, qkv, span, int(heads))
        try:
            scorer._ensure([(t, p) for p, toks in enumerate(tokens_at) for t in toks])
        except _Unsupported:
            return None
        if not scorer._agrees(context, tokens_at):
            return None
        return scorer

    def _ensure(self, pairs: list[tuple[int, int]]) -> None:
        """Compute the queries, keys and values of the (token, position) pairs not yet in the table."""
        missing = [pair for pair in dict.fromkeys(pairs) if pair not in self.index]
        if not missing:
            return
        device = self.victim.device
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for s in range(0, len(missing), 4096):
            chunk = missing[s : s + 4096]
            ids = torch.tensor([t for t, _ in chunk], device=device).unsqueeze(1)
            pos = torch.tensor([p for _, p in chunk], device=device).unsqueeze(1)
            with torch.no_grad():
                x = capture_input(self.victim, self.qkv[0], ids, position_ids=pos)[:, 0]
                projected = _project(self.victim, self.qkv, x)
            if projected is None:
                raise _Unsupported
            parts.append(projected)
        base = len(self.index)
        for k, pair in enumerate(missing):
            self.index[pair] = base + k
        self.q = torch.cat([self.q, *(q for q, _, _ in parts)])
        self.k = torch.cat([self.k, *(k for _, k, _ in parts)])
        self.v = torch.cat([self.v, *(v for _, _, v in parts)])
        self.f32 = tuple(m.to(torch.float32) for m in (self.q, self.k, self.v))

    def _rows(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        self._ensure([(t, p) for s in seqs for p, t in enumerate(s)])
        n, width = len(seqs), max(len(s) for s in seqs)
        rows = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.bool)
        for i, s in enumerate(seqs):
            rows[i, : len(s)] = torch.tensor([self.index[(t, p)] for p, t in enumerate(s)])
            mask[i, : len(s)] = True
        return rows, mask

    def _agrees(self, context: Projection, tokens_at: list[list[int]]) -> bool:
        gen = torch.Generator().manual_seed(0)
        width = len(tokens_at)
        lengths = sorted({width, max(1, width // 2), max(1, width - 1)}, reverse=True)
        seqs = []
        for n in lengths:
            seqs.append(
                [tokens_at[p][int(torch.randint(len(tokens_at[p]), (1,), generator=gen))] for p in range(n)]
            )
        ids, mask = pad(self.victim, seqs)
        try:
            want = capture_input(self.victim, context, ids, attention_mask=mask).double()
        except (IndexError, RuntimeError) as exc:  # pragma: no cover - exotic models
            log.debug("attention scorer probe failed: %s", exc)
            return False
        got = self.contexts(seqs).double()
        valid = mask.bool()
        if got.shape != want.shape:
            return False
        err = float((got - want)[valid].norm(dim=-1).max() / want[valid].norm(dim=-1).min().clamp_min(1e-300))
        log.debug("attention scorer agrees with the model to %.3g", err)
        return err < AGREE

    def contexts(self, seqs: list[list[int]]) -> torch.Tensor:
        """(n, L, d) attention contexts of the sequences, at the model's precision (zero rows at
        padding)."""
        rows, mask = self._rows(seqs)
        # at the model's own precision: the span's rounding is that of the model's contexts
        tables = tuple(m.to(self.dtype) for m in (self.q, self.k, self.v))
        return self._attend(rows, mask, tables).masked_fill(~mask[..., None], 0.0)

    def _attend(
        self, rows: torch.Tensor, mask: torch.Tensor, tables: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """(n, L, d) attention contexts of the table rows `rows` (n, L) where `mask` holds."""
        n, width = rows.shape
        q, k, v = (self._heads(m[rows]) for m in tables)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        return (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, width, -1)

    def substitutions(self, seqs: list[list[int]], position: int, tokens: list[int]) -> torch.Tensor:
        """(n, T) summed span residuals (estimated in the sketch) of each sequence with its token at
        `position` replaced by each of `tokens` (every sequence must reach `position`).

        Incremental: a substitution changes one key and one value, so at every other position the
        softmax numerator and denominator change by one term each; the context's distance to the
        span is linear in those terms per head, so it is assembled from per-head projections on
        the span's complement instead of being recomputed. Only the substituted position's own
        query needs a full pass."""
        self._ensure([(t, position) for t in tokens])
        rows, mask = self._rows(seqs)
        heads, d = self.heads, self.victim.hidden_size
        c32 = self.sketch32.view(heads, d // heads, -1)  # (H, dh, m)
        scale = 1.0 / math.sqrt(d // heads)
        # float32 throughout: the distances it ranks span orders of magnitude (true tokens ~1e-6,
        # false ones ~1e-2); whether a sequence is solved is decided by `residuals`
        q, k, v = (self._heads(m[rows]) for m in self.f32)  # (n, H, L, dh)
        sub = torch.tensor([self.index[(t, position)] for t in tokens])
        q2, k2, v2 = (m[sub].view(len(tokens), heads, -1) for m in self.f32)  # (T, H, dh)
        keys = mask[:, None, None, :]
        scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~keys, float("-inf"))
        top = scores.amax(dim=-1)  # (n, H, L)
        e = (scores - top[..., None]).exp()
        den = e.sum(dim=-1)  # (n, H, L)
        num = e @ v  # (n, H, L, dh)
        a = e[..., position][:, None]  # (n, 1, H, L): the old term
        vp = v[:, :, position]  # (n, H, dh)
        b = (torch.einsum("nhld,thd->nthl", q, k2) * scale - top[:, None]).exp()  # (n, T, H, L): the new one
        inv = 1.0 / (den[:, None] - a + b)
        # context = (num - a vp + b v2) * inv per head; its projection on the complement, and its norm
        proj = (
            torch.einsum("nthl,nhlm->ntlm", inv, torch.einsum("nhld,hdm->nhlm", num, c32))
            - torch.einsum("nthl,nhm->ntlm", a * inv, torch.einsum("nhd,hdm->nhm", vp, c32))
            + torch.einsum("nthl,thm->ntlm", b * inv, torch.einsum("thd,hdm->thm", v2, c32))
        )  # (n, T, L, m)
        nv = torch.einsum("nhld,nhd->nhl", num, vp)[:, None]
        nw = torch.einsum("nhld,thd->nthl", num, v2)
        vw = torch.einsum("nhd,thd->nth", vp, v2)[..., None]
        sq = (
            num.pow(2).sum(-1)[:, None] - 2 * a * nv + 2 * b * nw
            + a.pow(2) * vp.pow(2).sum(-1)[:, None, :, None] - 2 * a * b * vw
            + b.pow(2) * v2.pow(2).sum(-1)[None, :, :, None]
        ) * inv.pow(2)  # fmt: skip
        norm = sq.clamp_min(0.0).sum(dim=2)  # (n, T, L)
        # the substituted position: its new query over the keys with its own key replaced
        own = torch.einsum("thd,nhld->nthl", q2, k) * scale
        own[..., position] = (q2 * k2).sum(-1)[None] * scale
        w = own.masked_fill(~keys, float("-inf")).softmax(dim=-1)  # (n, T, H, L)
        at = torch.einsum("nthl,nhld->nthd", w, v) + w[..., position, None] * (v2[None] - vp[:, None])
        proj[:, :, position] = torch.einsum("nthd,hdm->ntm", at, c32)
        norm[:, :, position] = at.pow(2).sum(dim=(-1, -2))
        res = proj.double().norm(dim=-1) / norm.double().sqrt().clamp_min(1e-300)
        return res.masked_fill(~mask[:, None, :], 0.0).sum(dim=-1)

    def estimates(self, seqs: list[list[int]]) -> torch.Tensor:
        """(n, L) span residuals of the sequences' contexts estimated in the sketch, in float32 (as
        `substitutions` ranks them), 0 at padding: for ranking many candidate moves, whose best is
        then scored exactly with `residuals`."""
        out = []
        width = max(len(s) for s in seqs)
        for start in range(0, len(seqs), CHUNK):
            rows, mask = self._rows(seqs[start : start + CHUNK])
            ctx = self._attend(rows, mask, self.f32)
            res = (ctx @ self.sketch32).norm(dim=-1) / ctx.norm(dim=-1).clamp_min(1e-30)
            out.append(torch.nn.functional.pad(res.masked_fill(~mask, 0.0), (0, width - rows.shape[1])))
        return torch.cat(out)

    def residuals(self, seqs: list[list[int]]) -> torch.Tensor:
        """(n, L) span residuals of the sequences' contexts, inf at padding."""
        width = max(len(s) for s in seqs)
        out = []
        for start in range(0, len(seqs), CHUNK):
            part = seqs[start : start + CHUNK]
            res = residual(self.span, self.contexts(part))
            for i, s in enumerate(part):
                res[i, len(s) :] = float("inf")
            out.append(torch.nn.functional.pad(res, (0, width - res.shape[1]), value=float("inf")))
        return torch.cat(out)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        n, length, d = t.shape
        return t.view(n, length, self.heads, d // self.heads).transpose(1, 2)


class _Unsupported(Exception):
    pass


def _project(
    victim: Victim, qkv: tuple[Projection, ...], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Queries, keys and values (float64, on the CPU) of the layer inputs x: three maps (BERT) or
    one fused map whose output splits in three (GPT-2's c_attn)."""
    modules = [victim.model.get_submodule(p.name.rsplit(".", 1)[0]) for p in qkv]
    outs = [m(x).detach().double().cpu() for m in modules]
    if len(outs) == 3:
        return outs[0], outs[1], outs[2]
    if len(outs) == 1 and outs[0].shape[-1] % 3 == 0:
        q, k, v = outs[0].split(outs[0].shape[-1] // 3, dim=-1)
        return q.contiguous(), k.contiguous(), v.contiguous()
    return None
