"""What patching puts into a model, and the checks an adapter or a mapping passes first.

The ``moe_lora`` experts implementation (``moe_lora_experts``, registered in transformers'
``ALL_EXPERTS_FUNCTIONS``) calls the ``_PatchedExperts`` object a patched experts module carries:
``fused_experts`` with the block's LoRA table and the model's slot mapping. ``check_rank`` and
``check_finite`` refuse an adapter before anything is written; ``Names`` is a mapping as the caller
gives it (an adapter per batch row, or per sequence of a packed batch).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .adapters import AdapterLoRA
from .linear import SlotMapping, lora_table_dtype
from .lora import ExpertLoRASlots
from .models import ExpertsSpec, MoEBlock
from .ops.fused_experts import fused_experts
from .parallel import ExpertSharding

EXPERTS_IMPLEMENTATION = "moe_lora"
"""The name of our experts implementation in ``ALL_EXPERTS_FUNCTIONS``."""

STATE_ATTR = "_moe_lora"


class PatchedExperts:
    """What the patched experts of one block read: their spec, LoRA table, the row mapping and,
    under parallelism, this rank's sharding (local expert ids, then one all-reduce of the output)."""

    def __init__(
        self, spec: ExpertsSpec, table: ExpertLoRASlots, mapping: SlotMapping, sharding: ExpertSharding | None
    ):
        self.spec, self.table, self.mapping, self.sharding = spec, table, mapping, sharding

    def __call__(self, experts: nn.Module, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        token_lora = self.mapping.token_slots(x.shape[0], x.device)
        lora = None if token_lora is None else self.table.weights
        if self.sharding is not None:
            topk_ids = self.sharding.local_ids(topk_ids, self.table.num_experts)
        out = fused_experts(x, topk_ids, topk_weights, token_lora=token_lora, lora=lora, **self.spec.op_kwargs(experts))
        return out if self.sharding is None else self.sharding.reduce(out)


def moe_lora_experts(
    experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The ``moe_lora`` experts implementation: ``fused_experts`` with the module's LoRA table.

    Args:
        experts: a patched interface experts module.
        hidden_states: ``[T, H]``; top_k_index: ``[T, K]`` int64; top_k_weights: ``[T, K]`` float.

    Returns:
        ``[T, H]`` in ``hidden_states.dtype``.
    """
    return getattr(experts, STATE_ATTR)(experts, hidden_states, top_k_index, top_k_weights)


def is_interface_block(block: MoEBlock) -> bool:
    return block.family.whole_block is None


def check_rank(adapter: AdapterLoRA, max_rank: int, joined: bool = False) -> None:
    if adapter.rank <= max_rank:
        return
    how = (
        " (its per-expert gate and up LoRAs joined into one gate_up LoRA of rank r_gate + r_up: the tables "
        "were built without separate gate/up slots)"
        if joined
        else ""
    )
    raise ValueError(
        f"adapter {adapter.name!r}: rank {adapter.rank}{how} > the tables' max_rank {max_rank} (every slot is "
        "padded to max_rank; give patch_model a max_rank as large as the largest adapter you will load)"
    )


def check_finite(adapter: AdapterLoRA, source, model: nn.Module, blocks: list[MoEBlock]) -> None:
    """Refuses an adapter with a NaN or Inf in its weights or scales, or with values that overflow
    the dtype of the table they go into: such an adapter is broken, and the GPU experts kernels add
    ``0 * B`` of every slot present in a block to the rows of the others (exactly zero for a finite
    B only).

    Raises:
        ValueError: naming the adapter, its directory and the module.
    """
    where = f"adapter {adapter.name!r}"
    if isinstance(source, (str, os.PathLike)):
        where += f" ({os.fspath(source)})"
    block_dtype = {b.name: b.dtype for b in blocks}
    checks = []
    for name, lora in adapter.linears.items():
        dtype = lora_table_dtype(model.get_submodule(name), model)
        checks += [
            (f"{name} lora_A", lora.a, dtype),
            (f"{name} lora_B", lora.b, dtype),
            (f"{name} scale", lora.scale, None),
        ]
    for name, lora in adapter.experts.items():
        for role in ("gate_up", "gate", "up", "down"):
            pair = getattr(lora, role)
            if pair is not None:
                checks += [(f"{name} experts {role} lora_A", pair[0], block_dtype[name])]
                checks += [(f"{name} experts {role} lora_B", pair[1], block_dtype[name])]
        checks += [(f"{name} experts gate_up scale", lora.gate_up_scale, None)]
        checks += [(f"{name} experts down scale", lora.down_scale, None)]
    for what, value, dtype in checks:
        if dtype is None:
            if not math.isfinite(value):
                raise ValueError(f"{where}: {what} is {value}")
        elif not torch.isfinite(value).all():
            raise ValueError(f"{where}: {what} holds NaN or Inf")
        elif not torch.isfinite(value.to(dtype)).all():
            raise ValueError(
                f"{where}: {what} overflows {dtype}, the model's dtype (largest |value| {value.abs().max().item():.3g})"
            )


class Names(NamedTuple):
    """A mapping as given: an adapter name (or None) per batch row, or per sequence of a packed batch
    with the sequences' token counts (``lengths``; None for batch rows)."""

    names: list[str | None]
    lengths: list[int] | None

    def token_slots(self, slot_of: Mapping[str, int]) -> list[int]:
        slots = [-1 if n is None else slot_of[n] for n in self.names]
        if self.lengths is None:
            return slots
        return [slot for slot, length in zip(slots, self.lengths) for _ in range(length)]


def as_names(names, lengths) -> Names | None:
    """``names`` (and ``lengths``) as ``Names``, or None; raises TypeError/ValueError for anything else."""
    if names is None:
        if lengths is not None:
            raise TypeError("set_adapters: lengths without names; give one adapter name (or None) per sequence")
        return None
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(
            f"names must be a sequence of adapter names (or None), one per batch row, or None; got "
            f"{type(names).__name__} {names!r}"
            + (f" (for one row, write [{names!r}])" if isinstance(names, str) else "")
        )
    names = list(names)
    bad = [n for n in names if n is not None and not isinstance(n, str)]
    if bad:
        raise TypeError(f"names must hold adapter names (str) or None, got {bad!r}")
    if not names:
        raise ValueError("names is empty; give one adapter name (or None) per batch row, or None for no mapping")
    if lengths is not None:
        if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence):
            raise TypeError(f"lengths must be a sequence of ints (tokens per sequence), got {type(lengths).__name__}")
        lengths = list(lengths)
        if len(lengths) != len(names) or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
            raise TypeError(f"lengths must hold one positive int per name ({len(names)} names), got {lengths!r}")
    return Names(names, lengths)
