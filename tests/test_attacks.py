"""Gradient-matching attacks on real CoLA sentences, and the attack registry."""

from __future__ import annotations

import pytest

from gradleak.attacks import ATTACKS, AttackOptions, Knowledge, get_attack
from gradleak.attacks.infer import infer_lengths
from gradleak.attacks.structure import position_embedding
from gradleak.client import fedsgd
from gradleak.errors import GradleakError, Refusal
from gradleak.experiment import RunSpec, run_one
from gradleak.metrics import mean_scores


@pytest.fixture(scope="module")
def tag_records():
    return [
        run_one(
            RunSpec(
                victim="bert-tiny",
                data="cola",
                batch_size=1,
                attack="tag",
                iterations=300,
                seed=s,
                max_words=10,
            )
        )
        for s in range(5)
    ]


@pytest.mark.slow
def test_tag_recovers_short_cola_sentences(tag_records):
    assert len(tag_records) == 5
    for rec in tag_records:
        assert len(rec.references) == len(rec.reconstructions) == 1
        assert len(rec.references[0].split()) <= 10
    # five different sentences were attacked
    assert len({rec.references for rec in tag_records}) == 5
    mean = mean_scores([rec.scores for rec in tag_records])
    assert mean.token_accuracy >= 40.0, [(r.references, r.reconstructions) for r in tag_records]


@pytest.mark.slow
def test_tag_records_labels_and_trace(tag_records):
    for rec in tag_records:
        # at batch size 1 the label is read off the head's bias gradient exactly
        assert rec.inferred_labels == rec.labels
        assert "labels inferred from the head's bias gradient" in rec.notes
        assert rec.seconds > 0
        js = rec.to_json()
        assert js["scores"]["token_accuracy"] == rec.scores.token_accuracy
        assert js["spec"]["max_words"] == 10


def test_registry():
    assert {"dlg", "tag", "cos", "exact"} <= set(ATTACKS)
    for name in ("dlg", "tag", "cos", "exact"):
        assert get_attack(name).name == name


def test_unknown_attack():
    with pytest.raises(GradleakError, match="unknown attack"):
        get_attack("no-such-attack")
    with pytest.raises(GradleakError):
        RunSpec(attack="no-such-attack").validate()


@pytest.mark.parametrize("kwargs", [{"iterations": 0}, {"learning_rate": 0.0}, {"optimizer": "sgd"}])
def test_bad_attack_options(kwargs):
    with pytest.raises(GradleakError):
        AttackOptions(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"batch_size": 0}, {"iterations": 0}, {"protocol": "fedprox"}, {"min_words": 5, "max_words": 3}],
)
def test_bad_run_specs(kwargs):
    with pytest.raises(GradleakError):
        RunSpec(**kwargs).validate()


def test_cosine_attack_short_run(bert_tiny, make_victim_batch):
    batch = make_victim_batch(bert_tiny, "cola", 2, 0, max_words=10)
    update = fedsgd(bert_tiny, batch)
    calls = []
    rec = get_attack("cos").reconstruct(
        bert_tiny,
        update,
        Knowledge(batch_size=2, lengths=batch.lengths),
        AttackOptions(iterations=4, seed=0),
        progress=lambda step, total, value: calls.append((step, total)),
    )
    assert len(rec.token_ids) == len(rec.texts) == 2
    assert tuple(len(t) for t in rec.token_ids) == batch.lengths
    tok = bert_tiny.tokenizer
    for ids in rec.token_ids:
        # the server knows the template: [CLS] first, [SEP] last, no special token in between
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert not set(ids[1:-1]) & set(tok.all_special_ids)
    assert rec.labels is not None and sorted(rec.labels) == sorted(batch.labels.tolist())
    assert len(rec.trace) == 4
    assert all(0.0 <= v <= 2.5 for v in rec.trace)  # 1 - cosine, plus a small norm term
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_matching_infers_withheld_lengths_on_gpt2_tiny(gpt2_tiny, make_victim_batch):
    """B = 1 on a decoder: the position-embedding gradient's last non-zero row is the length."""
    batch = make_victim_batch(gpt2_tiny, "cola", 1, 0)
    update = fedsgd(gpt2_tiny, batch)
    inferred = infer_lengths(gpt2_tiny, update, Knowledge(batch_size=1))
    assert inferred.lengths == batch.lengths and inferred.exact
    rec = get_attack("tag").reconstruct(
        gpt2_tiny, update, Knowledge(batch_size=1), AttackOptions(iterations=2)
    )
    assert tuple(len(t) for t in rec.token_ids) == batch.lengths
    assert f"length inferred from the position-embedding gradient: {batch.lengths[0]}" in rec.notes[0]


def test_matching_infers_withheld_lengths_on_bert_tiny(bert_tiny, make_victim_batch):
    """B = 2 on an encoder: the embedding gradients place each sequence's [SEP] (seeds 0..2)."""
    for seed in range(3):
        batch = make_victim_batch(bert_tiny, "cola", 2, seed)
        update = fedsgd(bert_tiny, batch)
        inferred = infer_lengths(bert_tiny, update, Knowledge(batch_size=2))
        assert inferred.lengths == tuple(sorted(batch.lengths, reverse=True)) and inferred.exact
    rec = get_attack("tag").reconstruct(
        bert_tiny, update, Knowledge(batch_size=2), AttackOptions(iterations=2)
    )
    assert sorted(len(t) for t in rec.token_ids) == sorted(batch.lengths)
    assert rec.notes[0].startswith("lengths inferred from the gradients: ")


def test_matching_refuses_where_lengths_cannot_be_inferred(gpt2_tiny, make_victim_batch):
    """No batch size, or (a decoder: no closing token to look for) no position-embedding gradient."""
    batch = make_victim_batch(gpt2_tiny, "cola", 1, 0)
    update = fedsgd(gpt2_tiny, batch)
    with pytest.raises(Refusal, match="batch size"):
        get_attack("tag").reconstruct(gpt2_tiny, update, Knowledge(), AttackOptions(iterations=1))
    positions = position_embedding(gpt2_tiny.model)[0] + ".weight"
    blind = update.replace({k: v for k, v in update.tensors.items() if k != positions})
    with pytest.raises(Refusal, match="lengths, which this scenario withholds, and they cannot be inferred"):
        get_attack("tag").reconstruct(gpt2_tiny, blind, Knowledge(batch_size=1), AttackOptions(iterations=1))


def test_lengths_from_the_closing_token_without_positions(bert_tiny, make_victim_batch):
    """Positions withheld, B = 1 on an encoder: the length is where [SEP] passes the span check."""
    batch = make_victim_batch(bert_tiny, "cola", 1, 0)
    update = fedsgd(bert_tiny, batch)
    positions = position_embedding(bert_tiny.model)[0] + ".weight"
    blind = update.replace({k: v for k, v in update.tensors.items() if k != positions})
    inferred = infer_lengths(bert_tiny, blind, Knowledge(batch_size=1))
    assert inferred.lengths == batch.lengths and "closing token's span check" in inferred.how


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_matching_leaves_the_victims_parameters_alone(bert_tiny, make_victim_batch, optimizer):
    """The attack differentiates with respect to its dummies only: no .grad lands on the victim's
    parameters (the model may be shared), and a fixed seed still gives one result."""
    batch = make_victim_batch(bert_tiny, "cola", 2, 0, max_words=10)
    update = fedsgd(bert_tiny, batch)
    knowledge = Knowledge(batch_size=2, lengths=batch.lengths)
    options = AttackOptions(iterations=3, seed=0, optimizer=optimizer)
    for p in bert_tiny.model.parameters():
        p.grad = None
    first = get_attack("tag").reconstruct(bert_tiny, update, knowledge, options)
    assert all(p.grad is None for p in bert_tiny.model.parameters())
    again = get_attack("tag").reconstruct(bert_tiny, update, knowledge, options)
    assert again.token_ids == first.token_ids and again.trace == first.trace
