"""gradleak inside Flower: the server-side audit of real clients' updates (issue 8).

The acceptance test runs Flower's Simulation Runtime (Ray) twice: 2 clients, 2 rounds, gpt2-tiny on
real SST-2 sentences, one local step. Without DP the audit recovers every client's sentence exactly and
the records are in the store; with Flower's LocalDpMod (client-side clipping and noise) the recorded
epsilon is finite and recovery falls. The wrapper itself is also tested in process, without Ray.
"""

from __future__ import annotations

import json
import math

import pytest
from _cli import main_in_process

pytest.importorskip("flwr", reason='Flower is not installed: pip install -e ".[fl]" (.ci/run installs it)')
pytest.importorskip("ray", reason="Flower's simulation runs on Ray")

from flwr.app import ConfigRecord, Context, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from gradleak.flower import FlSpec, LeakageAudit, make_client_app, run_fl  # noqa: E402
from gradleak.flower.client import GROUND_TRUTH, PROTOCOL  # noqa: E402
from gradleak.store import Store  # noqa: E402

SHORT = 12  # words: short SST-2 sentences keep the exact attack fast


def _spec(**kw) -> FlSpec:
    base = dict(victim="gpt2-tiny", data="sst2", clients=2, rounds=2, batch_size=1, max_words=SHORT)
    base.update(kw)
    return FlSpec(**base, time_budget=30.0)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "args, message",
    [
        (("--clients", "0"), "clients must be at least 1"),
        (("--rounds", "0"), "rounds must be at least 1"),
        (("--data", "{small}", "--clients", "3"), "fewer than the 3 clients"),
        (("--flower-dp", "local", "--dp-clip", "1"), "--dp-epsilon is required"),
        (("--dp-clip", "1"), "--dp-clip does not apply with --flower-dp none"),
        (("--local-steps", "2", "--defense", "dp-sgd:clip=1,multiplier=1"), "use --local-steps 1"),
        (("--defense", "withhold:params=embeddings"), "withhold cannot apply in fl"),
        (("--attack", "lamp", "--prior", "minilm"), "prior 'minilm' is an encoder"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path, capsys, monkeypatch):
    small = tmp_path / "two.txt"
    small.write_text("a first sentence\nand a second one\n", encoding="utf-8")
    args = tuple(a.format(small=small) for a in args)
    code, err = main_in_process(("fl", *args), capsys, monkeypatch)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


# ------------------------------------------------------------------ the wrapper, in process


class _Grid:
    """The two calls FedAvg makes on a Grid while configuring a round."""

    def get_node_ids(self):
        return [11, 22]


def _round(audit: LeakageAudit, spec: FlSpec, server_round: int, initial):
    app = make_client_app(spec)
    messages = list(audit.configure_train(server_round, initial, ConfigRecord(), _Grid()))
    replies = []
    for m in messages:
        node = m.metadata.dst_node_id
        ctx = Context(
            run_id=1,
            node_id=node,
            node_config={"partition-id": [11, 22].index(node), "num-partitions": 2},
            state=RecordDict(),
            run_config={},
        )
        replies.append(app(m, ctx))
    return replies


def test_audit_reads_each_update_and_the_wrapped_strategy_aggregates_unchanged(tmp_path, task_identity):
    from flwr.app import ArrayRecord

    from gradleak.flower.client import parameters
    from gradleak.victims import load_victim

    spec = _spec()
    victim = load_victim(spec.victim, seed=spec.seed)
    initial = ArrayRecord(torch_state_dict=parameters(victim))
    fedavg = FedAvg(fraction_evaluate=0.0)
    audit = LeakageAudit(
        fedavg,
        victim=victim,
        attack="exact",
        store=tmp_path / "audit.sqlite",
        local_lr=spec.local_lr,
        batch_size=1,
        options=spec.options(),
        spec={"victim": spec.victim, "data": spec.data, "batch_size": 1, "seed": 0},
    )
    replies = _round(audit, spec, 1, initial)
    assert all(GROUND_TRUTH in r.content.config_records for r in replies)
    twins = _round(LeakageAudit(FedAvg(), victim=victim, local_lr=spec.local_lr), spec, 1, initial)
    for t in twins:  # the same replies, stripped of gradleak's records, for plain FedAvg
        del t.content[GROUND_TRUTH]
        del t.content[PROTOCOL]
    arrays, _ = audit.aggregate_train(1, replies)
    expected, _ = FedAvg().aggregate_train(1, twins)
    assert arrays is not None and expected is not None
    assert list(arrays.keys()) == list(expected.keys())
    assert all((arrays[k].numpy() == expected[k].numpy()).all() for k in arrays.keys())
    assert all(GROUND_TRUTH not in r.content.config_records for r in replies)  # stripped before aggregation
    assert sorted(leak.client for leak in audit.leaks) == [0, 1]
    assert all(leak.scores.exact_match == 100.0 for leak in audit.leaks)
    with Store.open(tmp_path / "audit.sqlite") as store:
        runs = store.runs(kind="fl")
    assert sorted((r.spec["round"], r.spec["client"]) for r in runs) == [(1, 0), (1, 1)]


def test_local_dp_mod_clips_and_noises_the_update_reproducibly(task_identity):
    """Flower's LocalDpMod acts on the client's reply: the delta the server reads has the mod's noise
    std (sensitivity * sqrt(2 ln(1.25/delta)) / epsilon), and the seeding mod makes it reproducible."""
    import numpy as np
    from flwr.app import ArrayRecord, Message, MessageType

    from gradleak.flower.client import parameters
    from gradleak.victims import load_victim

    spec = _spec(flower_dp="local", dp_clip=0.01, dp_epsilon=1.0)
    victim = load_victim(spec.victim, seed=spec.seed)
    state = parameters(victim)
    app = make_client_app(spec)

    def reply():
        config = ConfigRecord({"server-round": 1, "gradleak-local-lr": spec.local_lr})
        content = RecordDict({"arrays": ArrayRecord(torch_state_dict=state), "config": config})
        msg = Message(content=content, dst_node_id=11, message_type=MessageType.TRAIN)
        ctx = Context(1, 11, {"partition-id": 0, "num-partitions": 2}, RecordDict(), {})
        out = app(msg, ctx)
        assert not out.has_error(), out.error
        got = out.content["arrays"].to_torch_state_dict()
        return np.concatenate([(got[k] - state[k]).double().flatten().numpy() for k in state])

    first, second = reply(), reply()
    assert (first == second).all()
    assert abs(first.std() / spec.local_dp_std() - 1) < 0.01  # the noise swamps the clipped update


def test_central_dp_noises_only_the_aggregate_so_the_server_still_reads_each_update(tmp_path, task_identity):
    from flwr.app import ArrayRecord
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    from gradleak.flower.client import parameters
    from gradleak.victims import load_victim

    spec = _spec(flower_dp="central-client-clip", dp_clip=0.1, dp_noise_multiplier=1.0)
    victim = load_victim(spec.victim, seed=spec.seed)
    initial = ArrayRecord(torch_state_dict=parameters(victim))
    accountant = RdpAccountant(
        PrivacyConfig(1e-5, 2, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION)
    )
    central = DifferentialPrivacyClientSideFixedClipping(
        FedAvg(fraction_evaluate=0.0), 1.0, 0.1, 2, accountant=accountant
    )
    audit = LeakageAudit(
        central,
        victim=victim,
        local_lr=spec.local_lr,
        batch_size=1,
        options=spec.options(),
        perturbed=spec.perturbed(),
    )
    arrays, _ = audit.aggregate_train(1, _round(audit, spec, 1, initial))
    assert arrays is not None
    assert [leak.scores.exact_match for leak in audit.leaks] == [100.0, 100.0]  # clipped, not noised
    assert all(leak.epsilon is None for leak in audit.leaks)
    assert all(leak.aggregate_epsilon is not None and leak.aggregate_epsilon > 0 for leak in audit.leaks)


# ------------------------------------------------------------------ the acceptance test, on Ray


@pytest.mark.slow
def test_flower_simulation_leaks_without_dp_and_local_dp_stops_it(tmp_path, capsys, monkeypatch):
    store = tmp_path / "fl.sqlite"
    out = tmp_path / "fl.json"
    args = ("fl", "--clients", "2", "--rounds", "2", "--victim", "gpt2-tiny", "--data", "sst2")
    args += ("--local-steps", "1", "--max-words", str(SHORT), "--time-budget", "30")
    code, err = main_in_process((*args, "--store", str(store), "--json", str(out)), capsys, monkeypatch)
    assert code == 0, err
    payload = json.loads(out.read_text(encoding="utf-8"))
    assert [r["round"] for r in payload["rounds"]] == [1, 2]
    for r in payload["rounds"]:
        assert sorted(c["client"] for c in r["clients"]) == [0, 1]
        for c in r["clients"]:
            assert set(c["scores"]) == {"rouge1", "rouge2", "rougeL", "token_accuracy", "exact_match"}
            assert c["scores"]["exact_match"] == 100.0, c  # the server reads every sentence
            assert c["reconstructions"] == c["references"]
            assert c["epsilon"] is None  # no noise: no finite epsilon
    with Store.open(store) as s:
        runs = s.runs(kind="fl")
    assert sorted((r.spec["round"], r.spec["client"]) for r in runs) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(r.done and r.record["scores"]["exact_match"] == 100.0 for r in runs)
    clean_rouge = [c["scores"]["rouge1"] for r in payload["rounds"] for c in r["clients"]]

    # Flower's LocalDpMod: each client clips its update and adds Gaussian noise before sending it
    dp = run_fl(_spec(flower_dp="local", dp_clip=0.01, dp_epsilon=1.0), store=tmp_path / "dp.sqlite")
    assert len(dp.leaks) == 4
    assert dp.errors == ()
    for leak in dp.leaks:
        assert leak.epsilon is not None and math.isfinite(leak.epsilon) and leak.epsilon > 0
        # the attack ran on the noised update and did not read the sentence (an attack that crashed or
        # gave up would also score 0: it must not be why)
        assert leak.error is None, leak.error
        assert leak.reconstructions != leak.references
        assert leak.scores.exact_match == 0.0
    by_client = {c: [leak.epsilon for leak in dp.leaks if leak.client == c] for c in (0, 1)}
    assert all(eps[1] > eps[0] for eps in by_client.values())  # composed over the rounds
    dp_rouge = [leak.scores.rouge1 for leak in dp.leaks]
    assert max(dp_rouge) < min(clean_rouge)
    with Store.open(tmp_path / "dp.sqlite") as s:
        assert all(r.record["epsilon"] is not None for r in s.runs(kind="fl"))
