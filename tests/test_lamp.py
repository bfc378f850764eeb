"""LAMP (`--attack lamp`): the discrete moves, the candidates' ranking, a phase that never raises the
score it optimises, and runs end to end through `run_one` and the CLI, with and without a prior."""

from __future__ import annotations

import json

import pytest
import torch

from gradleak.attacks import AttackOptions, Knowledge, get_attack
from gradleak.attacks.lamp import (
    MOVES,
    _Scorer,
    choose,
    discrete_phase,
    move_span,
    move_token,
    polish,
    prefix_to_end,
    propose,
    random_move,
    reverse_span,
    substitutes,
    swap,
    total,
)
from gradleak.attacks.matching import layerwise_cos, prepare
from gradleak.attacks.prior import load_prior
from gradleak.client import fedsgd
from gradleak.errors import GradleakError
from gradleak.experiment import RunSpec, run_one
from gradleak.store import canonical
from tests._cli import main_in_process

# ------------------------------------------------------------------ the moves


def test_moves_are_the_claimed_permutations():
    assert swap(5, 1, 3) == (0, 3, 2, 1, 4)
    assert swap(3, 2, 2) == (0, 1, 2)
    assert move_token(5, 0, 4) == (1, 2, 3, 4, 0)  # the first token to the end
    assert move_token(5, 4, 1) == (0, 4, 1, 2, 3)
    assert move_span(6, 1, 3, 2) == (0, 3, 1, 2, 4, 5)  # [1, 3) put back after two of the rest
    assert move_span(6, 3, 6, 0) == (3, 4, 5, 0, 1, 2)
    assert reverse_span(5, 1, 4) == (0, 3, 2, 1, 4)
    assert prefix_to_end(5, 2) == (2, 3, 4, 0, 1)
    words = ["a", "b", "c", "d", "e"]
    assert [words[k] for k in move_span(5, 0, 2, 3)] == ["c", "d", "e", "a", "b"]


@pytest.mark.parametrize("kind", MOVES)
def test_random_moves_are_permutations(kind):
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7):
        for _ in range(20):
            assert sorted(random_move(kind, n, gen)) == list(range(n))


def test_propose_gives_distinct_orders_identity_first():
    orders = propose(6, 40, torch.Generator().manual_seed(1))
    assert orders[0] == tuple(range(6))
    assert 30 <= len(orders) <= 40 and len(set(orders)) == len(orders)  # a fixed number of tries
    assert all(sorted(o) == list(range(6)) for o in orders)
    assert propose(2, 40, torch.Generator().manual_seed(1)) == [(0, 1), (1, 0)]  # all there are


def test_lower_distance_plus_prior_wins():
    distances = [1.0, 0.9, 0.5, 0.1]
    priors = {0: 5.0, 1: 3.0, 2: 6.0}  # candidate 3 was not read by the prior: it cannot win
    # totals (distance over the current order's, + 0.5 * NLL): 3.5, 2.4, 3.5
    assert choose(distances, priors, 0.5) == 1
    assert total(0.9, 1.0, 3.0, 0.5) == pytest.approx(2.4)
    assert choose(distances, priors, 0.0) == 2  # no prior: the lowest distance
    assert choose(distances, {0: 1.0}, 0.5) == 0  # only the current order: it stays


# ------------------------------------------------------------------ the attack


@pytest.fixture(scope="module")
def tiny_prior():
    return load_prior("gpt2-tiny")


def test_a_discrete_phase_never_raises_its_score(bert_tiny, make_victim_batch, tiny_prior):
    batch = make_victim_batch(bert_tiny, "cola", 2, 3, max_words=8)
    update = fedsgd(bert_tiny, batch)
    gen = torch.Generator().manual_seed(0)
    knowledge = Knowledge(batch_size=2, lengths=batch.lengths, labels=tuple(batch.labels.tolist()))
    problem = prepare("lamp", bert_tiny, update, knowledge, gen)
    scorer = _Scorer(problem, layerwise_cos, tiny_prior, 0.5, AttackOptions(prior="gpt2-tiny"), {})
    dummy = problem.random_dummy(gen)
    phases = []
    for _ in range(3):
        result = discrete_phase(scorer, dummy, gen)
        phases.append((result.before, result.after, result.moved))
        assert result.after <= result.before + 1e-12
        for row, n in enumerate(problem.lengths):  # the row's free positions reordered, nothing else
            assert torch.equal(
                result.dummy[row, 1 : n - 1].sort(dim=0).values, dummy[row, 1 : n - 1].sort(dim=0).values
            )
            assert torch.equal(result.dummy[row, n - 1 :], dummy[row, n - 1 :])  # [SEP] and padding
        dummy = result.dummy
    # measured (bert-tiny, seed 0, the gpt2-tiny prior): the first two phases reorder and lower the
    # total (relative distance + 0.5 * NLL per victim token), the third finds nothing better and
    # keeps the order
    assert [moved for _, _, moved in phases] == [2, 1, 0]
    assert phases[0][:2] == pytest.approx((8.9805, 8.7934), abs=1e-3)
    assert phases[2][0] == phases[2][1]


def test_lamp_end_to_end_with_a_prior_recovers_a_short_sentence():
    spec = RunSpec(
        victim="bert-tiny", data="cola", attack="lamp-l1l2", iterations=100, seed=103, prior="gpt2-tiny"
    )
    record = run_one(spec)
    assert record.references == ("john wants to leave",)
    assert record.scores.rouge1 == pytest.approx(100.0)
    out = record.to_json()
    assert out["prior"] == "gpt2-tiny" and out["spec"]["prior"] == "gpt2-tiny"
    assert "prior gpt2-tiny (weight 0.5 on its NLL per token)" in record.notes
    assert "2 discrete phases" in record.notes[-1]


def test_lamp_without_a_prior(bert_tiny, make_victim_batch):
    batch = make_victim_batch(bert_tiny, "cola", 1, 0, max_words=6)
    rec = get_attack("lamp").reconstruct(
        bert_tiny,
        fedsgd(bert_tiny, batch),
        Knowledge(batch_size=1),
        AttackOptions(iterations=50, prior="none"),
    )
    # the run's 50 steps, then two restarts of 50 // 3 from the searched tokens
    assert len(rec.trace) == 50 + 2 * 16 and rec.token_ids[0][0] == bert_tiny.tokenizer.cls_token_id
    assert len(rec.token_ids[0]) == batch.lengths[0]  # inferred from the position gradient
    # one phase at step 50 (the restarts are too short for one), and three searches of the tokens
    assert "prior none" in rec.notes and "4 discrete phases (3 of them token searches)" in rec.notes[-1]


def test_the_prior_is_keyed_only_where_the_attack_reads_it():
    def key(**kw) -> dict:
        return json.loads(canonical(RunSpec(**kw)))

    assert "prior" not in key(attack="lamp")  # the default: keys of older runs hold
    assert key(attack="lamp", prior="none")["prior"] == "none"
    assert "prior" not in key(attack="tag", prior="none")  # tag reads no prior
    with pytest.raises(GradleakError, match="prior weight"):
        AttackOptions(prior_weight=-1.0)


def test_a_sweep_grid_takes_the_prior():
    from gradleak.sweeps.grid import parse_plan

    plan = parse_plan(
        {"grid": {"attack": ["lamp"], "prior": ["smollm2", "none"]}, "fixed": {"iterations": 5}}
    )
    assert [j.spec.prior for j in plan.jobs] == ["smollm2", "none"]
    assert len({j.key for j in plan.jobs}) == 2


# ------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("prior", ["none", "gpt2-tiny"])
def test_cli_lamp_json(prior, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run.json"
    args = ("attack", "--attack", "lamp", "--prior", prior, "--iterations", "3", "--data", "cola",
            "--max-words", "6", "--json", str(out))  # fmt: skip
    code, _ = main_in_process(args, capsys, monkeypatch)
    assert code == 0
    record = json.loads(out.read_text())
    assert record["attack"] == "lamp" and record["prior"] == prior
    assert f"prior {prior}" in " ".join(record["notes"])


@pytest.mark.parametrize(
    ("prior", "says"), [("foo", "unknown prior 'foo'"), ("minilm", "is an encoder, not a language model")]
)
def test_cli_bad_prior_exits_2_with_one_line(prior, says, capsys, monkeypatch):
    code, err = main_in_process(("attack", "--attack", "lamp", "--prior", prior), capsys, monkeypatch)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and says in err


def test_rounds_of_reordering_put_a_shuffled_sentence_back_in_order(bert_tiny, make_victim_batch):
    # the final reordering of `lamp`: greedy rounds on the tokens' own embeddings; from a shuffle of
    # the true sentence's words (one round is not enough), the gradient distance alone (no prior)
    # leads back to the sentence
    batch = make_victim_batch(bert_tiny, "cola", 1, 5, max_words=10)
    assert batch.texts == ("bill was struck by john as stupid",)
    update = fedsgd(bert_tiny, batch)
    knowledge = Knowledge(batch_size=1, lengths=batch.lengths, labels=tuple(batch.labels.tolist()))
    problem = prepare("lamp", bert_tiny, update, knowledge, torch.Generator().manual_seed(0))
    scorer = _Scorer(problem, layerwise_cos, None, 0.0, AttackOptions(prior="none"), {})
    ids = batch.input_ids[:, : problem.mask.shape[1]].clone()
    n = problem.lengths[0]
    shuffle = torch.randperm(n - 2, generator=torch.Generator().manual_seed(0))
    ids[0, 1 : n - 1] = ids[0, 1 : n - 1][shuffle]
    assert problem.token_rows(ids) != problem.token_rows(batch.input_ids)
    one = discrete_phase(scorer, problem.embedding[ids], torch.Generator().manual_seed(0))
    result = discrete_phase(scorer, problem.embedding[ids], torch.Generator().manual_seed(0), rounds=10)
    # measured: one round moves once and leaves the total (relative distance) at 0.64; the rounds
    # move five times and reach the sentence (total 0)
    assert one.moved == 1 and one.after == pytest.approx(0.639, abs=1e-3)
    assert result.moved == 5 and result.after == pytest.approx(0.0, abs=1e-4)
    assert problem.token_rows(problem.nearest(result.dummy)) == problem.token_rows(batch.input_ids)


def _mixed(problem, ids, row, p, wrong):
    """The true tokens' embeddings, position p of sequence `row` a mixture the wrong token dominates."""
    dummy = problem.embedding[ids].clone()
    dummy[row, p] = 0.8 * problem.embedding[wrong] + 0.6 * problem.embedding[ids[row, p]]
    return dummy


def test_matching_pursuit_pools_hold_the_tokens_of_a_mixture(bert_tiny, make_victim_batch):
    batch = make_victim_batch(bert_tiny, "cola", 1, 5, max_words=10)
    knowledge = Knowledge(batch_size=1, lengths=batch.lengths, labels=tuple(batch.labels.tolist()))
    gen = torch.Generator().manual_seed(0)
    problem = prepare("lamp", bert_tiny, fedsgd(bert_tiny, batch), knowledge, gen)
    ids = batch.input_ids[:, : problem.mask.shape[1]]
    wrong = int(bert_tiny.tokenizer.convert_tokens_to_ids("house"))
    dummy = _mixed(problem, ids, 0, 3, wrong)
    pool = substitutes(problem, dummy, 4)
    assert pool.shape == (*ids.shape, 4)
    assert int(problem.nearest(dummy)[0, 3]) == wrong  # the nearest token is the dominant, wrong one
    assert pool[0, 3, :2].tolist() == [wrong, int(ids[0, 3])]  # pursuit's second atom is the true one
    assert torch.equal(pool[0, 1:-1, 0], ids[0, 1:-1].where(torch.arange(ids.shape[1] - 2) != 2, wrong))
    assert bool(problem.allowed[pool].all())  # never a special or placeholder token


def _polish_setup(bert_tiny, make_victim_batch):
    """A CoLA batch of two, its matching problem (labels and lengths given), a scorer without a prior
    and the true ids."""
    batch = make_victim_batch(bert_tiny, "cola", 2, 5, max_words=10)
    knowledge = Knowledge(batch_size=2, lengths=batch.lengths, labels=tuple(batch.labels.tolist()))
    gen = torch.Generator().manual_seed(0)
    problem = prepare("lamp", bert_tiny, fedsgd(bert_tiny, batch), knowledge, gen)
    scorer = _Scorer(problem, layerwise_cos, None, 0.0, AttackOptions(prior="none"), {})
    truth = batch.input_ids[:, : problem.mask.shape[1]]
    return batch, problem, scorer, truth


def test_polish_substitutes_and_exchanges_its_way_back_to_the_batch(bert_tiny, make_victim_batch):
    # `lamp`'s final search, from a batch with one position a mixture (its nearest token wrong) and
    # two tokens exchanged between the sequences: the gradient distance alone (no prior) leads back
    batch, problem, scorer, truth = _polish_setup(bert_tiny, make_victim_batch)
    ids = truth.clone()
    ids[0, 2], ids[1, 3] = truth[1, 3], truth[0, 2]
    assert int(ids[0, 2]) != int(ids[1, 3])
    wrong = int(bert_tiny.tokenizer.convert_tokens_to_ids("house"))
    result = polish(scorer, _mixed(problem, ids, 1, 1, wrong), torch.Generator().manual_seed(0), rounds=10)
    assert batch.texts == ("bill was struck by john as stupid", "i know you like the back of my hand")
    assert result.before == 1.0 and result.after == pytest.approx(0.0, abs=1e-4)
    assert problem.token_rows(problem.nearest(result.dummy)) == problem.token_rows(truth)
    assert result.moved == 2  # measured: one exchange and one substitution


def test_polish_exchanges_tails_where_sentences_sit_in_each_others_lengths(bert_tiny, make_victim_batch):
    # the continuous phase can put each sentence of a batch in the other's length (seen on B = 2
    # tuning seeds): one exchange of the parts both sequences fill puts them back
    batch, problem, scorer, truth = _polish_setup(bert_tiny, make_victim_batch)
    common = min(batch.lengths) - 1  # the positions after [CLS] that both sentences fill ([SEP] is fixed)
    ids = truth.clone()
    ids[0, 1:common], ids[1, 1:common] = truth[1, 1:common], truth[0, 1:common]
    result = polish(scorer, problem.embedding[ids], torch.Generator().manual_seed(0), rounds=10)
    assert problem.token_rows(problem.nearest(result.dummy)) == problem.token_rows(truth)
    assert result.after == pytest.approx(0.0, abs=1e-4) and result.moved == 1
