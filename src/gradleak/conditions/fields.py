"""The fields a study plots and tabulates: any RunSpec field, plus derived ones (a registry) that read a
run's spec and say in one value what varies (the victim's depth, the noise level, what is shared).

A field is a function of a run's spec (the canonical dict the store keeps) and a column heading."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gradleak.errors import GradleakError
from gradleak.knowledge import Knows
from gradleak.victims import PRESET_SHAPES as _PRESET_SHAPES

Spec = dict[str, Any]

# depth and width of the fixed presets (parametric victims say theirs in their name)
PRESET_SHAPES: dict[str, tuple[int, int]] = dict(_PRESET_SHAPES)


@dataclass(frozen=True)
class Field:
    name: str
    heading: str
    get: Callable[[Spec], Any]


def victim_params(victim: str) -> tuple[str, dict[str, str]]:
    """`gpt2-random:layers=2,hidden=256,heads=4` -> ("gpt2-random", {"layers": "2", ...})."""
    family, _, rest = victim.partition(":")
    params = dict(p.split("=", 1) for p in rest.split(",") if "=" in p)
    return family, params


def _shape(spec: Spec, index: int, key: str) -> int | None:
    family, params = victim_params(str(spec.get("victim", "")))
    if key in params:
        try:
            return int(params[key])
        except ValueError:
            return None
    shape = PRESET_SHAPES.get(family)
    return None if shape is None else shape[index]


def _family(spec: Spec) -> str:
    family, _ = victim_params(str(spec.get("victim", "")))
    return family


def _noise(spec: Spec, family: str) -> float:
    """The absolute sigma (`family="sigma"`) or DP-SGD multiplier of the chain; 0 without one."""
    from gradleak.report.data import noise_level

    level = noise_level(tuple(spec.get("defenses", ())))
    return level.value if level is not None and level.family == family else 0.0


def _shared(spec: Spec) -> str:
    parts: list[str] = []
    share = tuple(spec.get("share", ()))
    if share:
        parts.append("only " + ", ".join(_group(s) for s in share))
    withhold = tuple(spec.get("withhold", ()))
    if withhold:
        parts.append(("all but " if not share else "minus ") + ", ".join(withhold))
    if spec.get("protocol") == "fedavg":
        steps = int(spec.get("local_steps", 1))
        parts.append(f"FedAvg delta, {steps} local step{'s' if steps != 1 else ''}")
    return "; ".join(parts) or "all gradients"


def _group(text: str) -> str:
    if text.startswith("last:"):
        k = text.split(":", 1)[1]
        return f"last {k} layer{'s' if k != '1' else ''}"
    return text


_DEFAULT_KNOWS = Knows()  # what a spec without the known_* fields means: the server's default


def _knowledge(spec: Spec) -> str:
    known = [
        name
        for name, key, default in (
            ("labels", "known_labels", _DEFAULT_KNOWS.labels),
            ("lengths", "known_lengths", _DEFAULT_KNOWS.lengths),
            ("B", "known_batch_size", _DEFAULT_KNOWS.batch_size),
        )
        if spec.get(key, default)
    ]
    return "+".join(known) if known else "nothing"


def _length(spec: Spec) -> str:
    data, max_length = str(spec.get("data", "")), int(spec.get("max_length", 0))
    if int(spec.get("min_tokens", 0) or 0) >= max_length:
        return f"{data} {max_length} tok"
    return f"{data} (≤{max_length} tok)"


def _stage(spec: Spec) -> str:
    steps = int(spec.get("finetune_steps", 0) or 0)
    victim = str(spec.get("victim", ""))
    return f"{victim} + {steps} fine-tuning steps" if steps else victim


def _lora(spec: Spec, key: str) -> Any:
    """The LoRA rank or targets of a run's `peft` (None for the full model)."""
    text = spec.get("peft")
    if not text:
        return None
    from gradleak.adapters import parse_peft

    lora = parse_peft(str(text))
    return lora.r if key == "r" else "+".join(lora.targets)


DERIVED: dict[str, Field] = {
    f.name: f
    for f in (
        Field("family", "architecture", _family),
        Field("layers", "layers", lambda s: _shape(s, 0, "layers")),
        Field("hidden", "hidden", lambda s: _shape(s, 1, "hidden")),
        Field("sigma", "σ (absolute)", lambda s: _noise(s, "sigma")),
        Field("multiplier", "DP-SGD multiplier", lambda s: _noise(s, "multiplier")),
        Field("shared", "shared", _shared),
        Field("knowledge", "server knows", _knowledge),
        Field("length", "sequences", _length),
        Field("stage", "victim", _stage),
        Field("forced", "forced", lambda s: "forced" if s.get("force") else ""),
        Field("lora_r", "LoRA r", lambda s: _lora(s, "r")),
        Field("lora_targets", "LoRA targets", lambda s: _lora(s, "targets")),
    )
}

HEADINGS = {
    "batch_size": "B",
    "known_labels": "labels known",
    "known_lengths": "lengths known",
    "known_batch_size": "B known",
    "finetune_steps": "fine-tuning steps",
    "local_steps": "local steps",
    "max_length": "max tokens",
    "defenses": "defence",
}


def get_field(name: str, source: str = "study") -> Field:
    """A derived field, or a RunSpec field by name; anything else is a one-line error."""
    if name in DERIVED:
        return DERIVED[name]
    from gradleak.experiment import RunSpec

    names = set(RunSpec.__dataclass_fields__)
    if name not in names:
        raise GradleakError(
            f"{source}: unknown field {name!r}: a RunSpec field or one of {', '.join(DERIVED)}"
        )
    return Field(name, HEADINGS.get(name, name.replace("_", " ")), lambda s: s.get(name))


def show(value: Any) -> str:
    """A field's value as table text."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else "∞"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "none"
    return "—" if value is None else str(value)
