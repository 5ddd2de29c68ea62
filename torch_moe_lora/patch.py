"""Patching a Hugging Face MoE model for multi-LoRA inference, and the handle that drives it.

``patch_model`` finds every MoE block (``models.find_moe_blocks``), gives each one an
``ExpertLoRASlots`` table and routes its experts through ``fused_experts``: interface blocks by the
``moe_lora`` experts implementation registered in transformers' ``ALL_EXPERTS_FUNCTIONS``, whole
blocks (Llama 4) by replacing the block's forward with ``models.whole_block_forward``. Routing stays
the model's own. Targeted ``nn.Linear`` layers are swapped for ``MultiLoRALinear``. Every table is
allocated once; loading, unloading and remapping adapters copy into them in place.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .adapters import AdapterLoRA, check_adapter_name, read_adapter
from .linear import MultiLoRALinear, RowSlots
from .lora import ExpertLoRASlots
from .models import ExpertsSpec, MoEBlock, find_moe_blocks, whole_block_forward
from .ops.fused_experts import fused_experts
from .parallel import ExpertSharding
from .reference import gate_rows_ref

EXPERTS_IMPLEMENTATION = "moe_lora"
"""The name of our experts implementation in ``ALL_EXPERTS_FUNCTIONS``."""

_STATE_ATTR = "_moe_lora"


class _PatchedExperts:
    """What the patched experts of one block read: their spec, LoRA table, the row mapping and,
    under parallelism, this rank's sharding (local expert ids, then one all-reduce of the output)."""

    def __init__(
        self, spec: ExpertsSpec, table: ExpertLoRASlots, row_slots: RowSlots, sharding: ExpertSharding | None
    ):
        self.spec, self.table, self.row_slots, self.sharding = spec, table, row_slots, sharding

    def __call__(self, experts: nn.Module, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        token_lora = self.row_slots.token_slots(x.shape[0], x.device)
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
    return getattr(experts, _STATE_ATTR)(experts, hidden_states, top_k_index, top_k_weights)


def _is_interface_block(block: MoEBlock) -> bool:
    return block.family.whole_block is None


def _check_rank(adapter: AdapterLoRA, max_rank: int, joined: bool = False) -> None:
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


def _check_finite(adapter: AdapterLoRA, source, model: nn.Module, blocks: list[MoEBlock]) -> None:
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
    block_dtype = {b.name: b.spec.w13(b.experts).dtype for b in blocks}
    checks = []
    for name, lora in adapter.linears.items():
        dtype = model.get_submodule(name).weight.dtype
        checks += [(f"{name} lora_A", lora.a, dtype), (f"{name} lora_B", lora.b, dtype), (f"{name} scale", lora.scale, None)]
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


class MoELoRAModel:
    """Handle of a patched model: loads, unloads and maps adapters while the model runs.

    Threads: the mapping is the model's, one at a time. An ``adapters()`` block holds the handle's
    lock from entry to exit, so blocks of different threads take turns (a thread entering one
    waits until the block of another exits) and each block's forward passes run with its own
    mapping; ``set_adapters``, ``load_adapter`` and ``unload_adapter`` wait for it too, and an eager
    forward of the model holds it while it runs. Compiled code cannot take a lock: call a compiled
    model from several threads only inside ``adapters()`` blocks.

    Attributes:
        model: the patched model (call it, or its ``generate``, as usual).
        max_loras: ``L``, adapter slots per layer.
        max_rank: ``R``, the largest adapter rank the tables hold.
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: list[MoEBlock],
        max_loras: int,
        max_rank: int,
        split_gate_up: bool,
        sharding: ExpertSharding | None = None,
    ):
        self.model, self.blocks, self.max_loras, self.max_rank = model, blocks, max_loras, max_rank
        self.sharding = sharding
        self.device = blocks[0].spec.w13(blocks[0].experts).device
        self.row_slots = RowSlots(max_loras)
        self._slot_of: dict[str, int] = {}
        self._row_names: list[str | None] | None = None
        self._lock = threading.RLock()
        # The mappings that enclosing adapters() blocks restore on exit (innermost last).
        self._saved_mappings: list[list[str | None] | None] = []
        self._linears: dict[str, tuple[nn.Linear, MultiLoRALinear]] = {}
        self._tables: dict[str, ExpertLoRASlots] = {}
        self._previous_implementation: dict[int, tuple[object, str | None]] = {}
        for block in blocks:
            w13, w2 = block.spec.w13(block.experts), block.spec.w2(block.experts)
            self._tables[block.name] = ExpertLoRASlots(
                max_loras, w2.shape[0], w2.shape[1], w2.shape[2], max_rank,
                gated=block.spec.gated, interleaved=block.spec.interleaved, split_gate_up=split_gate_up,
                dtype=w13.dtype, device=w13.device,
            )  # fmt: skip
        self._patch_blocks()
        self._hooks = [
            model.register_forward_pre_hook(self._enter_forward, with_kwargs=True),
            model.register_forward_hook(self._exit_forward, with_kwargs=True, always_call=True),
            *(block.block.register_forward_pre_hook(self._check_block_rows, with_kwargs=True) for block in blocks),
        ]

    # --- patching -------------------------------------------------------------------------------

    def _patch_blocks(self) -> None:
        ALL_EXPERTS_FUNCTIONS[EXPERTS_IMPLEMENTATION] = moe_lora_experts
        for block in self.blocks:
            state = _PatchedExperts(block.spec, self._tables[block.name], self.row_slots, self.sharding)
            setattr(block.experts, _STATE_ATTR, state)
            if _is_interface_block(block):
                config = block.experts.config
                self._previous_implementation.setdefault(id(config), (config, config._experts_implementation))
                config._experts_implementation = EXPERTS_IMPLEMENTATION
            else:
                experts_fn = functools.partial(state, block.experts)
                block.block.forward = functools.partial(whole_block_forward, block.block, experts_fn=experts_fn)

    def _wrap_linear(self, name: str) -> None:
        if name in self._linears:
            return
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        original = getattr(parent, child)
        wrapped = MultiLoRALinear(original, self.max_loras, self.max_rank, self.row_slots)
        setattr(parent, child, wrapped)
        self._linears[name] = (original, wrapped)

    def unpatch(self) -> nn.Module:
        """Restores the model's own experts, block forwards and linears; the handle is then unusable.

        Returns:
            The model.

        Raises:
            NotImplementedError: the experts were sharded over a process group (their full weights
                are gone).
        """
        if self.sharding is not None:
            raise NotImplementedError("unpatch: the experts are sharded over a process group; reload the model")
        if self._saved_mappings:
            raise RuntimeError("unpatch: called inside an adapters() block; call it after the block")
        for config, implementation in self._previous_implementation.values():
            config._experts_implementation = implementation
        for block in self.blocks:
            delattr(block.experts, _STATE_ATTR)
            if not _is_interface_block(block):
                del block.block.forward
        for name, (original, _) in self._linears.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, original)
        for hook in self._hooks:
            hook.remove()
        self._linears, self._tables, self._slot_of, self.blocks = {}, {}, {}, []
        self.row_slots.clear()
        return self.model

    # --- adapters -------------------------------------------------------------------------------

    def _check_patched(self) -> None:
        if not self._tables:
            raise RuntimeError("this MoELoRAModel was unpatched; patch the model again")

    @property
    def adapter_names(self) -> list[str]:
        """Names of the resident adapters, in slot order."""
        return sorted(self._slot_of, key=self._slot_of.get)

    def _read(self, name: str, source) -> AdapterLoRA:
        """Reads and checks an adapter against the tables; raises before anything changes."""
        self._check_patched()
        adapter = read_adapter(name, source, self.model, self.blocks, self.sharding)
        _check_finite(adapter, source, self.model, self.blocks)
        joined = adapter.split_gate_up and not next(iter(self._tables.values())).weights.split_gate_up
        if joined:
            experts = dict(adapter.experts)
            for block in self.blocks:
                if block.name in experts:
                    experts[block.name] = experts[block.name].joined(self._gate_rows(block))
            adapter = adapter._replace(experts=experts)
        _check_rank(adapter, self.max_rank, joined)
        return adapter

    def _gate_rows(self, block: MoEBlock) -> torch.Tensor:
        """``[2I]`` bool gate-row mask of the block's (on a shard: this rank's) gate_up rows."""
        rows = block.spec.w13(block.experts).shape[1]
        return gate_rows_ref(rows, gated=True, interleaved=block.spec.interleaved)

    def _write(self, slot: int, adapter: AdapterLoRA) -> None:
        for name in adapter.linears:
            self._wrap_linear(name)
        for name, (_, linear) in self._linears.items():
            lora = adapter.linears.get(name)
            if lora is None:
                linear.clear_slot(slot)
            else:
                linear.set_slot(slot, lora.a, lora.b, lora.scale)
        for block_name, table in self._tables.items():
            lora = adapter.experts.get(block_name)
            if lora is None:
                table.clear_slot(slot)
                continue
            as_table = dict(dtype=table.weights.gate_up_a.dtype, device=table.weights.gate_up_a.device)
            pairs = {
                role: tuple(t.to(**as_table) for t in pair)
                for role, pair in (("gate_up", lora.gate_up), ("gate", lora.gate), ("up", lora.up), ("down", lora.down))
                if pair is not None
            }
            table.set_slot(slot, **pairs, gate_up_scale=lora.gate_up_scale, down_scale=lora.down_scale)

    def load_adapter(self, name: str, source) -> int:
        """Loads an adapter into a free slot of every table, in place (a compiled model keeps its graphs).

        Linears that no resident adapter targeted yet are wrapped on the way (a compiled model then
        recompiles once). Nothing changes when the adapter is refused.

        Args:
            name: a new adapter name.
            source: a PEFT adapter directory or a ``(state_dict, config)`` pair (see
                ``adapters.read_adapter``).

        Returns:
            The slot it occupies.

        Raises:
            ValueError: the name is taken, every slot is used, the rank exceeds ``max_rank``, the
                adapter does not fit the model, or its weights hold NaN or Inf or overflow the model's
                dtype. NotImplementedError: an unsupported PEFT feature.
        """
        check_adapter_name(name)
        with self._lock:
            if name in self._slot_of:
                raise ValueError(f"adapter {name!r} is already loaded (slot {self._slot_of[name]})")
            free = [slot for slot in range(self.max_loras) if slot not in self._slot_of.values()]
            if not free:
                raise ValueError(
                    f"adapter {name!r}: all {self.max_loras} slots are used by {self.adapter_names}; unload one first"
                )
            adapter = self._read(name, source)
            self._write(free[0], adapter)
            self._slot_of[name] = free[0]
            return free[0]

    def unload_adapter(self, name: str) -> None:
        """Zeros the adapter's slot in every table and frees it.

        Raises:
            KeyError: the adapter is not loaded. ValueError: the current mapping still uses it.
        """
        with self._lock:
            if name not in self._slot_of:
                raise KeyError(f"adapter {name!r} is not loaded; loaded: {self.adapter_names}")
            if self._row_names is not None and name in self._row_names:
                raise ValueError(f"adapter {name!r} is mapped to batch rows by set_adapters; remap the rows first")
            if any(saved is not None and name in saved for saved in self._saved_mappings):
                raise ValueError(
                    f"adapter {name!r} is in the mapping an enclosing adapters() block restores; unload it after "
                    "that block"
                )
            slot = self._slot_of.pop(name)
            for _, linear in self._linears.values():
                linear.clear_slot(slot)
            for table in self._tables.values():
                table.clear_slot(slot)

    # --- mapping --------------------------------------------------------------------------------

    def set_adapters(self, names: Sequence[str | None] | None) -> None:
        """Chooses each batch row's adapter for the following forward passes.

        Args:
            names: one entry per batch row, an adapter name or None (the base model), or None to
                remove the mapping (every row runs the base model, any batch size). The batch of
                every following call must have ``len(names)`` rows.

        Raises:
            TypeError: ``names`` is a string or holds something other than names and None.
            KeyError: a name that is not loaded.
        """
        names = _row_names(names)
        with self._lock:
            self._check_patched()
            if names is None:
                self._map(None)
                return
            unknown = sorted({n for n in names if n is not None and n not in self._slot_of})
            if unknown:
                raise KeyError(f"adapters {unknown} are not loaded; loaded: {self.adapter_names}")
            self._map(names)

    def _map(self, names: list[str | None] | None) -> None:
        """Writes the mapping of already-checked names (held under the lock)."""
        if names is None:
            self.row_slots.clear()
        else:
            self.row_slots.set([-1 if n is None else self._slot_of[n] for n in names], self.device)
        self._row_names = names

    @contextlib.contextmanager
    def adapters(self, names: Sequence[str | None] | None) -> Iterator[None]:
        """``set_adapters(names)`` for the duration of a ``with`` block, then the previous mapping.

        The block holds the handle's lock: another thread's block waits until this one exits (see
        the class docstring). Blocks nest; an adapter that an enclosing block restores cannot be
        unloaded inside it, so every exit restores exactly what was there.
        """
        with self._lock:
            previous = self._row_names
            self.set_adapters(names)
            self._saved_mappings.append(previous)
            try:
                yield
            finally:
                self._saved_mappings.pop()
                if self._tables:
                    self._map(previous)

    def _enter_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Released by _exit_forward, which nn.Module calls even when a hook or the forward raises.
        if not torch.compiler.is_compiling():
            self._lock.acquire()
        self._check_batch(args, kwargs)

    def _exit_forward(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if not torch.compiler.is_compiling():
            self._lock.release()

    def _check_block_rows(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden_states = args[0] if args else kwargs.get("hidden_states")
        if isinstance(hidden_states, torch.Tensor):
            self.row_slots.check_rows(hidden_states, f"the patched MoE block {type(block).__name__}")

    def _check_batch(self, args: tuple, kwargs: dict) -> None:
        row_slot = self.row_slots.row_slot
        if row_slot is None:
            return
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if inputs is None and args:
            inputs = args[0]
        if isinstance(inputs, torch.Tensor) and inputs.shape[0] != row_slot.shape[0]:
            raise ValueError(
                f"the batch has {inputs.shape[0]} rows but set_adapters was given {row_slot.shape[0]} names; "
                "give one adapter name (or None) per batch row"
            )


def _row_names(names) -> list[str | None] | None:
    """``names`` as a list of names and None, or None; raises TypeError for anything else."""
    if names is None:
        return None
    if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise TypeError(
            f"names must be a sequence of adapter names (or None), one per batch row, or None; got "
            f"{type(names).__name__} {names!r}" + (f" (for one row, write [{names!r}])" if isinstance(names, str) else "")
        )
    names = list(names)
    bad = [n for n in names if n is not None and not isinstance(n, str)]
    if bad:
        raise TypeError(f"names must hold adapter names (str) or None, got {bad!r}")
    if not names:
        raise ValueError("names is empty; give one adapter name (or None) per batch row, or None for no mapping")
    return names


def patch_model(
    model: nn.Module,
    loras: Mapping[str, object],
    *,
    max_loras: int | None = None,
    max_rank: int | None = None,
    process_group=None,
    parallelism: str = "tensor",
) -> MoELoRAModel:
    """Patches ``model`` in place for per-row multi-LoRA inference and loads ``loras``.

    Args:
        model: a transformers MoE model of a family in ``models.FAMILIES`` (any dtype and device).
        loras: adapter name -> PEFT adapter directory or ``(state_dict, config)`` pair; loaded into
            slots ``0, 1, ...`` in order.
        max_loras: slots per layer; defaults to ``len(loras)``. Give more to load adapters later.
        max_rank: the largest rank the tables hold; defaults to the largest rank in ``loras``. Every
            slot is padded to it, so it and ``max_loras`` set the memory of the tables (per MoE
            layer ``max_loras * E * max_rank * (2H + 3I)`` elements, per wrapped linear
            ``max_loras * max_rank * (in + out)``), and an adapter loaded later must fit it.
        process_group: a ``torch.distributed`` group over which to split the routed experts (every
            rank calls ``patch_model`` with the same model and adapters); None runs unsplit.
        parallelism: with a group, ``"tensor"`` (each rank keeps ``I / world`` intermediate columns
            of every expert) or ``"expert"`` (each rank keeps ``E / world`` experts); see
            ``torch_moe_lora.parallel``. Attention, embeddings, shared experts and routers stay
            replicated.

    Returns:
        The ``MoELoRAModel`` handle (``set_adapters``, ``adapters``, ``load_adapter``, ...).

    Raises:
        NotImplementedError: no supported MoE block; unsupported adapter features.
        TypeError: ``loras`` not a mapping, a name not a str, ``max_loras``/``max_rank`` not
            positive ints.
        ValueError: adapters that do not fit the model or the tables; a block that does not split
            evenly over the group.
    """
    if not isinstance(loras, Mapping):
        raise TypeError(f"patch_model: loras must be a mapping of adapter name -> source, got {type(loras).__name__}")
    for name, value in (("max_loras", max_loras), ("max_rank", max_rank)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise TypeError(f"patch_model: {name} must be a positive int or None, got {value!r}")
    for name in loras:
        check_adapter_name(name)
    blocks = find_moe_blocks(model)
    sharding = None if process_group is None else ExpertSharding.create(process_group, parallelism)
    if sharding is not None:
        for block in blocks:
            sharding.check(block)
    if any(hasattr(block.experts, _STATE_ATTR) for block in blocks):
        raise ValueError(f"{type(model).__name__} is already patched; call unpatch() on its handle first")
    adapters = {name: read_adapter(name, source, model, blocks, sharding) for name, source in loras.items()}
    for name, adapter in adapters.items():
        _check_finite(adapter, loras[name], model, blocks)
    if not adapters and (max_loras is None or max_rank is None):
        raise ValueError("patch_model: without adapters, give max_loras and max_rank")
    max_loras = len(adapters) if max_loras is None else max_loras
    max_rank = max(a.rank for a in adapters.values()) if max_rank is None else max_rank
    if max_loras < len(adapters):
        raise ValueError(f"patch_model: {len(adapters)} adapters do not fit max_loras={max_loras}")
    for adapter in adapters.values():
        _check_rank(adapter, max_rank)
    if sharding is not None:
        for block in blocks:
            sharding.shard_block(block)
    split_gate_up = any(a.split_gate_up for a in adapters.values())
    handle = MoELoRAModel(model, blocks, max_loras, max_rank, split_gate_up, sharding)
    for slot, adapter in enumerate(adapters.values()):
        handle._write(slot, adapter)
        handle._slot_of[adapter.name] = slot
    return handle
