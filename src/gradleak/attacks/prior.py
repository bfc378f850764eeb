"""A language-model prior for the attacks: how natural a candidate text reads.

LAMP (Balunovic et al., NeurIPS 2022) scores each discrete candidate by its gradient distance plus a
language model's perplexity of it; the noise-robust exact attack ranks its beams the same way. The
prior reads detokenised *text*, never the victim's token ids, so one prior serves every victim
whatever its tokenizer: a BERT victim's candidates are decoded to strings and re-tokenised by the
prior's own tokenizer.

`load_prior("smollm2")` (the default of `--prior`) is the real pretrained SmolLM2-135M; any causal
language model the victims module can load (`gpt2-tiny`, a local Hugging Face directory, a Hub id
in the cache) serves as well, and `"none"` gives no prior.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from gradleak.errors import GradleakError

log = logging.getLogger(__name__)

DEFAULT_PRIOR = "smollm2"
NO_PRIOR = "none"


@dataclass(frozen=True)
class LanguagePrior:
    """A causal language model and its tokenizer, used only to score text (no gradients)."""

    name: str
    model: nn.Module
    tokenizer: object
    max_tokens: int = 128  # texts are cut to this many prior tokens

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is None:
            bos = getattr(self.tokenizer, "eos_token_id", None)
        if bos is not None:  # condition the first word on a start token, so it is scored too
            ids = [int(bos), *ids]
        return ids[: self.max_tokens]

    @torch.no_grad()
    def nll(self, texts: Sequence[str], *, batch: int = 32, total: bool = False) -> torch.Tensor:
        """Mean negative log-likelihood per predicted token of each text (natural log, float64 on
        the CPU). ln(perplexity), in other words; with `total`, the sum over the predicted tokens
        instead. An empty text scores 0.0, and so does one the tokenizer turns into a single token
        (nothing to predict)."""
        out = torch.zeros(len(texts), dtype=torch.float64)
        encoded = [self._encode(t) for t in texts]
        order = [i for i, ids in enumerate(encoded) if len(ids) >= 2]
        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), int(pad), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            picked = logp.gather(-1, ids[:, 1:, None])[..., 0]
            keep = mask[:, 1:].to(picked.dtype)
            per_text = -(picked * keep).sum(1) / (1 if total else keep.sum(1))
            for row, i in enumerate(chunk):
                out[i] = float(per_text[row])
        return out

    def perplexity(self, texts: Sequence[str]) -> list[float]:
        return [math.exp(x) for x in self.nll(texts).tolist()]


def check_prior_name(name: str) -> None:
    """Fails early, with the reason, on a prior that cannot be a causal language model."""
    if name == NO_PRIOR:
        return
    from gradleak.victims import check_loadable, family_size

    if name in ("bert-tiny", "minilm", "minilm-random") or (family_size(name) or ("",))[0] == "bert-random":
        raise GradleakError(f"prior {name!r} is an encoder, not a language model; give a causal LM or 'none'")
    try:
        check_loadable(name)
    except GradleakError:
        raise GradleakError(
            f"unknown prior {name!r}: give none, a causal-LM preset (smollm2, gpt2-tiny, gpt2-wide), "
            "gpt2-random:layers=L,hidden=H,heads=N, a model directory or a Hub id"
        ) from None


@functools.lru_cache(maxsize=2)
def load_prior(name: str = DEFAULT_PRIOR, *, device: str = "cpu", seed: int = 0) -> LanguagePrior | None:
    """The prior named `name` (a causal-LM victim: preset, local directory or cached Hub id), loaded
    once per process and device; None for 'none'."""
    if name == NO_PRIOR:
        return None
    check_prior_name(name)
    from gradleak.victims import load_victim

    victim = load_victim(name, task="lm", seed=seed, device=device)
    victim.model.eval()
    victim.model.requires_grad_(False)
    log.info("language prior %s loaded", name)
    return LanguagePrior(name=name, model=victim.model, tokenizer=victim.tokenizer)
