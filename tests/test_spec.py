"""The shared spec base and the threat model: defaults, shared checks, records and the report."""

from __future__ import annotations

import dataclasses
import time

import pytest

from gradleak.conditions import fields
from gradleak.errors import GradleakError
from gradleak.experiment import RunRecord, RunSpec
from gradleak.flower.spec import FlSpec
from gradleak.knowledge import Knows
from gradleak.metrics import Scores
from gradleak.report import load_report_data, render
from gradleak.spec import AttackSpec, VictimSpec
from gradleak.store import StoredRun, run_key
from gradleak.train import TrainSpec
from gradleak.victims import PRESET_SHAPES

# RunSpec's fields as the store's canonical JSON has them: a change here changes every run's key
RUN_FIELDS = {
    "victim", "data", "batch_size", "attack", "iterations", "seed", "task", "dtype", "device",
    "max_length", "min_words", "max_words", "withhold", "protocol", "local_steps", "local_lr",
    "attack_lr", "optimizer", "known_labels", "known_lengths", "force", "time_budget", "defenses",
    "delta", "accountant", "share", "known_batch_size", "finetune_steps", "finetune_lr", "min_tokens",
}  # fmt: skip
ALL = (RunSpec, TrainSpec, FlSpec)


def _names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_one_base_and_the_field_names_kept():
    assert issubclass(RunSpec, AttackSpec) and issubclass(FlSpec, AttackSpec)
    assert issubclass(TrainSpec, VictimSpec) and not issubclass(TrainSpec, AttackSpec)
    assert _names(RunSpec) == RUN_FIELDS | {"text_column", "label_column", "peft", "local_batch", "prior"}
    shared = _names(VictimSpec)
    assert all(shared <= _names(cls) for cls in ALL)
    # each keeps its own defaults
    assert (RunSpec().victim, RunSpec().data, RunSpec().batch_size, RunSpec().attack) == (
        "bert-tiny", "sample", 1, "tag",
    )  # fmt: skip
    assert (TrainSpec().data, TrainSpec().batch_size) == ("sst2", 16)
    assert (FlSpec().victim, FlSpec().attack, FlSpec().iterations) == ("gpt2-tiny", "exact", 100)


@pytest.mark.parametrize("cls", [RunSpec, FlSpec])
def test_the_default_server_knows_the_batch_size_only(cls):
    spec = cls()
    assert (spec.known_batch_size, spec.known_lengths, spec.known_labels) == (True, False, False)
    assert spec.knows() == Knows() and spec.knows().to_json() == {
        "batch_size": True, "lengths": False, "labels": False,
    }  # fmt: skip


BAD_COMMON = [
    ({"batch_size": 0}, "batch size must be at least 1"),
    ({"max_length": 1}, "max length must be at least 2"),
    ({"task": "translate"}, "unknown task"),
    ({"dtype": "int8"}, "unknown dtype"),
    ({"victim": "gpt2-random:layers=x"}, "must be a positive integer"),
    ({"delta": 1.5}, "delta must be in"),
    ({"accountant": "magic"}, "unknown accountant"),
    ({"defenses": ("nonsense:x=1",)}, "unknown defence"),
]


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize(("change", "message"), BAD_COMMON, ids=[next(iter(c)) for c, _ in BAD_COMMON])
def test_shared_fields_are_checked_once_for_all(cls, change, message):
    with pytest.raises(GradleakError, match=message):
        cls(**change).validate()


@pytest.mark.parametrize("cls", [RunSpec, FlSpec])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"iterations": 0}, "iterations must be at least 1"),
        ({"attack": "no-such-attack"}, "attack"),
        ({"local_steps": 0}, "local steps must be at least 1"),
        ({"local_lr": 0.0}, "local learning rate"),
        ({"optimizer": "sgd"}, "unknown optimizer"),
    ],
)
def test_attack_fields_are_checked_once_for_both(cls, change, message):
    with pytest.raises(GradleakError, match=message):
        cls(**change).validate()


def _record(spec: RunSpec) -> dict:
    return RunRecord(
        spec=spec,
        references=("a private sentence",),
        reconstructions=("a private sentence",),
        scores=Scores(100.0, 100.0, 100.0, 100.0, 100.0),
        seconds=1.0,
        labels=None,
        inferred_labels=None,
    ).to_json()


def test_every_record_says_what_the_attack_was_given():
    assert _record(RunSpec())["knowledge"] == {"batch_size": True, "lengths": False, "labels": False}
    given = _record(RunSpec(known_lengths=True, known_labels=True, known_batch_size=False))
    assert given["knowledge"] == {"batch_size": False, "lengths": True, "labels": True}


def _row(spec: RunSpec) -> StoredRun:
    now = time.time()
    return StoredRun(run_key("attack", spec), "attack", {}, "done", _record(spec), None, now, now + 1, "0")


def test_the_report_keeps_threat_models_apart_and_names_them():
    base = dict(victim="gpt2-tiny", attack="exact", data="sst2")
    rows = [
        _row(RunSpec(**base, seed=0)),
        _row(RunSpec(**base, seed=1)),
        _row(RunSpec(**base, seed=0, known_lengths=True)),
    ]
    data = load_report_data(rows)
    groups = data.groups()
    assert sorted((g.first.knows, len(g.runs)) for g in groups) == [
        ("batch-size", 2), ("batch-size,lengths", 1),
    ]  # fmt: skip
    page = render(data)
    assert "server knows" in page and "batch-size,lengths" in page


def test_records_without_knowledge_read_it_from_their_spec():
    from gradleak.report.data import knowledge_of

    assert knowledge_of({}, {"known_lengths": True}) == Knows(lengths=True)
    assert knowledge_of({}, {}) == Knows()
    assert knowledge_of({"knowledge": {"batch_size": False}}, {"known_lengths": True}) == Knows(
        batch_size=False
    )


def test_study_fields_follow_the_defaults_and_the_victims():
    assert fields.PRESET_SHAPES == PRESET_SHAPES
    knowledge = fields.get_field("knowledge").get
    assert knowledge({}) == "B"  # a spec that does not say: the server's default
    assert knowledge({"known_lengths": True, "known_batch_size": True}) == "lengths+B"
    assert fields.get_field("layers").get({"victim": "minilm"}) == PRESET_SHAPES["minilm"][0]


def test_run_one_records_what_was_given():
    """An lm batch has no labels to give: known_labels does not make the record say they were given."""
    from gradleak.experiment import run_one

    spec = RunSpec(
        victim="gpt2-tiny", task="lm", dtype="float64", data="sample", attack="exact",
        known_labels=True, known_lengths=True, time_budget=30,
    )  # fmt: skip
    record = run_one(spec).to_json()
    assert record["knowledge"] == {"batch_size": True, "lengths": True, "labels": False}


@pytest.mark.parametrize("known_lengths", [False, True])
def test_flower_records_say_what_the_audit_gave(known_lengths):
    """The audit gives the attack what the FlSpec's known_* say, and its records say so."""
    pytest.importorskip("flwr")
    from gradleak.flower.audit import LeakageAudit
    from gradleak.victims import load_victim

    victim = load_victim("gpt2-tiny", seed=0)
    spec = dataclasses.asdict(FlSpec(known_lengths=known_lengths))
    audit = LeakageAudit(object(), victim=victim, local_lr=0.01, batch_size=1, spec=spec)  # type: ignore[arg-type]
    state = {n: p.detach().clone() for n, p in victim.model.state_dict().items()}
    ids = victim.tokenizer("a private sentence")["input_ids"]
    truth = {"client": 0, "texts": ["a private sentence"], "token_ids": [ids], "labels": [1]}
    given = []

    class Spy:  # stands in for the attack: records what it is given
        name = "spy"

        def reconstruct(self, victim, update, knowledge, options, progress=None):
            from gradleak.attacks import Reconstruction

            given.append(knowledge)
            return Reconstruction(token_ids=(), texts=(), labels=None)

    audit.attack = Spy()  # type: ignore[assignment]
    leak = audit.audit(1, 7, state, state, truth, None)
    assert leak.record["knowledge"] == {"batch_size": True, "lengths": known_lengths, "labels": False}
    assert given[0].batch_size == 1 and given[0].labels is None
    assert given[0].lengths == ((len(ids),) if known_lengths else None)


def test_data_columns_enter_the_store_key_only_when_set(tmp_path):
    import json

    from gradleak.store import canonical, run_key

    plain = RunSpec(victim="gpt2-tiny", data="sst2")
    assert set(json.loads(canonical(plain))) == RUN_FIELDS  # keys of runs stored before the fields
    named = RunSpec(victim="gpt2-tiny", data="sst2", text_column="review")
    assert json.loads(canonical(named))["text_column"] == "review"
    assert run_key("attack", plain) != run_key("attack", named)


def test_text_and_label_columns_reach_the_examples(tmp_path):
    table = tmp_path / "reviews.csv"
    table.write_text("id,review,stars\n1,a fine film,1\n2,a dull film,0\n3,what a ride,1\n")
    spec = RunSpec(data=str(table), text_column="review", label_column="stars")
    examples = spec.examples()
    expected = [("a fine film", 1), ("a dull film", 0), ("what a ride", 1)]
    assert [(e.text, e.label) for e in examples] == expected
