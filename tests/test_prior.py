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
