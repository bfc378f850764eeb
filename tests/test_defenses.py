"""Defences: what each does to the update, what it buys in DP, and how the exact attack degrades."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from gradleak.attacks import AttackOptions, Knowledge
from gradleak.attacks.exact import EXACT
from gradleak.client import fedsgd
from gradleak.defenses import (
    DefenseChain,
    DefenseContext,
    DpSgd,
    global_norm,
    parse_defense,
    per_example_gradients,
)
from gradleak.errors import GradleakError
from gradleak.experiment import RunSpec, score_reconstruction


def context(victim, batch, seed: int = 0) -> DefenseContext:
    return DefenseContext(victim, batch, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def bert_case(bert_tiny, make_victim_batch):
    batch = make_victim_batch(bert_tiny, "sst2", 6, 1)
    return bert_tiny, batch, fedsgd(bert_tiny, batch)


def test_per_example_gradients_average_to_the_batch_gradient(bert_case, gpt2_tiny, make_victim_batch):
    victim, batch, update = bert_case  # BERT goes one example at a time (its mask code defeats vmap)
    per = per_example_gradients(victim, batch, list(update.tensors))
    for k, g in update.tensors.items():
        torch.testing.assert_close(per[k].mean(0), g, atol=1e-6, rtol=1e-4)
    b2 = make_victim_batch(gpt2_tiny, "cola", 3, 2)  # GPT-2 vectorises with torch.func
    u2 = fedsgd(gpt2_tiny, b2)
    per2 = per_example_gradients(gpt2_tiny, b2, list(u2.tensors))
    for k, g in u2.tensors.items():
        torch.testing.assert_close(per2[k].mean(0), g, atol=1e-10, rtol=1e-8)


def test_dp_sgd_clips_every_example_to_the_bound(bert_case):
    victim, batch, update = bert_case
    clip = 0.05
    per = per_example_gradients(victim, batch, list(update.tensors))
    norms = torch.sqrt(sum(g.double().pow(2).flatten(1).sum(1) for g in per.values()))
    assert bool((norms > clip).all()), "the bound must bite for the test to mean something"
    factors = (clip / norms).clamp(max=1.0)
    for i in range(batch.size):
        contribution = {k: per[k][i] * factors[i] for k in per}
        assert global_norm(contribution) <= clip * (1 + 1e-6)
    # without noise the defended update is exactly the mean of the clipped contributions
    defended, trace = DefenseChain((DpSgd(clip, 0.0),)).apply(update, context(victim, batch))
    for k in per:
        expected = (per[k] * factors.view(-1, *[1] * (per[k].dim() - 1)).to(per[k].dtype)).mean(0)
        torch.testing.assert_close(defended.tensors[k], expected, atol=1e-7, rtol=1e-5)
    assert global_norm(defended.tensors) <= clip * (1 + 1e-6)
    assert trace.unit == "example"


def test_dp_sgd_noise_has_the_stated_scale(bert_case):
    victim, batch, update = bert_case
    clean, _ = DefenseChain((DpSgd(1.0, 0.0),)).apply(update, context(victim, batch))
    noisy, trace = DefenseChain((DpSgd(1.0, 2.0),)).apply(update, context(victim, batch))
    diff = torch.cat([(noisy.tensors[k] - clean.tensors[k]).flatten().double() for k in clean.tensors])
    expected = 2.0 * 1.0 / batch.size  # std Z * C on the sum, divided by B
    assert diff.std().item() == pytest.approx(expected, rel=0.02)
    assert abs(diff.mean().item()) < 5 * expected / math.sqrt(diff.numel())
    report = trace.report(1e-5, "rdp")
    assert report.epsilon is not None and report.accountant == "rdp"


def test_clip_bounds_the_whole_update(bert_case):
    victim, batch, update = bert_case
    defended, trace = DefenseChain.parse(["clip:norm=0.01"]).apply(update, context(victim, batch))
    assert global_norm(defended.tensors) == pytest.approx(0.01, rel=1e-5)
    assert trace.sensitivity == 0.01
    # clipping alone adds no noise: no finite epsilon
    assert trace.report(1e-5, "rdp").epsilon is None


def test_gaussian_noise_scale_and_accounting(bert_case):
    victim, batch, update = bert_case
    noisy, trace = DefenseChain.parse(["gaussian:sigma=0.1"]).apply(update, context(victim, batch))
    diff = torch.cat([(noisy.tensors[k] - update.tensors[k]).flatten() for k in update.tensors])
    assert diff.std().item() == pytest.approx(0.1, rel=0.01)
    unclipped = trace.report(1e-5, "rdp")
    assert unclipped.epsilon is None and "unclipped" in unclipped.reason
    # clip then noise relative to the clip: a Gaussian mechanism with multiplier Z
    _, trace = DefenseChain.parse(["clip:norm=2", "gaussian:multiplier=1.5"]).apply(
        update, context(victim, batch)
    )
    rep = trace.report(1e-5, "analytic")
    from gradleak.privacy import analytic_gaussian_epsilon

    assert rep.epsilon == pytest.approx(analytic_gaussian_epsilon(3.0, 2.0, 1e-5))
    # the same noise as an absolute sigma after the clip counts too
    _, trace = DefenseChain.parse(["clip:norm=2", "gaussian:sigma=3"]).apply(update, context(victim, batch))
    assert trace.report(1e-5, "analytic").epsilon == pytest.approx(rep.epsilon)


def test_laplace_noise_scale(bert_case):
    victim, batch, update = bert_case
    noisy, trace = DefenseChain.parse(["laplace:scale=0.1"]).apply(update, context(victim, batch))
    diff = torch.cat([(noisy.tensors[k] - update.tensors[k]).flatten() for k in update.tensors])
    assert diff.abs().mean().item() == pytest.approx(0.1, rel=0.02)  # E|Laplace(b)| = b
    assert trace.report(1e-5, "pld").epsilon is None


def test_pruning_and_quantisation(bert_case):
    victim, batch, update = bert_case
    pruned, _ = DefenseChain.parse(["prune:fraction=0.9"]).apply(update, context(victim, batch))
    flat = torch.cat([t.flatten() for t in pruned.tensors.values()])
    orig = torch.cat([t.flatten() for t in update.tensors.values()])
    kept = flat != 0
    assert kept.float().mean().item() <= 0.1 + 1e-3
    assert flat[kept].abs().min() >= orig[~kept].abs().max()  # the largest magnitudes survive
    rnd, _ = DefenseChain.parse(["prune:fraction=0.5,method=random"]).apply(update, context(victim, batch))
    rflat = torch.cat([t.flatten() for t in rnd.tensors.values()])
    frac = rflat[orig != 0].eq(0).float().mean().item()  # (most embedding rows are zero already)
    assert frac == pytest.approx(0.5, abs=0.01)
    q8, _ = DefenseChain.parse(["quantize:bits=8"]).apply(update, context(victim, batch))
    for k, t in update.tensors.items():
        step = t.abs().max() / 127
        assert (q8.tensors[k] - t).abs().max() <= step / 2 + 1e-12
        assert q8.tensors[k].div(step).sub(q8.tensors[k].div(step).round()).abs().max() < 1e-3
    q16, _ = DefenseChain.parse(["quantize:bits=16"]).apply(update, context(victim, batch))
    for k, t in update.tensors.items():
        torch.testing.assert_close(q16.tensors[k], t.half().float())


def test_withhold_defence(bert_case):
    victim, batch, update = bert_case
    out, _ = DefenseChain.parse(["withhold:params=embeddings"]).apply(update, context(victim, batch))
    assert not any("word_embeddings" in k for k in out.tensors)
    assert any("word_embeddings" in k for k in out.withheld)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("blur", "unknown defence"),
        ("clip", "missing norm"),
        ("clip:norm=-1", "norm must be"),
        ("clip:size=1", "unknown key"),
        ("gaussian:sigma=-0.1", "sigma must be"),
        ("gaussian:sigma=1,multiplier=1", "exactly one"),
        ("gaussian:sigma=abc", "not a number"),
        ("dp-sgd:clip=1", "missing multiplier"),
        ("prune:fraction=1", "fraction must be"),
        ("prune:fraction=0.5,method=smart", "topk or random"),
        ("quantize:bits=4", "bits must be"),
        ("clip:norm", "key=value"),
    ],
)
def test_bad_defence_specs(text, message):
    with pytest.raises(GradleakError, match=message):
        parse_defense(text)


def test_bad_chains(bert_case):
    victim, batch, update = bert_case
    with pytest.raises(GradleakError, match="first defence"):
        DefenseChain.parse(["clip:norm=1", "dp-sgd:clip=1,multiplier=1"])
    with pytest.raises(GradleakError, match="put a clip"):
        DefenseChain.parse(["gaussian:multiplier=1"]).apply(update, context(victim, batch))
    with pytest.raises(GradleakError, match="fedsgd"):
        RunSpec(protocol="fedavg", defenses=("dp-sgd:clip=1,multiplier=1",)).validate()


def _exact_rouge(victim, batch, defenses, seed=0):
    update = fedsgd(victim, batch)
    chain = DefenseChain.parse(defenses)
    defended, _ = chain.apply(update, context(victim, batch, seed))
    knowledge = Knowledge(batch_size=batch.size, perturbed=chain.perturbs())
    rec = EXACT.reconstruct(victim, defended, knowledge, AttackOptions(seed=seed))
    return score_reconstruction(victim, batch, rec).rouge1, rec


@pytest.mark.parametrize("seed", range(3))
def test_exact_attack_degrades_gracefully_under_noise(gpt2_tiny, make_victim_batch, seed):
    # measured on seeds 0-4: 100 / 100 at sigma 1e-4, 100 / 11 / 100 / 100 / 69 at 1e-3, 0 at 1e-1
    batch = make_victim_batch(gpt2_tiny, "rt", 1, seed, max_words=20)
    scores = {}
    for sigma in (0.0, 1e-4, 1e-3, 1e-1):
        defenses = [f"gaussian:sigma={sigma}"] if sigma else []
        scores[sigma], rec = _exact_rouge(gpt2_tiny, batch, defenses)
    assert scores[0.0] == 100.0
    assert scores[1e-4] >= 90.0  # small noise: still recovered, no refusal
    assert scores[1e-3] <= scores[1e-4]
    assert scores[1e-1] <= 10.0  # noise far above the signal: nothing, said in the notes
    assert scores[0.0] >= scores[1e-4] >= scores[1e-3] >= scores[1e-1]


@pytest.mark.parametrize("seed", range(5))
def test_exact_attack_under_dp_sgd_without_noise_still_recovers(gpt2_tiny, make_victim_batch, seed):
    batch = make_victim_batch(gpt2_tiny, "sst2", 2, seed, max_words=15)
    rouge, rec = _exact_rouge(gpt2_tiny, batch, ["dp-sgd:clip=1e-3,multiplier=0"])
    assert rouge == 100.0  # clipping rescales each example's gradient: its span is unchanged
    # labels from the sign pattern, per recovered sentence (the reconstruction's order is its own)
    truth = dict(zip(batch.texts, (int(x) for x in batch.labels), strict=True))
    assert dict(zip(rec.texts, rec.labels, strict=True)) == truth


@pytest.mark.slow
def test_cli_attack_reports_privacy():
    proc = subprocess.run(
        [
            sys.executable, "-m", "gradleak", "attack", "--victim", "gpt2-tiny", "--data", "sst2",
            "--attack", "exact", "--defense", "clip:norm=1", "--defense", "gaussian:multiplier=2",
            "--accountant", "pld", "--json", "-",
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out["privacy"]) >= {"epsilon", "delta", "accountant"}
    assert out["privacy"]["accountant"] == "pld" and out["privacy"]["epsilon"] > 0
    assert out["defenses"] == ["clip:norm=1", "gaussian:multiplier=2"]
    proc = subprocess.run(
        [
            sys.executable, "-m", "gradleak", "attack", "--victim", "gpt2-tiny", "--data", "sst2",
            "--attack", "exact", "--defense", "gaussian:sigma=1e-6", "--json", "-",
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["privacy"]["epsilon"] is None  # unclipped noise: no finite epsilon
    assert "unclipped" in out["privacy"]["reason"]


@pytest.mark.parametrize(
    "args",
    [
        ("--defense", "gaussian:sigma=-1"),
        ("--defense", "nonsense"),
        ("--defense", "clip:norm=1", "--delta", "0"),
        ("--protocol", "fedavg", "--defense", "dp-sgd:clip=1,multiplier=1"),
    ],
)
def test_cli_attack_bad_defence_is_one_line(args):
    proc = subprocess.run(
        [sys.executable, "-m", "gradleak", "attack", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


def test_dp_sgd_in_chunks_releases_the_same_update(bert_case, monkeypatch):
    """Large models: the per-example gradients are taken a few examples at a time, and the clipped sum
    and its noise are the same as with the whole batch at once."""
    import gradleak.defenses as defenses

    victim, batch, update = bert_case
    whole, _ = DefenseChain((DpSgd(0.5, 1.0),)).apply(update, context(victim, batch))
    per_example = sum(v.numel() * v.element_size() for v in update.tensors.values())
    monkeypatch.setattr(defenses, "PER_EXAMPLE_BYTES", per_example)  # one example a chunk
    assert len(defenses._chunks(batch.size, per_example)) == batch.size > 1
    chunked, trace = DefenseChain((DpSgd(0.5, 1.0),)).apply(update, context(victim, batch))
    assert trace.sensitivity == 0.5 / batch.size
    for k, v in whole.tensors.items():
        torch.testing.assert_close(chunked.tensors[k], v, rtol=1e-5, atol=1e-7)
