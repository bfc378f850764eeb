"""Training under perturbed gradients: plain SGD on a victim with the attacks' defence chain.

Each step draws a minibatch (seeded; see Sampling), computes the clean gradient of the mean loss,
passes it through the defence chain exactly as a client would before sharing it, and
takes x <- x - lr * defended gradient (plain SGD, no momentum, no weight decay: the setting of the
convergence bound in `gradleak.bounds`), or, with `optimizer="adam"`, hands the defended gradient to
torch's Adam (DP-Adam under dp-sgd, the usual way to fine-tune LoRA adapters; a post-processing of
the released update, so epsilon is unchanged; the bound does not apply). Recorded per step: the
minibatch loss, the clean and the defended gradient norms; every K steps (and at 0 and T): held-out
accuracy and loss and the epsilon spent so far.

Choices:

- **Held-out split.** The named data sets ship one split each (`sst2` and `cola` are the GLUE dev
  sets, `rt` one pool), so a fixed, seeded fraction (`holdout`, 20%) is held out for evaluation,
  drawn with `split_seed` (0) independently of the run's seed: every run on a data set evaluates on
  the same sentences, and no held-out sentence is ever trained on.
- **Dropout stays off** (victims load in eval mode): the gradient is a deterministic function of the
  parameters and the batch, so a run is reproducible from its seed and the only randomness is the
  minibatch draw and the defence's noise.
- **Withholding is refused.** A withheld parameter group is not sent, so the server never updates it:
  in training it would silently freeze those parameters instead of protecting anything.
- **Sampling and accounting.** When the chain bounds each *example's* contribution (dp-sgd), each
  step draws a Poisson sample: every training example independently with probability q = B / N, so
  the batch size varies around B and may be 0. That is the sampling the accountants' subsampled
  Gaussian assumes (add/remove-one adjacency), so epsilon is that of q and the number of steps, with
  any accountant. As in Opacus, DP-SGD's noisy sum of clipped per-example gradients is divided by the
  *expected* batch size B, not by the drawn one (which depends on the data), and an empty draw
  releases the noise alone (its loss is recorded as NaN, None in JSON). Fixed-size batches accounted
  as Poisson at q = B / N, as before, reported a number no accountant proves for that sampling: the
  bound dp-accounting has for it (without replacement, replace-one adjacency,
  `privacy.without_replacement_epsilon`) is 12.9 where Poisson gives 1.58 (N = 1000, B = 16, z = 1,
  T = 100, delta = 1e-5, RDP; tests/test_privacy.py). A chain that clips the whole
  update (clip, then noise) bounds the *client's* contribution, and the client takes part in every
  step, so it is accounted at q = 1 (client-level DP) and the minibatches stay B distinct examples
  drawn without replacement; so do they without a DP mechanism. The record says which
  (`privacy.sampling`, `privacy.accounting`). Epsilon after t steps composes t steps.
- **PEFT.** Under `--peft lora:...` the base is frozen and only the LoRA adapters (and a classifier's
  fresh head) train: the gradient, DP-SGD's per-example clipping and its noise cover those tensors
  only (DP-LoRA, the usual way to fine-tune under DP), the frozen weights stay bit-identical, and the
  accounting is unchanged (it depends on the clip, the noise multiplier, q and T, not on what is
  trained). The record says what was trained (`trained`: tensors and parameters; with PEFT the rank
  and every adapter's shape). `--train-only` does not combine with `--peft`.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gradleak.adapters import shared_summary
from gradleak.bounds import PerturbedSgdBound, RunningVariance, power_iteration, running_mean
from gradleak.client import WITHHOLD_GROUPS, Update
from gradleak.data import Batch, Example, make_batch
from gradleak.defenses import (
    DefenseChain,
    DefenseContext,
    DpSgd,
    Noise,
    PrivacyTrace,
    Withhold,
    global_norm,
)
from gradleak.errors import GradleakError
from gradleak.privacy import PrivacyReport
from gradleak.spec import VictimSpec
from gradleak.victims import Victim, load_victim

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]  # (step, total, loss)
POISSON = "poisson"  # each example independently with probability q = B / N
FIXED_SIZE = "fixed-size"  # B distinct examples, uniformly without replacement
NOT_FOR_TRAINING: dict[type, str] = {
    Withhold: "the server would never update the withheld parameters, silently freezing them",
}


@dataclass(frozen=True)
class TrainSpec(VictimSpec):
    """Everything that determines a training run; the shared fields are `VictimSpec`'s."""

    data: str = "sst2"
    batch_size: int = 16
    steps: int = 100
    lr: float = 0.1
    optimizer: str = "sgd"  # "sgd" (plain, the bound's setting) or "adam" (DP-Adam under dp-sgd)
    eval_every: int = 10
    holdout: float = 0.2
    split_seed: int = 0
    max_eval: int = 512
    max_train: int | None = None  # train on the first N sentences of the training split only
    train_only: tuple[str, ...] = ()  # parameter groups / fnmatch patterns to train; empty: all
    bound: bool = True  # estimate L and sigma_g^2 and compute the convergence bound
    probe_batches: int = 8  # minibatches for the gradient-variance estimate
    power_iterations: int = 10  # Hessian power-iteration steps for the smoothness estimate

    def validate(self) -> None:
        self.validate_common()
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise GradleakError(f"learning rate must be a finite number > 0, got {self.lr}")
        if self.steps < 1:
            raise GradleakError(f"steps must be at least 1, got {self.steps}")
        if self.optimizer not in OPTIMIZERS:
            choices = ", ".join(OPTIMIZERS)
            raise GradleakError(f"unknown optimizer {self.optimizer!r}; choose one of {choices}")
        if self.optimizer != "sgd" and self.bound:
            raise GradleakError(
                "the convergence bound holds for plain SGD only: "
                f"give --no-bound with --optimizer {self.optimizer}"
            )
        if self.eval_every < 1:
            raise GradleakError(f"eval-every must be at least 1, got {self.eval_every}")
        if not 0 < self.holdout < 1:
            raise GradleakError(f"holdout must be a fraction in (0, 1), got {self.holdout}")
        if self.max_train is not None and self.max_train < 1:
            raise GradleakError(f"max-train must be at least 1, got {self.max_train}")
        if self.max_eval < 1:
            raise GradleakError(f"max-eval must be at least 1, got {self.max_eval}")
        if self.probe_batches < 2:
            raise GradleakError(f"probe batches must be at least 2, got {self.probe_batches}")
        if self.power_iterations < 1:
            raise GradleakError(f"power iterations must be at least 1, got {self.power_iterations}")
        if self.peft and self.train_only:
            raise GradleakError(
                "--train-only does not apply with --peft: LoRA trains the adapters (and a classifier's head) "
                "on a frozen base"
            )

    def defense_chain(self) -> DefenseChain:
        chain = DefenseChain.parse(self.defenses)
        for d in chain:
            for kind, why in NOT_FOR_TRAINING.items():
                if isinstance(d, kind):
                    raise GradleakError(f"{d.spec()} cannot apply to training: {why}")
        return chain


@dataclass(frozen=True)
class EvalPoint:
    step: int
    accuracy: float  # held-out accuracy (next-token accuracy for --task lm), 0-1
    loss: float  # held-out mean loss
    epsilon: float | None  # spent after `step` steps; None: no finite bound


@dataclass(frozen=True)
class BoundEstimate:
    """The convergence bound with the run's estimated constants, and what the run measured."""

    bound: PerturbedSgdBound
    initial_loss: float  # f(x_0), mean loss of the probe batches at the start
    smoothness_start: float  # |lambda_max| of the probe loss's Hessian at x_0
    smoothness_end: float  # the same at x_T
    variance_start: float  # sigma_g^2 at x_0
    variance_end: float  # sigma_g^2 at x_T
    dimension: int  # trained parameters d
    measured: float  # (1/T) sum_t ||g_t||^2, clean minibatch gradients
    value: float  # the bound at T

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v for k, v in asdict(self).items() if k != "bound"}
        out.update(self.bound.to_json())
        out["value"] = _finite(self.value)
        return out


@dataclass(frozen=True)
class TrainRecord:
    spec: TrainSpec
    steps: list[int]
    loss: list[float]  # minibatch loss at x_{t-1}, before step t
    grad_norm: list[float]  # norm of the clean minibatch gradient
    defended_grad_norm: list[float]  # norm of the gradient after the defence chain (what SGD applies)
    eval: list[EvalPoint]
    privacy: PrivacyReport
    privacy_unit: str  # "example" (q = B/N) or "client" (q = 1)
    sample_rate: float
    train_size: int
    eval_size: int
    parameters: int
    seconds: float
    bound: BoundEstimate | None = None
    environment: dict[str, str] = field(default_factory=dict)
    sampling: str = FIXED_SIZE  # POISSON or FIXED_SIZE: how each step's minibatch was drawn
    batch_sizes: list[int] = field(default_factory=list)  # examples drawn at each step
    trained: dict[str, Any] = field(default_factory=dict)  # what trained (`adapters.shared_summary`)

    @property
    def accounting(self) -> str:
        """How the epsilon accounts the sampling, in words."""
        if self.privacy.epsilon is None:
            return f"no finite epsilon: {self.privacy.reason}"
        if self.privacy_unit == "example":
            return (
                f"Poisson-subsampled mechanism at q = B/N = {self.sample_rate:.4g}, add/remove-one "
                f"adjacency, {self.privacy.accountant} accountant"
            )
        return f"q = 1: the client's whole update every step, {self.privacy.accountant} accountant"

    @property
    def epsilon(self) -> float | None:
        return self.privacy.epsilon

    @property
    def final_accuracy(self) -> float:
        return self.eval[-1].accuracy

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "loss": [_finite(x) for x in self.loss],  # None: an empty Poisson draw
            "grad_norm": self.grad_norm,
            "defended_grad_norm": self.defended_grad_norm,
            "eval": [asdict(e) for e in self.eval],
            "epsilon": self.epsilon,
            "final_accuracy": self.final_accuracy,
            "final_loss": self.eval[-1].loss,
            "privacy": {
                **self.privacy.to_json(),
                "unit": self.privacy_unit,
                "sample_rate": self.sample_rate,
                "sampling": self.sampling,
                "accounting": self.accounting,
            },
            "batch_sizes": self.batch_sizes,
            "bound": None if self.bound is None else self.bound.to_json(),
            "train_size": self.train_size,
            "eval_size": self.eval_size,
            "parameters": self.parameters,
            "trained": self.trained,
            "seconds": self.seconds,
            "spec": asdict(self.spec),
            "environment": self.environment,
        }


# ------------------------------------------------------------------ data


def split_examples(
    examples: Sequence[Example], holdout: float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a seeded shuffle, the first `holdout` fraction held out."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    k = max(1, round(holdout * len(examples)))
    if k >= len(examples):
        raise GradleakError(f"{len(examples)} sentences are too few to hold {holdout:g} of them out")
    return [examples[i] for i in order[k:]], [examples[i] for i in order[:k]]


def _labels(victim: Victim, batch: Batch) -> torch.Tensor:
    if victim.task == "lm":
        return batch.input_ids
    if batch.labels is None:
        raise GradleakError("classification needs labelled data")
    return batch.labels


def _check_labels(victim: Victim, examples: Sequence[Example], where: str) -> None:
    if victim.task == "lm":
        return
    bad = [e.label for e in examples if e.label is None or not 0 <= e.label < victim.num_labels]
    if bad:
        raise GradleakError(
            f"classification needs labels in 0..{victim.num_labels - 1}; {where} has {bad[0]!r}"
        )


# ------------------------------------------------------------------ gradients and evaluation


def freeze_except(victim: Victim, patterns: Sequence[str]) -> list[str]:
    """Train only the parameters named by groups (`embeddings`, `positions`, `head`) or fnmatch
    patterns; the rest is frozen (requires_grad off), so it gets neither gradient nor noise."""
    names = [n for n, _ in victim.model.named_parameters()]
    keep: list[str] = []
    for item in patterns:
        globs = WITHHOLD_GROUPS.get(item, (item,))
        hits = [n for n in names if any(fnmatch.fnmatch(n, g) for g in globs)]
        if not hits:
            groups = ", ".join(WITHHOLD_GROUPS)
            raise GradleakError(f"train-only {item!r} matches no parameter of {victim.name}; groups {groups}")
        keep.extend(h for h in hits if h not in keep)
    for name, p in victim.model.named_parameters():
        p.requires_grad_(name in keep)
    log.info("training %d of %d parameter tensors", len(keep), len(names))
    return keep


def _trainable(victim: Victim) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in victim.model.named_parameters() if p.requires_grad}


def loss_and_gradient(victim: Victim, batch: Batch) -> tuple[float, dict[str, torch.Tensor]]:
    """The mean minibatch loss and its gradient for every trainable parameter (one backward pass)."""
    batch = batch.to(victim.device)
    params = _trainable(victim)
    loss = victim.loss(
        attention_mask=batch.attention_mask, labels=_labels(victim, batch), input_ids=batch.input_ids
    )
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    out = {
        n: torch.zeros_like(p) if g is None else g.detach()
        for (n, p), g in zip(params.items(), grads, strict=True)
    }
    return float(loss.detach()), out


@torch.no_grad()
def evaluate(victim: Victim, batches: Sequence[Batch]) -> tuple[float, float]:
    """(accuracy, mean loss) on held-out batches: class accuracy, or next-token accuracy for `lm`."""
    correct = total = 0
    loss_sum = 0.0
    for batch in batches:
        batch = batch.to(victim.device)
        logits = victim.logits(attention_mask=batch.attention_mask, input_ids=batch.input_ids)
        if victim.task == "lm":
            mask = batch.attention_mask[:, 1:].bool()
            pred, target = logits[:, :-1][mask], batch.input_ids[:, 1:][mask]
        else:
            assert batch.labels is not None
            pred, target = logits, batch.labels
        loss_sum += float(F.cross_entropy(pred.float(), target, reduction="sum"))
        correct += int((pred.argmax(-1) == target).sum())
        total += int(target.numel())
    if total == 0:
        raise GradleakError("the held-out set has nothing to predict")
    return correct / total, loss_sum / total


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors.values()])


def hessian_norm(victim: Victim, batch: Batch, iterations: int, seed: int) -> float:
    """|lambda_max| of the Hessian of the mean loss on `batch`: power iteration on Hessian-vector
    products (double backward)."""
    batch = batch.to(victim.device)
    params = list(_trainable(victim).values())
    loss = victim.loss(
        attention_mask=batch.attention_mask, labels=_labels(victim, batch), input_ids=batch.input_ids
    )
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    pairs = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
    like = torch.zeros(sum(p.numel() for p, _ in pairs), dtype=victim.dtype, device=victim.device)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        chunks, offset = [], 0
        for p, _ in pairs:
            chunks.append(v[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        dot = sum((g * c).sum() for (_, g), c in zip(pairs, chunks, strict=True))
        hv = torch.autograd.grad(dot, [p for p, _ in pairs], retain_graph=True, allow_unused=True)
        return torch.cat(
            [
                (torch.zeros_like(p) if h is None else h).reshape(-1)
                for (p, _), h in zip(pairs, hv, strict=True)
            ]
        )

    gen = torch.Generator(device=victim.device).manual_seed(seed)
    return power_iteration(hvp, like, iterations, gen)


@dataclass(frozen=True)
class _Probe:
    loss: float
    variance: float
    smoothness: float


def _probe(victim: Victim, batches: Sequence[Batch], iterations: int, seed: int) -> _Probe:
    """Mean loss, minibatch-gradient variance and Hessian norm at the current parameters."""
    acc = RunningVariance()
    losses = []
    for batch in batches:
        loss, grads = loss_and_gradient(victim, batch)
        losses.append(loss)
        acc.add(_flat(grads))
    smooth = hessian_norm(victim, batches[0], iterations, seed)
    return _Probe(sum(losses) / len(losses), acc.variance(), smooth)


# ------------------------------------------------------------------ training


def _environment(device: str) -> dict[str, str]:
    env = {
        "python": platform.python_version(),
        "device": device,
        "torch_threads": str(torch.get_num_threads()),
    }
    for pkg in ("gradleak", "torch", "transformers"):
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:  # pragma: no cover
            env[pkg] = "not installed"
    return env


def per_example(chain: DefenseChain) -> bool:
    """Whether the chain bounds each example's contribution (dp-sgd): then batches are Poisson samples."""
    return any(isinstance(d, DpSgd) for d in chain)


def poisson_sample(examples: Sequence[Example], q: float, rng: random.Random) -> list[Example]:
    """Each example independently with probability q (the sampling the subsampled-Gaussian accountants
    assume); the sample may be empty."""
    return [e for e in examples if rng.random() < q]


def defend_poisson(
    chain: DefenseChain,
    clean: dict[str, torch.Tensor],
    victim: Victim,
    batch: Batch | None,
    generator: torch.Generator,
    expected: int,
) -> tuple[Update, PrivacyTrace]:
    """The chain on a Poisson batch (None: the draw was empty), normalised as Opacus does: DP-SGD's sum
    of clipped per-example gradients plus noise is divided by the expected batch size `expected`, not by
    the drawn size, which depends on the data (dividing by it would not be post-processing of the noisy
    sum). An empty draw releases the noise alone. The other defences apply as in `DefenseChain.apply`,
    after DP-SGD seeing the update at sensitivity clip / expected."""
    trace = PrivacyTrace()
    update = Update(clean)
    ctx = DefenseContext(victim, batch, generator)
    for d in chain:
        if not isinstance(d, DpSgd):
            update = d.apply(update, ctx, trace)
            continue
        if batch is None:
            std = d.multiplier * d.clip
            out = {k: _gaussian(v, generator, std) / expected for k, v in update.tensors.items()}
            trace.unit = "example"
            trace.mechanisms.append(("gaussian", d.multiplier))
        else:
            update = d.apply(update, ctx, trace)  # (sum + noise) / drawn size
            out = {k: v * (batch.size / expected) for k, v in update.tensors.items()}
        trace.sensitivity = d.clip / expected
        update = update.replace(out)
    bad = [k for k, v in update.tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise GradleakError(f"the defended update has NaN or infinite values (in {bad[0]})")
    return update, trace


def _gaussian(like: torch.Tensor, generator: torch.Generator, std: float) -> torch.Tensor:
    z = torch.randn(like.shape, generator=generator, dtype=torch.float64, device=generator.device)
    return (z * std).to(like.dtype).to(like.device)


Stepper = Callable[[dict[str, torch.Tensor]], None]  # takes one step along the defended gradient


def _sgd(params: dict[str, torch.Tensor], lr: float) -> Stepper:
    @torch.no_grad()
    def step(grads: dict[str, torch.Tensor]) -> None:
        for name, g in grads.items():
            params[name].sub_(lr * g.to(params[name].dtype))

    return step


def _adam(params: dict[str, torch.Tensor], lr: float) -> Stepper:
    """torch's Adam fed the defended gradient: post-processing of the released update, so the
    accounting is the same as for SGD (DP-Adam)."""
    opt = torch.optim.Adam(list(params.values()), lr=lr)

    def step(grads: dict[str, torch.Tensor]) -> None:
        for name, p in params.items():
            p.grad = grads[name].to(p.dtype) if name in grads else torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


OPTIMIZERS: dict[str, Callable[[dict[str, torch.Tensor], float], Stepper]] = {"sgd": _sgd, "adam": _adam}


def _privacy(trace, spec: TrainSpec, steps: int, q: float) -> PrivacyReport:
    return trace.report(spec.delta, spec.accountant, sample_rate=q, steps=steps)


def train(spec: TrainSpec, progress: Progress | None = None) -> TrainRecord:
    """Fine-tune the victim with plain SGD on defended gradients, as the spec says."""
    spec.validate()
    chain = spec.defense_chain()
    start = time.perf_counter()
    victim = load_victim(
        spec.victim, task=spec.task, dtype=spec.dtype, seed=spec.seed, device=spec.device, peft=spec.peft
    )
    examples = spec.examples()
    train_set, held = split_examples(examples, spec.holdout, spec.split_seed)
    held = held[: spec.max_eval]
    if spec.max_train is not None:
        train_set = train_set[: spec.max_train]
    _check_labels(victim, train_set + held, repr(spec.data))
    if spec.batch_size > len(train_set):
        raise GradleakError(
            f"batch size {spec.batch_size} is larger than the training split ({len(train_set)} sentences)"
        )
    with_labels = victim.task == "classify"
    if spec.train_only:
        freeze_except(victim, spec.train_only)

    def batch_of(chosen: Sequence[Example]) -> Batch:
        return make_batch(chosen, victim.tokenizer, spec.max_length, with_labels=with_labels)

    eval_batches = [batch_of(held[i : i + 64]) for i in range(0, len(held), 64)]
    params = _trainable(victim)
    dimension = sum(p.numel() for p in params.values())
    trained = shared_summary(victim.model, {n: p.detach() for n, p in params.items()}, spec.peft)
    sampler = random.Random(spec.seed)
    noise = torch.Generator(device=victim.device).manual_seed(spec.seed)
    probe_batches: list[Batch] = []
    first = None
    if spec.bound:  # the constants of the bound at x_0: f(x_0), sigma_g^2, L
        probe_rng = random.Random(f"probe-{spec.seed}")
        samples = [probe_rng.sample(train_set, spec.batch_size) for _ in range(spec.probe_batches)]
        probe_batches = [batch_of(chosen) for chosen in samples]
        first = _probe(victim, probe_batches, spec.power_iterations, spec.seed)

    losses: list[float] = []
    clean_norms: list[float] = []
    defended_norms: list[float] = []
    perturbation: list[float] = []
    batch_sizes: list[int] = []
    evals: list[EvalPoint] = []
    trace = None
    poisson = per_example(chain)
    sampling = POISSON if poisson else FIXED_SIZE
    unit, q = "example", spec.batch_size / len(train_set)

    def record_eval(step: int) -> None:
        acc, loss = evaluate(victim, eval_batches)
        eps = None if trace is None or step == 0 else _privacy(trace, spec, step, q).epsilon
        evals.append(EvalPoint(step, acc, loss, eps if step else 0.0))
        log.info("step %d: held-out accuracy %.3f, loss %.4f, epsilon %s", step, acc, loss, eps)

    step_with = OPTIMIZERS[spec.optimizer](params, spec.lr)
    record_eval(0)
    for step in range(1, spec.steps + 1):
        if poisson:
            chosen = poisson_sample(train_set, q, sampler)
        else:
            chosen = sampler.sample(train_set, spec.batch_size)
        batch_sizes.append(len(chosen))
        batch = batch_of(chosen) if chosen else None
        if batch is None:  # an empty Poisson draw: no loss, a zero gradient, and the noise is released
            loss, clean = math.nan, {n: torch.zeros_like(p) for n, p in params.items()}
        else:
            loss, clean = loss_and_gradient(victim, batch)
            if not math.isfinite(loss) or not all(torch.isfinite(g).all() for g in clean.values()):
                raise GradleakError(
                    f"training diverged at step {step} (loss {loss:.4g}): lower the learning rate {spec.lr:g}"
                )
        if poisson:
            update, step_trace = defend_poisson(chain, clean, victim, batch, noise, spec.batch_size)
        else:
            update, step_trace = chain.apply(Update(clean), DefenseContext(victim, batch, noise))
        if trace is None:
            trace = step_trace
            unit = step_trace.unit
            q = spec.batch_size / len(train_set) if unit == "example" else 1.0
        step_with(update.tensors)
        losses.append(loss)
        clean_norms.append(global_norm(clean))
        defended_norms.append(global_norm(update.tensors))
        perturbation.append(
            sum(float((update.tensors[k] - g).double().pow(2).sum()) for k, g in clean.items())
        )
        if progress is not None:
            progress(step, spec.steps, loss)
        if step % spec.eval_every == 0 or step == spec.steps:
            record_eval(step)
    assert trace is not None
    privacy = _privacy(trace, spec, spec.steps, q)

    estimate = None
    if first is not None:
        last = _probe(victim, probe_batches, spec.power_iterations, spec.seed)
        bound = PerturbedSgdBound(
            gap=max(first.loss, 0.0),  # f* >= 0 for cross-entropy
            lr=spec.lr,
            smoothness=max(first.smoothness, last.smoothness),
            grad_variance=max(first.variance, last.variance),
            perturbation=sum(perturbation) / len(perturbation),
            unbiased=all(isinstance(d, Noise) for d in chain),
        )
        estimate = BoundEstimate(
            bound=bound,
            initial_loss=first.loss,
            smoothness_start=first.smoothness,
            smoothness_end=last.smoothness,
            variance_start=first.variance,
            variance_end=last.variance,
            dimension=dimension,
            measured=running_mean([g * g for g in clean_norms])[-1],
            value=bound.value(spec.steps),
        )
    return TrainRecord(
        spec=spec,
        steps=list(range(1, spec.steps + 1)),
        loss=losses,
        grad_norm=clean_norms,
        defended_grad_norm=defended_norms,
        eval=evals,
        privacy=privacy,
        privacy_unit=unit,
        sample_rate=q,
        train_size=len(train_set),
        eval_size=len(held),
        parameters=dimension,
        seconds=time.perf_counter() - start,
        bound=estimate,
        environment=_environment(spec.device),
        sampling=sampling,
        batch_sizes=batch_sizes,
        trained=trained,
    )


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


# ------------------------------------------------------------------ plot


def plot(record: TrainRecord, path: str | Path) -> None:
    """A PNG: train loss, held-out accuracy, and the running mean of ||grad f||^2 beside the bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = record.spec
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    steps = record.steps
    ax = axes[0]
    ax.plot(steps, record.loss, lw=0.8, alpha=0.5, label="minibatch loss")  # NaN: an empty draw
    drawn = [(t, x) for t, x in zip(steps, record.loss, strict=True) if math.isfinite(x)]
    ax.plot([t for t, _ in drawn], running_mean([x for _, x in drawn]), lw=1.8, label="running mean")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("train loss")
    ax.legend()

    ax = axes[1]
    ax.plot([e.step for e in record.eval], [e.accuracy for e in record.eval], marker="o")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.set_title(f"held-out accuracy ({record.eval_size} sentences)")

    ax = axes[2]
    measured = running_mean([g * g for g in record.grad_norm])
    ax.plot(steps, measured, lw=1.8, label=r"$\frac{1}{T}\sum_t \|g_t\|^2$ (clean minibatch)")
    ax.plot(steps, running_mean([g * g for g in record.defended_grad_norm]), lw=1, ls=":",
            label="defended gradient, same average")  # fmt: skip
    title = r"$\|\nabla f\|^2$ against the bound"
    if record.bound is not None:
        b = record.bound.bound
        if b.applies:
            label = f"bound (est. L={b.smoothness:.3g}, " + r"$\sigma_g^2$" + f"={b.grad_variance:.3g})"
            ax.plot(steps, b.curve(len(steps)), lw=1.8, ls="--", color="black", label=label)
        else:
            title += f"\n(no bound: {b.reason})"
    ax.set_yscale("log")
    ax.set_xlabel("step T")
    ax.set_title(title)
    ax.legend(fontsize=8)

    privacy = record.privacy.describe()
    fig.suptitle(
        f"{spec.victim} on {spec.data}: SGD lr {spec.lr:g}, batch {spec.batch_size}, "
        f"defences {' -> '.join(spec.defenses) or 'none'}; {privacy}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
