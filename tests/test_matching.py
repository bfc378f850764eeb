"""The gradient-matching problem every matching attack shares (`matching.prepare`): which tokens a
reconstruction may read off, and which parameters' gradients are matched."""

from __future__ import annotations

import pytest
import torch

from gradleak.attacks import AttackOptions, Knowledge
from gradleak.attacks.matching import layerwise_cos, prepare
from gradleak.attacks.tokens import candidate_mask
from gradleak.client import fedsgd


def test_bert_placeholders_and_specials_are_never_read_off(bert_tiny):
    tok = bert_tiny.tokenizer
    mask = candidate_mask(tok, len(tok), torch.device("cpu"))
    # the uncased vocabulary: [PAD] 0, [unused0..98] 1-99, [UNK] [CLS] [SEP] [MASK] 100-103,
    # [unused99..993] 104-998, then real tokens ("!" is 999)
    assert not mask[:999].any()
    assert mask[999:].all()
    assert tok.convert_ids_to_tokens([1, 998, 999]) == ["[unused0]", "[unused993]", "!"]


def test_a_byte_level_vocabulary_loses_only_its_specials(gpt2_tiny):
    tok = gpt2_tiny.tokenizer
    mask = candidate_mask(tok, len(tok), torch.device("cpu"))
    assert (~mask).nonzero().flatten().tolist() == sorted(set(tok.all_special_ids))


def _problem(victim, batch):
    knowledge = Knowledge(batch_size=batch.size, lengths=batch.lengths, labels=tuple(batch.labels.tolist()))
    return prepare("lamp", victim, fedsgd(victim, batch), knowledge, torch.Generator().manual_seed(0))


def test_the_readout_skips_placeholders_even_at_their_own_embedding(bert_tiny, make_victim_batch):
    problem = _problem(bert_tiny, make_victim_batch(bert_tiny, "cola", 1, 3, max_words=6))
    dummy = problem.embedding[torch.full(problem.mask.shape, 500)]  # [unused396] everywhere
    ids = problem.nearest(dummy)
    free = problem.mask.bool() & ~problem.fixed
    assert bool((ids[free] >= 999).all())  # a real token, never a placeholder or a special


def test_vanishing_gradients_are_left_out_and_the_cosine_is_smooth(bert_tiny, make_victim_batch):
    batch = make_victim_batch(bert_tiny, "cola", 1, 3, max_words=8)
    problem = _problem(bert_tiny, batch)
    names = {id(p): n for n, p in bert_tiny.model.named_parameters()}
    matched = [names[id(p)] for p in problem.params]
    # the attention key bias's gradient is float noise (softmax is shift invariant): left out, in
    # both of bert-tiny's layers; every other parameter but the word embeddings is matched
    assert not [n for n in matched if "key.bias" in n]
    assert len(matched) == len(list(bert_tiny.model.parameters())) - 1 - 2
    # so LAMP's per-tensor cosine is zero at the true embeddings and stays small beside them (with
    # the noise tensors in, a 1e-6 nudge moved it by 0.05 to 0.08: their direction is random)
    truth = problem.embedding[batch.input_ids[:, : problem.mask.shape[1]]]
    opts = AttackOptions()
    at = float(layerwise_cos(problem.gradients(truth, create_graph=False), list(problem.true), opts))
    nudged = truth + 1e-6 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(1))
    near = float(layerwise_cos(problem.gradients(nudged, create_graph=False), list(problem.true), opts))
    assert at == pytest.approx(0.0, abs=1e-5)
    assert near < 1e-4


def test_with_the_key_bias_kept_the_cosine_is_noise(bert_tiny, make_victim_batch, monkeypatch):
    # what the vanishing tensors did before they were left out: their shared gradient is rounding
    # noise, and the per-tensor cosine of noise jumps under the least nudge
    import gradleak.attacks.matching as matching

    monkeypatch.setattr(matching, "_without_vanishing", lambda problem, names, attack: problem)
    batch = make_victim_batch(bert_tiny, "cola", 1, 3, max_words=8)
    problem = _problem(bert_tiny, batch)
    names = {id(p): n for n, p in bert_tiny.model.named_parameters()}
    norms = {names[id(p)]: float(g.norm()) for p, g in zip(problem.params, problem.true, strict=True)}
    keys = [v for n, v in norms.items() if "key.bias" in n]
    assert len(keys) == 2 and max(keys) < 1e-9  # ~1e-11
    assert min(v for n, v in norms.items() if "key.bias" not in n) > 1e-5
    truth = problem.embedding[batch.input_ids[:, : problem.mask.shape[1]]]
    nudged = truth + 1e-6 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(1))
    near = float(
        layerwise_cos(problem.gradients(nudged, create_graph=False), list(problem.true), AttackOptions())
    )
    assert near > 0.03  # measured 0.08
