"""Where the exact attack looks, found from the model's structure rather than from its name.

A transformer's layers are its longest `nn.ModuleList`. A probe forward pass groups each layer's
linear maps (nn.Linear or GPT-2's Conv1D) by the tensor they read: the first group is the
attention's input projections (BERT's query/key/value, GPT-2's c_attn). Inputs to a map are
captured with a forward hook that stops the pass as soon as it has what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradleak.errors import Refusal
from gradleak.victims import Victim


class _Stop(Exception):
    pass


@dataclass(frozen=True)
class Projection:
    name: str  # parameter name of the weight
    transposed: bool  # Conv1D stores (in, out); nn.Linear stores (out, in)
    reads: str | None = None  # the weight whose output this map reads (LoRA's B reads A's output)
    # the outermost module that receives this map's input (or, with `reads`, its reader's input)
    # first: capturing there skips the work in between (a LoRA-adapted map runs its frozen base first)
    entry: str | None = None


def _is_projection(module: nn.Module) -> bool:
    """A linear map that trains: frozen maps (the base of a LoRA-adapted model) share no gradient."""
    linear = isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
    return linear and bool(module.weight.requires_grad)


def layer_blocks(model: nn.Module) -> nn.ModuleList:
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise Refusal("the exact attack does not understand this model: it has no list of layers")
    return max(lists, key=len)


def position_embedding(model: nn.Module) -> tuple[str, nn.Embedding] | None:
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    word = model.get_input_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module is not word and module.num_embeddings == limit:
            return name, module
    return None


def word_embedding_name(model: nn.Module) -> str:
    word = model.get_input_embeddings().weight
    return next(n for n, p in model.named_parameters() if p is word)


def projection_groups(victim: Victim, block: int) -> list[tuple[Projection, ...]]:
    """The block's linear maps, grouped by the input they read, in the order the forward runs them.

    BERT: (query, key, value), (attention output), (intermediate), (output); GPT-2: (c_attn),
    (attn.c_proj), (mlp.c_fc), (mlp.c_proj). LoRA-adapted maps (only the adapters train): the A
    factors that read one input form a group, and each B factor, which reads its A's output, a group
    of its own (`Projection.reads` names that A).
    """
    model = victim.model
    target = layer_blocks(model)[block]
    seen: list[tuple[str, nn.Module, torch.Tensor]] = []
    outputs: list[tuple[str, torch.Tensor]] = []
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, args):
        seen.append((names[module], module, args[0]))  # tensors kept alive: compared by identity

    def out_hook(module, args, output):
        outputs.append((f"{names[module]}.weight", output))

    entered: list[tuple[str, object]] = []

    def entry_hook(module, args, kwargs):
        entered.append((names[module], args[0] if args else kwargs.get("hidden_states")))

    for module in target.modules():
        if _is_projection(module):
            handles.append(module.register_forward_pre_hook(hook))
            handles.append(module.register_forward_hook(out_hook))
        elif module is not target:
            handles.append(module.register_forward_pre_hook(entry_hook, with_kwargs=True))

    def done(module, args, output):
        raise _Stop  # the block has run: nothing after it matters

    handles.append(target.register_forward_hook(done))
    try:
        ids = torch.zeros(1, 3, dtype=torch.long, device=victim.device)
        with torch.no_grad():
            model(**victim.model_inputs(attention_mask=torch.ones_like(ids), input_ids=ids))
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[torch.Tensor, list[Projection]]] = []
    entries: dict[str, str | None] = {}
    for name, module, tensor in seen:
        reads = next((w for w, out in outputs if out is tensor), None)
        if reads is not None:
            entry = entries.get(reads)
        else:
            entry = next((m for m, t in entered if t is tensor and name.startswith(m + ".")), None)
        entries[f"{name}.weight"] = entry
        proj = Projection(f"{name}.weight", type(module).__name__ == "Conv1D", reads, entry)
        for held, members in groups:
            if held is tensor:
                members.append(proj)
                break
        else:
            groups.append((tensor, [proj]))
    if not groups:
        raise Refusal(
            f"the exact attack does not understand this model: block {block} has no linear map that "
            "trains (nothing of it is in the update)"
        )
    if len(groups) < 2:
        raise Refusal(
            f"the exact attack does not understand this model: block {block} has {len(groups)} group(s) "
            "of linear maps by input, not the attention's input projections followed by others"
        )
    return [tuple(members) for _, members in groups]


def attention_projections(victim: Victim, block: int) -> tuple[Projection, ...]:
    """The projections that read the block's input: query, key and value."""
    return projection_groups(victim, block)[0]


def context_projections(victim: Victim, block: int) -> tuple[Projection, ...]:
    """The last hidden-width group of the block (the MLP input): it reads each token after the
    block's attention has mixed in its context, and every token's row enters its gradient."""
    return context_views(victim, block)[0]


def context_views(victim: Victim, block: int) -> list[tuple[Projection, ...]]:
    """Groups whose input depends on each token's context, first choice first: the block's last
    hidden-width group after its attention (the MLP input) and the factors that read it, then the next
    block's input views (for an update without the MLP's gradient: LoRA on the attention only, or a
    client that shares the attention weights only)."""
    hidden = victim.hidden_size
    groups = projection_groups(victim, block)
    wide = [g for g in groups[1:] if _in_features(victim, g[0]) == hidden and g[0].reads is None]
    views = [wide[-1], *chained(groups, wide[-1])] if wide else []
    # where the MLP is withheld or frozen: the next block's input, unless that block is the last (a
    # classifier's last attention passes on its pooled position only, so its gradient holds weighted sums
    # per sequence and head, not each token's input)
    if block + 2 < len(layer_blocks(victim.model)):
        views += input_views(victim, block + 1)
    if views:
        return views
    raise Refusal(
        f"the exact attack does not understand this model: block {block} has no linear map after "
        f"its attention that reads the hidden width {hidden}"
    )


def chained(
    groups: list[tuple[Projection, ...]], group: tuple[Projection, ...]
) -> list[tuple[Projection, ...]]:
    """The groups that read the outputs of `group`'s maps (LoRA's B factors after their A's)."""
    names = {p.name for p in group}
    return [g for g in groups if g[0].reads in names]


def input_views(victim: Victim, block: int) -> list[tuple[Projection, ...]]:
    """Where the block's input shows in the update, first choice first: the projections that read it
    (query/key/value, or their LoRA A factors), then each map that reads one of their outputs (a LoRA
    B factor: its gradient spans the input seen through A, which holds even where B = 0 leaves
    A's gradient zero)."""
    groups = projection_groups(victim, block)
    return [groups[0], *chained(groups, groups[0])]


def pick_view(
    gradients: dict[str, torch.Tensor], views: list[tuple[Projection, ...]]
) -> tuple[Projection, ...]:
    """Of the views whose maps are all in the update with a non-zero gradient, those whose span shows a
    clean rank (all of them where none does): the first view if it is one of them, else the factor view
    whose gradient spans the most (a query sees nothing of a sequence's first token, which attends to
    itself alone: a value sees every token). The first present view where every gradient is zero, the
    first view where none is present: the caller refuses."""
    from gradleak.attacks.spans import span_of

    present = [v for v in views if all(p.name in gradients for p in v)]
    live = [v for v in present if any(bool(gradients[p.name].detach().abs().max() > 0) for p in v)]
    if len(live) < 2:
        return (live or present or views)[0]
    spans = [span_of(gradient_rows(gradients, v)) for v in live]
    # a view with a clean rank first: float32 weights blur a small change of A (FedAvg rounds after the
    # first) where B's, larger relative to its weights, still shows its rank
    pairs = list(zip(live, spans, strict=True))
    pool = [(v, s) for v, s in pairs if not s.full] or pairs
    if pool[0][0] is views[0]:
        return views[0]
    return max(pool, key=lambda item: item[1].rank)[0]


def row_cap(victim: Victim, projections: tuple[Projection, ...]) -> int:
    """The most dimensions the projections' stacked gradient rows can span: their input width, or the
    number of rows where fewer (LoRA's A factors have r rows each)."""
    rows = 0
    for p in projections:
        weight = victim.model.get_parameter(p.name)
        rows += int(weight.shape[1] if p.transposed else weight.shape[0])
    return min(rows, _in_features(victim, projections[0]))


def mixing_projections(victim: Victim, block: int) -> tuple[Projection, ...]:
    """The group right after the attention's input projections: the attention's output projection,
    which reads each position's context (the softmax-weighted values) before anything else."""
    return projection_groups(victim, block)[1]


def _in_features(victim: Victim, proj: Projection) -> int:
    weight = victim.model.get_parameter(proj.name)
    return int(weight.shape[0] if proj.transposed else weight.shape[1])


def capture_input(
    victim: Victim,
    proj: Projection,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The input (B, L, d) to the projection `proj` for these token ids (the pass stops there)."""
    module = stop_module(victim, proj)
    captured: list[torch.Tensor] = []

    def hook(mod, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    kwargs = victim.model_inputs(
        attention_mask=attention_mask, input_ids=input_ids, position_ids=position_ids
    )
    try:
        with torch.no_grad():
            victim.model(**kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return lift(victim, proj, captured[0])


def stop_module(victim: Victim, proj: Projection) -> nn.Module:
    """Where a pass that wants `proj`'s input can stop (`Projection.entry`)."""
    return victim.model.get_submodule(proj.entry or (proj.reads or proj.name).rsplit(".", 1)[0])


def lift(victim: Victim, proj: Projection, x: torch.Tensor) -> torch.Tensor:
    """`proj`'s input from the input captured at its stop module: through the map it reads (LoRA's A
    factor; its dropout is off in eval mode), else as is."""
    if proj.reads is None:
        return x
    reader = victim.model.get_submodule(proj.reads.rsplit(".", 1)[0])
    with torch.no_grad():
        return reader(x).detach()


def gradient_rows(gradients: dict[str, torch.Tensor], projections: tuple[Projection, ...]) -> torch.Tensor:
    """Stack the projections' weight gradients so that their rows span the inputs that occurred."""
    mats = []
    for p in projections:
        g = gradients[p.name].detach().to(torch.float64).cpu()
        mats.append(g.T if p.transposed else g)
    return torch.cat(mats, dim=0)


def is_causal(victim: Victim) -> bool:
    """Whether the first block's attention is causal: changing the last token of a probe sequence
    leaves the earlier positions' context inputs unchanged (decoders) or not (encoders)."""
    proj = context_projections(victim, 0)[0]
    vocab = victim.model.get_input_embeddings().weight.shape[0]
    ids = torch.tensor([[1, 2, 3], [1, 2, 4]], device=victim.device) % vocab
    x = capture_input(victim, proj, ids)
    diff = (x[0] - x[1]).abs().amax(-1)
    return bool(diff[:2].max() < 1e-3 * diff[2])  # rounding differs between rows; context does not


def token_local(victim: Victim, proj: Projection) -> bool:
    """Whether the projection reads each token on its own (the first attention's input: embeddings,
    normed): changing an earlier token leaves the last position's input unchanged. An MLP's input
    has the attention's context mixed in."""
    vocab = victim.model.get_input_embeddings().weight.shape[0]
    ids = torch.tensor([[1, 2, 3], [4, 2, 3]], device=victim.device) % vocab
    x = capture_input(victim, proj, ids)[:, -1]
    return bool((x[0] - x[1]).abs().max() <= 1e-6 * x[0].abs().max())


def position_free(victim: Victim, proj: Projection) -> bool:
    """Whether the projection's input carries no position (rotary models: positions enter inside the
    attention, so the first layer reads each token alone); absolute position embeddings add to it."""
    vocab = victim.model.get_input_embeddings().weight.shape[0]
    ids = torch.tensor([[1, 2, 3]], device=victim.device) % vocab
    a = capture_input(victim, proj, ids)
    b = capture_input(victim, proj, ids, position_ids=torch.tensor([[7, 9, 12]], device=victim.device))
    return bool((a - b).abs().max() <= 1e-6 * a.abs().max())
