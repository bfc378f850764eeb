"""The Flower client: trains a gradleak victim on its shard of a real data set and returns its weights.

Each training message carries the global weights (one ArrayRecord) and the round's config (one
ConfigRecord, with the protocol's learning rate and local steps). The client draws a seeded batch from
its shard, runs K full-batch SGD steps (`gradleak.client.fedavg`), passes the weight delta through the
gradleak defence chain if one is given, and replies with global + delta under the same array keys,
`num-examples` in its MetricRecord, and two ConfigRecords:

- `gradleak-ground-truth`: the batch's texts, token ids and labels. GROUND TRUTH FOR SCORING ONLY: the
  server-side `LeakageAudit` removes it from the reply before anything else reads the reply; the
  attack never sees it, and the wrapped strategy aggregates a standard reply.
- `gradleak-protocol`: the noise mechanisms the gradleak defences applied (public protocol facts, for
  the epsilon).

Under `--peft` the client's model is the LoRA-wrapped victim (base frozen, `load_victim(peft=...)`): the
arrays it receives and returns are the trainable tensors only, the adapters (and a classifier's head),
in the model's order, and dp-sgd clips and noises the per-example gradients of those tensors only.

Flower's DP mods (`LocalDpMod`, `fixedclipping_mod`) wrap this function and act on the reply after it,
as in any Flower app. Flower's noise comes from NumPy's global generator; the first mod seeds it per
round and client so that simulations are reproducible.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from functools import cache
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from gradleak.client import Update, fedavg, fedsgd
from gradleak.data import Batch, Example, make_batch, sample_examples
from gradleak.defenses import DefenseContext, DpSgd, PrivacyTrace
from gradleak.errors import GradleakError
from gradleak.flower.spec import (
    KEY_LOCAL_LR,
    KEY_LOCAL_STEPS,
    FlSpec,
    partitions,
    round_seed,
)
from gradleak.victims import Victim, load_victim

log = logging.getLogger(__name__)

GROUND_TRUTH = "gradleak-ground-truth"
PROTOCOL = "gradleak-protocol"
METRICS = "metrics"
PARTITION_ID = "partition-id"  # flwr.common.constant.PARTITION_ID_KEY, set by the simulation


# ------------------------------------------------------------------ weights <-> victim


def parameters(victim: Victim) -> dict[str, torch.Tensor]:
    """The victim's trainable parameters by name, in the model's order (CPU copies): the arrays Flower
    exchanges. Under `--peft` these are the LoRA factors (and a classifier's head) only; the frozen
    base never travels."""
    return {n: p.detach().cpu().clone() for n, p in victim.model.named_parameters() if p.requires_grad}


def set_parameters(victim: Victim, state: Mapping[str, torch.Tensor]) -> None:
    """Load the global arrays: exactly the victim's trainable parameters (a frozen or unknown name, or
    a missing trainable one, means the two sides built different models)."""
    params = dict(victim.model.named_parameters())
    missing = [k for k in params if params[k].requires_grad and k not in state]
    unknown = [k for k in state if k not in params or not params[k].requires_grad]
    if missing or unknown:
        raise GradleakError(
            f"the global weights do not fit victim {victim.name}: "
            f"{'missing ' + missing[0] if missing else 'unexpected ' + unknown[0]}"
        )
    shape = [k for k, v in state.items() if tuple(v.shape) != tuple(params[k].shape)]
    if shape:
        k = shape[0]
        raise GradleakError(
            f"the global weights do not fit victim {victim.name}: {k} has shape "
            f"{list(state[k].shape)}, the model {list(params[k].shape)}"
        )
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(device=params[k].device, dtype=params[k].dtype))


# ------------------------------------------------------------------ per-process caches


@cache
def _victim(name: str, task: str, dtype: str, seed: int, device: str, peft: str | None) -> Victim:
    return load_victim(name, task=task, dtype=dtype, seed=seed, device=device, peft=peft)


@cache
def _partitions(spec: FlSpec) -> list[list[Example]]:
    return partitions(spec)


# ------------------------------------------------------------------ one round of local training


def client_batch(spec: FlSpec, victim: Victim, client: int, server_round: int) -> Batch:
    shard = _partitions(spec)[client]
    chosen = sample_examples(shard, spec.batch_size, round_seed(spec.seed, server_round, client))
    return make_batch(chosen, victim.tokenizer, spec.max_length, with_labels=victim.task == "classify")


def local_update(
    spec: FlSpec, victim: Victim, batch: Batch, lr: float, steps: int, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], PrivacyTrace]:
    """The weight delta after `steps` SGD steps at `lr`, through the gradleak defence chain.

    With dp-sgd (one step only) the defended per-example FedSGD gradient g becomes the delta -lr * g."""
    chain = spec.defense_chain()
    ctx = DefenseContext(victim, batch, generator)
    if any(isinstance(d, DpSgd) for d in chain):
        if steps != 1:
            raise GradleakError("dp-sgd computes one FedSGD gradient: use one local step")
        update, trace = chain.apply(fedsgd(victim, batch), ctx)
        return {k: -lr * v for k, v in update.tensors.items()}, trace
    update: Update = fedavg(victim, batch, local_steps=steps, learning_rate=lr)
    update, trace = chain.apply(update, ctx)
    return dict(update.tensors), trace


def train(spec: FlSpec, msg: Message, context: Context) -> Message:
    """The ClientApp's train function (see the module docstring)."""
    if len(msg.content.array_records) != 1 or len(msg.content.config_records) != 1:
        raise GradleakError("a training message must hold one ArrayRecord and one ConfigRecord")
    arrays_key, arrays = next(iter(msg.content.array_records.items()))
    config = next(iter(msg.content.config_records.values()))
    client = int(context.node_config[PARTITION_ID])
    server_round = int(config.get("server-round", 0))
    lr = float(config.get(KEY_LOCAL_LR, spec.local_lr))
    steps = int(config.get(KEY_LOCAL_STEPS, spec.local_steps))

    victim = _victim(spec.victim, spec.task, spec.dtype, spec.seed, spec.device, spec.peft)
    state = arrays.to_torch_state_dict()
    set_parameters(victim, state)
    batch = client_batch(spec, victim, client, server_round)
    generator = torch.Generator(device=victim.device).manual_seed(round_seed(spec.seed, server_round, client))
    delta, trace = local_update(spec, victim, batch, lr, steps, generator)
    new_state = {k: (v + delta[k].detach().to(device="cpu", dtype=v.dtype)) for k, v in state.items()}

    truth = {
        "client": client,
        "texts": list(batch.texts),
        "token_ids": [list(t) for t in batch.token_ids],
        "labels": None if batch.labels is None else [int(x) for x in batch.labels],
    }
    protocol = {
        "client": client,
        "mechanisms": [list(m) for m in trace.mechanisms],
        "unbounded_noise": list(trace.unbounded_noise),
        "unit": trace.unit,
        "defenses": spec.defense_chain().specs(),
    }
    content = RecordDict(
        {
            arrays_key: ArrayRecord(torch_state_dict=new_state),
            METRICS: MetricRecord({"num-examples": batch.size}),
            GROUND_TRUTH: ConfigRecord({"json": json.dumps(truth)}),
            PROTOCOL: ConfigRecord({"json": json.dumps(protocol)}),
        }
    )
    return Message(content=content, reply_to=msg)


# ------------------------------------------------------------------ the app


class SeedNoiseMod:
    """Seeds NumPy's global generator (which Flower's DP mods draw their noise from) per round and
    client, so that a simulation is reproducible. Put it first: it must run before the DP mods."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        config: Any = next(iter(msg.content.config_records.values()), {})
        server_round = int(config.get("server-round", 0)) if config else 0
        client = int(ctxt.node_config.get(PARTITION_ID, 0))
        np.random.seed(round_seed(self.seed, server_round, client) + 1)
        return call_next(msg, ctxt)


def flower_mods(spec: FlSpec) -> list[Any]:
    """Flower's client-side mods for the spec's `flower_dp`, after the seeding mod."""
    mods: list[Any] = [SeedNoiseMod(spec.seed)]
    if spec.flower_dp == "local":
        mods.append(
            LocalDpMod(
                clipping_norm=float(spec.dp_clip),  # type: ignore[arg-type]
                sensitivity=spec.local_dp_sensitivity,
                epsilon=float(spec.dp_epsilon),  # type: ignore[arg-type]
                delta=spec.local_dp_delta,
            )
        )
    elif spec.flower_dp == "central-client-clip":
        mods.append(fixedclipping_mod)
    return mods


def make_client_app(spec: FlSpec) -> ClientApp:
    """A Flower ClientApp that trains `spec.victim` on the client's shard of `spec.data`."""
    spec.validate()
    app = ClientApp(mods=flower_mods(spec))

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)  # one CPU per simulated client
        return train(spec, msg, context)

    return app
