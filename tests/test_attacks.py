"""Gradient-matching attacks on real CoLA sentences, and the attack registry."""

from __future__ import annotations

import pytest

from gradleak.attacks import ATTACKS, AttackOptions, Knowledge, get_attack
from gradleak.client import fedsgd
from gradleak.errors import GradleakError
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


def test_matching_needs_lengths(bert_tiny, make_victim_batch):
    batch = make_victim_batch(bert_tiny, "cola", 1, 0)
    update = fedsgd(bert_tiny, batch)
    with pytest.raises(GradleakError, match="lengths"):
        get_attack("tag").reconstruct(bert_tiny, update, Knowledge(batch_size=1), AttackOptions(iterations=1))


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
