"""Parameter-efficient fine-tuning: LoRA adapters on a frozen victim, through the `peft` library.

`--peft lora:r=8,alpha=16,targets=q_proj+v_proj[,dropout=0.05][,bias=none]` wraps the victim's
linear maps in LoRA adapters (`peft.LoraConfig` + `get_peft_model`); everything else is frozen, so
the client's update (`client.batch_gradient`, `client.fedavg`) holds the adapter tensors only, plus a
classifier's fresh head, which has to train (peft's `modules_to_save`). Targets are module-name
suffixes (`q_proj`, `attn.c_attn`) or roles found from the module tree: `attention` (the linear maps
inside attention modules), `mlp` (the other linear maps inside the transformer blocks) and
`all-linear` (both). With LoRA's usual initialisation (B = 0) the first round's gradient of every A
is zero; `--finetune-steps` trains the adapters first, as later rounds see them.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import torch
from torch import nn

from gradleak.errors import GradleakError

log = logging.getLogger(__name__)

PEFT_SYNTAX = "lora:r=INT[,alpha=FLOAT][,targets=NAME+NAME...][,dropout=FLOAT][,bias=none|all|lora_only]"
ROLES = ("attention", "mlp", "all-linear")
BIASES = ("none", "all", "lora_only")
DEFAULT_TARGETS = ("attention",)


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA configuration: rank, scale alpha (the update is B A x * alpha / r), the targeted maps."""

    r: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    bias: str = "none"

    def describe(self) -> str:
        return f"LoRA r={self.r}, alpha={self.alpha:g}, targets {'+'.join(self.targets)}"


def parse_peft(text: str) -> LoraSpec:
    """`lora:r=8,alpha=16,targets=q_proj+v_proj` as a LoraSpec; anything else is a one-line error."""
    method, _, rest = text.strip().partition(":")
    if method != "lora":
        raise GradleakError(f"unknown PEFT method {method!r} in {text!r}; write {PEFT_SYNTAX}")
    fields: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not value:
            raise GradleakError(f"--peft {text!r}: {item!r} is not KEY=VALUE; write {PEFT_SYNTAX}")
        if key not in ("r", "alpha", "targets", "dropout", "bias"):
            raise GradleakError(f"--peft {text!r}: unknown key {key!r}; write {PEFT_SYNTAX}")
        fields[key] = value
    if "r" not in fields:
        raise GradleakError(f"--peft {text!r}: the rank r is required; write {PEFT_SYNTAX}")
    r = _number(text, "r", fields["r"], int)
    if r < 1:
        raise GradleakError(f"--peft {text!r}: the rank r must be at least 1, got {r}")
    alpha = _number(text, "alpha", fields.get("alpha", str(2 * r)), float)
    if not alpha > 0:
        raise GradleakError(f"--peft {text!r}: alpha must be > 0, got {alpha:g}")
    dropout = _number(text, "dropout", fields.get("dropout", "0"), float)
    if not 0 <= dropout < 1:
        raise GradleakError(f"--peft {text!r}: dropout must lie in [0, 1), got {dropout:g}")
    bias = fields.get("bias", "none")
    if bias not in BIASES:
        raise GradleakError(f"--peft {text!r}: bias must be one of {', '.join(BIASES)}, got {bias!r}")
    targets = tuple(t for t in fields.get("targets", "+".join(DEFAULT_TARGETS)).split("+") if t)
    if not targets:
        raise GradleakError(f"--peft {text!r}: no targets")
    return LoraSpec(r=r, alpha=alpha, targets=targets, dropout=dropout, bias=bias)


def _number(text: str, key: str, value: str, kind: type) -> int | float:
    try:
        return kind(value)
    except ValueError:
        raise GradleakError(f"--peft {text!r}: {key} must be a number, got {value!r}") from None


# ---------------------------------------------------------------- targets from the module tree


def _is_linear_map(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's Conv1D


def _blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise GradleakError("--peft: the model has no list of transformer blocks")
    return max(lists, key=lambda item: len(item[1]))


def linear_maps(model: nn.Module) -> dict[str, str]:
    """Every linear map inside the transformer blocks, by module name, with its role."""
    name, _ = _blocks(model)
    attention = [
        n
        for n, m in model.named_modules()
        if n.startswith(name + ".") and type(m).__name__.endswith("Attention")
    ]
    out: dict[str, str] = {}
    for n, m in model.named_modules():
        if n.startswith(name + ".") and _is_linear_map(m):
            inside = any(n.startswith(a + ".") for a in attention)
            out[n] = "attention" if inside else "mlp"
    return out


def resolve_targets(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Full module names of the targeted linear maps; a target that matches none is a one-line error
    that lists what the model has."""
    maps = linear_maps(model)
    chosen: set[str] = set()
    for target in spec.targets:
        if target in ROLES:
            hits = [n for n, role in maps.items() if target == "all-linear" or role == target]
        else:
            hits = [n for n in maps if n == target or n.endswith("." + target) or fnmatch.fnmatch(n, target)]
        if not hits:
            known = sorted({n.rsplit(".", 1)[-1] for n in maps})
            raise GradleakError(
                f"--peft target {target!r} matches no linear map of the model; it has "
                f"{', '.join(known)} (roles: {', '.join(ROLES)})"
            )
        chosen.update(hits)
    return sorted(chosen, key=list(maps).index)


def _head_modules(model: nn.Module, num_labels: int) -> list[str]:
    """A classifier's head (the last linear map to the label space, outside the blocks): it is fresh,
    so it trains beside the adapters (peft's modules_to_save)."""
    name, _ = _blocks(model)
    heads = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == num_labels and not n.startswith(name + ".")
    ]
    return heads[-1:]


def apply_lora(model: nn.Module, spec: LoraSpec, *, task: str, num_labels: int, seed: int) -> nn.Module:
    """The model with LoRA adapters on the targeted maps (seeded A), the base frozen."""
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(model, spec)
    head = _head_modules(model, num_labels) if task == "classify" else []
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        target_modules=targets,
        lora_dropout=spec.dropout,
        bias=spec.bias,
        modules_to_save=head or None,
        fan_in_fan_out=any(type(model.get_submodule(t)).__name__ == "Conv1D" for t in targets),
    )
    torch.manual_seed(seed)
    try:
        wrapped = get_peft_model(model, config)
    except (ValueError, TypeError) as exc:
        raise GradleakError(f"--peft: peft refused the configuration: {str(exc).splitlines()[0]}") from None
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    log.info("%s on %d maps: %d trainable parameters", spec.describe(), len(targets), trainable)
    return wrapped


def adapter_summary(model: nn.Module) -> dict[str, list[int]]:
    """Name -> shape of every tensor a PEFT client shares (its trainable parameters)."""
    return {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def is_adapter(name: str) -> bool:
    return ".lora_" in name


def check_sharing(model: nn.Module, share: tuple[str, ...], withhold: tuple[str, ...]) -> None:
    """Under PEFT the client sends only what trains: a share or withhold item that selects only
    frozen parameters means nothing, and withholding every adapter leaves nothing to send; both are
    one-line errors."""
    from gradleak.client import resolve_shared, resolve_withheld

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for item in share:
        if not set(resolve_shared(model, (item,))) & trainable:
            raise GradleakError(
                f"--share {item!r} selects only frozen parameters: under --peft the client sends the adapters"
            )
    withheld: set[str] = set()
    for item in withhold:
        hits = set(resolve_withheld(model, (item,)))
        if not hits & trainable:
            raise GradleakError(
                f"--withhold {item!r} selects only frozen parameters: under --peft the client sends only "
                "the adapters (and a classifier's head), which it does not touch"
            )
        withheld |= hits
    adapters = {n for n in trainable if is_adapter(n)}
    if adapters and adapters <= withheld:
        raise GradleakError("--withhold covers every adapter tensor: the client would send no adapter")


def shared_summary(model: nn.Module, tensors: dict[str, torch.Tensor], peft: str | None) -> dict[str, object]:
    """What the update holds, for the record: tensor and parameter counts; under PEFT also the LoRA
    configuration and every shared tensor's name and shape."""
    out: dict[str, object] = {
        "tensors": len(tensors),
        "parameters": int(sum(t.numel() for t in tensors.values())),
    }
    if peft:
        spec = parse_peft(peft)
        out["peft"] = {
            "method": "lora",
            "r": spec.r,
            "alpha": spec.alpha,
            "targets": list(spec.targets),
            "adapter_tensors": sum(1 for n in tensors if is_adapter(n)),
            "shapes": {n: list(t.shape) for n, t in tensors.items()},
        }
    return out
