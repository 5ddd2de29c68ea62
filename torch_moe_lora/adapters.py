"""Reading PEFT LoRA adapters into per-module pieces in the layouts the patched layers use.

An adapter is a directory saved by PEFT's ``save_pretrained`` (``adapter_config.json`` and
``adapter_model.safetensors``; pickle files are never read) or an in-memory ``(state_dict, config)``
pair, the state dict keyed as PEFT saves it (``base_model.model.<module>.lora_A.weight``).

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

Scales follow PEFT: ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), with ``rank_pattern`` and
``alpha_pattern`` matched against the module key (``<module>.<parameter>`` for target parameters).
Everything PEFT could compute differently is refused with an error naming the adapter and the
feature, before anything is loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .linear import MultiLoRALinear
from .models import LegacyTarget, MoEBlock, legacy_expert_target

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

# Config fields that change what an adapter computes beyond B A x; any truthy value is refused.
_UNSUPPORTED_CONFIG = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "LoRA bias (lora_bias)",
    "modules_to_save": "modules_to_save",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer_replication",
    "fan_in_fan_out": "fan_in_fan_out",
    "use_qalora": "QALoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "alora_invocation_tokens": "aLoRA (alora_invocation_tokens)",
    "velora_config": "VeLoRA (velora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "megatron_config": "Megatron layers (megatron_config)",
}
# Keys of state-dict entries that are not plain LoRA A/B weights, by the feature they belong to.
_UNSUPPORTED_KEYS = (
    (".lora_magnitude_vector", "DoRA (lora_magnitude_vector)"),
    (".lora_embedding_", "LoRA on embeddings"),
    (".modules_to_save.", "modules_to_save"),
    (".token_adapter.", "trainable tokens"),
    ("lora_B.bias", "LoRA bias (lora_bias)"),
)
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


FULL_PARAMETERS_ATTR = "_moe_lora_full_parameters"
"""Attribute of an experts module whose parameters were sharded (``parallel.py``): name -> a meta
tensor of the whole parameter's shape, against which adapters written for the whole model are read."""


def _whole_parameter(experts: nn.Module, name: str) -> torch.Tensor:
    """The parameter ``name`` as the whole model has it (its full-shape meta tensor on a shard)."""
    return getattr(experts, FULL_PARAMETERS_ATTR, {}).get(name, getattr(experts, name))


class LinearLoRA(NamedTuple):
    """The LoRA of one ``nn.Linear``: ``a [r, in]``, ``b [out, r]`` (the file's dtype) and its scale."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


class ExpertsLoRA(NamedTuple):
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

    def joined(self, gate_rows: torch.Tensor) -> ExpertsLoRA:
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
    experts: dict[str, ExpertsLoRA]
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


class StoredTensor:
    """A 2-D tensor of an open safetensors file; indexing reads only the indexed slice.

    Attributes:
        key: its name in the file; shape: its ``torch.Size``.
    """

    def __init__(self, file, key: str):
        self.key, self._slice = key, file.get_slice(key)
        self.shape = torch.Size(self._slice.get_shape())

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index) -> torch.Tensor:
        return self._slice[index]


def _adapter_paths(path: str | os.PathLike) -> tuple[str, str]:
    config_path, weights_path = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: no {ADAPTER_CONFIG}; expected a PEFT adapter directory")
    if not os.path.isfile(weights_path):
        pickled = " (adapter_model.bin is a pickle and is not read: re-save with safetensors)"
        raise FileNotFoundError(
            f"{path}: no {ADAPTER_WEIGHTS}{pickled if os.path.isfile(os.path.join(path, 'adapter_model.bin')) else ''}"
        )
    return config_path, weights_path


def load_adapter_files(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Reads ``adapter_config.json`` and ``adapter_model.safetensors`` from a PEFT adapter directory.

    Returns:
        ``(state_dict, config)``: tensors on the CPU in the file's dtype, the config as a dict.

    Raises:
        FileNotFoundError: a file is missing (a pickled ``adapter_model.bin`` is named, not read).
    """
    config_path, weights_path = _adapter_paths(path)
    with open(config_path) as f:
        config = json.load(f)
    return load_file(weights_path, device="cpu"), config


def open_adapter_files(path: str | os.PathLike) -> tuple[dict[str, StoredTensor], dict]:
    """Like ``load_adapter_files``, but nothing is read until a tensor is indexed (``StoredTensor``),
    so that a rank holding a shard of the experts reads only its slices."""
    config_path, weights_path = _adapter_paths(path)
    with open(config_path) as f:
        config = json.load(f)
    file = safe_open(weights_path, framework="pt", device="cpu")
    return {key: StoredTensor(file, key) for key in file.keys()}, config


def _take(t, rows: list[slice] | None = None, cols: list[slice] | None = None) -> torch.Tensor:
    """The rows (runs of dim 0) and columns (runs of dim 1) of a 2-D tensor or ``StoredTensor``,
    concatenated in order; None takes the whole dimension. A ``StoredTensor`` reads only these."""
    rows, cols = rows or [slice(None)], cols or [slice(None)]
    blocks = [[t[r, c] for c in cols] for r in rows]
    if len(rows) == 1 and len(cols) == 1:
        return blocks[0][0]
    return torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)


def _config_dict(config) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"adapter config must be a LoraConfig or a dict, got {type(config).__name__}")


def _pattern_value(patterns: Mapping[str, object] | None, key: str, default):
    # peft.utils.other.get_pattern_key: the first pattern that matches a dotted suffix of the key.
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _fold(b: torch.Tensor, scale: float, table_scale: float) -> torch.Tensor:
    """B rescaled so that ``table_scale * B' == scale * B`` (``table_scale`` is the largest
    magnitude among the scales it stands for, so it is 0 only when ``scale`` is)."""
    return b if scale == table_scale or table_scale == 0 else b * (scale / table_scale)


class _Reader:
    """Turns one adapter's state dict into an ``AdapterLoRA`` for one model."""

    def __init__(self, name: str, config: dict, model: nn.Module, blocks: list[MoEBlock], sharding=None):
        self.name, self.config, self.model, self.sharding = name, config, model, sharding
        self.block_of_experts = {id(b.experts): b for b in blocks}
        self.block_of_name = {b.name: b for b in blocks}
        self.routers = {id(getattr(b.block, b.family.router_attr)) for b in blocks}
        self.families = list({id(b.family): b.family for b in blocks}.values())
        output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.output_embeddings = id(output_embeddings) if output_embeddings is not None else None

    def error(self, message: str, kind: type[Exception] = ValueError) -> Exception:
        return kind(f"adapter {self.name!r}: {message}")

    def unsupported(self, feature: str) -> Exception:
        return self.error(f"{feature} is not supported", NotImplementedError)

    def check_config(self) -> None:
        peft_type = self.config.get("peft_type")
        peft_type = str(getattr(peft_type, "value", peft_type))
        if peft_type != "LORA":
            raise self.unsupported(f"PEFT type {peft_type!r} (only LORA)")
        for field, feature in _UNSUPPORTED_CONFIG.items():
            if self.config.get(field):
                raise self.unsupported(feature)
        if self.config.get("bias", "none") != "none":
            raise self.unsupported(f"training base-model biases (bias={self.config['bias']!r})")

    def scale(self, key: str, rank: int) -> float:
        """PEFT's scaling for the module (or parameter) key; checks the configured rank."""
        configured = _pattern_value(self.config.get("rank_pattern"), key, self.config.get("r", 8))
        if configured != rank:
            raise self.error(f"{key}: the weights have rank {rank} but the config gives r={configured}")
        alpha = _pattern_value(self.config.get("alpha_pattern"), key, self.config.get("lora_alpha", 8))
        return alpha / (math.sqrt(rank) if self.config.get("use_rslora") else rank)

    def factors(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """``{module path: {"A": tensor, "B": tensor}}`` with PEFT's prefix removed."""
        found: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state_dict.items():
            for marker, feature in _UNSUPPORTED_KEYS:
                if marker in key:
                    raise self.unsupported(f"{feature} (key {key})")
            match = _LORA_KEY.fullmatch(key)
            if match is None:
                raise self.error(f"key {key} is not a LoRA A/B weight")
            module = match["module"].removeprefix(PEFT_PREFIX)
            found.setdefault(module, {})[match["factor"]] = tensor
        for module, pair in found.items():
            if len(pair) != 2:
                raise self.error(f"{module} has lora_{'A' if 'B' in pair else 'B'} missing")
        if not found:
            raise self.error("the state dict holds no LoRA weights")
        return found

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
        is_plain_linear = isinstance(module, nn.Linear) and type(module).forward in (
            nn.Linear.forward,
            MultiLoRALinear.forward,
        )
        if not is_plain_linear:
            raise self.unsupported(f"LoRA on {path} ({what}; only nn.Linear modules and expert parameters)")

    def linear(self, path: str, module: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> LinearLoRA:
        rank = a.shape[0]
        if a.shape != (rank, module.in_features) or b.shape != (module.out_features, rank):
            raise self.error(
                f"{path}: LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not match the model's "
                f"nn.Linear({module.in_features}, {module.out_features}) (expected A [r, {module.in_features}], "
                f"B [{module.out_features}, r])"
            )
        for target in self.config.get("target_parameters") or ():
            if f"{path}.weight" == target or f"{path}.weight".endswith(f".{target}"):
                raise self.unsupported(f"target_parameters on nn.Linear weights ({path}.weight)")
        return LinearLoRA(_take(a), _take(b), self.scale(path, rank))

    def expert_parameter(self, path: str, depth: int, block: MoEBlock) -> str:
        """Which experts parameter the wrapper ``depth`` levels below the outermost one targets."""
        targets = self.config.get("target_parameters") or ()
        targeted = [
            name
            for name, _ in block.experts.named_parameters(recurse=False)
            if any(f"{path}.{name}" == t or f"{path}.{name}".endswith(f".{t}") for t in targets)
        ]
        if depth >= len(targeted):
            raise self.error(
                f"{path}: LoRA weights for {depth + 1} nested parameter wrappers, but target_parameters "
                f"{list(targets)} match only {targeted}"
            )
        name = targeted[len(targeted) - 1 - depth]
        if name not in (block.spec.w13_name, block.spec.w2_name):
            raise self.unsupported(f"LoRA on the expert parameter {path}.{name}")
        return name

    def experts_pair(self, path: str, param: str, block: MoEBlock, a, b):
        """``(A [E, r, in], B [E, out, r])`` in the op's layout (this rank's slices only, under
        parallelism), and the scale."""
        experts, spec = block.experts, block.spec
        weight = _whole_parameter(experts, param)
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
        return pair, self.scale(f"{path}.{param}", rank)

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
        w13 = _whole_parameter(block.experts, block.spec.w13_name)
        w2 = _whole_parameter(block.experts, block.spec.w2_name)
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
        self.check_config()
        joint: dict[str, dict[str, tuple]] = {}
        legacy: dict[str, dict[str, dict]] = {}
        linears: dict[str, LinearLoRA] = {}
        for path, pair in self.factors(state_dict).items():
            a, b = pair["A"], pair["B"]
            owner, depth = path, 0
            while owner.endswith(".base_layer"):
                owner, depth = owner.removesuffix(".base_layer"), depth + 1
            target = self.legacy_target(owner) if depth == 0 else None
            if target is not None:
                rank = a.shape[0]
                roles = legacy.setdefault(target.block_name, {}).setdefault(target.role, {})
                roles[target.expert] = (a, b, self.scale(owner, rank))
                continue
            module = self.module(owner)
            if module is None:
                raise self.error(f"{path}: matches no module of {type(self.model).__name__}")
            block = self.block_of_experts.get(id(module))
            if block is not None:
                param = self.expert_parameter(owner, depth, block)
                role = "gate_up" if param == block.spec.w13_name else "down"
                joint.setdefault(block.name, {})[role] = self.experts_pair(owner, param, block, a, b)
                continue
            if depth:
                raise self.unsupported(f"parameter wrappers on {owner} ({type(module).__name__})")
            self.classify_module(owner, module)
            linears[owner] = self.linear(owner, module, a, b)
        experts = {}
        for block_name in joint.keys() | legacy.keys():
            if block_name in joint and block_name in legacy:
                raise self.error(f"{block_name}: both fused (target_parameters) and per-expert LoRA weights")
            experts[block_name] = self.experts_lora(
                joint.get(block_name, {}), legacy.get(block_name, {}), self.block_of_name[block_name]
            )
        return AdapterLoRA(self.name, experts, linears)

    def experts_lora(self, joint: dict, legacy: dict, block: MoEBlock) -> ExpertsLoRA:
        pairs = joint or self.legacy_pairs(legacy, block)
        gate_up_scale = max((pairs[r][1] for r in ("gate_up", "gate", "up") if r in pairs), key=abs, default=1.0)
        folded = {}
        for role, ((a, b), scale) in pairs.items():
            folded[role] = (a, _fold(b, scale, gate_up_scale) if role in ("gate", "up") else b)
        return ExpertsLoRA(
            gate_up=folded.get("gate_up"),
            gate=folded.get("gate"),
            up=folded.get("up"),
            down=folded.get("down"),
            gate_up_scale=gate_up_scale,
            down_scale=pairs["down"][1] if "down" in pairs else 1.0,
        )


def read_adapter(name: str, source, model: nn.Module, blocks: list[MoEBlock], sharding=None) -> AdapterLoRA:
    """Reads one PEFT LoRA adapter for ``model``, checking every key against the model.

    Args:
        name: the adapter's name, used in error messages.
        source: a PEFT adapter directory (``str`` or ``os.PathLike``) or a ``(state_dict, config)``
            pair, ``config`` a ``LoraConfig`` or its dict, ``state_dict`` keyed as PEFT saves it.
        model: the base model the adapter was trained on (patched or not).
        blocks: ``models.find_moe_blocks(model)``.
        sharding: a ``parallel.ExpertSharding``: the expert LoRAs come back as this rank's shard,
            and from a directory only those slices are read from the file. None: whole.

    Returns:
        An ``AdapterLoRA``: ``experts`` maps MoE block names to ``ExpertsLoRA`` (``A [E, r, in]``,
        ``B [E, out, r]`` in the op's layout, sliced by ``sharding``), ``linears`` maps
        ``nn.Linear`` names to ``LinearLoRA`` (``A [r, in]``, ``B [out, r]``); tensors on the CPU.

    Raises:
        NotImplementedError: an unsupported feature (DoRA, ``lora_bias``, embedding, lm_head,
            convolution or router targets, ``modules_to_save``, another PEFT type, ...).
        ValueError: a key that matches no module, or shapes that do not match the model.
        FileNotFoundError: a directory without ``adapter_config.json`` or ``adapter_model.safetensors``.
    """
    if isinstance(source, (str, os.PathLike)):
        state_dict, config = open_adapter_files(source)
    else:
        state_dict, config = source
    return _Reader(name, _config_dict(config), model, blocks, sharding).read(state_dict)
