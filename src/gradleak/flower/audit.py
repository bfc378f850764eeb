"""`LeakageAudit`: a Flower strategy wrapper that plays the honest-but-curious server.

Each round it remembers the global weights it sends to each node, and when the replies come back it
reads every client's weights exactly as the server receives them (before any server-side DP wrapper
clips or noises anything), forms the weight delta, turns it into the pseudo-gradient
-delta / (lr * K) with the learning rate and local steps the server configured
(`gradleak.client.Update(kind="fedavg")`), runs the chosen gradleak attack, scores the reconstruction
against the client's batch, and writes one record per (round, client) to the results store. The
wrapped strategy (FedAvg, a DP wrapper around it, or any other) then aggregates the replies unchanged.

Under PEFT (`peft="lora:r=8,..."`, the clients' `--peft`) the arrays exchanged are the trainable
tensors only: the LoRA factors (and a classifier's head), in the model's order; the frozen base never
travels. The audit's own victim carries the same adapters, so names and shapes match, and the
pseudo-gradient and the attack cover the adapter tensors only. Every record says what was shared
(`shared`: tensor names and shapes, and the LoRA rank, alpha and targets).

Scoring needs the truth, which a real server lacks: gradleak's client app adds its batch to the reply
in a ConfigRecord `gradleak-ground-truth`, which this wrapper removes from the reply first. The attack
sees only the update, the model, whether the protocol perturbs updates, and what the spec's threat
model gives it (`known_batch_size`, `known_lengths`, `known_labels`; by default the batch size, a
protocol parameter, and nothing else); every record says what it was given under `knowledge`.

Epsilon: per client, the composition over the rounds it took part in of the noise mechanisms applied
to its update before the server read it: Flower's `LocalDpMod` (given as `server_mechanisms`) and the
gradleak defences the client reports. A round without noise has no finite epsilon, and then neither
has the client. Central DP (noise on the aggregate) protects the aggregate from everyone who sees only
the aggregate, not the individual updates from the server: its epsilon, from the wrapped strategy's
own Flower accountant, is recorded beside as `aggregate_epsilon`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from gradleak.adapters import is_adapter, shared_summary
from gradleak.attacks import AttackOptions, Knowledge, Reconstruction, get_attack
from gradleak.client import Update
from gradleak.errors import GradleakError, Refusal
from gradleak.experiment import environment, strip_special
from gradleak.flower.client import GROUND_TRUTH, PROTOCOL, set_parameters
from gradleak.flower.spec import KEY_BATCH_SIZE, KEY_LOCAL_LR, KEY_LOCAL_STEPS
from gradleak.knowledge import Knows
from gradleak.metrics import Scores, score
from gradleak.privacy import Mechanism, PrivacyReport, report
from gradleak.victims import Victim, load_victim

log = logging.getLogger(__name__)

KIND = "fl"  # the store's kind of these records


@dataclass(frozen=True)
class ClientLeak:
    """What the audit found in one client's update in one round."""

    round: int
    client: int
    node_id: int
    references: tuple[str, ...]
    reconstructions: tuple[str, ...]
    scores: Scores
    seconds: float
    privacy: PrivacyReport
    labels: tuple[int, ...] | None = None
    inferred_labels: tuple[int, ...] | None = None
    notes: tuple[str, ...] = ()
    error: str | None = None
    aggregate_epsilon: float | None = None
    record: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def refused(self) -> bool:
        """The attack declined the scenario (a result, not a failure)."""
        return self.error is not None and self.error.startswith("refused: ")

    @property
    def epsilon(self) -> float | None:
        return self.privacy.epsilon


# ------------------------------------------------------------------ the store


def write_record(
    store: Any, kind: str, spec: Mapping[str, Any], record: dict[str, Any], started: float
) -> str:
    """Write one finished record to a gradleak results store (`gradleak.store.Store`); its key."""
    from gradleak.store import StoredRun, gradleak_version, run_key

    key = run_key(kind, dict(spec))
    store.put(
        StoredRun(
            key=key,
            kind=kind,
            spec=json.loads(json.dumps(dict(spec))),
            status="done",
            record=record,
            error=None,
            started=started,
            finished=time.time(),
            version=gradleak_version(),
        )
    )
    return key


class _Sink:
    """Where records go: a `gradleak.store.Store` used as given, or a path opened for each write (the
    ServerApp runs in its own thread, and an SQLite connection belongs to the thread that opened it)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.path = Path(store) if isinstance(store, str | Path) else None
        if self.path is not None:  # refuse a bad store before the simulation starts
            from gradleak.store import Store

            Store.open(self.path, create=True).close()

    def write(self, kind: str, spec: Mapping[str, Any], record: dict[str, Any], started: float) -> None:
        if self.path is None:
            write_record(self.store, kind, spec, record, started)
            return
        from gradleak.store import Store

        with Store.open(self.path, create=True) as store:
            write_record(store, kind, spec, record, started)


# ------------------------------------------------------------------ the wrapper


class LeakageAudit(Strategy):
    """Wrap a Flower strategy; attack every client's update as the server receives it.

    `victim`: the model the clients train (a `Victim`, or a preset name loaded with `seed` and `peft`);
    its trainable weights (under PEFT the adapters) are set to each round's global weights before an
    attack. `peft`: the clients' LoRA configuration (a `Victim` given must carry adapters then).
    `local_lr` and `local_steps` are the protocol the server configures (they are sent to the clients
    in every training round's config).
    `batch_size`: the batch size the server knows, or None. `perturbed`: the protocol perturbs updates
    (noise-aware exact attack). `server_mechanisms`: noise mechanisms applied to every client update
    before the server sees it (e.g. `LocalDpMod`). `store`: a path to a results store (opened for each
    record: Flower runs the ServerApp in its own thread), a `gradleak.store.Store` opened in the thread
    that runs the strategy, or None. `spec`: the run's parameters, written into every record's spec with
    its round and client. `on_leak` is called with each `ClientLeak` as it is found."""

    def __init__(
        self,
        strategy: Strategy,
        *,
        victim: Victim | str,
        attack: str = "exact",
        store: Any = None,
        local_lr: float,
        local_steps: int = 1,
        batch_size: int | None = None,
        options: AttackOptions | None = None,
        perturbed: bool = False,
        server_mechanisms: Sequence[Mechanism] = (),
        delta: float = 1e-5,
        accountant: str = "rdp",
        seed: int = 0,
        peft: str | None = None,
        spec: Mapping[str, Any] | None = None,
        on_leak: Callable[[ClientLeak], None] | None = None,
    ) -> None:
        super().__init__()
        if local_lr <= 0 or local_steps < 1:
            raise GradleakError(f"need lr > 0 and local steps >= 1, got {local_lr} and {local_steps}")
        self.strategy = strategy
        self.victim = victim if isinstance(victim, Victim) else load_victim(victim, seed=seed, peft=peft)
        trainable = {n: p.detach() for n, p in self.victim.model.named_parameters() if p.requires_grad}
        if peft and not any(is_adapter(n) for n in trainable):
            raise GradleakError(f"peft {peft!r} given, but victim {self.victim.name} carries no adapters")
        self.shared = shared_summary(self.victim.model, trainable, peft)  # what every update holds
        self.attack = get_attack(attack)
        self.options = options or AttackOptions(seed=seed)
        self.local_lr = float(local_lr)
        self.local_steps = int(local_steps)
        self.batch_size = batch_size
        self.perturbed = perturbed
        self.server_mechanisms = tuple(server_mechanisms)
        self.delta = delta
        self.accountant = accountant
        self.spec = (
            dict(spec)
            if spec is not None
            else {
                "victim": self.victim.name,
                "attack": self.attack.name,
                "local_lr": self.local_lr,
                "local_steps": self.local_steps,
                "batch_size": batch_size,
                "seed": seed,
                **({"peft": peft} if peft else {}),
            }
        )
        # what the server is given besides the update: the spec's known_* (default: the batch size only)
        default = Knows()
        self.knows = Knows(
            batch_size=bool(self.spec.get("known_batch_size", default.batch_size)) and batch_size is not None,
            lengths=bool(self.spec.get("known_lengths", default.lengths)),
            labels=bool(self.spec.get("known_labels", default.labels)),
        )
        self.on_leak = on_leak
        self.sink = None if store is None else _Sink(store)
        self.leaks: list[ClientLeak] = []
        self.errors: list[str] = []
        self._sent: dict[int, dict[int, ArrayRecord]] = {}
        self._releases: dict[int, list[tuple[Mechanism, ...] | None]] = defaultdict(list)

    def __repr__(self) -> str:
        return f"LeakageAudit({self.attack.name}, {self.strategy!r})"

    # ------------------------------------------------------------------ Strategy

    def summary(self) -> None:
        lora = self.shared.get("peft")
        on = f" (LoRA r={lora['r']}: {self.shared['tensors']} adapter arrays)" if lora else ""
        log.info("leakage audit: %s attack on %s%s", self.attack.name, self.victim.name, on)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[KEY_LOCAL_LR] = self.local_lr
        config[KEY_LOCAL_STEPS] = self.local_steps
        if self.batch_size is not None:
            config[KEY_BATCH_SIZE] = self.batch_size
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sent[server_round] = {
            m.metadata.dst_node_id: next(iter(m.content.array_records.values())) for m in messages
        }
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent = self._sent.pop(server_round, {})
        seen = []  # read everything before the wrapped strategy touches the replies (it may clip them)
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if reply.has_error():
                self.errors.append(f"round {server_round}, node {node}: {reply.error.reason}")
                continue
            truth = _pop_json(reply.content, GROUND_TRUTH)
            protocol = _pop_json(reply.content, PROTOCOL)
            if node not in sent or len(reply.content.array_records) != 1:
                self.errors.append(f"round {server_round}, node {node}: no update the audit can read")
                continue
            received = next(iter(reply.content.array_records.values())).to_torch_state_dict()
            global_state = sent[node].to_torch_state_dict()
            if set(received) != set(global_state):
                odd = sorted(set(received) ^ set(global_state))[0]
                self.errors.append(
                    f"round {server_round}, node {node}: the reply's arrays are not those sent ({odd})"
                )
                continue
            seen.append((node, global_state, received, truth, protocol))
        aggregated = self.strategy.aggregate_train(server_round, replies)
        aggregate_epsilon = _aggregate_epsilon(self.strategy)
        for node, global_state, received, truth, protocol in seen:
            leak = self.audit(server_round, node, global_state, received, truth, protocol, aggregate_epsilon)
            self.leaks.append(leak)
            if self.on_leak is not None:
                self.on_leak(leak)
        return aggregated

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    # ------------------------------------------------------------------ the audit of one update

    def audit(
        self,
        server_round: int,
        node: int,
        global_state: Mapping[str, torch.Tensor],
        received: Mapping[str, torch.Tensor],
        truth: Mapping[str, Any] | None,
        protocol: Mapping[str, Any] | None,
        aggregate_epsilon: float | None = None,
    ) -> ClientLeak:
        """Attack one client's update (its returned weights minus the global weights it was sent)."""
        started = time.time()
        if truth is None:
            raise GradleakError(
                f"round {server_round}, node {node}: the reply has no {GROUND_TRUTH} record to score "
                "against (use gradleak's client app)"
            )
        client = int(truth.get("client", node))
        references = tuple(truth["texts"])
        token_ids = tuple(tuple(t) for t in truth["token_ids"])
        victim = self.victim
        set_parameters(victim, dict(global_state))
        delta = {
            k: (received[k].to(torch.float64) - global_state[k].to(torch.float64)).to(
                device=victim.device, dtype=victim.dtype
            )
            for k in global_state
        }
        update = Update(delta, "fedavg", self.local_lr, self.local_steps)
        notes: list[str] = []
        knows = self.knows
        lengths = tuple(len(t) for t in token_ids) if knows.lengths else None
        given_labels = truth.get("labels") if knows.labels else None
        knowledge = Knowledge(
            batch_size=self.batch_size if knows.batch_size else None,
            lengths=lengths,
            labels=None if given_labels is None else tuple(int(x) for x in given_labels),
            perturbed=self.perturbed,
        )
        error = None
        t0 = time.perf_counter()
        try:
            rec = self.attack.reconstruct(victim, update, knowledge, self.options)
        except Refusal as exc:  # the attack's assumptions fail: nothing recovered, said as is
            error = f"refused: {exc}"
            rec = Reconstruction(token_ids=(), texts=(), labels=None, notes=(f"attack refused: {exc}",))
        except GradleakError as exc:  # any other one-line error of the attack: nothing recovered either
            error = f"failed: {exc}"
            rec = Reconstruction(token_ids=(), texts=(), labels=None, notes=(f"attack failed: {exc}",))
        seconds = time.perf_counter() - t0
        special = set(victim.tokenizer.all_special_ids)
        scores = score(
            references,
            rec.texts,
            strip_special(token_ids, special),
            strip_special(rec.token_ids, special),
        )
        privacy = self._privacy(client, protocol)
        notes.extend(rec.notes)
        labels = None if truth.get("labels") is None else tuple(int(x) for x in truth["labels"])
        leak = ClientLeak(
            round=server_round,
            client=client,
            node_id=node,
            references=references,
            reconstructions=tuple(rec.texts),
            scores=scores,
            seconds=seconds,
            privacy=privacy,
            labels=labels,
            inferred_labels=rec.labels,
            notes=tuple(notes),
            error=error,
            aggregate_epsilon=aggregate_epsilon,
        )
        record = self._record(leak, protocol)
        leak = _with_record(leak, record)
        if self.sink is not None:
            self.sink.write(KIND, record["spec"], record, started)
        log.info("round %d client %d: %s", server_round, client, scores)
        return leak

    def _privacy(self, client: int, protocol: Mapping[str, Any] | None) -> PrivacyReport:
        """Epsilon of everything this client has sent the server so far (composition over rounds)."""
        mechs = list(self.server_mechanisms)
        unbounded: list[str] = []
        unit = "client"
        if protocol is not None:
            mechs.extend(Mechanism(str(kind), float(z)) for kind, z in protocol.get("mechanisms", ()))
            unbounded = list(protocol.get("unbounded_noise", ()))
            if protocol.get("unit") == "example" and not self.server_mechanisms:
                unit = "example"
        releases = self._releases[client]
        releases.append(tuple(mechs) if mechs else None)
        rounds = len(releases)
        if any(r is None for r in releases):
            reason = (
                f"{', '.join(unbounded)} on an unclipped update: no sensitivity bound"
                if unbounded
                else "the server reads an update without noise"
            )
            return report(None, self.delta, self.accountant, reason)
        composed = [m for r in releases for m in r]  # type: ignore[union-attr]
        return report(composed, self.delta, self.accountant, f"{unit}-level DP over {rounds} round(s)")

    def _record(self, leak: ClientLeak, protocol: Mapping[str, Any] | None) -> dict[str, Any]:
        spec = {**self.spec, "round": leak.round, "client": leak.client}
        env = environment(str(self.victim.device))
        try:
            env["flwr"] = metadata.version("flwr")
        except metadata.PackageNotFoundError:  # pragma: no cover
            env["flwr"] = "not installed"
        return {
            "kind": KIND,
            "round": leak.round,
            "client": leak.client,
            "node_id": leak.node_id,
            "victim": spec.get("victim", self.victim.name),
            "attack": self.attack.name,
            "data": spec.get("data"),
            "batch_size": spec.get("batch_size", len(leak.references)),
            "seed": spec.get("seed"),
            "references": list(leak.references),
            "reconstructions": list(leak.reconstructions),
            "scores": leak.scores.as_dict(),
            "seconds": leak.seconds,
            "labels": None if leak.labels is None else list(leak.labels),
            "inferred_labels": None if leak.inferred_labels is None else list(leak.inferred_labels),
            "notes": list(leak.notes),
            "error": leak.error,
            "defenses": list(spec.get("defenses", ()) or (protocol or {}).get("defenses", ())),
            "protocol": {"kind": "fedavg", "local_lr": self.local_lr, "local_steps": self.local_steps},
            "flower_dp": spec.get("flower_dp", "none"),
            "epsilon": leak.epsilon,
            "aggregate_epsilon": leak.aggregate_epsilon,
            "privacy": leak.privacy.to_json(),
            "knowledge": self.knows.to_json(),  # what the attack was given besides the update
            "shared": self.shared,  # what the update held: every array's name and shape (LoRA: r)
            "spec": spec,
            "environment": env,
        }


def _with_record(leak: ClientLeak, record: dict[str, Any]) -> ClientLeak:
    from dataclasses import replace

    return replace(leak, record=record)


def _pop_json(content: RecordDict, key: str) -> dict[str, Any] | None:
    """Remove a gradleak ConfigRecord from a reply and decode it."""
    if key not in content.config_records:
        return None
    record = content.config_records[key]
    del content[key]
    try:
        return json.loads(str(record["json"]))
    except (KeyError, json.JSONDecodeError) as exc:
        raise GradleakError(f"malformed {key} record in a client reply: {exc}") from None


def _aggregate_epsilon(strategy: Any) -> float | None:
    """The epsilon Flower's own accountant has spent on the aggregate so far (a central-DP wrapper with
    an accountant, anywhere in the chain of wrapped strategies), or None."""
    seen = 0
    while strategy is not None and seen < 16:
        spent = getattr(strategy, "privacy_spent", None)
        if callable(spent):
            result = spent()
            if result is not None:
                return float(result.epsilon)
        strategy = getattr(strategy, "strategy", None)
        seen += 1
    return None
