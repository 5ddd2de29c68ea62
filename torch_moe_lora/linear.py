"""Per-token multi-LoRA for ``nn.Linear`` layers, and the row-to-slot mapping the patched layers share.

``MultiLoRALinear`` keeps every resident adapter in one fixed slot table and adds, to each token,
the LoRA of its slot through ``moe_lora::add_lora_linear``: tokens are grouped by slot once per
mapping (``RowSlots``), and each token pays for, and reads, its own adapter only. An adapter whose
weights hold a NaN or an Inf, or whose delta overflows, changes its own rows and nothing else.
Shapes are static and nothing reads device data on the host, so compiled code and CUDA graphs
replay with new mappings.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .ops.lora_linear import add_lora_linear, slot_segments


class RowSlots:
    """The adapter slot of each batch row, shared by every patched layer of one model.

    ``row_slot`` is ``[B]`` int64 (``-1``: no adapter) or None for no mapping (layers then skip
    LoRA); ``row_order [B]`` and ``slot_row_start [L + 1]`` (int32) are its segment table
    (``ops.lora_linear.slot_segments``). They are rewritten in place while ``B`` stays the same, so
    compiled code and captured graphs that read them see new mappings without recompiling. Layers
    see hidden states flattened row-major from ``[B, S, ...]`` to ``[B * S, ...]``, so token ``t``
    belongs to row ``t // S``.

    Args:
        num_slots: ``L``, the slots of the tables the mapping indexes.
    """

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.row_slot: torch.Tensor | None = None
        self.row_order: torch.Tensor | None = None
        self.slot_row_start: torch.Tensor | None = None

    def set(self, slots: list[int], device: torch.device) -> None:
        """Maps row ``i`` to ``slots[i]`` (``-1`` for none), in place when the row count is unchanged.

        Raises:
            ValueError: a slot outside ``[-1, L)``, or no rows.
        """
        if not slots:
            raise ValueError("RowSlots.set: a mapping needs at least one row")
        new = torch.tensor(slots, dtype=torch.int64)
        row_order, slot_row_start = slot_segments(new, self.num_slots)
        if self.row_slot is not None and self.row_slot.shape == new.shape and self.row_slot.device == device:
            self.row_slot.copy_(new)
            self.row_order.copy_(row_order)
            self.slot_row_start.copy_(slot_row_start)
        else:
            self.row_slot, self.row_order, self.slot_row_start = new.to(device), row_order.to(device), slot_row_start.to(device)

    def clear(self) -> None:
        """Removes the mapping: every layer computes the base model."""
        self.row_slot = self.row_order = self.slot_row_start = None

    @property
    def slots(self) -> list[int] | None:
        """The mapped slot of each row (reads the device), or None."""
        return None if self.row_slot is None else self.row_slot.tolist()

    def check_rows(self, x: torch.Tensor, where: str) -> None:
        """Raises when ``x [B', S, ...]`` (3-D or more) does not have the mapped row count ``B``.

        Flattened ``[T, ...]`` inputs are checked by ``token_slots``/``segments`` (``T % B``)."""
        if self.row_slot is not None and x.dim() >= 3 and x.shape[0] != self.row_slot.shape[0]:
            raise ValueError(
                f"{where} got a batch of {x.shape[0]} rows but set_adapters was given {self.row_slot.shape[0]} "
                "names; give one adapter name (or None) per batch row"
            )

    def _check_tokens(self, num_tokens: int) -> int:
        rows = self.row_slot.shape[0]
        if num_tokens % rows != 0:
            raise ValueError(
                f"a patched layer got {num_tokens} tokens, not a multiple of the {rows} batch rows given to "
                "set_adapters; set one adapter name (or None) per batch row"
            )
        return rows

    def token_slots(self, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """The slot of each of ``num_tokens`` row-major tokens, ``[num_tokens]`` int64, or None.

        Raises:
            ValueError: ``num_tokens`` is not a multiple of the mapped row count.
        """
        if self.row_slot is None:
            return None
        rows = self._check_tokens(num_tokens)
        return self.row_slot.to(device)[:, None].expand(rows, num_tokens // rows).reshape(num_tokens)

    def segments(self, num_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(row_order, slot_row_start)`` on ``device`` for ``num_tokens`` row-major tokens, or None.

        Raises:
            ValueError: ``num_tokens`` is not a multiple of the mapped row count.
        """
        if self.row_slot is None:
            return None
        self._check_tokens(num_tokens)
        return self.row_order.to(device), self.slot_row_start.to(device)


class MultiLoRALinear(nn.Linear):
    """An ``nn.Linear`` that adds, to each token, the LoRA of its adapter slot.

    ``y = x W^T + b + scale[s] * B[s] (A[s] x)`` with ``s`` the token's slot (no LoRA for ``-1``).
    It shares the wrapped layer's ``weight`` and ``bias`` (no copy); the slot table is held in
    non-persistent buffers, so ``state_dict`` is the wrapped layer's. Every slot is padded to
    ``max_rank``: the table takes ``L * R * (in + out)`` elements of the weight's dtype.

    Buffers (the weight's dtype and device unless noted):

    * ``lora_a [L, R, in]``: shrink matrices, rank rows past an adapter's ``r`` are zero.
    * ``lora_b [L, out, R]``: expand matrices, rank columns past an adapter's ``r`` are zero.
    * ``lora_scale [L]`` float32: per-slot scaling (PEFT's ``alpha / r``).

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
        self.register_buffer("lora_a", torch.zeros(num_slots, max_rank, self.in_features, **kw), persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, self.out_features, max_rank, **kw), persistent=False)
        self.register_buffer(
            "lora_scale", torch.zeros(num_slots, dtype=torch.float32, device=kw["device"]), persistent=False
        )

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """Writes one adapter into ``slot`` in place.

        Args:
            slot: in ``[0, L)``.
            a: ``[r, in]``; b: ``[out, r]`` with ``r <= R`` (real floating point, any device).
            scale: the LoRA scaling (a real number).
        """
        for name, t in (("a", a), ("b", b)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"MultiLoRALinear.set_slot: {name} must be a real floating-point tensor, got {what}")
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"MultiLoRALinear.set_slot: scale must be a real number, got {type(scale).__name__}")
        rank = a.shape[0] if a.dim() == 2 else -1
        if a.shape != (rank, self.in_features) or b.shape != (self.out_features, rank):
            raise ValueError(
                f"MultiLoRALinear.set_slot: expected A [r, {self.in_features}] and B [{self.out_features}, r], "
                f"got A {tuple(a.shape)}, B {tuple(b.shape)}"
            )
        if rank > self.max_rank:
            raise ValueError(f"MultiLoRALinear.set_slot: rank {rank} > max_rank {self.max_rank}")
        dtype = self.lora_a.dtype
        if not (torch.isfinite(a.to(dtype)).all() and torch.isfinite(b.to(dtype)).all() and math.isfinite(scale)):
            raise ValueError(
                f"MultiLoRALinear.set_slot: A, B and scale must be finite in the table's dtype {dtype} (a NaN or Inf, "
                "or a value that overflows it)"
            )
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
        self.row_slots.check_rows(x, "a patched linear layer")
        segments = self.row_slots.segments(x.numel() // self.in_features, x.device)
        if segments is None:
            return out
        flat_out = out.view(-1, self.out_features)
        add_lora_linear(flat_out, x.reshape(-1, self.in_features), *segments, self.lora_a, self.lora_b, self.lora_scale)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_slots={self.num_slots}, max_rank={self.max_rank}"
