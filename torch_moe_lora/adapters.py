"""Reading PEFT LoRA adapters into per-module pieces in the layouts the patched layers use.

An adapter is a directory saved by PEFT's ``save_pretrained`` or an in-memory ``(state_dict, config)``
pair, the state dict keyed as PEFT saves it (``base_model.model.<module>.lora_A.weight``). What needs
no model weights is in ``adapter_config``: reading the directory, grouping the keys into per-module
LoRA layers, and the config (``AdapterConfig``: checked fields, scales, which modules and parameters
it targets). Here each targeted layer is checked against the model and laid out for it; weights of
modules the config does not target are ignored, as PEFT ignores them, with a warning naming them.

Three kinds of keys are understood:

* Expert parameters targeted with ``target_parameters`` (PEFT ``ParamWrapper``). A 3-D parameter
  ``[E, d1, d2]`` gets ``A [E*r, in]`` (rows expert-major, a view ``(E, r, in)``) and
  ``B [out, r*E]`` (a view ``(out, r, E)``). PEFT reads ``in, out = d1, d2`` when the experts
  module says ``is_transposed`` and ``in, out = d2, d1`` otherwise (also for experts without the
  flag, such as Llama 4's ``[E, H, 2I]``, whose op-layout LoRA is then ``(B^T, A^T)``). Several
  parameters of one module nest wrappers: the parameter targeted first (in the module's parameter
  order) is innermost, at ``experts.base_layer...``, the last at ``experts``.
* Per-expert modules of transformers 4.x adapters (``experts.<e>.w1``, ``experts.<e>.gate_proj``,
  ...), placed by ``models.legacy_expert_target``: separate gate and up LoRAs.
* LoRA on ``nn.Linear`` modules (attention, shared experts, dense MLPs, linear routers):
  ``A [r, in]``, ``B [out, r]``.

Everything PEFT could compute differently is refused, before anything is loaded, and every error
names the adapter (and its directory or file): unreadable files, config fields of the wrong type or
value (named with their value and what PEFT expects), tensors that are not floating-point 2-D
matrices, keys that are not LoRA weights, shapes that do not fit the model, unsupported features.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from .adapter_config import AdapterConfig, LoRALayer, StoredTensor, adapter_where, lora_layers, open_adapter_files
from .adapter_config import load_adapter_files  # noqa: F401  (callers import it from here)
from .linear import MultiLoRALinear, wrappable_linear
from .models import LegacyTarget, MoEBlock, legacy_expert_target
from .parallel import whole_parameter

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LinearLoRA(NamedTuple):
    """The LoRA of one ``nn.Linear``: ``a [r, in]``, ``b [out, r]`` (the file's dtype) and its scale."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


class BlockLoRA(NamedTuple):
    """The LoRA of one MoE block's experts, in the op's layout (``w13 [E, 2I, H]``, ``w2 [E, H, I]``).

    Each projection is ``(A [E, r, in], B [E, out, r])`` or None: ``gate_up`` (joint, from
    ``target_parameters``; rows in the experts' gate_up row order) or ``gate`` and ``up`` (separate,
    from 4.x per-expert adapters; ``B [E, I, r]``), and ``down``. Any per-expert or gate-versus-up
    difference in scale is folded into B, so one ``gate_up_scale`` and one ``down_scale`` are exact.
    """

    gate_up: tuple[torch.Tensor, torch.Tensor] | None
    gate: tuple[torch.Tensor, torch.Tensor] | None
    up: tuple[torch.Tensor, torch.Tensor] | None
    down: tuple[torch.Tensor, torch.Tensor] | None
    gate_up_scale: float
    down_scale: float

    @property
    def split_gate_up(self) -> bool:
        """Whether gate and up have separate LoRAs."""
        return self.gate is not None or self.up is not None

    @property
    def rank(self) -> int:
        """The largest rank of its projections."""
        return max(pair[0].shape[1] for pair in (self.gate_up, self.gate, self.up, self.down) if pair is not None)

    def joined(self, gate_rows: torch.Tensor) -> BlockLoRA:
        """The same LoRA with gate and up joined into one gate_up LoRA of rank ``r_gate + r_up``.

        A stacks the gate and up A's; B is block-diagonal (gate rows read the gate part of the rank,
        up rows the up part), which is exactly PEFT's own conversion of per-expert adapters.

        Args:
            gate_rows: ``[2I]`` bool, True on the gate rows of ``w13``.
        """
        if not self.split_gate_up:
            return self
        ref = self.gate if self.gate is not None else self.up
        num_experts, hidden, rows = ref[0].shape[0], ref[0].shape[2], gate_rows.shape[0]
        empty = (ref[0].new_zeros(num_experts, 0, hidden), ref[1].new_zeros(num_experts, rows // 2, 0))
        gate = self.gate if self.gate is not None else empty
        up = self.up if self.up is not None else empty
        rank_gate, rank_up = gate[0].shape[1], up[0].shape[1]
        a = torch.cat([gate[0], up[0].to(gate[0].dtype)], dim=1)
        b = ref[1].new_zeros(num_experts, rows, rank_gate + rank_up)
        b[:, gate_rows, :rank_gate] = gate[1].to(b.dtype)
        b[:, ~gate_rows, rank_gate:] = up[1].to(b.dtype)
        return self._replace(gate_up=(a, b), gate=None, up=None)


class AdapterLoRA(NamedTuple):
    """One adapter read for one model: expert LoRAs by MoE block name, linear LoRAs by module name."""

    name: str
    experts: dict[str, BlockLoRA]
    linears: dict[str, LinearLoRA]

    @property
    def rank(self) -> int:
        """The largest rank of any of its modules (separate gate/up LoRAs count one by one)."""
        ranks = [e.rank for e in self.experts.values()] + [lin.a.shape[0] for lin in self.linears.values()]
        return max(ranks)

    @property
    def split_gate_up(self) -> bool:
        """Whether any block has separate gate and up LoRAs (a 4.x per-expert adapter)."""
        return any(e.split_gate_up for e in self.experts.values())


def check_adapter_name(name) -> None:
    """Raises unless ``name`` is a non-empty ``str`` (TypeError for another type, ValueError for ``""``)."""
    if not isinstance(name, str):
        raise TypeError(f"adapter name must be a non-empty str, got {name!r} ({type(name).__name__})")
    if not name:
        raise ValueError("adapter name must be a non-empty str, got ''")


def _take(t, rows: list[slice] | None = None, cols: list[slice] | None = None) -> torch.Tensor:
    """The rows (runs of dim 0) and columns (runs of dim 1) of a 2-D tensor or ``StoredTensor``,
    concatenated in order; None takes the whole dimension. A ``StoredTensor`` reads only these."""
    rows, cols = rows or [slice(None)], cols or [slice(None)]
    blocks = [[t[r, c] for c in cols] for r in rows]
    if len(rows) == 1 and len(cols) == 1:
        return blocks[0][0]
    return torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)


def _fold(b: torch.Tensor, scale: float, table_scale: float) -> torch.Tensor:
    """B rescaled so that ``table_scale * B' == scale * B`` (``table_scale`` is the largest
    magnitude among the scales it stands for, so it is 0 only when ``scale`` is)."""
    return b if scale == table_scale or table_scale == 0 else b * (scale / table_scale)


# Ignored keys a warning lists before it says how many more there are.
_KEYS_SHOWN = 8


class _Reader:
    """Turns one adapter's state dict into an ``AdapterLoRA`` for one model."""

    def __init__(
        self, name: str, config: dict, model: nn.Module, blocks: list[MoEBlock], sharding=None, path: str | None = None
    ):
        self.name, self.model, self.sharding = name, model, sharding
        self.where = adapter_where(name, path)
        self.config = AdapterConfig(config, self.where, model)
        self.block_of_experts = {id(b.experts): b for b in blocks}
        self.block_of_name = {b.name: b for b in blocks}
        self.routers = {id(getattr(b.block, b.family.router_attr)) for b in blocks}
        self.families = list({id(b.family): b.family for b in blocks}.values())
        output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.output_embeddings = id(output_embeddings) if output_embeddings is not None else None

    def error(self, message: str, kind: type[Exception] = ValueError) -> Exception:
        return kind(f"{self.where}: {message}")

    def unsupported(self, feature: str) -> Exception:
        return self.error(f"{feature} is not supported", NotImplementedError)

    def factors(self, path: str, layer: LoRALayer) -> tuple[torch.Tensor | StoredTensor, torch.Tensor | StoredTensor]:
        """``(A, B)`` of a layer PEFT loads; refuses its other keys and a missing factor."""
        if layer.unsupported:
            raise self.unsupported(layer.unsupported[0])
        if len(layer.factors) != 2:
            raise self.error(f"{path} has lora_{'A' if 'B' in layer.factors else 'B'} missing")
        return layer.factors["A"], layer.factors["B"]

    def legacy_target(self, path: str) -> LegacyTarget | None:
        """Where a 4.x per-expert module name lands in one of the model's blocks, if it is one."""
        for family in self.families:
            target = legacy_expert_target(family, path)
            if target is not None and target.block_name in self.block_of_name:
                return target
        return None

    def module(self, path: str) -> nn.Module | None:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            return None

    def classify_module(self, path: str, module: nn.Module) -> None:
        """Raises for a targeted module that is not a plain ``nn.Linear``."""
        what = type(module).__name__
        if id(module) == self.output_embeddings:
            raise self.unsupported(f"LoRA on the output embeddings ({path}, lm_head)")
        if isinstance(module, nn.Embedding):
            raise self.unsupported(f"LoRA on embeddings ({path})")
        if isinstance(module, _CONV) or what == "Conv1D":
            raise self.unsupported(f"LoRA on convolutions ({path}, {what})")
        if id(module) in self.routers:
            raise self.unsupported(f"LoRA on the MoE router {path} ({what})")
        if not (isinstance(module, MultiLoRALinear) or wrappable_linear(module)):
            raise self.unsupported(
                f"LoRA on {path} ({what}; only nn.Linear modules, transformers' FP8Linear and expert parameters)"
            )

    def linear(self, path: str, module: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> LinearLoRA:
        rank = a.shape[0]
        if a.shape != (rank, module.in_features) or b.shape != (module.out_features, rank):
            raise self.error(
                f"{path}: LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not match the model's "
                f"nn.Linear({module.in_features}, {module.out_features}) (expected A [r, {module.in_features}], "
                f"B [{module.out_features}, r])"
            )
        if self.config.targets_parameter(f"{path}.weight"):
            raise self.unsupported(f"target_parameters on nn.Linear weights ({path}.weight)")
        return LinearLoRA(_take(a), _take(b), self.config.scale(path, rank))

    def expert_parameter(self, path: str, depth: int, block: MoEBlock) -> str | None:
        """Which experts parameter the wrapper ``depth`` levels below the outermost one targets; None
        where PEFT makes no such wrapper (``target_parameters`` names fewer parameters of the module)."""
        targeted = self.config.targeted_parameters(path, block.experts)
        if depth >= len(targeted):
            return None
        name = targeted[len(targeted) - 1 - depth]
        if name not in (block.spec.w13_name, block.spec.w2_name):
            raise self.unsupported(f"LoRA on the expert parameter {path}.{name}")
        return name

    def experts_pair(self, path: str, param: str, block: MoEBlock, a, b):
        """``(A [E, r, in], B [E, out, r])`` in the op's layout (this rank's slices only, under
        parallelism), and the scale."""
        experts, spec = block.experts, block.spec
        weight = whole_parameter(experts, param)
        num_experts, d1, d2 = weight.shape
        peft_transposed = bool(getattr(experts, "is_transposed", False))
        peft_in, peft_out = (d1, d2) if peft_transposed else (d2, d1)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] % num_experts or a.shape[1] != peft_in:
            raise self.error(
                f"{path}.{param}: LoRA A {tuple(a.shape)} does not match the parameter {tuple(weight.shape)} "
                f"(expected [E*r, {peft_in}] with E = {num_experts})"
            )
        rank = a.shape[0] // num_experts
        if b.shape != (peft_out, rank * num_experts):
            raise self.error(
                f"{path}.{param}: LoRA B {tuple(b.shape)} does not match A {tuple(a.shape)} and the parameter "
                f"{tuple(weight.shape)} (expected [{peft_out}, {rank * num_experts}])"
            )
        # PEFT's delta is B A on [E, out, in] when it swapped in/out, else (B A)^T; the op reads the
        # parameter as is, or transposed when spec.transposed.
        same_layout = peft_transposed == spec.transposed
        role = "gate_up" if param == spec.w13_name else "down"
        # The dimension tensor parallelism splits (gate_up's output rows, down's input columns) is a
        # row dimension of the file's B or a column dimension of its A.
        on_b_rows = (role == "gate_up") == same_layout
        split_size = peft_out if on_b_rows else peft_in
        kept, runs = self.shard_of(block, role, num_experts, split_size)
        a_rows = [slice(kept.start * rank, kept.stop * rank)]
        b_cols = None
        if len(kept) < num_experts:  # B's columns are (r, E): each rank index holds a run of experts
            b_cols = [slice(j * num_experts + kept.start, j * num_experts + kept.stop) for j in range(rank)]
        a = _take(a, a_rows, None if on_b_rows else runs).reshape(len(kept), rank, -1)
        b = _take(b, runs if on_b_rows else None, b_cols).reshape(-1, rank, len(kept)).permute(2, 0, 1)
        if same_layout:
            pair = (a.contiguous(), b.contiguous())
        else:
            pair = (b.transpose(1, 2).contiguous(), a.transpose(1, 2).contiguous())
        return pair, self.config.scale(f"{path}.{param}", rank)

    def shard_of(self, block: MoEBlock, role: str, num_experts: int, split_size: int) -> tuple[range, list | None]:
        """This rank's experts and runs of the tensor-parallel dimension (None: all of it)."""
        if self.sharding is None:
            return range(num_experts), None
        return self.sharding.lora_shard(block, role, num_experts, split_size)

    def legacy_pairs(self, pieces: dict, block: MoEBlock) -> dict[str, tuple[tuple[torch.Tensor, torch.Tensor], float]]:
        """Stacks per-expert ``(A [r, in], B [out, r], scale)`` into ``(A [E, r, in], B [E, out, r])`` per role.

        Experts without a LoRA get zeros; each expert's scale is folded into its B relative to the
        largest-magnitude scale of the role, which is returned with the stacked pair. Under
        parallelism only this rank's experts and slices are read and stacked.
        """
        w13 = whole_parameter(block.experts, block.spec.w13_name)
        w2 = whole_parameter(block.experts, block.spec.w2_name)
        if block.spec.transposed:
            w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
        num_experts, hidden, inter = w2.shape
        if not block.spec.gated or w13.shape[1] != 2 * inter:
            raise self.unsupported(f"per-expert gate/up LoRAs on non-gated experts ({block.name})")
        shapes = {"gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden)}
        stacked = {}
        for role, by_expert in pieces.items():
            fan_in, fan_out = shapes[role]
            rank = max(a.shape[0] for a, _, _ in by_expert.values())
            ref_scale = max((scale for _, _, scale in by_expert.values()), key=abs)
            for expert, (a, b, _) in by_expert.items():
                if expert >= num_experts:
                    raise self.error(f"{block.name}: LoRA for expert {expert} but the block has {num_experts} experts")
                if a.dim() != 2 or a.shape[1] != fan_in or b.shape != (fan_out, a.shape[0]):
                    raise self.error(
                        f"{block.name} expert {expert} {role}: LoRA A {tuple(a.shape)}, B {tuple(b.shape)} do not "
                        f"match the model (expected A [r, {fan_in}], B [{fan_out}, r])"
                    )
            kept, runs = self.shard_of(block, role, num_experts, inter)
            local = sum(len(range(inter)[run]) for run in runs) if runs else inter
            a_all = torch.zeros(len(kept), rank, local if role == "down" else fan_in)
            b_all = torch.zeros(len(kept), fan_out if role == "down" else local, rank)
            for expert, (a, b, scale) in by_expert.items():
                if expert not in kept:
                    continue
                a = _take(a, None, runs if role == "down" else None)
                b = _take(b, None if role == "down" else runs, None)
                a_all[expert - kept.start, : a.shape[0]] = a.float()
                b_all[expert - kept.start, :, : a.shape[0]] = _fold(b.float(), scale, ref_scale)
            stacked[role] = ((a_all, b_all), ref_scale)
        return stacked

    def read(self, state_dict: Mapping[str, torch.Tensor]) -> AdapterLoRA:
        self.config.check()
        joint: dict[str, dict[str, tuple]] = {}
        legacy: dict[str, dict[str, dict]] = {}
        linears: dict[str, LinearLoRA] = {}
        ignored: list[str] = []
        for path, layer in lora_layers(state_dict, self.where).items():
            owner, depth = path, 0
            while owner.endswith(".base_layer"):
                owner, depth = owner.removesuffix(".base_layer"), depth + 1
            target = self.legacy_target(owner) if depth == 0 else None
            if target is not None:
                if not self.config.targets_module(owner):
                    ignored += layer.keys
                    continue
                a, b = self.factors(path, layer)
                roles = legacy.setdefault(target.block_name, {}).setdefault(target.role, {})
                roles[target.expert] = (a, b, self.config.scale(owner, a.shape[0]))
                continue
            module = self.module(owner)
            block = self.block_of_experts.get(id(module))
            if block is not None:
                param = self.expert_parameter(owner, depth, block)
                if param is None:
                    ignored += layer.keys
                    continue
                role = "gate_up" if param == block.spec.w13_name else "down"
                a, b = self.factors(path, layer)
                joint.setdefault(block.name, {})[role] = self.experts_pair(owner, param, block, a, b)
                continue
            if module is None or not (
                self.config.targets_module(owner) or self.config.targeted_parameters(owner, module)
            ):
                ignored += layer.keys
                continue
            a, b = self.factors(path, layer)
            if depth:
                raise self.unsupported(f"parameter wrappers on {owner} ({type(module).__name__})")
            self.classify_module(owner, module)
            linears[owner] = self.linear(owner, module, a, b)
        if not (joint or legacy or linears):
            raise self.error(
                f"none of its LoRA weights is for a module its config targets in {type(self.model).__name__} "
                f"({self.config.describe_targets()})"
            )
        if ignored:
            self.warn_ignored(ignored)
        experts = {}
        for block_name in joint.keys() | legacy.keys():
            if block_name in joint and block_name in legacy:
                raise self.error(f"{block_name}: both fused (target_parameters) and per-expert LoRA weights")
            experts[block_name] = self.experts_lora(
                joint.get(block_name, {}), legacy.get(block_name, {}), self.block_of_name[block_name]
            )
        return AdapterLoRA(self.name, experts, linears)

    def warn_ignored(self, keys: list[str]) -> None:
        """Warns of weights PEFT does not load: of modules the config does not target or the model lacks."""
        more = len(keys) - _KEYS_SHOWN
        shown = ", ".join(keys[:_KEYS_SHOWN]) + (f" and {more} more" if more > 0 else "")
        warnings.warn(
            f"{self.where}: ignoring {len(keys)} weights of modules that its config does not target (or that "
            f"{type(self.model).__name__} lacks), as PEFT ignores them: {shown}",
            stacklevel=4,
        )

    def experts_lora(self, joint: dict, legacy: dict, block: MoEBlock) -> BlockLoRA:
        pairs = joint or self.legacy_pairs(legacy, block)
        gate_up_scale = max((pairs[r][1] for r in ("gate_up", "gate", "up") if r in pairs), key=abs, default=1.0)
        folded = {}
        for role, ((a, b), scale) in pairs.items():
            folded[role] = (a, _fold(b, scale, gate_up_scale) if role in ("gate", "up") else b)
        return BlockLoRA(
            gate_up=folded.get("gate_up"),
            gate=folded.get("gate"),
            up=folded.get("up"),
            down=folded.get("down"),
            gate_up_scale=gate_up_scale,
            down_scale=pairs["down"][1] if "down" in pairs else 1.0,
        )


def read_adapter(name: str, source, model: nn.Module, blocks: list[MoEBlock], sharding=None) -> AdapterLoRA:
    """Reads one PEFT LoRA adapter for ``model``, checking every key against the model.

    Only the weights PEFT loads are read: those of modules the config targets (``target_modules``,
    ``exclude_modules``, ``layers_to_transform``, ``target_parameters``, as PEFT matches them). Others
    are ignored, as PEFT ignores them, with a warning naming them.

    Args:
        name: the adapter's name (a non-empty ``str``), used in error messages.
        source: a PEFT adapter directory (``str`` or ``os.PathLike``) or a ``(state_dict, config)``
            pair, ``config`` a ``LoraConfig`` or its dict, ``state_dict`` keyed as PEFT saves it.
        model: the base model the adapter was trained on (patched or not).
        blocks: ``models.find_moe_blocks(model)``.
        sharding: a ``parallel.ExpertSharding``: the expert LoRAs come back as this rank's shard,
            and from a directory only those slices are read from the file. None: whole.

    Returns:
        An ``AdapterLoRA``: ``experts`` maps MoE block names to ``BlockLoRA`` (``A [E, r, in]``,
        ``B [E, out, r]`` in the op's layout, sliced by ``sharding``), ``linears`` maps
        ``nn.Linear`` names to ``LinearLoRA`` (``A [r, in]``, ``B [out, r]``); tensors on the CPU.

    Every error names the adapter, and the directory (or the file in it) it was read from.

    Raises:
        NotImplementedError: an unsupported feature (DoRA, ``lora_bias``, embedding, lm_head,
            convolution or router targets, ``modules_to_save``, another PEFT type, ...).
        TypeError: ``name``, ``source``, the state dict, the config or one of its fields, or a tensor
            of the wrong type (a config field is named with its value and what PEFT expects).
        ValueError: an empty name; a config field's invalid value; a file that is not valid JSON or
            safetensors (truncated, corrupt); a key that is not a LoRA weight; shapes or ranks that do
            not match the model or the config; no weights for any targeted module.
        FileNotFoundError: no such directory, or one without ``adapter_config.json`` or
            ``adapter_model.safetensors``. OSError: a file that cannot be read.
    """
    check_adapter_name(name)
    path = None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        state_dict, config = open_adapter_files(path, name)
    elif isinstance(source, (tuple, list)) and len(source) == 2:
        state_dict, config = source
    else:
        got = type(source).__name__
        if isinstance(source, (tuple, list)):
            got = f"a {got} of {len(source)}"
        raise TypeError(
            f"adapter {name!r}: source must be a PEFT adapter directory (str or os.PathLike) or a "
            f"(state_dict, config) pair, got {got}"
        )
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"adapter {name!r}: the state dict must be a mapping of key -> tensor, got {type(state_dict).__name__}"
        )
    if isinstance(config, Mapping):
        config = dict(config)
    elif hasattr(config, "to_dict"):
        config = config.to_dict()
    else:
        raise TypeError(f"adapter {name!r}: the config must be a LoraConfig or a dict, got {type(config).__name__}")
    return _Reader(name, config, model, blocks, sharding, path).read(state_dict)
