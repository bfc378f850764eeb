"""Label inference from the head's bias gradient, on real SST-2 batches.

Seeds are 0..N-1, not picked: a failure at some seed is a finding, not something to route around.
"""

from __future__ import annotations

import pytest
import torch

from gradleak.attacks.labels import head_parameters, infer_labels
from gradleak.client import fedsgd

VICTIMS = ["bert_tiny", "minilm"]


def _check(victim, batch, batch_size):
    grads = fedsgd(victim, batch).gradients()
    got = infer_labels(victim, grads, batch_size)
    assert got is not None
    assert len(got) == batch_size
    assert tuple(sorted(got)) == tuple(sorted(int(x) for x in batch.labels))


@pytest.mark.parametrize("fixture", VICTIMS)
@pytest.mark.parametrize("seed", range(5))
def test_batch_of_one(request, make_victim_batch, fixture, seed):
    victim = request.getfixturevalue(fixture)
    _check(victim, make_victim_batch(victim, "sst2", 1, seed), 1)


@pytest.mark.parametrize("fixture", VICTIMS)
@pytest.mark.parametrize("seed", range(5))
def test_batch_of_four(request, make_victim_batch, fixture, seed):
    victim = request.getfixturevalue(fixture)
    _check(victim, make_victim_batch(victim, "sst2", 4, seed), 4)


def test_seeds_cover_both_labels_and_mixed_batches(bert_tiny, make_victim_batch):
    # guard against a vacuous test: the B=4 draws above must include mixed and different batches
    counts = {int(make_victim_batch(bert_tiny, "sst2", 4, s).labels.sum()) for s in range(5)}
    assert len(counts) >= 2
    assert counts & {1, 2, 3}


def test_head_parameters(bert_tiny, gpt2_tiny):
    assert head_parameters(bert_tiny) == ("classifier.weight", "classifier.bias")
    assert head_parameters(gpt2_tiny) == ("score.weight", None)


def test_no_labels_without_a_shared_bias(bert_tiny, gpt2_tiny, make_victim_batch):
    batch = make_victim_batch(bert_tiny, "sst2", 2, 0)
    withheld = fedsgd(bert_tiny, batch, withhold=["head"]).gradients()
    assert infer_labels(bert_tiny, withheld, 2) is None
    # GPT-2's score layer has no bias
    assert infer_labels(gpt2_tiny, {"score.weight": torch.zeros(2, 256)}, 1) is None
