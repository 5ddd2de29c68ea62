"""Per-token multi-LoRA for ``nn.Linear`` layers, and the row-to-slot mapping the patched layers share.

``MultiLoRALinear`` keeps every resident adapter in one fixed slot table and adds, to each token,
the LoRA of its slot through ``moe_lora::add_lora_linear``: tokens are grouped by slot once per
mapping (``SlotMapping``), and each token pays for, and reads, its own adapter only. An adapter whose
weights hold a NaN or an Inf, or whose delta overflows, changes its own rows and nothing else.
Shapes are static and nothing reads device data on the host, so compiled code and CUDA graphs
replay with new mappings.

Linears that a model calls one after another on the same input (an attention's q, k and v; an
MLP's gate and up) form a ``SharedInputGroup``: the first one called computes every member's
output, with one ``add_lora_linear_group`` call for all their LoRAs (one shrink and one expand
launch on the GPU), and the others take theirs when called with the same tensor.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .ops.checks import FLOAT_DTYPES
from .ops.lora_linear import add_lora_linear_group, slot_segments


class SlotMapping:
    """The adapter slot of each batch row, or of each token, shared by every patched layer of a model.

    Layers see hidden states flattened row-major to ``[T, ...]``. A mapping has one of two forms:

    * per batch row (``set``): ``B`` rows, each of ``T / B`` consecutive tokens, so one mapping serves
      the prefill and every decode step of a batch. Its tensors are rewritten in place while ``B``
      stays the same.
    * per token (``set_tokens``): exactly the ``T`` tokens of a packed batch (``[1, T]`` inputs, several
      sequences one after another, as transformers' continuous batching runs them). Its tensors are
      views of a buffer kept for every power-of-two token count and written in place, so for a given
      ``T`` they always lie at the same addresses: captured CUDA graphs replay with new mappings.

    ``row_slot [N]`` (int64 for rows, int32 for tokens; ``-1``: no adapter) is None for no mapping
    (layers then skip LoRA); ``row_order [N]`` and ``slot_row_start [L + 1]`` (int32) are its segment
    table (``ops.lora_linear.slot_segments``). ``N`` is ``B`` or ``T``.

    Args:
        num_slots: ``L``, the slots of the tables the mapping indexes.
    """

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.row_slot: torch.Tensor | None = None
        self.row_order: torch.Tensor | None = None
        self.slot_row_start: torch.Tensor | None = None
        self.per_token = False
        self._rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._token_buffers: dict[tuple[int, torch.device], torch.Tensor] = {}

    def set(self, slots: list[int], device: torch.device) -> None:
        """Maps batch row ``i`` to ``slots[i]`` (``-1`` for none), in place when the row count is unchanged.

        Raises:
            ValueError: a slot outside ``[-1, L)``, or no rows.
        """
        if not slots:
            raise ValueError("SlotMapping.set: a mapping needs at least one row")
        new = torch.tensor(slots, dtype=torch.int64)
        row_order, slot_row_start = slot_segments(new, self.num_slots)
        rows = self._rows
        if rows is not None and rows[0].shape == new.shape and rows[0].device == device:
            for t, value in zip(rows, (new, row_order, slot_row_start)):
                t.copy_(value)
        else:
            rows = self._rows = (new.to(device), row_order.to(device), slot_row_start.to(device))
        self.row_slot, self.row_order, self.slot_row_start = rows
        self.per_token = False

    def set_tokens(self, slots: list[int], device: torch.device) -> None:
        """Maps token ``t`` of a packed batch to ``slots[t]`` (``-1`` for none), in place.

        The segment table is computed on the host and reaches the device in one copy, issued on the
        current stream (non-blocking from pinned memory on CUDA).

        Raises:
            ValueError: a slot outside ``[-1, L)``, or no tokens.
        """
        if not slots:
            raise ValueError("SlotMapping.set_tokens: a mapping needs at least one token")
        count, width = len(slots), self.num_slots + 1
        host = torch.empty(width + 2 * count, dtype=torch.int32, pin_memory=torch.device(device).type == "cuda")
        host[width : width + count] = torch.tensor(slots, dtype=torch.int32)
        row_order, slot_row_start = slot_segments(host[width : width + count], self.num_slots)
        host[:width] = slot_row_start
        host[width + count :] = row_order
        capacity = max(64, 1 << (count - 1).bit_length())
        key = (capacity, torch.device(device))
        if key not in self._token_buffers:
            self._token_buffers[key] = torch.empty(width + 2 * capacity, dtype=torch.int32, device=device)
        buffer = self._token_buffers[key]
        buffer[: host.shape[0]].copy_(host, non_blocking=True)
        self.slot_row_start = buffer[:width]
        self.row_slot = buffer[width : width + count]
        self.row_order = buffer[width + count : width + 2 * count]
        self.per_token = True

    def clear(self) -> None:
        """Removes the mapping: every layer computes the base model."""
        self.row_slot = self.row_order = self.slot_row_start = None
        self.per_token = False

    def state(self) -> tuple:
        """The current mapping, for ``restore`` (references, no copy)."""
        return self.row_slot, self.row_order, self.slot_row_start, self.per_token

    def restore(self, state: tuple) -> None:
        """Makes a mapping returned by ``state`` current again (the tensors it names, as they are now)."""
        self.row_slot, self.row_order, self.slot_row_start, self.per_token = state

    @property
    def slots(self) -> list[int] | None:
        """The mapped slot of each row or token (reads the device), or None."""
        return None if self.row_slot is None else self.row_slot.tolist()

    def check_rows(self, x: torch.Tensor, where: str) -> None:
        """Raises when ``x [B', S, ...]`` (3-D or more) does not have the mapped row count ``B``.

        Flattened ``[T, ...]`` inputs, and per-token mappings, are checked by ``token_slots`` and
        ``segments``."""
        if self.row_slot is not None and not self.per_token and x.dim() >= 3 and x.shape[0] != self.row_slot.shape[0]:
            raise ValueError(
                f"{where} got a batch of {x.shape[0]} rows but set_adapters was given {self.row_slot.shape[0]} "
                "names; give one adapter name (or None) per batch row"
            )

    def _check_tokens(self, num_tokens: int) -> int:
        mapped = self.row_slot.shape[0]
        if self.per_token and num_tokens != mapped:
            raise ValueError(
                f"a patched layer got {num_tokens} tokens but the packed mapping has {mapped}; map every token of the "
                "packed batch (the lengths given to set_adapters add up to its token count)"
            )
        if num_tokens % mapped != 0:
            raise ValueError(
                f"a patched layer got {num_tokens} tokens, not a multiple of the {mapped} batch rows given to "
                "set_adapters; set one adapter name (or None) per batch row"
            )
        return mapped

    def token_slots(self, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """The slot of each of ``num_tokens`` row-major tokens, ``[num_tokens]`` int64 (int32 for a
        per-token mapping), or None.

        Raises:
            ValueError: ``num_tokens`` does not fit the mapping.
        """
        if self.row_slot is None:
            return None
        rows = self._check_tokens(num_tokens)
        row_slot = _on(self.row_slot, device)
        if self.per_token:
            return row_slot
        return row_slot[:, None].expand(rows, num_tokens // rows).reshape(num_tokens)

    def segments(self, num_tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(row_order, slot_row_start)`` on ``device`` for ``num_tokens`` row-major tokens, or None.

        Raises:
            ValueError: ``num_tokens`` does not fit the mapping.
        """
        if self.row_slot is None:
            return None
        self._check_tokens(num_tokens)
        return _on(self.row_order, device), _on(self.slot_row_start, device)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` (itself when it is there already: no dispatcher call in eager mode)."""
    return t if t.device == device else t.to(device)


def _fp8_linear_class() -> type | None:
    """transformers' ``FP8Linear`` (block-scaled FP8 weights), or None where this transformers lacks it."""
    try:
        from transformers.integrations.finegrained_fp8 import FP8Linear
    except ImportError:
        return None
    return FP8Linear


def wrappable_linear(module: nn.Module) -> bool:
    """Whether ``MultiLoRALinear.wrap`` can wrap ``module``: an ``nn.Linear`` with ``nn.Linear``'s
    forward (not already wrapped), or transformers' ``FP8Linear``, whose own forward then computes
    the base output."""
    fp8 = _fp8_linear_class()
    if isinstance(module, MultiLoRALinear) or not isinstance(module, nn.Linear):
        return False
    return type(module).forward is nn.Linear.forward or (fp8 is not None and type(module) is fp8)


_WRAPPER_CLASSES: dict[type, type] = {}


def _wrapper_class(base: type) -> type:
    """``MultiLoRALinear`` for a plain ``nn.Linear``; for a quantized linear class, a subclass of both
    whose ``super().forward`` is the quantized class's (made once per class)."""
    if base.forward is nn.Linear.forward:
        return MultiLoRALinear
    if base not in _WRAPPER_CLASSES:
        _WRAPPER_CLASSES[base] = type(f"MultiLoRA{base.__name__}", (MultiLoRALinear, base), {"__module__": __name__})
    return _WRAPPER_CLASSES[base]


def lora_table_dtype(linear: nn.Linear, model: nn.Module | None = None) -> torch.dtype:
    """The dtype of ``linear``'s LoRA table: its weight's, or for a quantized weight the activation
    dtype of ``model`` (the model holding it): its input embeddings' (FP8 checkpoints keep them
    unquantized)."""
    dtype = linear.weight.dtype
    if dtype in FLOAT_DTYPES:
        return dtype
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{type(linear).__name__} with {dtype} weights: the LoRA table needs the model's compute dtype"
        )
    return weight.dtype


class MultiLoRALinear(nn.Linear):
    """An ``nn.Linear`` that adds, to each token, the LoRA of its adapter slot.

    ``y = base(x) + scale[s] * B[s] (A[s] x)`` with ``s`` the token's slot (no LoRA for ``-1``) and
    ``base(x) = x W^T + b``, or for transformers' ``FP8Linear`` its own FP8 forward (the wrapper is then
    a ``MultiLoRAFP8Linear``, a subclass of both; ``MultiLoRALinear.wrap`` picks the class). It shares
    the wrapped layer's parameters, buffers and attributes (no copy); the slot table is held in
    non-persistent buffers, so ``state_dict`` is the wrapped layer's. Every slot is padded to
    ``max_rank``: the table takes ``L * R * (in + out)`` elements of its dtype.

    Buffers (the table's dtype, the weight's device, unless noted):

    * ``lora_a [L, R, in]``: shrink matrices, rank rows past an adapter's ``r`` are zero.
    * ``lora_b [L, out, R]``: expand matrices, rank columns past an adapter's ``r`` are zero.
    * ``lora_scale [L]`` float32: per-slot scaling (PEFT's ``alpha / r``).

    Args:
        linear: the layer to wrap (``wrappable_linear``: a plain ``nn.Linear`` or ``FP8Linear``).
        num_slots: ``L``, adapters resident at once.
        max_rank: ``R``.
        row_slots: the model's shared ``SlotMapping``.
        dtype: the table's dtype; default the weight's (``lora_table_dtype``). Required for a
            quantized weight: the model's activation dtype.
    """

    def __init__(
        self, linear: nn.Linear, num_slots: int, max_rank: int, row_slots: SlotMapping, dtype: torch.dtype | None = None
    ):
        if not wrappable_linear(linear) or not isinstance(self, _wrapper_class(type(linear))):
            raise TypeError(
                f"MultiLoRALinear cannot wrap {type(linear).__name__} as {type(self).__name__}; use "
                "MultiLoRALinear.wrap (plain nn.Linear or transformers' FP8Linear)"
            )
        nn.Module.__init__(self)
        fresh = vars(nn.Module())
        for key, value in vars(linear).items():
            if key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
                getattr(self, key).update(value)
            elif key not in fresh and not callable(value):
                # The layer's own attributes (sizes, FP8 block size, ...), not its hooks nor a forward
                # set on the instance (accelerate's), which would shadow this class's.
                setattr(self, key, value)
        self.num_slots, self.max_rank, self.row_slots = num_slots, max_rank, row_slots
        self.train(linear.training)
        kw = dict(dtype=dtype or lora_table_dtype(linear), device=linear.weight.device)
        self.register_buffer("lora_a", torch.zeros(num_slots, max_rank, self.in_features, **kw), persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, self.out_features, max_rank, **kw), persistent=False)
        self.register_buffer(
            "lora_scale", torch.zeros(num_slots, dtype=torch.float32, device=kw["device"]), persistent=False
        )
        self.shared_input: SharedInputGroup | None = None
        self.shared_input_index = 0

    @staticmethod
    def wrap(
        linear: nn.Linear, num_slots: int, max_rank: int, row_slots: SlotMapping, dtype: torch.dtype | None = None
    ) -> MultiLoRALinear:
        """``linear`` wrapped in the ``MultiLoRALinear`` class that fits it (see the class)."""
        if not wrappable_linear(linear):
            raise TypeError(f"MultiLoRALinear wraps nn.Linear or transformers' FP8Linear, not {type(linear).__name__}")
        return _wrapper_class(type(linear))(linear, num_slots, max_rank, row_slots, dtype)

    @staticmethod
    def table_bytes(linear: nn.Linear, num_slots: int, max_rank: int, dtype: torch.dtype | None = None) -> int:
        """Bytes of the slot table ``MultiLoRALinear.wrap(linear, num_slots, max_rank, ..., dtype)`` allocates."""
        elements = num_slots * max_rank * (linear.in_features + linear.out_features)
        return elements * (dtype or lora_table_dtype(linear)).itemsize + num_slots * 4

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scale: float, *, check_finite: bool = True) -> None:
        """Writes one adapter into ``slot`` in place (every check first).

        Args:
            slot: in ``[0, L)``.
            a: ``[r, in]``; b: ``[out, r]`` with ``r <= R`` (real floating point, any device).
            scale: the LoRA scaling (a real number).
            check_finite: refuse A or B with a NaN or Inf in the table's dtype (the check waits for
                the device where they are on it); False only for values already checked so. False
                also copies ``non_blocking``: keep pinned host sources unchanged after the call.
        """
        for name, t in (("a", a), ("b", b)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"MultiLoRALinear.set_slot: {name} must be a real floating-point tensor, got {what}")
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"MultiLoRALinear.set_slot: scale must be a real number, got {type(scale).__name__}")
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"MultiLoRALinear: slot {slot} outside [0, {self.num_slots})")
        rank = a.shape[0] if a.dim() == 2 else -1
        if a.shape != (rank, self.in_features) or b.shape != (self.out_features, rank):
            raise ValueError(
                f"MultiLoRALinear.set_slot: expected A [r, {self.in_features}] and B [{self.out_features}, r], "
                f"got A {tuple(a.shape)}, B {tuple(b.shape)}"
            )
        if rank > self.max_rank:
            raise ValueError(f"MultiLoRALinear.set_slot: rank {rank} > max_rank {self.max_rank}")
        dtype = self.lora_a.dtype
        finite = math.isfinite(scale) and (
            not check_finite or bool(torch.isfinite(a.to(dtype)).all() and torch.isfinite(b.to(dtype)).all())
        )
        if not finite:
            raise ValueError(
                f"MultiLoRALinear.set_slot: A, B and scale must be finite in the table's dtype {dtype} (a NaN or Inf, "
                "or a value that overflows it)"
            )
        self.clear_slot(slot)
        self.lora_a[slot, :rank].copy_(a, non_blocking=not check_finite)
        self.lora_b[slot, :, :rank].copy_(b, non_blocking=not check_finite)
        self.lora_scale[slot] = scale

    def clear_slot(self, slot: int) -> None:
        """Zeros ``slot``: tokens mapped to it get the base layer's output."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"MultiLoRALinear: slot {slot} outside [0, {self.num_slots})")
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.lora_scale[slot] = 0.0

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped layer's own output (no LoRA)."""
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` (row-major over the batch rows) -> ``[..., out]`` in x's dtype."""
        if self.shared_input is not None:
            return self.shared_input.output(self.shared_input_index, x)
        out = self.base_forward(x)
        add_loras([self], x, [out])
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_slots={self.num_slots}, max_rank={self.max_rank}"


class SharedInputGroup:
    """``MultiLoRALinear`` layers a model calls one after another on the same input tensor (an
    attention's q, k and v; an MLP's gate and up), whose LoRAs then run in one call.

    The first member called with an input computes every member's output (their base layers, then
    one ``add_lora_linear_group`` for all their LoRAs: on the GPU one shrink and one expand launch
    in place of two per member) and keeps the others' outputs, keyed by that very tensor (``is``);
    a member called with it takes its own, and the last one taken frees them. A member called with
    any other tensor, or again, computes the whole group anew, so the outputs never depend on the
    order or on which members are called; only the work does. Under ``torch.compile`` the kept
    outputs live within one graph (``pending`` is None again once every member took its own).

    Members share the input width, the mapping, and the slot tables' shapes, dtype and device
    (``compatible``). Build one with ``join``.
    """

    def __init__(self, members: list[MultiLoRALinear]) -> None:
        self.members = members
        self.pending: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None

    @staticmethod
    def compatible(members: list[MultiLoRALinear]) -> bool:
        """Whether ``members`` can share their LoRA calls."""
        first = members[0]
        return all(
            m.in_features == first.in_features
            and m.row_slots is first.row_slots
            and m.lora_a.shape[:2] == first.lora_a.shape[:2]
            and m.lora_a.dtype == first.lora_a.dtype
            and m.lora_a.device == first.lora_a.device
            for m in members
        )

    @staticmethod
    def join(members: list[MultiLoRALinear]) -> None:
        """Makes ``members`` (each taken out of any group it was in) one group, if there are two or
        more and they are ``compatible``; otherwise each runs alone."""
        for m in members:
            m.shared_input, m.shared_input_index = None, 0
        if len(members) < 2 or not SharedInputGroup.compatible(members):
            return
        group = SharedInputGroup(list(members))
        for index, m in enumerate(members):
            m.shared_input, m.shared_input_index = group, index

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s output for ``x``: kept from the call that computed the group's, or
        computed now with every other member's (which are then kept)."""
        pending = self.pending
        if pending is not None and pending[0] is x and index in pending[1]:
            out = pending[1].pop(index)
            if not pending[1]:
                self.pending = None
            return out
        outs = [m.base_forward(x) for m in self.members]
        add_loras(self.members, x, outs)
        others = {j: out for j, out in enumerate(outs) if j != index}
        self.pending = (x, others)
        return outs[index]


def add_loras(layers: list[MultiLoRALinear], x: torch.Tensor, outs: list[torch.Tensor]) -> None:
    """Adds to each ``outs[j]`` (``layers[j]``'s base output for ``x``, in place) the LoRA of every
    token's slot, for all the layers in one ``add_lora_linear_group`` call; nothing without a mapping.
    The layers share the input width and the mapping (``SharedInputGroup.compatible``)."""
    first = layers[0]
    first.row_slots.check_rows(x, "a patched linear layer")
    segments = first.row_slots.segments(x.numel() // first.in_features, x.device)
    if segments is None:
        return
    add_lora_linear_group(
        [out.view(-1, layer.out_features) for out, layer in zip(outs, layers)], x.reshape(-1, first.in_features),
        *segments, [layer.lora_a for layer in layers], [layer.lora_b for layer in layers],
        [layer.lora_scale for layer in layers],
    )  # fmt: skip
