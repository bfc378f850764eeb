"""Defences: perturbations of the update a client shares, composable in order, each tracking what it
does to the update's sensitivity so that the chain can name its (epsilon, delta) or say it has none.

From the command line a defence is `NAME[:key=value,...]` (`parse_defense`); in the library it is an
object with `apply(update, context, trace) -> Update`. The registry `DEFENSES` lists them:

- `clip:norm=C` L2-clips the whole update (client-level sensitivity C).
- `gaussian:sigma=S` adds N(0, S^2) to every coordinate (absolute, as in DLG/LAMP/DAGER experiments);
  `gaussian:multiplier=Z` adds N(0, (Z * sensitivity)^2) and needs a clip before it.
- `laplace:scale=B` / `laplace:multiplier=Z` likewise with Laplace noise; its L1 sensitivity is
  sqrt(d) times the L2 one.
- `dp-sgd:clip=C,multiplier=Z`: per-example gradients (torch.func, or one example at a time where the
  model does not vectorise), each L2-clipped to C, summed, N(0, (Z C)^2) added, divided by the batch
  size (Abadi et al. 2016). It computes the update, so it comes first and needs FedSGD.
- `prune:fraction=P[,method=topk|random]`: zero the fraction P of coordinates with the smallest
  magnitude (DLG's defence) or chosen at random.
- `quantize:bits=16|8`: round to float16, or to int8 with a per-tensor scale.
- `withhold:params=GROUP|PATTERN`: keep a parameter group or fnmatch pattern from the server.

Noise added while the sensitivity is unbounded (no clip before it) is not a DP mechanism; the chain
then reports no finite epsilon, with the reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from gradleak.client import Update, batch_gradient, resolve_withheld
from gradleak.data import Batch
from gradleak.errors import GradleakError
from gradleak.privacy import Mechanism, PrivacyReport, report
from gradleak.victims import Victim

log = logging.getLogger(__name__)


@dataclass
class DefenseContext:
    """What a defence may use besides the update: the victim and private batch (DP-SGD recomputes
    per-example gradients), and the generator all noise is drawn from."""

    victim: Victim | None
    batch: Batch | None
    generator: torch.Generator

    def need(self, what: str) -> tuple[Victim, Batch]:
        if self.victim is None or self.batch is None:
            raise GradleakError(f"{what} needs the victim model and the private batch")
        return self.victim, self.batch


@dataclass
class PrivacyTrace:
    """What the chain did to the update's sensitivity, and the noise mechanisms it applied.

    `sensitivity` is the L2 bound on one unit's (`unit`: an example or the whole client) contribution,
    relative to the update's current scale; `None` means unbounded."""

    sensitivity: float | None = None
    unit: str = "client"
    mechanisms: list[tuple[str, float]] = field(default_factory=list)  # (kind, noise multiplier)
    unbounded_noise: list[str] = field(default_factory=list)

    def report(
        self, delta: float, accountant: str, sample_rate: float = 1.0, steps: int = 1
    ) -> PrivacyReport:
        """(epsilon, delta) of `steps` releases, each on a Poisson sample at `sample_rate`."""
        if not self.mechanisms:
            if self.unbounded_noise:
                reason = f"{', '.join(self.unbounded_noise)} on an unclipped update: no sensitivity bound"
            else:
                reason = "no noise added" if self.sensitivity is not None else "no DP mechanism"
            return report(None, delta, accountant, reason)
        mechs = [Mechanism(kind, z, sample_rate, steps) for kind, z in self.mechanisms]
        return report(mechs, delta, accountant, f"{self.unit}-level DP")


class Defense(Protocol):
    name: str

    def apply(self, update: Update, ctx: DefenseContext, trace: PrivacyTrace) -> Update: ...

    def spec(self) -> str: ...


# ------------------------------------------------------------------ helpers


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors.values()))


def numel(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


def _noise(like: torch.Tensor, gen: torch.Generator, kind: str, scale: float) -> torch.Tensor:
    if kind == "gaussian":
        z = torch.randn(like.shape, generator=gen, dtype=torch.float64, device=gen.device)
    else:
        u = torch.rand(like.shape, generator=gen, dtype=torch.float64, device=gen.device) - 0.5
        z = -torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace(0, 1) by inversion
    return (z * scale).to(like.dtype).to(like.device)


def _positive(name: str, key: str, value: float, allow_zero: bool = False) -> float:
    ok = value >= 0 if allow_zero else value > 0
    if not (ok and math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        raise GradleakError(f"{name}: {key} must be a finite number {bound}, got {value}")
    return value


# ------------------------------------------------------------------ defences


@dataclass(frozen=True)
class Clip:
    norm: float
    name: str = "clip"

    def __post_init__(self) -> None:
        _positive(self.name, "norm", self.norm)

    def spec(self) -> str:
        return f"clip:norm={self.norm:g}"

    def apply(self, update: Update, ctx: DefenseContext, trace: PrivacyTrace) -> Update:
        n = global_norm(update.tensors)
        factor = min(1.0, self.norm / n) if n > 0 else 1.0
        trace.sensitivity = self.norm if trace.sensitivity is None else min(trace.sensitivity, self.norm)
        if trace.unit != "example":
            trace.unit = "client"
        return update.replace({k: v * factor for k, v in update.tensors.items()})


@dataclass(frozen=True)
class Noise:
    """Gaussian or Laplace noise, absolute (`sigma`/`scale`) or relative to the sensitivity."""

    kind: str
    absolute: float | None = None
    multiplier: float | None = None

    @property
    def name(self) -> str:
        return self.kind

    def __post_init__(self) -> None:
        key = "sigma" if self.kind == "gaussian" else "scale"
        if (self.absolute is None) == (self.multiplier is None):
            raise GradleakError(f"{self.kind}: give exactly one of {key}=... or multiplier=...")
        if self.absolute is not None:
            _positive(self.kind, key, self.absolute, allow_zero=True)
        if self.multiplier is not None:
            _positive(self.kind, "multiplier", self.multiplier, allow_zero=True)

    def spec(self) -> str:
        key = "sigma" if self.kind == "gaussian" else "scale"
        if self.absolute is not None:
            return f"{self.kind}:{key}={self.absolute:g}"
        return f"{self.kind}:multiplier={self.multiplier:g}"

    def apply(self, update: Update, ctx: DefenseContext, trace: PrivacyTrace) -> Update:
        sens = trace.sensitivity
        if self.multiplier is not None:
            if sens is None:
                raise GradleakError(
                    f"{self.spec()} scales with the sensitivity: put a clip (clip:norm=C) before it, "
                    "or give an absolute noise level"
                )
            scale = self.multiplier * sens
        else:
            scale = float(self.absolute)  # type: ignore[arg-type]
        if sens is None:
            if scale > 0:
                trace.unbounded_noise.append(f"{self.kind} noise")
        elif scale > 0:
            l_sens = sens if self.kind == "gaussian" else sens * math.sqrt(numel(update.tensors))
            trace.mechanisms.append((self.kind, scale / l_sens))
        else:
            trace.mechanisms.append((self.kind, 0.0))
        if scale == 0:
            return update
        return update.replace(
            {k: v + _noise(v, ctx.generator, self.kind, scale) for k, v in update.tensors.items()}
        )


@dataclass(frozen=True)
class DpSgd:
    """Per-example clipping to `clip` and Gaussian noise of std `multiplier * clip` on the sum."""

    clip: float
    multiplier: float
    name: str = "dp-sgd"

    def __post_init__(self) -> None:
        _positive(self.name, "clip", self.clip)
        _positive(self.name, "multiplier", self.multiplier, allow_zero=True)

    def spec(self) -> str:
        return f"dp-sgd:clip={self.clip:g},multiplier={self.multiplier:g}"

    def apply(self, update: Update, ctx: DefenseContext, trace: PrivacyTrace) -> Update:
        if update.kind != "fedsgd":
            raise GradleakError("dp-sgd computes a FedSGD gradient; use --protocol fedsgd")
        names = [k for k in update.tensors]
        victim, batch = ctx.need("dp-sgd")
        b = batch.size
        totals = {k: torch.zeros_like(v) for k, v in update.tensors.items()}
        for rows in _chunks(b, sum(v.numel() * v.element_size() for v in update.tensors.values())):
            per = per_example_gradients(victim, _rows(batch, rows), names)
            flat_norms = torch.sqrt(sum(per[k].double().pow(2).flatten(1).sum(1) for k in names))  # (b,)
            factors = (self.clip / flat_norms.clamp_min(1e-12)).clamp(max=1.0)
            for k in names:
                g = per[k]
                totals[k] += (
                    (g * factors.view(-1, *[1] * (g.dim() - 1)).to(g.dtype)).sum(0).to(totals[k].dtype)
                )
            del per
        out = {}
        for k in names:
            total = totals[k]
            if self.multiplier > 0:
                total = total + _noise(total, ctx.generator, "gaussian", self.multiplier * self.clip)
            out[k] = total / b
        trace.sensitivity = self.clip / b
        trace.unit = "example"
        trace.mechanisms.append(("gaussian", self.multiplier))
        return update.replace(out)


@dataclass(frozen=True)
class Prune:
    fraction: float
    method: str = "topk"
    name: str = "prune"

    def __post_init__(self) -> None:
        if not (0 <= self.fraction < 1):
            raise GradleakError(f"prune: fraction must be in [0, 1), got {self.fraction}")
        if self.method not in ("topk", "random"):
            raise GradleakError(f"prune: method must be topk or random, got {self.method!r}")

    def spec(self) -> str:
        return f"prune:fraction={self.fraction:g},method={self.method}"

    def apply(self, update: Update, ctx: DefenseContext, trace: PrivacyTrace) -> Update:
        if self.fraction == 0:
            return update
        flat = torch.cat([v.detach().flatten().abs().double().cpu() for v in update.tensors.values()])
        k = int(self.fraction * flat.numel())
        if k == 0:
            return update
        if self.method == "topk":  # keep the largest magnitudes (DLG, Zhu et al. 2019)
            cut = float(torch.kthvalue(flat, k).values)
            out = {n: torch.where(v.abs() > cut, v, torch.zeros_like(v)) for n, v in update.tensors.items()}
        else:
            out = {}
            for n, v in update.tensors.items():
                u = torch.rand(v.shape, generator=ctx.generator, device=ctx.generator.device)
                out[n] = torch.where(u.to(v.device) >= self.fraction, v, torch.zeros_like(v))
        return update.replace(out)  # never raises the norm: a clip's bound still holds


@dataclass(frozen=True)
class Quantize:
    bits: int
    name: str = "quantize"

    def __post_init__(self) -> None:
        if self.bits not in (8, 16):
            raise GradleakError(f"quantize: bits must be 16 (float16) or 8 (int8), got {self.bits}")

    def spec(self) -> str:
        return f"quantize:bits={self.bits}"

    def apply(self, update: Update, ctx: DefenseContext, trace: PrivacyTrace) -> Update:
        out = {}
        for n, v in update.tensors.items():
            if self.bits == 16:
                out[n] = v.to(torch.float16).to(v.dtype)
            else:
                scale = v.abs().max().clamp_min(1e-30) / 127
                out[n] = torch.round(v / scale).clamp(-127, 127) * scale
        if trace.sensitivity is not None and not trace.mechanisms:
            # rounding can raise the norm: the clip's bound no longer holds exactly
            trace.sensitivity = None
        return update.replace(out)


@dataclass(frozen=True)
class Withhold:
    params: str
    name: str = "withhold"

    def spec(self) -> str:
        return f"withhold:params={self.params}"

    def apply(self, update: Update, ctx: DefenseContext, trace: PrivacyTrace) -> Update:
        victim, _ = ctx.need("withhold")
        drop = set(resolve_withheld(victim.model, [self.params]))
        kept = {k: v for k, v in update.tensors.items() if k not in drop}
        if not kept:
            raise GradleakError(f"withhold:params={self.params} leaves nothing to share")
        return Update(
            kept, update.kind, update.learning_rate, update.local_steps, update.withheld + tuple(sorted(drop))
        )


# ------------------------------------------------------------------ per-example gradients


def per_example_gradients(victim: Victim, batch: Batch, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Gradients (B, *shape) of each example's own loss, for the parameters `names`: torch.func
    (vmap of grad) where the model vectorises, else one example at a time."""
    try:
        return _per_example_vmap(victim, batch, names)
    except RuntimeError as exc:  # data-dependent control flow (e.g. BERT's mask code) defeats vmap
        log.info("per-example gradients one at a time (vmap: %s)", str(exc).splitlines()[0][:80])
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    for i in range(batch.size):
        g = batch_gradient(victim, _subbatch(batch, i))
        for k in names:
            rows[k].append(g[k])
    return {k: torch.stack(v) for k, v in rows.items()}


PER_EXAMPLE_BYTES = 2 * 2**30  # per-example gradients held at once by dp-sgd: chunks of the batch above


def _chunks(size: int, bytes_per_example: int) -> list[range]:
    """The batch's rows in chunks whose per-example gradients take at most PER_EXAMPLE_BYTES (at least
    one example a chunk): DP-SGD's clipped sum is the same, its memory bounded for large models."""
    step = max(1, PER_EXAMPLE_BYTES // max(1, bytes_per_example))
    return [range(i, min(i + step, size)) for i in range(0, size, step)]


def _rows(batch: Batch, rows: range) -> Batch:
    """The batch's rows `rows` (padding kept: the same shapes for vmap)."""
    if rows.start == 0 and rows.stop == batch.size:
        return batch
    sl = slice(rows.start, rows.stop)
    return Batch(
        input_ids=batch.input_ids[sl],
        attention_mask=batch.attention_mask[sl],
        labels=None if batch.labels is None else batch.labels[sl],
        texts=batch.texts[sl],
        token_ids=batch.token_ids[sl],
    )


def _subbatch(batch: Batch, i: int) -> Batch:
    n = int(batch.attention_mask[i].sum())
    return Batch(
        input_ids=batch.input_ids[i : i + 1, :n],
        attention_mask=batch.attention_mask[i : i + 1, :n],
        labels=None if batch.labels is None else batch.labels[i : i + 1],
        texts=batch.texts[i : i + 1],
        token_ids=batch.token_ids[i : i + 1],
    )


def _per_example_vmap(victim: Victim, batch: Batch, names: Sequence[str]) -> dict[str, torch.Tensor]:
    from torch.func import functional_call, grad, vmap

    batch = batch.to(victim.device)
    model = victim.model
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    wanted = {k: params[k] for k in names}
    rest = {k: v for k, v in params.items() if k not in wanted}
    buffers = dict(model.named_buffers())
    labels = batch.input_ids if victim.task == "lm" else batch.labels
    if labels is None:
        raise GradleakError("classification needs labelled data")

    def loss(
        p: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        state = {**rest, **p, **buffers}
        return victim.loss(
            attention_mask=mask[None],
            labels=y[None],
            input_ids=ids[None],
            forward=lambda **kw: functional_call(model, state, (), kw),
        )

    grads = vmap(grad(loss), in_dims=(None, 0, 0, 0))(wanted, batch.input_ids, batch.attention_mask, labels)
    out = {k: g.detach() for k, g in grads.items()}
    if not all(torch.isfinite(g).all() for g in out.values()):
        raise GradleakError("a per-example gradient contains NaN or infinite values")
    return out


# ------------------------------------------------------------------ parsing and chains

Factory = Callable[[dict[str, str]], Defense]


def _num(name: str, key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise GradleakError(f"{name}: {key}={value!r} is not a number") from None


def _keys(name: str, given: dict[str, str], allowed: Sequence[str], required: Sequence[str] = ()) -> None:
    unknown = [k for k in given if k not in allowed]
    if unknown:
        raise GradleakError(f"{name}: unknown key {unknown[0]!r}; keys: {', '.join(allowed)}")
    missing = [k for k in required if k not in given]
    if missing:
        raise GradleakError(f"{name}: missing {missing[0]}=...")


def _clip(kv: dict[str, str]) -> Defense:
    _keys("clip", kv, ("norm",), ("norm",))
    return Clip(_num("clip", "norm", kv["norm"]))


def _noise_factory(kind: str, key: str) -> Factory:
    def make(kv: dict[str, str]) -> Defense:
        _keys(kind, kv, (key, "multiplier"))
        absolute = _num(kind, key, kv[key]) if key in kv else None
        mult = _num(kind, "multiplier", kv["multiplier"]) if "multiplier" in kv else None
        return Noise(kind, absolute, mult)

    return make


def _dp_sgd(kv: dict[str, str]) -> Defense:
    _keys("dp-sgd", kv, ("clip", "multiplier"), ("clip", "multiplier"))
    return DpSgd(_num("dp-sgd", "clip", kv["clip"]), _num("dp-sgd", "multiplier", kv["multiplier"]))


def _prune(kv: dict[str, str]) -> Defense:
    _keys("prune", kv, ("fraction", "method"), ("fraction",))
    return Prune(_num("prune", "fraction", kv["fraction"]), kv.get("method", "topk"))


def _quantize(kv: dict[str, str]) -> Defense:
    _keys("quantize", kv, ("bits",), ("bits",))
    bits = _num("quantize", "bits", kv["bits"])
    if bits != int(bits):
        raise GradleakError(f"quantize: bits must be 16 or 8, got {kv['bits']}")
    return Quantize(int(bits))


def _withhold(kv: dict[str, str]) -> Defense:
    _keys("withhold", kv, ("params",), ("params",))
    return Withhold(kv["params"])


DEFENSES: dict[str, tuple[Factory, str]] = {
    "clip": (_clip, "clip:norm=C  L2-clip the whole update"),
    "gaussian": (_noise_factory("gaussian", "sigma"), "gaussian:sigma=S | gaussian:multiplier=Z"),
    "laplace": (_noise_factory("laplace", "scale"), "laplace:scale=B | laplace:multiplier=Z"),
    "dp-sgd": (_dp_sgd, "dp-sgd:clip=C,multiplier=Z  per-example clip + Gaussian noise"),
    "prune": (_prune, "prune:fraction=P[,method=topk|random]"),
    "quantize": (_quantize, "quantize:bits=16|8"),
    "withhold": (_withhold, "withhold:params=GROUP|PATTERN"),
}


def parse_defense(text: str) -> Defense:
    """`NAME[:key=value,...]` -> a defence object."""
    name, _, rest = text.strip().partition(":")
    if name not in DEFENSES:
        raise GradleakError(f"unknown defence {name!r}: choose one of {', '.join(DEFENSES)}")
    kv: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise GradleakError(f"{name}: expected key=value, got {item!r}")
        kv[key.strip()] = value.strip()
    return DEFENSES[name][0](kv)


@dataclass(frozen=True)
class DefenseChain:
    defenses: tuple[Defense, ...] = ()

    @classmethod
    def parse(cls, texts: Sequence[str]) -> DefenseChain:
        chain = cls(tuple(parse_defense(t) for t in texts))
        chain.validate()
        return chain

    def validate(self) -> None:
        for i, d in enumerate(self.defenses):
            if isinstance(d, DpSgd) and i != 0:
                raise GradleakError("dp-sgd computes the update from the batch: it must be the first defence")

    def perturbs(self) -> bool:
        """Whether the chain adds noise, prunes or quantises (more than clipping or withholding)."""
        for d in self.defenses:
            if isinstance(d, Noise | Prune | Quantize):
                return True
            if isinstance(d, DpSgd) and d.multiplier > 0:
                return True
        return False

    def specs(self) -> list[str]:
        return [d.spec() for d in self.defenses]

    def apply(self, update: Update, ctx: DefenseContext) -> tuple[Update, PrivacyTrace]:
        trace = PrivacyTrace()
        for d in self.defenses:
            update = d.apply(update, ctx, trace)
            log.debug("applied %s: norm %.4g", d.spec(), global_norm(update.tensors))
        bad = [k for k, v in update.tensors.items() if not torch.isfinite(v).all()]
        if bad:
            raise GradleakError(f"the defended update has NaN or infinite values (in {bad[0]})")
        return update, trace

    def __bool__(self) -> bool:
        return bool(self.defenses)

    def __iter__(self):
        return iter(self.defenses)


def describe(chain: DefenseChain | Sequence[Any]) -> str:
    return " -> ".join(d.spec() for d in chain) or "none"
