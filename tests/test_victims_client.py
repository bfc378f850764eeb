"""Victim presets and local model directories; what the client shares (FedSGD and FedAvg)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gradleak.attacks.structure import is_causal
from gradleak.client import Update, fedavg, fedsgd, resolve_withheld
from gradleak.data import Example, make_batch
from gradleak.errors import GradleakError
from gradleak.victims import PRESET_SHAPES, load_victim


def _params(victim):
    return {n: p.detach().clone() for n, p in victim.model.named_parameters()}


# ---------------------------------------------------------------- victims


@pytest.mark.parametrize("fixture", ["bert_tiny", "minilm", "gpt2_tiny"])
def test_presets_use_eager_attention(request, fixture):
    victim = request.getfixturevalue(fixture)
    assert victim.model.config._attn_implementation == "eager"
    assert victim.task == "classify"
    assert victim.num_labels == 2
    assert not victim.model.training  # dropout off


def test_bert_tiny_shape(bert_tiny):
    cfg = bert_tiny.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (128, 2, 2)
    assert bert_tiny.hidden_size == 128
    assert bert_tiny.dtype == torch.float32
    assert not is_causal(bert_tiny)
    # the real BERT uncased vocabulary
    assert cfg.vocab_size == bert_tiny.tokenizer.vocab_size == 30522


def test_minilm_is_pretrained(minilm):
    cfg = minilm.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (384, 6)
    # a pretrained encoder: "king" is nearer to "queen" than to "carrot" in its embedding table
    tok, emb = minilm.tokenizer, minilm.model.get_input_embeddings().weight
    king, queen, carrot = (emb[tok.convert_tokens_to_ids(w)] for w in ("king", "queen", "carrot"))
    assert F.cosine_similarity(king, queen, dim=0) > F.cosine_similarity(king, carrot, dim=0) + 0.1


def test_gpt2_tiny_shape(gpt2_tiny):
    cfg = gpt2_tiny.model.config
    assert (cfg.n_embd, cfg.n_layer) == (256, 2)
    assert gpt2_tiny.dtype == torch.float64
    assert is_causal(gpt2_tiny)
    assert cfg.vocab_size == len(gpt2_tiny.tokenizer) == 50257
    assert gpt2_tiny.tokenizer.encode("hello world") == [31373, 995]  # the real GPT-2 BPE


@pytest.mark.parametrize("fixture", ["bert_tiny", "minilm", "gpt2_tiny"])
def test_preset_shapes_are_the_built_models(request, fixture):
    """PRESET_SHAPES (which the study tables read) says what the presets build."""
    victim = request.getfixturevalue(fixture)
    cfg = victim.model.config
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    assert PRESET_SHAPES[fixture.replace("_", "-")] == (layers, hidden)


def test_gpt2_tiny_language_model_loss():
    victim = load_victim("gpt2-tiny", task="lm", seed=0)
    assert victim.task == "lm"
    assert type(victim.model).__name__ == "GPT2LMHeadModel"
    batch = make_batch(
        [Example("the cat sat on the mat"), Example("a dog")], victim.tokenizer, 32, with_labels=False
    )
    loss = victim.loss(attention_mask=batch.attention_mask, labels=batch.input_ids, input_ids=batch.input_ids)
    # manual next-token cross-entropy over the real (unpadded) positions
    logits = victim.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    terms = [
        F.cross_entropy(logits[i, : n - 1], batch.input_ids[i, 1:n], reduction="sum")
        for i, n in enumerate(batch.lengths)
    ]
    expected = sum(terms) / sum(n - 1 for n in batch.lengths)
    loss, expected = float(loss.detach()), float(expected.detach())
    assert math.isfinite(loss)
    assert loss == pytest.approx(expected, rel=1e-5)
    # a random model predicts near-uniformly over the 50257 tokens
    assert abs(loss - math.log(50257)) < 1.0
    grads = fedsgd(victim, batch).tensors
    assert any(float(g.abs().sum()) > 0 for g in grads.values())


def test_same_seed_same_weights_different_seed_different(bert_tiny):
    a = _params(load_victim("bert-tiny", seed=0))
    b = _params(load_victim("bert-tiny", seed=1))
    ref = _params(bert_tiny)
    assert a.keys() == ref.keys()
    assert all(torch.equal(a[k], ref[k]) for k in a)
    assert not torch.equal(
        a["bert.encoder.layer.0.attention.self.query.weight"],
        b["bert.encoder.layer.0.attention.self.query.weight"],
    )
    assert not torch.equal(a["classifier.weight"], b["classifier.weight"])


def test_minilm_seed_changes_only_the_fresh_head(minilm):
    other = load_victim("minilm", seed=1)
    a, b = _params(minilm), _params(other)
    word = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(a[word], b[word])
    assert not torch.equal(a["classifier.weight"], b["classifier.weight"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "no-such-victim"},
        {"name": "bert-tiny", "task": "translate"},
        {"name": "bert-tiny", "dtype": "float16"},
        {"name": "bert-tiny", "task": "lm"},  # an encoder has no language-model head here
    ],
)
def test_bad_victim_requests(kwargs):
    name = kwargs.pop("name")
    with pytest.raises(GradleakError):
        load_victim(name, **kwargs)


def test_local_directory_round_trip(bert_tiny, tmp_path):
    bert_tiny.model.save_pretrained(tmp_path)
    bert_tiny.tokenizer.save_pretrained(tmp_path)
    victim = load_victim(str(tmp_path), seed=0)
    assert victim.name == str(tmp_path)
    assert victim.model.config._attn_implementation == "eager"
    assert victim.tokenizer.encode("the cat sat") == bert_tiny.tokenizer.encode("the cat sat")
    a, b = _params(victim), _params(bert_tiny)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_directory_without_a_model_is_an_error(tmp_path):
    (tmp_path / "README.txt").write_text("nothing here", encoding="utf-8")
    with pytest.raises(GradleakError):
        load_victim(str(tmp_path))


# ---------------------------------------------------------------- FedSGD


@pytest.mark.parametrize("fixture", ["bert_tiny", "gpt2_tiny"])
def test_fedsgd_matches_manual_gradient(request, make_victim_batch, fixture):
    victim = request.getfixturevalue(fixture)
    batch = make_victim_batch(victim, "sst2", 3, 0)
    update = fedsgd(victim, batch)
    trainable = [(n, p) for n, p in victim.model.named_parameters() if p.requires_grad]
    assert update.kind == "fedsgd" and update.withheld == ()
    assert set(update.tensors) == {n for n, _ in trainable}
    # independent reference: the model's own mean cross-entropy loss
    out = victim.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    manual = torch.autograd.grad(out.loss, [p for _, p in trainable], allow_unused=True)
    tol = 1e-10 if victim.dtype == torch.float64 else 1e-5
    for (name, p), g in zip(trainable, manual, strict=True):
        expected = torch.zeros_like(p) if g is None else g
        assert update.tensors[name].shape == p.shape
        torch.testing.assert_close(update.tensors[name], expected, atol=tol, rtol=1e-4, msg=name)
    assert update.gradients().keys() == update.tensors.keys()
    # the classification head receives a non-zero gradient
    head = "classifier.bias" if fixture == "bert_tiny" else "score.weight"
    assert float(update.tensors[head].abs().sum()) > 0


def test_fedsgd_is_the_mean_over_the_batch(bert_tiny, make_victim_batch):
    batch = make_victim_batch(bert_tiny, "cola", 2, 1)
    both = fedsgd(bert_tiny, batch).tensors
    singles = [
        fedsgd(bert_tiny, make_batch([ex], bert_tiny.tokenizer, 32)).tensors
        for ex in (
            Example(batch.texts[0], int(batch.labels[0])),
            Example(batch.texts[1], int(batch.labels[1])),
        )
    ]
    name = "classifier.weight"
    torch.testing.assert_close(both[name], (singles[0][name] + singles[1][name]) / 2, atol=1e-5, rtol=1e-4)


def test_withholding_embeddings(bert_tiny, make_victim_batch):
    batch = make_victim_batch(bert_tiny, "sst2", 2, 0)
    full = fedsgd(bert_tiny, batch)
    update = fedsgd(bert_tiny, batch, withhold=["embeddings"])
    assert update.withheld == ("bert.embeddings.word_embeddings.weight",)
    assert "bert.embeddings.word_embeddings.weight" not in update.tensors
    assert set(update.tensors) == set(full.tensors) - {"bert.embeddings.word_embeddings.weight"}
    for k, v in update.tensors.items():
        assert torch.equal(v, full.tensors[k])


def test_withhold_groups_resolve(bert_tiny, gpt2_tiny):
    assert resolve_withheld(gpt2_tiny.model, ["embeddings", "positions"]) == (
        "transformer.wte.weight",
        "transformer.wpe.weight",
    )
    head = resolve_withheld(bert_tiny.model, ["head"])
    assert set(head) == {
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    }
    with pytest.raises(GradleakError):
        resolve_withheld(bert_tiny.model, ["no_such_param*"])


def test_out_of_range_labels_are_rejected(bert_tiny):
    batch = make_batch([Example("three classes", 2)], bert_tiny.tokenizer, 32)
    with pytest.raises(GradleakError):
        fedsgd(bert_tiny, batch)


# ---------------------------------------------------------------- FedAvg


@pytest.mark.parametrize("fixture", ["gpt2_tiny", "bert_tiny"])
def test_fedavg_one_step_is_scaled_gradient(request, make_victim_batch, fixture):
    victim = request.getfixturevalue(fixture)
    batch = make_victim_batch(victim, "sst2", 2, 1)
    before = _params(victim)
    eta = 0.05
    grad = fedsgd(victim, batch).tensors
    update = fedavg(victim, batch, local_steps=1, learning_rate=eta)
    after = _params(victim)
    assert all(torch.equal(before[k], after[k]) for k in before), "weights were not restored"
    assert update.kind == "fedavg" and update.learning_rate == eta and update.local_steps == 1
    assert set(update.tensors) == set(grad)
    f64 = victim.dtype == torch.float64
    recovered = update.gradients()
    for k, g in grad.items():
        # a float32 weight update loses about one ulp of the weight, i.e. 1e-7 |w| / eta in gradient
        atol = 1e-12 if f64 else 1e-7 * float(before[k].abs().max() + 1) * 2
        torch.testing.assert_close(update.tensors[k], -eta * g, atol=atol, rtol=1e-6 if f64 else 1e-3, msg=k)
        torch.testing.assert_close(recovered[k], g, atol=atol / eta, rtol=1e-6 if f64 else 1e-3, msg=k)


def test_fedavg_several_steps_differs_and_restores(gpt2_tiny, make_victim_batch):
    batch = make_victim_batch(gpt2_tiny, "sst2", 2, 2)
    before = _params(gpt2_tiny)
    one = fedavg(gpt2_tiny, batch, local_steps=1, learning_rate=0.5)
    three = fedavg(gpt2_tiny, batch, local_steps=3, learning_rate=0.5, withhold=["embeddings"])
    assert all(torch.equal(before[k], p) for k, p in _params(gpt2_tiny).items())
    assert "transformer.wte.weight" not in three.tensors
    assert three.withheld == ("transformer.wte.weight",)
    # three steps move the weights further than one, and not along exactly three times the first step
    k = "score.weight"
    assert float(three.tensors[k].norm()) > float(one.tensors[k].norm())
    assert not torch.allclose(three.tensors[k], 3 * one.tensors[k], rtol=1e-6, atol=1e-12)


def test_fedavg_mini_batches_step_through_the_batch_in_order(gpt2_tiny, make_victim_batch):
    """local_batch=2 on B=4: step 1 takes sequences 0-1, step 2 sequences 2-3 (DAGER's FedAvg epoch)."""
    from gradleak.client import batch_gradient

    batch = make_victim_batch(gpt2_tiny, "sst2", 4, 0)
    lr = 0.5
    update = fedavg(gpt2_tiny, batch, local_steps=2, learning_rate=lr, local_batch=2)
    params = dict(gpt2_tiny.model.named_parameters())
    start = {k: p.detach().clone() for k, p in params.items()}
    try:  # the same two steps by hand
        for part in (batch.rows(0, 2), batch.rows(2, 4)):
            grads = batch_gradient(gpt2_tiny, part)
            with torch.no_grad():
                for k, g in grads.items():
                    params[k].sub_(lr * g)
        by_hand = {k: params[k].detach() - start[k] for k in params}
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(start[k])
    for k, delta in update.tensors.items():
        assert torch.allclose(delta, by_hand[k], rtol=1e-5, atol=1e-7), k
    whole = fedavg(gpt2_tiny, batch, local_steps=2, learning_rate=lr)
    assert not torch.allclose(whole.tensors["score.weight"], update.tensors["score.weight"])
    with pytest.raises(GradleakError, match="mini-batch size"):
        fedavg(gpt2_tiny, batch, local_steps=1, learning_rate=lr, local_batch=0)


def test_fedavg_bad_arguments(bert_tiny, make_victim_batch):
    batch = make_victim_batch(bert_tiny, "sst2", 1, 0)
    with pytest.raises(GradleakError):
        fedavg(bert_tiny, batch, local_steps=0, learning_rate=0.1)
    with pytest.raises(GradleakError):
        fedavg(bert_tiny, batch, local_steps=1, learning_rate=0.0)


def test_update_gradients_scaling():
    t = {"w": torch.tensor([1.0, -2.0])}
    assert torch.equal(Update(t).gradients()["w"], t["w"])
    avg = Update(t, "fedavg", learning_rate=0.5, local_steps=2)
    assert torch.equal(avg.gradients()["w"], torch.tensor([-1.0, 2.0]))
