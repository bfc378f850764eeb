"""What a conditions study varies: victim size, random vs pretrained weights, a fine-tuned stage, what
the client shares, what the server knows, and the sequence length."""

from __future__ import annotations

import json

import pytest
import torch
from _cli import main_in_process

from gradleak.client import fedavg, fedsgd, resolve_shared
from gradleak.data import load_examples, make_batch, sample_examples, sample_with_tokens
from gradleak.errors import GradleakError, Refusal
from gradleak.experiment import RunSpec, run_one
from gradleak.finetune import finetune, finetune_batches
from gradleak.sweeps.grid import parse_plan
from gradleak.victims import bert_tokenizer, gpt2_tokenizer, load_victim

torch.set_num_threads(1)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------- parametric victims


def test_parametric_victims_have_the_asked_size():
    gpt2 = load_victim("gpt2-random:layers=3,hidden=128,heads=2").model.config
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.n_head) == (3, 128, 2)
    bert = load_victim("bert-random:layers=1,hidden=64").model.config  # heads default to hidden // 64
    assert (bert.num_hidden_layers, bert.hidden_size, bert.num_attention_heads) == (1, 64, 1)
    assert bert.intermediate_size == 256
    default = load_victim("bert-random").model.config
    assert (default.num_hidden_layers, default.hidden_size, default.num_attention_heads) == (2, 256, 4)


def test_a_parametric_name_builds_the_preset_of_that_size(gpt2_tiny):
    same = load_victim("gpt2-random:layers=2,hidden=256,heads=4", dtype="float64", seed=0)
    preset = dict(gpt2_tiny.model.named_parameters())
    for name, p in same.model.named_parameters():
        assert torch.equal(p, preset[name]), name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gpt2-random:depth=4", "unknown size 'depth=4'"),
        ("bert-random:hidden=256,heads=3", "not divisible by heads 3"),
        ("bert-random:hidden=200", "heads default to hidden // 64"),
        ("gpt2-random:layers=0", "layers must be a positive integer"),
        ("gpt2-random:layers=two", "layers must be a positive integer"),
        ("gpt2-random:layers=2,layers=3", "layers is given twice"),
        ("gpt2-random:", "unknown size"),
        ("gpt3-random:layers=2", "gpt2-random, bert-random"),  # the families are listed
    ],
)
def test_bad_parametric_names_are_one_line_errors(name, message):
    with pytest.raises(GradleakError) as exc:
        load_victim(name)
    assert message in _one_line(exc)
    if name.startswith(("gpt2-random", "bert-random")):  # caught before anything runs
        with pytest.raises(GradleakError, match="victim"):
            RunSpec(victim=name).validate()


def test_minilm_random_has_minilm_shapes_but_fresh_weights(minilm):
    fresh = load_victim("minilm-random", seed=0)
    assert fresh.model.config._attn_implementation == "eager" and not fresh.model.training
    assert fresh.num_labels == 2 and fresh.tokenizer.vocab_size == minilm.tokenizer.vocab_size
    pretrained = dict(minilm.model.named_parameters())
    random_ = dict(fresh.model.named_parameters())
    assert list(random_) == list(pretrained)
    assert all(random_[n].shape == pretrained[n].shape for n in pretrained)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert float((random_[query] - pretrained[query]).detach().abs().max()) > 0.1
    again = dict(load_victim("minilm-random", seed=0).model.named_parameters())
    assert all(torch.equal(again[n], random_[n]) for n in random_)  # seeded


# ---------------------------------------------------------------- fine-tuned stage


def test_finetune_batches_never_hold_the_private_examples():
    examples = load_examples("sample")
    private = sample_examples(examples, 3, seed=1)
    batches = finetune_batches(examples, private, steps=20, seed=1)  # several passes over the rest
    assert len(batches) == 20 and all(len(b) == 8 for b in batches)
    seen = {e for b in batches for e in b}
    assert not seen & set(private)
    assert seen == set(examples) - set(private)
    assert batches == finetune_batches(examples, private, steps=20, seed=1)  # seeded


def test_finetune_changes_weights_and_lowers_its_loss():
    victim = load_victim("bert-random:layers=1,hidden=64", seed=0)
    before = {n: p.detach().clone() for n, p in victim.model.named_parameters()}
    examples = load_examples("sst2")[:26]  # a small pool: the steps revisit their sentences
    private = examples[:2]
    result = finetune(victim, examples, exclude=private, steps=15, learning_rate=0.1, seed=0)
    assert result.loss_after < result.loss_before - 0.005
    assert not victim.model.training
    changed = [n for n, p in victim.model.named_parameters() if not torch.equal(p, before[n])]
    assert "classifier.weight" in changed and len(changed) > len(before) // 2
    assert "loss" in result.note() and set(result.as_environment()) == {
        "finetune_loss_before",
        "finetune_loss_after",
    }
    lm = load_victim("gpt2-random:layers=1,hidden=64", task="lm", seed=0)
    tuned = finetune(lm, load_examples("wikitext"), exclude=(), steps=4, learning_rate=0.1, seed=0)
    assert tuned.loss_after < tuned.loss_before - 0.1
    with pytest.raises(GradleakError) as exc:
        finetune(victim, examples, exclude=examples, steps=1, learning_rate=0.1, seed=0)
    assert "no sentences outside the private batch" in _one_line(exc)


def test_run_one_fine_tunes_outside_the_private_batch(monkeypatch):
    import gradleak.finetune as ft

    seen: list[str] = []
    real = ft.make_batch

    def spy(examples, *args, **kwargs):
        seen.extend(e.text for e in examples)
        return real(examples, *args, **kwargs)

    monkeypatch.setattr(ft, "make_batch", spy)
    spec = RunSpec(
        victim="bert-random:layers=1,hidden=64",
        data="sample",
        batch_size=2,
        attack="tag",
        iterations=2,
        finetune_steps=6,
        finetune_lr=0.1,
        seed=3,
    )
    record = run_one(spec)
    private = {e.text for e in sample_examples(load_examples("sample"), 2, 3)}
    assert seen and not private & set(seen)
    assert record.notes[0].startswith("fine-tuned 6 SGD steps")
    assert float(record.environment["finetune_loss_after"]) > 0


# ---------------------------------------------------------------- what is shared


ATTENTION = {
    "bert_tiny": [
        f"bert.encoder.layer.{i}.attention.{m}.{w}"
        for i in range(2)
        for m in ("self.query", "self.key", "self.value", "output.dense")
        for w in ("weight", "bias")
    ],
    "gpt2_tiny": [
        f"transformer.h.{i}.attn.{m}.{w}"
        for i in range(2)
        for m in ("c_attn", "c_proj")
        for w in ("weight", "bias")
    ],
}


@pytest.mark.parametrize("fixture", ["bert_tiny", "gpt2_tiny"])
def test_sharing_attention_sends_exactly_the_attention_parameters(request, make_victim_batch, fixture):
    victim = request.getfixturevalue(fixture)
    batch = make_victim_batch(victim, "sst2", 2, 0)
    full = fedsgd(victim, batch)
    update = fedsgd(victim, batch, share=("attention",))
    assert set(update.tensors) == set(ATTENTION[fixture])
    assert set(update.withheld) == set(full.tensors) - set(ATTENTION[fixture])
    for name, value in update.tensors.items():
        assert torch.equal(value, full.tensors[name])
    delta = fedavg(victim, batch, local_steps=1, learning_rate=0.01, share=("attention",))
    assert set(delta.tensors) == set(ATTENTION[fixture]) and delta.withheld == update.withheld


@pytest.mark.parametrize(
    ("fixture", "block"), [("bert_tiny", "bert.encoder.layer.1."), ("gpt2_tiny", "transformer.h.1.")]
)
def test_sharing_the_last_block(request, make_victim_batch, fixture, block):
    victim = request.getfixturevalue(fixture)
    batch = make_victim_batch(victim, "sst2", 1, 0)
    update = fedsgd(victim, batch, share=("last:1",))
    expected = {n for n, _ in victim.model.named_parameters() if n.startswith(block)}
    assert expected and set(update.tensors) == expected
    with pytest.raises(GradleakError) as exc:
        fedsgd(victim, batch, share=("last:3",))
    assert "only 2 blocks" in _one_line(exc)


def test_share_groups_and_withhold_compose(bert_tiny, make_victim_batch):
    batch = make_victim_batch(bert_tiny, "sst2", 1, 0)
    embeddings = set(resolve_shared(bert_tiny.model, ["embeddings"]))
    assert embeddings == {
        "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.token_type_embeddings.weight",
        "bert.embeddings.LayerNorm.weight",
        "bert.embeddings.LayerNorm.bias",
    }
    assert set(resolve_shared(bert_tiny.model, ["head"])) == {
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    }
    update = fedsgd(bert_tiny, batch, withhold=("embeddings",), share=("embeddings", "classifier.*"))
    assert set(update.tensors) == (embeddings - {"bert.embeddings.word_embeddings.weight"}) | {
        "classifier.weight",
        "classifier.bias",
    }
    assert "bert.embeddings.word_embeddings.weight" in update.withheld
    for share, message in [
        (("no_such_param*",), "matches no parameter"),
        (("last",), "write last:K"),
        (("attention:2",), "write attention"),
        (("last:0",), "positive integer"),
    ]:
        with pytest.raises(GradleakError) as exc:
            fedsgd(bert_tiny, batch, share=share)
        assert message in _one_line(exc)
    with pytest.raises(GradleakError) as exc:
        fedsgd(bert_tiny, batch, share=("head",), withhold=("head",))
    assert "shares nothing" in _one_line(exc)


@pytest.mark.parametrize(
    ("share", "missing"),
    [
        # two blocks: the second is the last, whose attention gradient sums over tokens (pooled position)
        (("attention",), "transformer.h.0.mlp.c_fc.weight"),
        (("embeddings", "head"), "transformer.h.0.attn.c_attn.weight"),
        (("last:1",), "transformer.h.0.attn.c_attn.weight"),
    ],
)
def test_exact_refuses_in_one_line_without_the_first_layer(share, missing):
    spec = RunSpec(
        victim="gpt2-tiny", dtype="float64", data="sst2", batch_size=2, attack="exact", share=share
    )
    with pytest.raises(GradleakError) as exc:
        run_one(spec)
    assert missing in _one_line(exc) and "withheld" in str(exc.value)


def test_exact_reads_the_next_block_when_only_the_attention_is_shared():
    """Without the MLP's gradient the context check reads the second block's attention input (a model
    of three blocks: the second is not the last)."""
    spec = RunSpec(
        victim="gpt2-random:layers=3,hidden=128,heads=2",
        dtype="float64",
        data="sst2",
        batch_size=2,
        attack="exact",
        share=("attention",),
    )
    record = run_one(spec)
    assert record.scores.exact_match == 100.0


def test_exact_runs_on_what_the_blocks_share_without_embeddings():
    spec = RunSpec(
        victim="gpt2-tiny", dtype="float64", data="sst2", batch_size=1, attack="exact", share=("last:2",)
    )
    record = run_one(spec)
    assert record.scores.exact_match == 100.0
    assert any("whole vocabulary" in n for n in record.notes)


def test_tag_runs_on_attention_only():
    spec = RunSpec(victim="bert-tiny", data="sst2", attack="tag", iterations=2, share=("attention",))
    record = run_one(spec)
    assert "labels optimised as soft labels" in record.notes  # the head was not shared


# ---------------------------------------------------------------- what the server knows


def test_unknown_batch_size_stops_tag_but_not_exact():
    spec = RunSpec(victim="bert-tiny", data="sst2", attack="tag", iterations=2, known_batch_size=False)
    with pytest.raises(Refusal) as exc:
        run_one(spec)
    assert "needs the batch size" in _one_line(exc)
    for known_lengths in (True, False):
        exact = RunSpec(
            victim="gpt2-tiny",
            dtype="float64",
            data="sst2",
            batch_size=2,
            attack="exact",
            known_batch_size=False,
            known_lengths=known_lengths,
            time_budget=600,
        )
        assert run_one(exact).scores.exact_match == 100.0


# ---------------------------------------------------------------- sequence length


@pytest.mark.parametrize("tokenizer", [gpt2_tokenizer, bert_tokenizer], ids=["gpt2", "bert"])
def test_wikitext_min_tokens_gives_full_length_sequences(tokenizer):
    tok = tokenizer()
    examples = load_examples("wikitext")
    for max_length in (32, 64, 128, 256):
        chosen = sample_with_tokens(examples, 4, 0, tok, max_length)
        batch = make_batch(chosen, tok, max_length, with_labels=False)
        assert batch.lengths == (max_length,) * 4
        assert chosen == sample_with_tokens(examples, 4, 0, tok, max_length)  # seeded
    # the same passages at every truncation when min_tokens is fixed at the longest
    long = sample_with_tokens(examples, 2, 0, tok, 256)
    assert make_batch(long, tok, 32, with_labels=False).lengths == (32, 32)
    assert sample_with_tokens(examples, 3, 5, tok, 0) == sample_examples(examples, 3, 5)


def test_min_tokens_errors_are_one_line():
    tok = bert_tokenizer()
    examples = load_examples("sample")
    with pytest.raises(GradleakError) as exc:
        sample_with_tokens(examples, 1, 0, tok, 400)
    assert "no sentence has at least 400 tokens" in _one_line(exc)
    with pytest.raises(GradleakError) as exc:
        RunSpec(min_tokens=-1).validate()
    _one_line(exc)


def test_run_one_with_min_tokens():
    spec = RunSpec(
        victim="bert-random:layers=1,hidden=64",
        data="wikitext",
        attack="tag",
        iterations=1,
        batch_size=2,
        max_length=64,
        min_tokens=64,
    )
    record = run_one(spec)
    tok = bert_tokenizer()
    assert all(len(tok(t)["input_ids"]) >= 60 for t in record.references)  # ~64 once decoded


# ---------------------------------------------------------------- CLI and sweeps


def test_cli_attack_takes_the_new_options(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run.json"
    args = (
        "attack",
        "--victim",
        "gpt2-random:layers=1,hidden=128",
        "--dtype",
        "float64",
        "--data",
        "sst2",
        "--attack",
        "exact",
        "--share",
        "embeddings",
        "--share",
        "last:1",
        "--knows",
        "none",
        "--finetune-steps",
        "2",
        "--finetune-lr",
        "0.01",
        "--min-tokens",
        "8",
        "--json",
        str(out),
    )
    code, err = main_in_process(args, capsys, monkeypatch)
    assert code == 0, err
    spec = json.loads(out.read_text())["spec"]
    assert spec["share"] == ["embeddings", "last:1"] and spec["known_batch_size"] is False
    assert (spec["finetune_steps"], spec["finetune_lr"], spec["min_tokens"]) == (2, 0.01, 8)
    code, err = main_in_process(("attack", "--victim", "bert-random:width=3"), capsys, monkeypatch)
    assert code == 2 and "keys: layers, hidden, heads" in err and len(err.strip().splitlines()) == 1


def test_sweep_grid_reads_the_new_fields():
    plan = parse_plan(
        {
            "grid": {
                "victim": ["gpt2-random:layers=4,hidden=256", "minilm-random"],
                "share": [[], "attention", ["embeddings", "last:1"]],
                "known_batch_size": [True, False],
            },
            "fixed": {"finetune_steps": 10, "finetune_lr": 1, "min_tokens": 64, "data": "wikitext"},
        }
    )
    assert len(plan.jobs) == 12
    spec = plan.jobs[-1].spec
    assert spec.share == ("embeddings", "last:1") and spec.known_batch_size is False
    assert spec.finetune_lr == 1.0 and isinstance(spec.finetune_lr, float) and spec.min_tokens == 64
    with pytest.raises(GradleakError, match="last:x"):
        parse_plan({"grid": {"share": ["last:x"]}})


def test_refused_and_failed_come_from_the_stored_status_not_the_words():
    from gradleak.conditions.table import _row, reason
    from gradleak.store import StoredRun

    def run(key: str, status: str, error: str | None) -> StoredRun:
        scores = {"rouge1": 100.0, "rouge2": 100.0, "exact_match": 100.0}
        record = {"scores": scores} if status == "done" else None
        return StoredRun(key, "attack", {"seed": 0}, status, record, error, 1.0, 2.0, "0")

    # a crash whose message happens to say "cannot" is a failure; a refusal in plain words is a refusal
    crash = "RuntimeError: cannot reshape tensor"
    assert reason("failed", crash) == f"failed: {crash}"
    assert reason("refused", "attack 'tag' the batch is too long") == "refused: the batch is too long"
    runs = [
        run("a", "done", None),
        run("b", "refused", "attack 'tag' needs the batch size, which this scenario withholds"),
        run("c", "failed", "RuntimeError: cannot reshape tensor"),
    ]
    row = _row("p", "batch_size", 1, "", (), ("a", "b", "c"), runs, False, False)
    assert (row.n, row.refused, row.failed) == (1, 1, 1)
    assert row.note == (
        "1 of 3 failed: RuntimeError: cannot reshape tensor; "
        "1 of 3 refused: needs the batch size, which this scenario withholds"
    )
    only_refused = _row("p", "batch_size", 1, "", (), ("b",), runs[1:2], False, False)
    assert only_refused.failed == 0 and only_refused.note.startswith("refused: needs the batch size")
    assert only_refused.to_json([])["refused"] == 1
