"""Shared fixtures: victims are loaded once per session, batches come from the real data sets."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from gradleak.data import Batch, filter_by_words, load_examples, make_batch, sample_examples
from gradleak.victims import Victim, load_victim

# One thread per test process (and per CLI subprocess, through the environment): the models here are
# small, and on a shared 2-core machine two OpenMP threads per process wait on each other (measured:
# the MiniLM batch-of-four test took 158 s with two threads under load, 48 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Offline, as the tests must run: a Hub id that is not cached fails at once instead of retrying a network
# that is not there (set before transformers or huggingface_hub is imported, which read it then).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def bert_tiny() -> Victim:
    return load_victim("bert-tiny", seed=0)


@pytest.fixture(scope="session")
def minilm() -> Victim:
    return load_victim("minilm", seed=0)


@pytest.fixture(scope="session")
def gpt2_tiny() -> Victim:
    return load_victim("gpt2-tiny", dtype="float64", seed=0)


def batch_from(
    victim: Victim,
    name: str,
    batch_size: int,
    seed: int,
    *,
    min_words: int = 0,
    max_words: int | None = None,
    max_length: int = 32,
    with_labels: bool = True,
) -> Batch:
    """A seeded batch of `batch_size` sentences of the named data set, tokenised for `victim`."""
    examples = filter_by_words(load_examples(name), min_words, max_words)
    chosen = sample_examples(examples, batch_size, seed)
    return make_batch(chosen, victim.tokenizer, max_length, with_labels=with_labels)


@pytest.fixture(scope="session")
def make_victim_batch() -> Callable[..., Batch]:
    """The `batch_from` helper as a fixture, for tests that prefer injection over import."""
    return batch_from


@pytest.fixture
def task_identity(monkeypatch):
    """The identity Flower's runtimes give the process that builds messages (as run_simulation does)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)
