"""The language-model prior: natural text reads as more likely than the same words shuffled."""

import pytest

from gradleak.attacks.prior import check_prior_name, load_prior
from gradleak.errors import GradleakError


def test_smollm2_prefers_natural_text() -> None:
    prior = load_prior("smollm2")
    assert prior is not None
    nll = prior.nll(["the cat sat on the mat.", "mat the on sat cat the.", ""])
    assert nll[0] < nll[1] - 2.0  # ln-perplexity: the shuffle costs more than 2 nats a token
    assert float(nll[2]) == 0.0
    ppl = prior.perplexity(["I loved this movie, it was great fun."])
    assert 1.0 < ppl[0] < 500.0


def test_no_prior_and_encoders() -> None:
    assert load_prior("none") is None
    with pytest.raises(GradleakError, match="encoder"):
        check_prior_name("minilm")
    with pytest.raises(GradleakError):
        check_prior_name("gpt2-random:layers=x")


def test_total_nll_and_why_lamp_reads_it_per_victim_token() -> None:
    prior = load_prior("smollm2")
    assert prior is not None
    texts = ["that ' s a new car dealership", "1800 ' s a new car dealership"]
    mean, total = prior.nll(texts), prior.nll(texts, total=True)
    counts = [len(prior._encode(t)) - 1 for t in texts]  # predicted tokens: all but the start token
    expected = [m * c for m, c in zip(mean.tolist(), counts, strict=True)]
    assert total.tolist() == pytest.approx(expected, rel=1e-6)
    # a number is split into its digits, each predictable: per prior token the wrong text reads as
    # more likely than the true one by more than 2 nats (measured); per victim token (7 of them in
    # both texts for BERT: 1800 is one), by less than 0.5, which LAMP's distance ratio outweighs
    assert counts[1] > counts[0] and mean[1] < mean[0] - 2.0
    assert 0 < (total[0] - total[1]) / 7 < 0.5
