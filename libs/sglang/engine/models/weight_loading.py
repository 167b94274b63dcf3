"""Map HF checkpoint tensors onto our modules: direct names, fused (stacked) projections, tied heads.

Our module names mirror HF's, except that some projections are fused: ``q_proj``/``k_proj``/
``v_proj`` live in ``qkv_proj`` and ``gate_proj``/``up_proj`` in ``gate_up_proj``. A model lists
those as :class:`StackedParam` rows and calls :func:`load_hf_weights`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sglang.engine.layers.linear import MergedColumnLinear, copy_checked

# Non-learned buffers some checkpoints carry; they are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


@dataclass(frozen=True)
class StackedParam:
    """HF names containing ``part`` (e.g. ``".q_proj."``) load into shard ``shard`` of the
    :class:`MergedColumnLinear` whose name has ``fused`` (e.g. ``".qkv_proj."``) in its place."""

    fused: str
    part: str
    shard: str


LLAMA_STACKED = (
    StackedParam(".qkv_proj.", ".q_proj.", "q"),
    StackedParam(".qkv_proj.", ".k_proj.", "k"),
    StackedParam(".qkv_proj.", ".v_proj.", "v"),
    StackedParam(".gate_up_proj.", ".gate_proj.", "gate"),
    StackedParam(".gate_up_proj.", ".up_proj.", "up"),
)


def load_hf_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked: Sequence[StackedParam] = LLAMA_STACKED,
    tied_names: Sequence[str] = (),
) -> None:
    """Copy every checkpoint tensor into ``model`` (casting dtype, moving device).

    Contract: an unknown name, or a shape mismatch, raises ValueError; after all tensors, any
    parameter (or fused shard) that received nothing raises ValueError listing them. Names in
    ``tied_names`` (e.g. ``lm_head.weight`` of a tied model) are skipped: their parameter is
    shared with another one and is listed once by ``named_parameters()`` under the other name.
    """
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    expected_shards = {
        (f"{mod_name}.{kind}", shard)
        for mod_name, mod in modules.items()
        if isinstance(mod, MergedColumnLinear)
        for kind in ("weight", "bias")
        if getattr(mod, kind) is not None
        for shard in mod.shard_names
    }
    fused_names = {name for name, _ in expected_shards}
    loaded: set[str] = set()
    loaded_shards: set[tuple[str, str]] = set()

    for name, tensor in weights:
        if name.endswith(_IGNORED_SUFFIXES) or name in tied_names:
            continue
        target = _stacked_target(name, stacked)
        if target is not None:
            fused_name, shard = target
            mod_name, kind = fused_name.rsplit(".", 1)
            mod = modules.get(mod_name)
            if not isinstance(mod, MergedColumnLinear) or (fused_name, shard) not in expected_shards:
                raise ValueError(f"checkpoint weight {name!r} has no place in {type(model).__name__}")
            mod.load_shard(shard, kind, tensor)
            loaded_shards.add((fused_name, shard))
            continue
        if name not in params or name in fused_names:
            raise ValueError(f"checkpoint weight {name!r} has no place in {type(model).__name__}")
        copy_checked(params[name].data, tensor, name)
        loaded.add(name)

    missing = sorted(n for n in params if n not in fused_names and n not in loaded)
    missing += sorted(f"{n}[{s}]" for n, s in expected_shards - loaded_shards)
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise ValueError(f"checkpoint lacks weights for {type(model).__name__}: {shown}")


def _stacked_target(name: str, stacked: Sequence[StackedParam]) -> tuple[str, str] | None:
    for row in stacked:
        if row.part in name:
            return name.replace(row.part, row.fused), row.shard
    return None
