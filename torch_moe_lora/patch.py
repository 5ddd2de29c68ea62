"""Patching a Hugging Face MoE model for multi-LoRA inference, and the handle that drives it.

``patch_model`` finds every MoE block (``models.find_moe_blocks``), gives each one an
``ExpertLoRASlots`` table and routes its experts through ``fused_experts``: interface blocks by the
``moe_lora`` experts implementation registered in transformers' ``ALL_EXPERTS_FUNCTIONS``
(``patching.moe_lora_experts``), whole blocks (Llama 4) by replacing the block's forward with
``models.whole_block_forward``. Routing stays the model's own. Targeted ``nn.Linear`` layers are
swapped for ``MultiLoRALinear``. Every table is allocated once; registering, swapping in, unloading
and remapping adapters copy into them in place. Continuous batching is in ``serving``, the books of
registered and resident adapters in ``residency``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from . import serving
from .adapters import AdapterLoRA, BlockLoRA, check_adapter_name, read_adapter
from .linear import MultiLoRALinear, SharedInputGroup, SlotMapping, lora_table_dtype
from .lora import ExpertLoRASlots, check_device_memory
from .models import SHARED_INPUT_LINEARS, MoEBlock, find_moe_blocks, whole_block_forward
from .parallel import ExpertSharding
from .patching import (
    EXPERTS_IMPLEMENTATION,
    STATE_ATTR,
    Names,
    PatchedExperts,
    as_names,
    check_finite,
    check_rank,
    is_interface_block,
    moe_lora_experts,
)  # fmt: skip
from .reference import gate_rows_ref
from .residency import AdapterStore, host_copy


class MoELoRAModel:
    """Handle of a patched model: registers, maps and unloads adapters while the model runs.

    Slots: the tables hold ``max_loras`` adapters at a time, but any number can be registered. Every
    registered adapter is kept in host memory (pinned for tables on a GPU); mapping one that has
    no slot (``set_adapters``, ``adapters``, a continuous-batching request) writes it into a free
    slot, or into the slot of the least recently used adapter that no mapping, enclosing
    ``adapters()`` block or running request uses (that one stays registered). Tables are written in
    place, so compiled code and captured CUDA graphs keep running without recompiling.

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
        mapping: the ``linear.SlotMapping`` every patched layer reads.
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
        self.mapping = SlotMapping(max_loras)
        self._store = AdapterStore(max_loras)
        self._mapped: Names | None = None
        self._lock = threading.RLock()
        # The mappings that enclosing adapters() blocks restore on exit (innermost last).
        self._saved_mappings: list[Names | None] = []
        # Continuous batching (serving.RequestAdapters), once a request was added through the handle.
        self.serving = None
        self._linears: dict[str, tuple[nn.Linear, MultiLoRALinear]] = {}
        self._tables: dict[str, ExpertLoRASlots] = {}
        self._previous_implementation: dict[int, tuple[object, str | None]] = {}
        for block in blocks:
            w13, w2 = block.spec.w13(block.experts), block.spec.w2(block.experts)
            self._tables[block.name] = ExpertLoRASlots(
                max_loras, w2.shape[0], w2.shape[1], w2.shape[2], max_rank,
                gated=block.spec.gated, interleaved=block.spec.interleaved, split_gate_up=split_gate_up,
                dtype=block.dtype, device=w13.device,
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
        if any(block.spec.quantized for block in self.blocks):
            # transformers' FP8Experts dispatch through their own table of experts implementations.
            from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS

            ALL_FP8_EXPERTS_FUNCTIONS[EXPERTS_IMPLEMENTATION] = moe_lora_experts
        for block in self.blocks:
            state = PatchedExperts(block.spec, self._tables[block.name], self.mapping, self.sharding)
            setattr(block.experts, STATE_ATTR, state)
            if is_interface_block(block):
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
        if self.serving is not None and self.serving.running():
            raise RuntimeError(
                f"{name} is targeted by no adapter registered before continuous batching started, and its layer "
                "cannot be swapped for a LoRA one under a running manager (its CUDA graphs would not see it); "
                "register every adapter (add_adapter) before starting the manager, or stop it first"
            )
        dtype = lora_table_dtype(original, self.model)
        check_device_memory(
            MultiLoRALinear.table_bytes(original, self.max_loras, self.max_rank, dtype), original.weight.device,
            f"the LoRA table of {name}", self.max_loras, self.max_rank,
        )  # fmt: skip
        wrapped = MultiLoRALinear.wrap(original, self.max_loras, self.max_rank, self.mapping, dtype)
        setattr(parent, child, wrapped)
        self._linears[name] = (original, wrapped)
        prefix = f"{parent_name}." if parent_name else ""
        for siblings in SHARED_INPUT_LINEARS:
            if child in siblings:
                SharedInputGroup.join([self._linears[prefix + s][1] for s in siblings if prefix + s in self._linears])

    def unpatch(self) -> nn.Module:
        """Restores the model's own experts, block forwards and linears; the handle is then unusable.

        Returns:
            The model.

        Raises:
            NotImplementedError: the experts were sharded over a process group (their full weights
                are gone). RuntimeError: inside an ``adapters()`` block, or while continuous-batching
                requests added through the handle run or wait.
        """
        if self.sharding is not None:
            raise NotImplementedError("unpatch: the experts are sharded over a process group; reload the model")
        if self._saved_mappings:
            raise RuntimeError("unpatch: called inside an adapters() block; call it after the block")
        if self.serving is not None:
            self.serving.detach()
        for config, implementation in self._previous_implementation.values():
            config._experts_implementation = implementation
        for block in self.blocks:
            delattr(block.experts, STATE_ATTR)
            if not is_interface_block(block):
                del block.block.forward
        for name, (original, _) in self._linears.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, original)
        for hook in self._hooks:
            hook.remove()
        self._linears, self._tables, self.blocks = {}, {}, []
        self._store = AdapterStore(self.max_loras)
        self.mapping.clear()
        return self.model

    # --- adapters -------------------------------------------------------------------------------

    def _check_patched(self) -> None:
        if not self._tables:
            raise RuntimeError("this MoELoRAModel was unpatched; patch the model again")

    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters that occupy a slot, in slot order."""
        return self._store.resident

    @property
    def registered_adapters(self) -> list[str]:
        """Names of every registered adapter, in a slot or in host memory only, in registration order."""
        return self._store.names

    def slot_of(self, name: str) -> int | None:
        """The slot ``name`` occupies, or None (registered, in host memory only)."""
        return self._store.slot_of.get(name)

    def _read(self, name: str, source) -> AdapterLoRA:
        """Reads and checks an adapter against the tables; raises before anything changes."""
        self._check_patched()
        adapter = read_adapter(name, source, self.model, self.blocks, self.sharding)
        check_finite(adapter, source, self.model, self.blocks)
        joined = adapter.split_gate_up and not next(iter(self._tables.values())).weights.split_gate_up
        if joined:
            experts = dict(adapter.experts)
            for block in self.blocks:
                if block.name in experts:
                    experts[block.name] = experts[block.name].joined(self._gate_rows(block))
            adapter = adapter._replace(experts=experts)
        check_rank(adapter, self.max_rank, joined)
        return adapter

    def _gate_rows(self, block: MoEBlock) -> torch.Tensor:
        """``[2I]`` bool gate-row mask of the block's (on a shard: this rank's) gate_up rows."""
        rows = block.spec.w13(block.experts).shape[1]
        return gate_rows_ref(rows, gated=True, interleaved=block.spec.interleaved)

    def _register(self, name: str, adapter: AdapterLoRA) -> None:
        """Wraps the linears it targets (now, so that swapping it in later changes no module) and keeps
        a host copy in the tables' dtypes."""
        for linear in adapter.linears:
            self._wrap_linear(linear)
        linear_dtype = {n: self._linears[n][1].lora_a.dtype for n in adapter.linears}
        block_dtype = {n: t.weights.gate_up_a.dtype for n, t in self._tables.items()}
        self._store.add(name, host_copy(adapter, linear_dtype, block_dtype, pin=self.device.type == "cuda"))

    def _write(self, slot: int, adapter: AdapterLoRA) -> None:
        for name, (_, linear) in self._linears.items():
            lora = adapter.linears.get(name)
            if lora is None:
                linear.clear_slot(slot)
            else:
                linear.set_slot(slot, lora.a, lora.b, lora.scale, check_finite=False)
        for block_name, table in self._tables.items():
            lora = adapter.experts.get(block_name)
            if lora is None:
                table.clear_slot(slot)
                continue
            pairs = {role: pair for role, pair in zip(BlockLoRA._fields[:4], lora[:4]) if pair is not None}
            table.set_slot(
                slot, **pairs, gate_up_scale=lora.gate_up_scale, down_scale=lora.down_scale, check_finite=False
            )

    def _in_use(self, current: bool = True) -> dict[str, str]:
        """Adapter name -> what uses it: the mapping (unless ``current`` is False), an enclosing
        ``adapters()`` block, or running continuous-batching requests."""
        users = {}
        if self.serving is not None:
            users.update(dict.fromkeys(self.serving.in_use(), serving.RUNNING))
        for saved in self._saved_mappings:
            if saved is not None:
                users.update(dict.fromkeys((n for n in saved.names if n is not None), "an enclosing adapters() block"))
        if current and self._mapped is not None:
            users.update(dict.fromkeys((n for n in self._mapped.names if n is not None), "the mapping"))
        return users

    def _make_resident(self, names, current: bool = True) -> None:
        """Gives every adapter of ``names`` (registered) a slot, swapping in those without one.

        The writes are complete on return (the device is synchronized after a swap-in), so a request
        another stream runs next sees them. Held under the lock.

        Raises:
            ValueError: not enough slots can be freed.
        """
        names = [n for n in names if n is not None]
        placed = self._store.place(names, set(self._in_use(current)))
        for name, slot in placed:
            self._write(slot, self._store.host[name])
        if placed and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._store.touch(names)

    def add_adapter(self, name: str, source) -> None:
        """Registers an adapter in host memory without giving it a slot; it takes one (see the class
        docstring) when a mapping or a request names it. Linears that no registered adapter
        targeted yet are wrapped now (a compiled model then recompiles once).

        Args, Raises: as ``load_adapter``, less the slot errors.
        """
        check_adapter_name(name)
        with self._lock:
            if name in self._store:
                raise ValueError(f"adapter {name!r} is already registered")
            self._register(name, self._read(name, source))

    def load_adapter(self, name: str, source) -> int:
        """Registers an adapter and writes it into a slot now, in place (a compiled model keeps its graphs).

        The slot is a free one, else that of the least recently used adapter nothing uses (which
        stays registered, in host memory). Linears that no registered adapter targeted yet are
        wrapped on the way (a compiled model then recompiles once). Nothing changes when the adapter
        is refused.

        Args:
            name: a new adapter name.
            source: a PEFT adapter directory or a ``(state_dict, config)`` pair (see
                ``adapters.read_adapter``).

        Returns:
            The slot it occupies.

        Raises:
            ValueError: the name is taken, every slot holds an adapter in use, the rank exceeds
                ``max_rank``, the adapter does not fit the model, or its weights hold NaN or Inf or
                overflow the model's dtype. NotImplementedError: an unsupported PEFT feature.
        """
        check_adapter_name(name)
        with self._lock:
            if name in self._store:
                raise ValueError(f"adapter {name!r} is already loaded (slot {self.slot_of(name)})")
            adapter = self._read(name, source)
            if not self._store.free_slots() and set(self._store.slot_of) <= set(self._in_use()):
                raise ValueError(
                    f"adapter {name!r}: all {self.max_loras} slots are used by adapters in use "
                    f"({self.adapter_names}); unmap or unload one first"
                )
            self._register(name, adapter)
            self._make_resident([name])
            return self._store.slot_of[name]

    def unload_adapter(self, name: str) -> None:
        """Forgets an adapter: zeros its slot in every table and drops its host copy.

        Raises:
            KeyError: the adapter is not registered. ValueError: the mapping, an enclosing
                ``adapters()`` block or a running request uses it.
        """
        with self._lock:
            if name not in self._store:
                raise KeyError(f"adapter {name!r} is not loaded; loaded: {self.registered_adapters}")
            user = self._in_use().get(name)
            if user == "the mapping":
                raise ValueError(f"adapter {name!r} is mapped to batch rows by set_adapters; remap the rows first")
            if user == "an enclosing adapters() block":
                raise ValueError(
                    f"adapter {name!r} is in the mapping an enclosing adapters() block restores; unload it after "
                    "that block"
                )
            if user is not None:
                raise ValueError(f"adapter {name!r} is used by running requests; unload it when they have finished")
            slot = self._store.remove(name)
            if slot is not None:
                for _, linear in self._linears.values():
                    linear.clear_slot(slot)
                for table in self._tables.values():
                    table.clear_slot(slot)
                if self.serving is not None:
                    self.serving.wake()

    # --- continuous batching ------------------------------------------------------------------

    def waiting_requests(self) -> list[str]:
        """Ids of the continuous-batching requests added through this handle that wait for their
        adapter's slot, first come first (none before the first request)."""
        return [] if self.serving is None else self.serving.waiting()

    def _requests(self):
        if self.serving is None:
            self.serving = serving.RequestAdapters(self)
        return self.serving

    def init_continuous_batching(self, generation_config=None, continuous_batching_config=None, **kwargs):
        """``model.init_continuous_batching`` (transformers' ``ContinuousBatchingManager``) with KV-cache
        block sharing off, which would share blocks computed under another adapter. Add requests
        through ``add_request``; read results from the manager (``get_result``, ``request_id_iter``).

        Args:
            generation_config, continuous_batching_config, kwargs: as transformers takes them.
        """
        config = serving.continuous_batching_config(continuous_batching_config)
        return self.model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=config, **kwargs
        )

    def add_request(self, manager, input_ids: Sequence[int], *, adapter: str | None = None,
                    request_id: str | None = None, **kwargs) -> str:  # fmt: skip
        """Adds a request that runs on ``adapter`` to a continuous-batching manager of this model.

        An adapter without a slot is swapped in first (see the class docstring); when every slot
        holds an adapter that running requests use, the request waits, outside the manager, until
        one comes free. The adapter keeps its slot until the request's final output is delivered.

        Args:
            manager: from ``init_continuous_batching`` (or transformers' own, created with
                ``ContinuousBatchingConfig(allow_block_sharing=False)``).
            input_ids: the prompt's token ids.
            adapter: a registered adapter's name, or None for the base model.
            request_id: as ``manager.add_request`` takes it; a fresh id when None.
            kwargs: the rest of ``manager.add_request``'s arguments (``max_new_tokens``, ...).

        Returns:
            The request id (results come back from the manager under it).

        Raises:
            KeyError: ``adapter`` is not registered (only this request fails). ValueError: the
                manager shares KV-cache blocks, or the request id is running already.
            NotImplementedError: transformers older than 5.17, or ``num_return_sequences > 1``.
        """
        self._check_patched()
        return self._requests().add_request(manager, input_ids, adapter, request_id, **kwargs)

    def cancel_request(self, manager, request_id: str) -> None:
        """Cancels a request added by ``add_request`` (waiting for a slot or running) and frees its adapter."""
        self._requests().cancel_request(manager, request_id)

    def generate_batch(self, inputs: Sequence[Sequence[int]], adapters: Sequence[str | None] | None = None,
                       generation_config=None, continuous_batching_config=None, **kwargs) -> dict:  # fmt: skip
        """``model.generate_batch`` with an adapter per input, through transformers' continuous batching.

        Args:
            inputs: the prompts' token ids.
            adapters: one adapter name (or None) per input; None runs every input on the base model.
            generation_config, continuous_batching_config: as transformers takes them (block sharing
                is turned off).
            kwargs: passed to every ``add_request`` (e.g. ``max_new_tokens``).

        Returns:
            ``{"req_<i>": GenerationOutput}`` in input order, like transformers; an input naming an
            adapter that is not registered comes back with status FAILED and the error, the others
            run as usual.
        """
        self._check_patched()
        return serving.generate_batch(self, inputs, adapters, generation_config, continuous_batching_config, **kwargs)

    # --- mapping --------------------------------------------------------------------------------

    def set_adapters(self, names: Sequence[str | None] | None, *, lengths: Sequence[int] | None = None) -> None:
        """Chooses the adapter of each batch row, or of each sequence of a packed batch, for the
        following forward passes. Registered adapters without a slot are swapped in.

        Args:
            names: one entry per batch row (per sequence with ``lengths``), an adapter name or None
                (the base model), or None to remove the mapping (every row runs the base model, any
                batch size). The batch of every following call must have ``len(names)`` rows.
            lengths: for a packed batch (inputs ``[1, T]`` holding the sequences one after another,
                as with flash attention's varlen path), the token count of each sequence, adding up
                to ``T``; the mapping then holds one slot per token. None maps batch rows.

        Raises:
            TypeError: ``names`` is a string or holds something other than names and None, or
                ``lengths`` is not a sequence of positive ints of the same length.
            KeyError: a name that is not registered.
            ValueError: the adapters named need more slots than can be freed.
        """
        mapping = as_names(names, lengths)
        with self._lock:
            self._check_patched()
            if mapping is not None:
                unknown = sorted({n for n in mapping.names if n is not None and n not in self._store})
                if unknown:
                    raise KeyError(f"adapters {unknown} are not loaded; loaded: {self.registered_adapters}")
                self._make_resident(mapping.names, current=False)
            self._map(mapping)

    def _map(self, mapping: Names | None) -> None:
        """Writes an already-checked mapping whose adapters have slots (held under the lock)."""
        if mapping is None:
            self.mapping.clear()
        elif mapping.lengths is None:
            self.mapping.set(mapping.token_slots(self._store.slot_of), self.device)
        else:
            self.mapping.set_tokens(mapping.token_slots(self._store.slot_of), self.device)
        self._mapped = mapping
        if self.serving is not None:
            self.serving.wake()

    @contextlib.contextmanager
    def adapters(self, names: Sequence[str | None] | None, *, lengths: Sequence[int] | None = None) -> Iterator[None]:
        """``set_adapters(names, lengths=lengths)`` for the duration of a ``with`` block, then the
        previous mapping.

        The block holds the handle's lock: another thread's block waits until this one exits (see
        the class docstring). Blocks nest; an adapter that an enclosing block restores keeps its
        slot and cannot be unloaded inside it, so every exit restores exactly what was there.
        """
        with self._lock:
            previous = self._mapped
            self._saved_mappings.append(previous)
            try:
                self.set_adapters(names, lengths=lengths)
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
            self.mapping.check_rows(hidden_states, f"the patched MoE block {type(block).__name__}")

    def _check_batch(self, args: tuple, kwargs: dict) -> None:
        slots = self.mapping.row_slot
        if slots is None:
            return
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if inputs is None and args:
            inputs = args[0]
        if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
            return
        if self.mapping.per_token and inputs.shape[0] * inputs.shape[1] != slots.shape[0]:
            raise ValueError(
                f"the batch has {inputs.shape[0] * inputs.shape[1]} tokens but the packed mapping has "
                f"{slots.shape[0]}; the lengths given to set_adapters must add up to the batch's tokens"
            )
        if not self.mapping.per_token and inputs.shape[0] != slots.shape[0]:
            raise ValueError(
                f"the batch has {inputs.shape[0]} rows but set_adapters was given {slots.shape[0]} names; "
                "give one adapter name (or None) per batch row"
            )


def patch_model(
    model: nn.Module,
    loras: Mapping[str, object],
    *,
    max_loras: int | None = None,
    max_rank: int | None = None,
    process_group=None,
    parallelism: str = "tensor",
) -> MoELoRAModel:
    """Patches ``model`` in place for multi-LoRA inference (an adapter per batch row, per sequence of
    a packed batch, or per continuous-batching request) and registers ``loras``.

    Args:
        model: a transformers MoE model of a family in ``models.FAMILIES`` (any dtype and device).
        loras: adapter name -> PEFT adapter directory or ``(state_dict, config)`` pair, registered in
            order; the first ``max_loras`` take slots ``0, 1, ...``, the others stay in host memory
            until a mapping or a request names them (``MoELoRAModel``).
        max_loras: slots per layer; defaults to ``len(loras)``. Give more to load adapters later.
        max_rank: the largest rank the tables hold; defaults to the largest rank in ``loras``. Every
            slot is padded to it, so it and ``max_loras`` set the memory of the tables (per MoE
            layer ``max_loras * E * max_rank * (2H + 3I)`` elements, per wrapped linear
            ``max_loras * max_rank * (in + out)``), and an adapter loaded later must fit it. Tables
            that do not fit the device's free memory are refused before anything is allocated.
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
        ValueError: adapters that do not fit the model or the tables; tables larger than the
            device's free memory; a block that does not split evenly over the group.
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
    if any(hasattr(block.experts, STATE_ATTR) for block in blocks):
        raise ValueError(f"{type(model).__name__} is already patched; call unpatch() on its handle first")
    adapters = {name: read_adapter(name, source, model, blocks, sharding) for name, source in loras.items()}
    for name, adapter in adapters.items():
        check_finite(adapter, loras[name], model, blocks)
    if not adapters and (max_loras is None or max_rank is None):
        raise ValueError("patch_model: without adapters, give max_loras and max_rank")
    max_loras = len(adapters) if max_loras is None else max_loras
    max_rank = max(a.rank for a in adapters.values()) if max_rank is None else max_rank
    for adapter in adapters.values():
        check_rank(adapter, max_rank)
    split_gate_up = any(a.split_gate_up for a in adapters.values())
    if sharding is not None:
        for block in blocks:
            sharding.shard_block(block)
    device = blocks[0].spec.w13(blocks[0].experts).device
    need = sum(
        ExpertLoRASlots.table_bytes(max_loras, *b.spec.w2(b.experts).shape, max_rank, gated=b.spec.gated,
                                    split_gate_up=split_gate_up, dtype=b.dtype)
        for b in blocks
    )  # fmt: skip
    targeted = {name for adapter in adapters.values() for name in adapter.linears}
    need += sum(
        MultiLoRALinear.table_bytes(linear, max_loras, max_rank, lora_table_dtype(linear, model))
        for linear in map(model.get_submodule, targeted)
    )
    check_device_memory(need, device, f"the LoRA tables of {len(blocks)} MoE blocks and {len(targeted)} linears",
                        max_loras, max_rank)  # fmt: skip
    handle = MoELoRAModel(model, blocks, max_loras, max_rank, split_gate_up, sharding)
    for name, adapter in adapters.items():
        handle._register(name, adapter)
    handle._make_resident(list(adapters)[:max_loras])
    return handle
