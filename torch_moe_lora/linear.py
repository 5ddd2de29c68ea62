"""Per-token multi-LoRA for ``nn.Linear`` layers, and the row-to-slot mapping the patched layers share.

``MultiLoRALinear`` keeps every resident adapter in one fixed slot table and applies, to each token,
the adapter of its slot, with static shapes and no host synchronisation: one shrink over all slots'
stacked A, a mask that keeps only the columns of the token's slot (scaled), and one expand. That
costs ``L * R * (in + out)`` multiply-adds per token for ``L`` slots of rank ``R``, ``L`` times what
a single adapter needs, plus a ``[T, L * R]`` mask; for the attention and shared-expert projections of
an MoE model with a handful of adapters this is small next to the base GEMM. (A grouped kernel
over (slot, token) segments would cost one adapter's work; it is not needed at these sizes.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RowSlots:
    """The adapter slot of each batch row, shared by every patched layer of one model.

    ``row_slot`` is ``[B]`` int64 (``-1``: no adapter) or None for no mapping (layers then skip LoRA).
    It is rewritten in place while ``B`` stays the same, so compiled code and captured graphs that
    read it see new mappings without recompiling. Layers see hidden states flattened row-major from
    ``[B, S, ...]`` to ``[B * S, ...]``, so token ``t`` belongs to row ``t // S``.
    """

    def __init__(self) -> None:
        self.row_slot: torch.Tensor | None = None

    def set(self, slots: list[int], device: torch.device) -> None:
        """Maps row ``i`` to ``slots[i]`` (``-1`` for none), in place when the row count is unchanged."""
        new = torch.tensor(slots, dtype=torch.int64)
        if self.row_slot is not None and self.row_slot.shape == new.shape and self.row_slot.device == device:
            self.row_slot.copy_(new)
        else:
            self.row_slot = new.to(device)

    def clear(self) -> None:
        """Removes the mapping: every layer computes the base model."""
        self.row_slot = None

    def token_slots(self, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """The slot of each of ``num_tokens`` row-major tokens, ``[num_tokens]`` int64, or None.

        Raises:
            ValueError: ``num_tokens`` is not a multiple of the mapped row count.
        """
        row_slot = self.row_slot
        if row_slot is None:
            return None
        rows = row_slot.shape[0]
        if num_tokens % rows != 0:
            raise ValueError(
                f"a patched layer got {num_tokens} tokens, not a multiple of the {rows} batch rows given to "
                "set_adapters; set one adapter name (or None) per batch row"
            )
        return row_slot.to(device)[:, None].expand(rows, num_tokens // rows).reshape(num_tokens)


class MultiLoRALinear(nn.Linear):
    """An ``nn.Linear`` that adds, to each token, the LoRA of its adapter slot.

    ``y = x W^T + b + scale[s] * B[s] (A[s] x)`` with ``s`` the token's slot (no LoRA for ``-1``).
    It shares the wrapped layer's ``weight`` and ``bias`` (no copy); the slot table is held in
    non-persistent buffers, so ``state_dict`` is the wrapped layer's.

    Buffers (the weight's dtype and device unless noted):

    * ``lora_a [L, R, in]``: shrink matrices, rank rows past an adapter's ``r`` are zero.
    * ``lora_b_columns [out, L * R]``: expand matrices, slot-major columns (``lora_b`` is the
      ``[L, out, R]`` view), so one GEMM expands all slots.
    * ``lora_scale [L]`` float32: per-slot scaling (PEFT's ``alpha / r``).
    * ``slot_of_column [L * R]`` int64: the slot each shrink column belongs to.

    Args:
        linear: the ``nn.Linear`` to wrap (a plain one: subclasses that override ``forward`` are not).
        num_slots: ``L``, adapters resident at once.
        max_rank: ``R``.
        row_slots: the model's shared ``RowSlots``.
    """

    def __init__(self, linear: nn.Linear, num_slots: int, max_rank: int, row_slots: RowSlots):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.num_slots, self.max_rank, self.row_slots = num_slots, max_rank, row_slots
        self.train(linear.training)
        kw = dict(dtype=linear.weight.dtype, device=linear.weight.device)
        columns = num_slots * max_rank
        self.register_buffer("lora_a", torch.zeros(num_slots, max_rank, self.in_features, **kw), persistent=False)
        self.register_buffer("lora_b_columns", torch.zeros(self.out_features, columns, **kw), persistent=False)
        self.register_buffer(
            "lora_scale", torch.zeros(num_slots, dtype=torch.float32, device=kw["device"]), persistent=False
        )
        slot_of_column = torch.arange(num_slots, device=kw["device"]).repeat_interleave(max_rank)
        self.register_buffer("slot_of_column", slot_of_column, persistent=False)

    @property
    def lora_b(self) -> torch.Tensor:
        """The expand matrices as ``[L, out, R]`` (a view of ``lora_b_columns``)."""
        return self.lora_b_columns.view(self.out_features, self.num_slots, self.max_rank).permute(1, 0, 2)

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Writes one adapter into ``slot`` in place.

        Args:
            slot: in ``[0, L)``.
            a: ``[r, in]``; b: ``[out, r]`` with ``r <= R`` (any float dtype and device).
            scale: the LoRA scaling.
        """
        rank = a.shape[0]
        if a.shape != (rank, self.in_features) or b.shape != (self.out_features, rank):
            raise ValueError(
                f"MultiLoRALinear.set_slot: expected A [r, {self.in_features}] and B [{self.out_features}, r], "
                f"got A {tuple(a.shape)}, B {tuple(b.shape)}"
            )
        if rank > self.max_rank:
            raise ValueError(f"MultiLoRALinear.set_slot: rank {rank} > max_rank {self.max_rank}")
        self.clear_slot(slot)
        self.lora_a[slot, :rank].copy_(a)
        self.lora_b[slot, :, :rank].copy_(b)
        self.lora_scale[slot] = scale

    def clear_slot(self, slot: int) -> None:
        """Zeros ``slot``: tokens mapped to it get the base layer's output."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"MultiLoRALinear: slot {slot} outside [0, {self.num_slots})")
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.lora_scale[slot] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` (row-major over the batch rows) -> ``[..., out]`` in x's dtype."""
        out = F.linear(x, self.weight, self.bias)
        token_slot = self.row_slots.token_slots(x.numel() // self.in_features, x.device)
        if token_slot is None:
            return out
        shrunk = F.linear(x.reshape(-1, self.in_features), self.lora_a.view(-1, self.in_features))
        column_scale = torch.where(
            self.slot_of_column == token_slot[:, None], self.lora_scale[self.slot_of_column], 0.0
        )
        delta = F.linear((shrunk * column_scale).to(x.dtype), self.lora_b_columns)
        return out + delta.view(out.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_slots={self.num_slots}, max_rank={self.max_rank}"
