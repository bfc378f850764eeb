"""Hand-checked cases of the batch scores."""

from __future__ import annotations

import pytest

from gradleak.errors import GradleakError
from gradleak.metrics import Scores, match, mean_scores, score, token_accuracy

KEYS = ("rouge1", "rouge2", "rougeL", "token_accuracy", "exact_match")


def test_identical_batch_scores_100_everywhere():
    refs = ["the nurse kept the letters", "my account number changed", "we met at the clinic"]
    s = score(refs, list(refs))
    for key in KEYS:
        assert getattr(s, key) == pytest.approx(100.0), key


def test_permuted_batch_is_matched_back():
    refs = ["a b c", "d e f"]
    recs = list(reversed(refs))
    assert match(refs, recs) == [1, 0]
    s = score(refs, recs)
    for key in KEYS:
        assert getattr(s, key) == pytest.approx(100.0), key


def test_partial_overlap_hand_computed():
    s = score(["the cat sat on the mat"], ["the dog sat on the mat"])
    # unigrams: the, the, sat, on, mat shared -> P = R = 5/6
    assert s.rouge1 == pytest.approx(500 / 6, abs=1e-6)
    # bigrams: sat-on, on-the, the-mat shared of 5 each side
    assert s.rouge2 == pytest.approx(60.0, abs=1e-6)
    # longest common subsequence: "the sat on the mat" = 5 of 6
    assert s.rougeL == pytest.approx(500 / 6, abs=1e-6)
    # words 1, 3, 4, 5, 6 agree position by position; word 2 does not
    assert s.token_accuracy == pytest.approx(500 / 6, abs=1e-6)
    assert s.exact_match == 0.0


def test_disjoint_scores_zero():
    s = score(["alpha beta gamma"], ["delta epsilon zeta"])
    for key in KEYS:
        assert getattr(s, key) == 0.0, key


def test_missing_reconstructions_score_zero():
    refs = ["the cat sat", "a dog ran home"]
    s = score(refs, ["the cat sat"])
    assert s.rouge1 == pytest.approx(50.0)
    assert s.rouge2 == pytest.approx(50.0)
    assert s.rougeL == pytest.approx(50.0)
    assert s.exact_match == pytest.approx(50.0)
    # 3 of the 7 reference words are recovered
    assert s.token_accuracy == pytest.approx(300 / 7)


def test_missing_reconstruction_matched_to_the_right_reference():
    # the one reconstruction belongs to the second reference: the Hungarian match must find it
    refs = ["the cat sat", "a dog ran home"]
    s = score(refs, ["a dog ran home"])
    assert s.rouge1 == pytest.approx(50.0)
    assert s.exact_match == pytest.approx(50.0)
    assert s.token_accuracy == pytest.approx(400 / 7)


def test_token_accuracy_with_explicit_tokens():
    # texts agree word for word, but the explicit token lists decide the token accuracy
    refs = ["x y z w"]
    recs = ["x y z w"]
    s = score(refs, recs, [[101, 7, 8, 9]], [[101, 7, 5, 9, 11]])
    assert s.token_accuracy == pytest.approx(75.0)
    assert s.rouge1 == pytest.approx(100.0)
    assert s.exact_match == pytest.approx(100.0)


def test_token_accuracy_pools_tokens_over_the_batch():
    refs = ["a b", "c d e f"]
    s = score(refs, list(refs), [[1, 2], [3, 4, 5, 6]], [[1, 0], [3, 4, 5, 6]])
    # 5 of 6 tokens overall, not the mean of per-sequence accuracies (75)
    assert s.token_accuracy == pytest.approx(500 / 6)


def test_token_accuracy_function():
    assert token_accuracy([1, 2, 3, 4], [1, 9, 3]) == (2, 4)
    assert token_accuracy(["a"], []) == (0, 1)
    assert token_accuracy([], [1, 2]) == (0, 0)


def test_empty_batch_is_an_error():
    with pytest.raises(GradleakError):
        score([], [])


def test_mean_scores():
    a = Scores(100.0, 50.0, 80.0, 60.0, 100.0)
    b = Scores(0.0, 10.0, 20.0, 40.0, 0.0)
    m = mean_scores([a, b])
    assert m == Scores(50.0, 30.0, 50.0, 50.0, 50.0)
    assert mean_scores([a]) == a
    assert set(m.as_dict()) == set(KEYS)


def test_mean_scores_of_nothing_is_an_error():
    with pytest.raises(GradleakError):
        mean_scores([])
