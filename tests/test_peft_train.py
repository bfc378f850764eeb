"""LoRA without Flower (issue 19, part 5): the FedAvg delta of a PEFT client holds the trainable tensors
only, and `gradleak train --peft` trains the adapters only, under DP-SGD too (clipping and noise on the
adapters' per-example gradients, the frozen base bit-identical, epsilon accounted as before)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _cli import main_in_process

from gradleak import train as train_module
from gradleak.adapters import adapter_summary, is_adapter
from gradleak.client import batch_gradient, fedavg, fedsgd
from gradleak.defenses import _per_example_vmap, _subbatch
from gradleak.errors import GradleakError
from gradleak.train import TrainSpec, train
from gradleak.victims import load_victim
from tests.conftest import batch_from


@pytest.fixture(scope="module")
def lora_gpt2():
    return load_victim("gpt2-tiny", dtype="float64", seed=0, peft="lora:r=4")


def _head(name: str) -> bool:
    return ".modules_to_save." in name


def test_fedavg_delta_holds_only_the_trainable_tensors(lora_gpt2):
    victim = lora_gpt2
    batch = batch_from(victim, "sst2", 2, 1)
    before = {n: p.detach().clone() for n, p in victim.model.named_parameters()}
    trainable = list(adapter_summary(victim.model))
    update = fedavg(victim, batch, local_steps=2, learning_rate=0.1)
    assert list(update.tensors) == trainable  # the adapters and the head, nothing frozen
    assert all(is_adapter(n) or _head(n) for n in update.tensors)
    assert set(update.tensors) == set(fedsgd(victim, batch).tensors)
    assert any(float(v.abs().max()) > 0 for n, v in update.tensors.items() if ".lora_B." in n)
    after = dict(victim.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # restored, frozen ones untouched


def test_fedavg_of_a_full_model_still_holds_every_parameter(gpt2_tiny):
    batch = batch_from(gpt2_tiny, "sst2", 1, 0)
    update = fedavg(gpt2_tiny, batch, local_steps=1, learning_rate=0.1)
    assert list(update.tensors) == [n for n, _ in gpt2_tiny.model.named_parameters()]


def test_per_example_gradients_of_the_adapters_match_one_at_a_time(lora_gpt2):
    """DP-SGD clips what `per_example_gradients` returns: through peft's LoRA layers the vectorised path
    gives each example's own adapter gradient."""
    victim = lora_gpt2
    batch = batch_from(victim, "sst2", 3, 2)
    names = list(adapter_summary(victim.model))
    with torch.no_grad():  # B = 0 at initialisation: give the B factors weight so A's gradient is not 0
        for n, p in victim.model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype) * 0.1)
    try:
        fast = _per_example_vmap(victim, batch, names)
        for i in range(batch.size):
            one = batch_gradient(victim, _subbatch(batch, i))
            for k in names:
                torch.testing.assert_close(fast[k][i], one[k], rtol=1e-9, atol=1e-12, msg=k)
        assert all(float(fast[k].abs().max()) > 0 for k in names)
    finally:
        with torch.no_grad():
            for n, p in victim.model.named_parameters():
                if ".lora_B." in n:
                    p.zero_()


def test_dp_sgd_under_peft_trains_only_the_adapters_with_a_finite_epsilon(monkeypatch):
    seen = []

    def capture(*args, **kw):
        victim = load_victim(*args, **kw)
        seen.append(victim)
        return victim

    monkeypatch.setattr(train_module, "load_victim", capture)
    spec = TrainSpec(
        victim="gpt2-tiny",
        data="sample",
        peft="lora:r=4,targets=c_attn",
        steps=3,
        batch_size=4,
        lr=0.5,
        eval_every=3,
        defenses=("dp-sgd:clip=1,multiplier=1",),
        bound=False,
    )
    record = train(spec)
    assert record.epsilon is not None and math.isfinite(record.epsilon) and record.epsilon > 0
    assert record.privacy_unit == "example" and record.sampling == "poisson"
    trained = seen[0]
    fresh = load_victim("gpt2-tiny", seed=0, peft=spec.peft)
    shapes = adapter_summary(fresh.model)
    assert record.parameters == sum(math.prod(s) for s in shapes.values())
    assert record.trained["peft"]["r"] == 4 and record.trained["peft"]["targets"] == ["c_attn"]
    assert record.trained["peft"]["shapes"] == shapes and record.trained["tensors"] == len(shapes) == 5
    moved = []
    pairs = zip(trained.model.named_parameters(), fresh.model.named_parameters(), strict=True)
    for (name, p), (_, q) in pairs:
        if name in shapes:
            moved.append(not torch.equal(p, q))
        else:
            assert torch.equal(p, q), f"frozen {name} changed"
    assert all(moved)  # every adapter and the head moved (noise alone moves them)
    payload = record.to_json()
    assert payload["trained"]["peft"]["adapter_tensors"] == 4
    json.dumps(payload)


BAD = [
    (("--peft", "lora:r=0"), "the rank r must be at least 1"),
    (("--peft", "lora:r=4,rank=2"), "unknown key 'rank'"),
    (("--peft", "lora:r=4,targets=q_proj"), "target 'q_proj' matches no linear map"),
    (("--peft", "prefix:r=4"), "unknown PEFT method"),
    (("--peft", "lora:r=4", "--train-only", "head"), "--train-only does not apply with --peft"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_peft_input_to_train_is_one_line_and_exit_2(args, message, capsys, monkeypatch):
    base = ("train", "--victim", "gpt2-tiny", "--data", "sample", "--steps", "1", "--batch-size", "2")
    code, err = main_in_process((*base, *args), capsys, monkeypatch)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


def test_train_cli_reports_the_adapters(tmp_path, capsys, monkeypatch):
    out = tmp_path / "lora.json"
    args = ("train", "--victim", "bert-tiny", "--data", "sample", "--steps", "2", "--batch-size", "4")
    args += ("--eval-every", "2", "--no-bound", "--peft", "lora:r=2,targets=query+value", "--json", str(out))
    code, err = main_in_process(args, capsys, monkeypatch)
    assert code == 0, err
    record = json.loads(out.read_text(encoding="utf-8"))
    lora = record["trained"]["peft"]
    assert lora["r"] == 2 and lora["targets"] == ["query", "value"] and lora["adapter_tensors"] == 8
    assert record["spec"]["peft"] == "lora:r=2,targets=query+value"
    head = [n for n in lora["shapes"] if not is_adapter(n)]
    assert head == [
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    ]
    assert record["parameters"] == 8 * 2 * 128 + 2 * 128 + 2


def test_train_only_with_peft_is_refused_by_the_spec():
    with pytest.raises(GradleakError, match="--train-only does not apply"):
        TrainSpec(peft="lora:r=2", train_only=("head",)).validate()


def test_adam_steps_the_defended_gradient_and_keeps_the_accounting():
    """DP-Adam: Adam takes the same noisy, clipped gradients as SGD would, so epsilon is the same; only
    the adapters move, and differently from SGD's step."""
    common = dict(
        victim="gpt2-tiny",
        data="sample",
        peft="lora:r=2,targets=c_attn",
        steps=3,
        batch_size=4,
        lr=0.01,
        eval_every=3,
        defenses=("dp-sgd:clip=1,multiplier=1",),
        bound=False,
    )
    sgd = train(TrainSpec(**common))
    adam = train(TrainSpec(**common, optimizer="adam"))
    assert adam.epsilon == pytest.approx(sgd.epsilon)
    assert adam.batch_sizes == sgd.batch_sizes  # the same Poisson draws: the optimiser is post-processing
    assert adam.to_json()["spec"]["optimizer"] == "adam"
    assert adam.eval[-1].loss != sgd.eval[-1].loss


OPTIMIZER_BAD = [
    (("--optimizer", "rmsprop"), "unknown optimizer 'rmsprop'"),
    (("--optimizer", "adam", "--bound"), "the convergence bound holds for plain SGD only"),
]


@pytest.mark.parametrize(("args", "message"), OPTIMIZER_BAD, ids=[" ".join(a) for a, _ in OPTIMIZER_BAD])
def test_bad_optimizer_input_is_one_line_and_exit_2(args, message, capsys, monkeypatch):
    base = ("train", "--victim", "gpt2-tiny", "--data", "sample", "--steps", "1", "--batch-size", "2")
    code, err = main_in_process((*base, *args), capsys, monkeypatch)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def test_adam_from_the_cli_runs_without_the_bound(tmp_path, capsys, monkeypatch):
    out = tmp_path / "adam.json"
    args = ("train", "--victim", "gpt2-tiny", "--data", "sample", "--steps", "2", "--batch-size", "2")
    args += ("--optimizer", "adam", "--lr", "0.001", "--eval-every", "2", "--json", str(out))
    code, err = main_in_process(args, capsys, monkeypatch)
    assert code == 0, err
    payload = json.loads(out.read_text())
    assert payload["spec"]["optimizer"] == "adam" and payload["spec"]["bound"] is False
    assert payload["bound"] is None
