"""Tokenizer helpers every attack uses: the special tokens a tokenizer always adds, the tokens a
reconstruction may contain, and decoding token ids to text."""

from __future__ import annotations

import re

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


# Reserved slots of a vocabulary that no text tokenises to: BERT's [unused0]..[unused993] (ids 1-99 and
# 104-998 of the uncased vocabulary; LAMP leaves them out of its readout too), T5's <extra_id_N>,
# Gemma's <unusedN>, Llama 3's <|reserved_special_token_N|>, fairseq's madeupwordN.
PLACEHOLDER = re.compile(
    r"\[unused\d+\]|<unused\d+>|<extra_id_\d+>|<\|reserved_special_token_\d+\|>|madeupword\d+"
)


def candidate_mask(tokenizer, vocab_size: int, device: torch.device) -> torch.Tensor:
    """Tokens a reconstruction may contain: the vocabulary without special tokens and without the
    placeholder tokens (`PLACEHOLDER`) that never come out of tokenising text."""
    mask = torch.ones(vocab_size, dtype=torch.bool, device=device)
    special = [i for i in tokenizer.all_special_ids if i is not None and i < vocab_size]
    ids = range(min(vocab_size, len(tokenizer)))
    placeholders = [i for i, t in zip(ids, tokenizer.convert_ids_to_tokens(list(ids)), strict=True)
                    if t is not None and PLACEHOLDER.fullmatch(t)]  # fmt: skip
    mask[special + placeholders] = False
    return mask


def decode(victim: Victim, token_ids: list[list[int]]) -> tuple[str, ...]:
    """Each sequence's text, special tokens skipped."""
    return tuple(victim.tokenizer.decode(t, skip_special_tokens=True).strip() for t in token_ids)
