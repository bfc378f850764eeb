"""Tokenizer helpers every attack uses: the special tokens a tokenizer always adds, the tokens a
reconstruction may contain, and decoding token ids to text."""

from __future__ import annotations

import torch

from gradleak.victims import Victim


def special_template(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ids the tokenizer always puts before and after the text (e.g. [CLS] and [SEP])."""
    content = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    for start in range(len(full) - len(content) + 1):
        if full[start : start + len(content)] == content:
            return tuple(full[:start]), tuple(full[start + len(content) :])
    return (), ()


def candidate_mask(tokenizer, vocab_size: int, device: torch.device) -> torch.Tensor:
    """Tokens a reconstruction may contain: the vocabulary without special tokens."""
    mask = torch.ones(vocab_size, dtype=torch.bool, device=device)
    special = [i for i in tokenizer.all_special_ids if i is not None and i < vocab_size]
    mask[special] = False
    return mask


def decode(victim: Victim, token_ids: list[list[int]]) -> tuple[str, ...]:
    """Each sequence's text, special tokens skipped."""
    return tuple(victim.tokenizer.decode(t, skip_special_tokens=True).strip() for t in token_ids)
