"""Exact recovery on real sentences: decoders and encoders, embedding gradient shared or withheld."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gradleak.attacks import AttackOptions, Knowledge, get_attack
from gradleak.attacks.spans import residual, span_of
from gradleak.client import fedsgd
from gradleak.data import load_examples, make_batch
from gradleak.errors import GradleakError
from gradleak.experiment import RunSpec, run_one, score_reconstruction

EXACT = get_attack("exact")


@pytest.fixture(scope="module")
def batch_from(make_victim_batch):
    return make_victim_batch


def _attack(victim, batch, withhold=(), **knowledge):
    update = fedsgd(victim, batch, withhold=withhold)
    # a generous time budget: the search ends when solved, and results must not depend on machine load
    rec = EXACT.reconstruct(victim, update, Knowledge(**knowledge), AttackOptions(time_budget=600))
    return rec, score_reconstruction(victim, batch, rec)


@pytest.mark.parametrize("withhold", [(), ("embeddings",)], ids=["shared", "withheld"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_gpt2_tiny_recovered_exactly(batch_from, gpt2_tiny, batch_size, withhold):
    for seed in range(2):
        batch = batch_from(gpt2_tiny, "sst2", batch_size, seed, min_words=5, max_words=20)
        rec, scores = _attack(gpt2_tiny, batch, withhold, batch_size=batch_size)
        assert scores.exact_match == 100.0, (batch.texts, rec.texts)
        assert sorted(rec.labels) == sorted(batch.labels.tolist())


def test_decoder_assembly_past_its_budget_returns_the_prefixes_so_far(batch_from, gpt2_tiny):
    batch = batch_from(gpt2_tiny, "sst2", 2, 0, min_words=5, max_words=20)
    rec = EXACT.reconstruct(
        gpt2_tiny, fedsgd(gpt2_tiny, batch), Knowledge(batch_size=2), AttackOptions(time_budget=0.0)
    )
    true = {tuple(int(t) for t in batch.token_ids[i][: batch.lengths[i]]) for i in range(2)}
    assert rec.token_ids and all(len(s) < min(batch.lengths) for s in rec.token_ids)
    assert all(any(t[: len(s)] == s for t in true) for s in rec.token_ids)  # true prefixes


def test_a_sentence_that_begins_another_is_recovered_by_the_pooled_position_check(gpt2_tiny):
    """Real CoLA sentences, one the start of another: the decoder's span checks see only the longer
    one; the last block's MLP gradient (pooled positions only) shows where the shorter one ends."""
    texts = ["chris was handed", "chris was handed a note", "i served my guests"]
    found = {e.text: e for e in load_examples("cola") if e.text in texts}
    assert set(found) == set(texts)
    batch = make_batch([found[t] for t in texts], gpt2_tiny.tokenizer)
    rec, scores = _attack(gpt2_tiny, batch, batch_size=3)
    assert scores.exact_match == 100.0, rec.texts
    assert any("prefixes of others" in n for n in rec.notes)
    # without the batch size nothing says a sentence is missing: only the two visible ones come back
    rec, _ = _attack(gpt2_tiny, batch)
    assert sorted(rec.texts) == sorted(texts[1:])


@pytest.mark.parametrize("withhold", [(), ("embeddings",)], ids=["shared", "withheld"])
def test_minilm_single_sentence_recovered_exactly(batch_from, minilm, withhold):
    for seed in range(2):
        batch = batch_from(minilm, "sst2", 1, seed, min_words=5, max_words=20)
        rec, scores = _attack(minilm, batch, withhold, batch_size=1)
        assert scores.exact_match == 100.0, (batch.texts, rec.texts)
        assert rec.labels == tuple(batch.labels.tolist())


@pytest.mark.parametrize("withhold", [(), ("embeddings",)], ids=["shared", "withheld"])
def test_minilm_batch_of_four_reaches_rouge1_90(batch_from, minilm, withhold):
    rouge1 = []
    for seed in range(5):
        batch = batch_from(minilm, "sst2", 4, seed, min_words=5, max_words=20)
        _, scores = _attack(minilm, batch, withhold, batch_size=4)
        rouge1.append(scores.rouge1)
    assert sum(rouge1) / len(rouge1) >= 90.0, rouge1


def test_true_layer_inputs_lie_in_the_span_and_others_do_not(batch_from, gpt2_tiny):
    from gradleak.attacks.structure import attention_projections, capture_input, gradient_rows

    batch = batch_from(gpt2_tiny, "cola", 2, 0)
    grads = fedsgd(gpt2_tiny, batch).gradients()
    proj = attention_projections(gpt2_tiny, 0)
    span = span_of(gradient_rows(grads, proj))
    distinct = {(p, t) for seq in batch.token_ids for p, t in enumerate(seq)}
    assert span.rank == len(distinct)
    x = capture_input(gpt2_tiny, proj[0], batch.input_ids, batch.attention_mask)
    true = residual(span, x[batch.attention_mask.bool()])
    assert float(true.max()) < 1e-10
    other = torch.tensor([[50, 51, 52]])
    assert float(residual(span, capture_input(gpt2_tiny, proj[0], other)).min()) > 1e-3


def test_refuses_when_tokens_reach_the_hidden_width(batch_from, bert_tiny):
    batch = batch_from(bert_tiny, "rt", 8, 0, min_words=20)  # > 128 tokens in all
    assert sum(batch.lengths) >= 128
    update = fedsgd(bert_tiny, batch)
    with pytest.raises(GradleakError, match="hidden width"):
        EXACT.reconstruct(bert_tiny, update, Knowledge(batch_size=8, lengths=batch.lengths), AttackOptions())
    with pytest.raises(GradleakError, match="hidden width"):  # lengths unknown: the rank tells
        EXACT.reconstruct(bert_tiny, update, Knowledge(batch_size=8), AttackOptions())


def test_refuses_when_the_context_check_fills_the_width(batch_from, minilm):
    """Sixteen RT reviews (about 450 tokens) on MiniLM (width 384): the first layer still shows a rank
    (repeated tokens and positions share rows) but the context check is full, so any arrangement of
    the candidates would pass it; the attack says so instead of returning one at random."""
    batch = batch_from(minilm, "rt", 16, 0, max_length=64)
    assert sum(batch.lengths) > 384
    update = fedsgd(minilm, batch)
    with pytest.raises(GradleakError, match="context check") as err:
        EXACT.reconstruct(minilm, update, Knowledge(batch_size=16), AttackOptions())
    assert "\n" not in str(err.value)


def test_needs_first_layer_gradients(batch_from, gpt2_tiny):
    batch = batch_from(gpt2_tiny, "cola", 1, 0)
    update = fedsgd(gpt2_tiny, batch, withhold=["transformer.h.0.attn.*"])
    with pytest.raises(GradleakError, match="withheld"):
        EXACT.reconstruct(gpt2_tiny, update, Knowledge(batch_size=1), AttackOptions())


def test_nan_gradient_is_refused(batch_from, gpt2_tiny):
    batch = batch_from(gpt2_tiny, "cola", 1, 0)
    weight = gpt2_tiny.model.score.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight[0, 0] = float("nan")
        with pytest.raises(GradleakError, match="NaN"):
            fedsgd(gpt2_tiny, batch)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_run_one_language_model_recovers_the_last_token_from_the_output_layer(batch_size):
    """Under the next-token loss the last position predicts nothing: its token is in no span, and is
    read off the output layer's gradient once the prefixes are known (gpt2-tiny ties its embeddings)."""
    spec = RunSpec(
        victim="gpt2-tiny", task="lm", dtype="float64", data="cola", attack="exact", batch_size=batch_size
    )
    record = run_one(spec)
    assert sorted(record.reconstructions) == sorted(record.references)
    assert any("output layer" in note for note in record.notes)


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradleak", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_cli_recovers_unseen_plain_text(tmp_path):
    novel = tmp_path / "novel.txt"
    novel.write_text(
        "my neighbour painted her fence a shade of green nobody expected\n"
        "the bakery on the corner closes early on sundays\n"
        "we argued about the map until the ferry left without us\n"
        "an old radio hummed in the kitchen all winter\n"
        "the committee postponed the vote for another week\n",
        encoding="utf-8",
    )
    out = _cli(
        "attack", "--victim", "gpt2-tiny", "--data", str(novel), "--batch-size", "4",
        "--attack", "exact", "--json", "-",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["scores"]["exact_match"] == 100.0
    assert sorted(record["reconstructions"]) == sorted(record["references"])


def test_cli_refuses_too_many_tokens_with_one_line(tmp_path):
    out = _cli(
        "attack", "--victim", "bert-tiny", "--data", "rt", "--batch-size", "8", "--attack", "exact",
    )  # fmt: skip
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "hidden width" in lines[0]


def test_encoder_lengths_never_shorter_than_the_template(minilm):
    from gradleak.attacks.context import Candidates
    from gradleak.attacks.lengths import encoder_lengths
    from gradleak.attacks.tokens import special_template

    prefix, suffix = special_template(minilm.tokenizer)
    sep = suffix[-1]
    # under noise the closing token may rank among the candidates of position 0
    tokens = [torch.tensor([prefix[0], sep]), torch.tensor([2023, sep]), torch.tensor([sep])]
    cands = Candidates(tokens, [torch.zeros(len(t)) for t in tokens])
    lengths = encoder_lengths(minilm, cands, Knowledge(batch_size=2)).estimate
    assert min(lengths) >= len(prefix) + len(suffix)
    assert len(lengths) == 2


def test_a_weaker_gap_cuts_the_span_where_the_strict_one_does_not():
    """The context check's span may be cut at a weaker singular-value gap (float32 rounding blurs
    the drop): eight signal directions, the last four small, then a drop of only 8x to the floor."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))[0]
    s = torch.tensor([1.0, 0.8, 0.5, 0.3] + [2e-4] * 4 + [2.5e-5] * 32, dtype=torch.float64)
    rows = torch.diag(s) @ basis
    assert span_of(rows).full  # no drop of 10x to below FLOOR
    weak = span_of(rows, min_gap=4.0)
    assert not weak.full and weak.rank == 8
