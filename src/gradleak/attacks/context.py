"""What the assembly of sequences works with: per-position candidates, and the context check (the
span of a projection whose input depends on each token's context) with its residuals."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradleak.attacks.occurrences import Occurrences
from gradleak.attacks.spans import Span, residual
from gradleak.attacks.structure import Projection, capture_input
from gradleak.victims import Victim


@dataclass(frozen=True)
class Candidates:
    """Per occupied position: candidate token ids and their first-layer span residuals."""

    tokens: list[torch.Tensor]
    scores: list[torch.Tensor]
    occurrences: Occurrences | None = None  # what the embedding gradients place (encoders)


def pad(victim: Victim, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
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
        ids, mask = pad(victim, part)
        x = capture_input(victim, check.proj, ids, attention_mask=mask).cpu()
        res = residual(check.span, x)
        res[mask.cpu() == 0] = float("inf")
        out.append(res)
    width = max(len(s) for s in seqs)
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=float("inf")) for r in out])
