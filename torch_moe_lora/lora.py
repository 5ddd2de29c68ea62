"""Stacked LoRA weights of one MoE layer: the slot table the ops read.

An adapter occupies one slot; every slot has the same (padded) rank so that one tensor per
projection holds all adapters. Unused rank rows and columns stay zero, so adapters of different
ranks share a table without changing its result.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch


class LoRAWeights(NamedTuple):
    """LoRA weights of one MoE layer for ``L`` adapter slots and ``E`` experts.

    Fields (all on one device; the four matrices share the experts' dtype):

    * ``gate_up_a [L, E, Ra, H]``: shrink of the gate_up projection. ``Ra == R`` is one joint
      gate_up LoRA (PEFT ``target_parameters``); ``Ra == 2R`` holds separate gate and up LoRAs (PEFT
      per-expert modules): gate rows of ``gate_up_b`` use shrink outputs ``[0, R)``, up rows ``[R, 2R)``.
    * ``gate_up_b [L, E, 2I, R]`` (``[L, E, I, R]`` for non-gated experts): expand, rows in the same
      order as the experts' gate_up rows.
    * ``down_a [L, E, Rd, I]``, ``down_b [L, E, H, Rd]``: the down projection's LoRA.
    * ``gate_up_scale [L]``, ``down_scale [L]`` (float32): per-slot scaling (``alpha / r``).
    """

    gate_up_a: torch.Tensor
    gate_up_b: torch.Tensor
    down_a: torch.Tensor
    down_b: torch.Tensor
    gate_up_scale: torch.Tensor
    down_scale: torch.Tensor

    @property
    def num_slots(self) -> int:
        return self.gate_up_a.shape[0]

    @property
    def split_gate_up(self) -> bool:
        return self.gate_up_a.shape[2] != self.gate_up_b.shape[3]

    def experts(self, start: int, stop: int) -> "LoRAWeights":
        """The table of experts ``[start, stop)`` only (contiguous copies; scales shared), e.g. one
        rank's share under expert parallelism."""
        if not 0 <= start <= stop <= self.gate_up_a.shape[1]:
            raise ValueError(f"LoRAWeights.experts: [{start}, {stop}) is not a range of the {self.gate_up_a.shape[1]} experts")
        return LoRAWeights(*(t[:, start:stop].contiguous() for t in self[:4]), *self[4:])


class ExpertLoRASlots:
    """A fixed-size LoRA slot table for one MoE layer, filled and cleared adapter by adapter.

    The tensors are allocated once; ``set_slot`` and ``clear_slot`` copy into them in place, so a
    compiled model or a captured CUDA graph that reads ``weights`` sees new adapters without
    recompiling. ``set_slot`` refuses NaN and Inf (and values that overflow the table's dtype): the
    GPU kernels add ``0 * B`` of every slot present in a block to the other rows, which is zero for
    a finite B only, so write into ``weights`` directly only finite values.

    Args:
        num_slots: ``L``, adapters resident at once.
        num_experts: ``E``.
        hidden_size: ``H``.
        intermediate_size: ``I`` (per expert).
        max_rank: ``R``; every adapter's rank must be ``<= R``.
        gated: experts have gate and up projections (``w13 [E, 2I, H]``), else only up (``[E, I, H]``).
        interleaved: gate/up rows alternate (GPT-OSS) instead of gate rows then up rows.
        split_gate_up: reserve separate gate and up LoRAs (``Ra = 2R``); joint gate_up adapters
            are still accepted (their A is stored for both halves). Needed for adapters saved with
            per-expert ``gate_proj``/``up_proj`` modules.
        dtype, device: of the LoRA matrices (the experts' dtype and device).
    """

    def __init__(
        self,
        num_slots: int,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        max_rank: int,
        *,
        gated: bool = True,
        interleaved: bool = False,
        split_gate_up: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        if min(num_slots, num_experts, hidden_size, intermediate_size, max_rank) < 1:
            raise ValueError(
                "ExpertLoRASlots: num_slots, num_experts, hidden_size, intermediate_size and max_rank must be "
                f">= 1, got {num_slots}, {num_experts}, {hidden_size}, {intermediate_size}, {max_rank}"
            )
        if split_gate_up and not gated:
            raise ValueError("ExpertLoRASlots: split_gate_up needs gated experts")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.max_rank, self.gated, self.interleaved = max_rank, gated, interleaved
        gate_up_rows = (2 if gated else 1) * intermediate_size
        shrink_rank = 2 * max_rank if split_gate_up else max_rank
        kw = dict(dtype=dtype, device=device)
        self.weights = LoRAWeights(
            gate_up_a=torch.zeros(num_slots, num_experts, shrink_rank, hidden_size, **kw),
            gate_up_b=torch.zeros(num_slots, num_experts, gate_up_rows, max_rank, **kw),
            down_a=torch.zeros(num_slots, num_experts, max_rank, intermediate_size, **kw),
            down_b=torch.zeros(num_slots, num_experts, hidden_size, max_rank, **kw),
            gate_up_scale=torch.zeros(num_slots, dtype=torch.float32, device=device),
            down_scale=torch.zeros(num_slots, dtype=torch.float32, device=device),
        )

    @property
    def num_slots(self) -> int:
        return self.weights.num_slots

    @staticmethod
    def table_bytes(
        num_slots: int, num_experts: int, hidden_size: int, intermediate_size: int, max_rank: int, *,
        gated: bool = True, split_gate_up: bool = False, dtype: torch.dtype = torch.float32,
    ) -> int:  # fmt: skip
        """Bytes of the table ``ExpertLoRASlots(...)`` with these arguments allocates."""
        rows = (2 if gated else 1) * intermediate_size
        shrink = (2 if split_gate_up else 1) * max_rank
        per_expert = shrink * hidden_size + rows * max_rank + max_rank * intermediate_size + hidden_size * max_rank
        return num_slots * num_experts * per_expert * dtype.itemsize + 2 * num_slots * 4

    def _check_pair(self, name: str, pair, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"ExpertLoRASlots.set_slot: {name} must be a pair (A, B) of tensors, got {type(pair).__name__}")
        a, b = pair
        for factor, t in (("A", a), ("B", b)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"ExpertLoRASlots.set_slot: {name} {factor} must be a real floating-point tensor, got {what}")
        e = self.num_experts
        r = a.shape[1] if a.dim() == 3 else -1
        if a.shape != (e, r, in_features) or b.shape != (e, out_features, r):
            raise ValueError(
                f"ExpertLoRASlots.set_slot: {name} must be (A [E, r, in], B [E, out, r]) = "
                f"(A [{e}, r, {in_features}], B [{e}, {out_features}, r]); got A {tuple(a.shape)}, B {tuple(b.shape)}"
            )
        if r > self.max_rank:
            raise ValueError(f"ExpertLoRASlots.set_slot: {name} has rank {r} > max_rank {self.max_rank}")
        return a, b

    def set_slot(
        self,
        slot: int,
        *,
        gate_up: tuple[torch.Tensor, torch.Tensor] | None = None,
        gate: tuple[torch.Tensor, torch.Tensor] | None = None,
        up: tuple[torch.Tensor, torch.Tensor] | None = None,
        down: tuple[torch.Tensor, torch.Tensor] | None = None,
        gate_up_scale: float = 1.0,
        down_scale: float = 1.0,
        check_finite: bool = True,
    ) -> None:
        """Writes one adapter into ``slot`` (overwriting it); projections not given stay zero.

        Every check runs before the slot changes; the matrices are then copied straight into the
        table.

        Args:
            gate_up: ``(A [E, r, H], B [E, 2I, r])``, one joint LoRA over the gate_up rows in the
                experts' row order (``B [E, I, r]`` for non-gated experts).
            gate, up: ``(A [E, r, H], B [E, I, r])`` each, separate LoRAs (``split_gate_up`` tables).
            down: ``(A [E, r, I], B [E, H, r])``.
            gate_up_scale, down_scale: scaling applied to the deltas (PEFT's ``alpha / r``); fold any
                difference between gate and up scales into their B before calling.
            check_finite: refuse matrices with a NaN or Inf in the table's dtype. That check waits
                for the device where they are on it; pass False only for values already checked in
                the table's dtype (as the patched model does for the host copies it swaps in). False
                also copies ``non_blocking`` (from pinned host memory the call returns before the
                device has read them: keep them unchanged).
        """
        w = self.weights
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"ExpertLoRASlots.set_slot: slot {slot} outside [0, {self.num_slots})")
        for name, scale in (("gate_up_scale", gate_up_scale), ("down_scale", down_scale)):
            if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
                raise TypeError(f"ExpertLoRASlots.set_slot: {name} must be a real number, got {type(scale).__name__}")
            if not math.isfinite(scale):
                raise ValueError(f"ExpertLoRASlots.set_slot: {name} must be finite, got {scale}")
        if gate_up is not None and (gate is not None or up is not None):
            raise ValueError("ExpertLoRASlots.set_slot: pass gate_up or gate/up, not both")
        if (gate is not None or up is not None) and not w.split_gate_up:
            raise ValueError("ExpertLoRASlots.set_slot: separate gate/up LoRAs need a table built with split_gate_up=True")
        R, H, I = self.max_rank, self.hidden_size, self.intermediate_size
        rows = w.gate_up_b.shape[2]
        gate_a, gate_up_b, down_a, down_b = w.gate_up_a[slot], w.gate_up_b[slot], w.down_a[slot], w.down_b[slot]
        writes = []  # (what, table view, source)
        if gate_up is not None:
            a, b = self._check_pair("gate_up", gate_up, H, rows)
            r = a.shape[1]
            writes += [("gate_up A", gate_a[:, :r], a), ("gate_up B", gate_up_b[:, :, :r], b)]
            if w.split_gate_up:
                writes.append(("gate_up A", gate_a[:, R : R + r], a))
        gate_rows, up_rows = (slice(0, None, 2), slice(1, None, 2)) if self.interleaved else (slice(0, I), slice(I, None))
        for name, pair, offset, row_slice in (("gate", gate, 0, gate_rows), ("up", up, R, up_rows)):
            if pair is not None:
                a, b = self._check_pair(name, pair, H, I)
                r = a.shape[1]
                writes += [(f"{name} A", gate_a[:, offset : offset + r], a), (f"{name} B", gate_up_b[:, row_slice, :r], b)]
        if down is not None:
            a, b = self._check_pair("down", down, I, H)
            r = a.shape[1]
            writes += [("down A", down_a[:, :r], a), ("down B", down_b[:, :, :r], b)]
        if check_finite:
            for name, view, source in writes:
                if not torch.isfinite(source.to(view.dtype)).all():
                    raise ValueError(
                        f"ExpertLoRASlots.set_slot: {name} holds NaN or Inf in the table's dtype {view.dtype} (a "
                        "non-finite value, or one that overflows it)"
                    )
        for t in (gate_a, gate_up_b, down_a, down_b):
            t.zero_()
        for _, view, source in writes:
            view.copy_(source, non_blocking=not check_finite)
        w.gate_up_scale[slot] = gate_up_scale
        w.down_scale[slot] = down_scale

    def clear_slot(self, slot: int) -> None:
        """Zeros ``slot`` so that tokens still mapped to it get the base model's output."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"ExpertLoRASlots.clear_slot: slot {slot} outside [0, {self.num_slots})")
        for t in self.weights:
            t[slot].zero_()


def check_device_memory(needed: int, device: torch.device, what: str, num_slots: int, max_rank: int) -> None:
    """Raises before an allocation of ``needed`` bytes on a CUDA ``device`` that its free memory
    cannot hold (other devices are not checked).

    Raises:
        ValueError: naming ``what``, the sizes, and the ``max_loras``/``max_rank`` that set them.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    if needed > free:
        gib = 2**30
        raise ValueError(
            f"{what} need {needed / gib:.2f} GiB on {device} ({needed / num_slots / gib:.3f} GiB a slot at rank "
            f"{max_rank}), but only {free / gib:.2f} of its {total / gib:.2f} GiB are free; lower max_loras (now "
            f"{num_slots}) or max_rank (now {max_rank}): register more adapters than slots instead, they wait in host "
            "memory"
        )
