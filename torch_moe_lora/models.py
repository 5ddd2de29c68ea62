"""What the library knows about each Hugging Face MoE family, in one registry.

Two kinds of MoE block exist in transformers 5 (checked against 5.17 and 5.24):

* Interface blocks. Their experts class is decorated with ``use_experts_implementation``
  (``transformers/integrations/moe.py``): the block routes, then calls
  ``self.experts(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K])``, and the experts
  forward dispatches on ``config._experts_implementation``. The patcher registers its own experts
  implementation; ``experts_spec`` tells it, from the experts module alone, how to call the op.
* Whole blocks (Llama 4). The experts module has no such interface, so the patcher replaces the
  block's forward; the family's ``WholeBlock`` says how the block routes, what its shared expert
  adds and what it returns, and ``whole_block_forward`` runs it around any experts function.

Per-family knowledge lives in ``FAMILIES`` as small declarative entries; everything else here is
generic. ``legacy_expert_target`` maps the per-expert module names of transformers 4.x checkpoints
and PEFT adapters (``experts.<e>.w1``, ``experts.<e>.gate_proj``, ...) onto gate/up/down roles.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import transformers.activations as hf_activations
import transformers.integrations.moe as hf_moe
from torch import nn

from .ops.checks import FLOAT_DTYPES
from .ops.fused_experts import FP8_DTYPES, WeightScales
from .reference import ACTIVATIONS

ROLES = ("gate", "up", "down")
"""Roles of the per-expert projections: ``w13`` holds gate and up rows, ``w2`` is down."""


@dataclass(frozen=True)
class ExpertsSpec:
    """How to call the fused experts op for one experts module.

    The flags match ``reference.fused_experts_ref``'s keyword arguments. The weight names and
    ``transposed`` say where the module keeps its weights; ``w13``/``w2``/``w13_bias``/``w2_bias``
    return them in the op's layout, as views of the module's parameters (never copies). FP8
    experts (transformers' ``FP8Experts``) also name their block scales (``w13_scale_name``,
    ``w2_scale_name``; the block is the module's ``block_size``).
    """

    activation: str
    gated: bool = True
    interleaved: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    weight_on_input: bool = False
    transposed: bool = False
    w13_name: str = "gate_up_proj"
    w2_name: str = "down_proj"
    w13_bias_name: str | None = None
    w2_bias_name: str | None = None
    w13_scale_name: str | None = None
    w2_scale_name: str | None = None

    @property
    def quantized(self) -> bool:
        return self.w13_scale_name is not None

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation == "swigluoai" and not self.gated:
            raise ValueError("activation 'swigluoai' needs gated=True")
        if self.interleaved and not self.gated:
            raise ValueError("interleaved=True needs gated=True")

    def w13(self, experts: nn.Module) -> torch.Tensor:
        """The gate/up weight ``[E, 2I, H]`` (``[E, I, H]`` when not gated), a view of the parameter."""
        weight = getattr(experts, self.w13_name)
        return weight.transpose(1, 2) if self.transposed else weight

    def w2(self, experts: nn.Module) -> torch.Tensor:
        """The down weight ``[E, H, I]``, a view of the parameter."""
        weight = getattr(experts, self.w2_name)
        return weight.transpose(1, 2) if self.transposed else weight

    def w13_bias(self, experts: nn.Module) -> torch.Tensor | None:
        """The gate/up bias ``[E, 2I]`` (``[E, I]`` when not gated), or None."""
        return None if self.w13_bias_name is None else getattr(experts, self.w13_bias_name)

    def w2_bias(self, experts: nn.Module) -> torch.Tensor | None:
        """The down bias ``[E, H]``, or None."""
        return None if self.w2_bias_name is None else getattr(experts, self.w2_bias_name)

    def scales(self, experts: nn.Module) -> WeightScales | None:
        """The block scales of FP8 weights (``WeightScales``), or None for weights in the model's dtype."""
        if not self.quantized:
            return None
        block_n, block_k = experts.block_size
        return WeightScales(
            getattr(experts, self.w13_scale_name), getattr(experts, self.w2_scale_name), block_n, block_k
        )

    def op_kwargs(self, experts: nn.Module) -> dict:
        """Keyword arguments of ``fused_experts_ref`` (and the op) for this module's weights.

        Args:
            experts: the experts module this spec was made from.

        Returns:
            ``dict`` with ``w13 [E, 2I, H]``, ``w2 [E, H, I]``, ``w13_bias [E, 2I] | None``,
            ``w2_bias [E, H] | None`` (the module's dtype, views of its parameters), the flags
            ``activation``, ``gated``, ``interleaved``, ``swiglu_alpha``, ``swiglu_limit``,
            ``weight_on_input`` and, for FP8 weights, ``scales``.
        """
        quantized = {} if not self.quantized else {"scales": self.scales(experts)}
        return dict(
            **quantized,
            w13=self.w13(experts),
            w2=self.w2(experts),
            w13_bias=self.w13_bias(experts),
            w2_bias=self.w2_bias(experts),
            activation=self.activation,
            gated=self.gated,
            interleaved=self.interleaved,
            swiglu_alpha=self.swiglu_alpha,
            swiglu_limit=self.swiglu_limit,
            weight_on_input=self.weight_on_input,
        )


@dataclass(frozen=True, eq=False)
class LegacyExperts:
    """Per-expert module names of transformers 4.x checkpoints and of PEFT adapters trained on them.

    A projection lived at ``<decoder layer>.<block_attr>.experts.<e>.<name>``; ``roles`` maps each
    ``name`` to ``"gate"``, ``"up"`` or ``"down"``.
    """

    block_attr: str
    roles: Mapping[str, str]


@dataclass(frozen=True, eq=False)
class WholeBlock:
    """How to run an MoE block that is outside the experts interface, around any experts function.

    ``route(block, x [T, H])`` returns ``(router_logits [T, E], topk_ids [T, K] int64,
    topk_weights [T, K])`` exactly as the block computes them; ``shared_output(block, x)`` is what
    the block's shared expert adds (``[T, H]``); ``pack_output(block, hidden_states, out [T, H],
    router_logits)`` builds the block's return value. ``experts_layout`` holds the ``ExpertsSpec``
    fields that the experts class fixes (all but the activation, read from its ``act_fn``).
    """

    route: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    shared_output: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    pack_output: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], object]
    experts_layout: Mapping[str, object]


@dataclass(frozen=True, eq=False)
class MoEFamily:
    """One model family's MoE block, as transformers 5 builds it.

    Attributes:
        name: the family's ``model_type``.
        block_class: class name of the MoE block.
        experts_class: class name of its experts module, found at ``block.<experts_attr>``.
        block_attr: attribute of the decoder layer that holds the block (dense layers hold an MLP
            there instead).
        router_attr: attribute of the block that holds the router.
        shared_experts: attributes of the block holding shared experts (and their gates); plain
            ``nn.Linear`` MLPs the block runs itself.
        legacy: per-expert naming of 4.x checkpoints and adapters; None where the experts were
            always stored fused.
        apply_gate: for an experts class that overrides ``_apply_gate``: the ``ExpertsSpec`` fields
            its gating amounts to, read from the module.
        whole_block: set for blocks outside the experts interface.
        experts_attr: attribute of the block that holds the experts module.
    """

    name: str
    block_class: str
    experts_class: str
    block_attr: str
    router_attr: str
    shared_experts: tuple[str, ...] = ()
    legacy: LegacyExperts | None = None
    apply_gate: Callable[[nn.Module], Mapping[str, object]] | None = None
    whole_block: WholeBlock | None = None
    experts_attr: str = "experts"


_W_ROLES = {"w1": "gate", "w3": "up", "w2": "down"}
_PROJ_ROLES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

SHARED_INPUT_LINEARS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling linears that transformers' decoder layers call one after another on the same input
tensor (the attention's, the dense MLPs' and shared experts'); patched together they share one LoRA
call (``linear.SharedInputGroup``). Where a model called them on different tensors, each would
compute the whole group: the outputs stay right, only the work grows."""


def _gpt_oss_gate(experts: nn.Module) -> Mapping[str, object]:
    # GptOssExperts._apply_gate: interleaved gate/up, clamped swiglu with alpha/limit attributes.
    return dict(activation="swigluoai", swiglu_alpha=float(experts.alpha), swiglu_limit=float(experts.limit))


def _llama4_route(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Llama4Router returns dense scores [T, E]: sigmoid of the top-k logits, 0 elsewhere.
    scores, router_logits = block.router(x)
    topk_ids = torch.topk(router_logits, block.router.top_k, dim=1).indices
    return router_logits, topk_ids, scores.gather(1, topk_ids)


FAMILIES: dict[str, MoEFamily] = {
    f.name: f
    for f in (
        MoEFamily(
            "mixtral", "MixtralSparseMoeBlock", "MixtralExperts", block_attr="mlp", router_attr="gate",
            legacy=LegacyExperts("block_sparse_moe", _W_ROLES),
        ),
        MoEFamily(
            "qwen2_moe", "Qwen2MoeSparseMoeBlock", "Qwen2MoeExperts", block_attr="mlp", router_attr="gate",
            shared_experts=("shared_expert", "shared_expert_gate"), legacy=LegacyExperts("mlp", _PROJ_ROLES),
        ),
        MoEFamily(
            "qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeExperts", block_attr="mlp", router_attr="gate",
            legacy=LegacyExperts("mlp", _PROJ_ROLES),
        ),
        MoEFamily(
            "qwen3_next", "Qwen3NextSparseMoeBlock", "Qwen3NextExperts", block_attr="mlp", router_attr="gate",
            shared_experts=("shared_expert", "shared_expert_gate"), legacy=LegacyExperts("mlp", _PROJ_ROLES),
        ),
        MoEFamily(
            "olmoe", "OlmoeSparseMoeBlock", "OlmoeExperts", block_attr="mlp", router_attr="gate",
            legacy=LegacyExperts("mlp", _PROJ_ROLES),
        ),
        MoEFamily(
            "deepseek_v2", "DeepseekV2Moe", "DeepseekV2Experts", block_attr="mlp", router_attr="gate",
            shared_experts=("shared_experts",), legacy=LegacyExperts("mlp", _PROJ_ROLES),
        ),
        MoEFamily(
            "deepseek_v3", "DeepseekV3MoE", "DeepseekV3Experts", block_attr="mlp", router_attr="gate",
            shared_experts=("shared_experts",), legacy=LegacyExperts("mlp", _PROJ_ROLES),
        ),
        MoEFamily(
            "phimoe", "PhimoeSparseMoeBlock", "PhimoeExperts", block_attr="mlp", router_attr="router",
            legacy=LegacyExperts("block_sparse_moe", _W_ROLES),
        ),
        MoEFamily(
            "gpt_oss", "GptOssMLP", "GptOssExperts", block_attr="mlp", router_attr="router",
            apply_gate=_gpt_oss_gate,
        ),
        MoEFamily(
            "granitemoe", "GraniteMoeMoE", "GraniteMoeExperts", block_attr="block_sparse_moe", router_attr="router",
        ),
        MoEFamily(
            "llama4", "Llama4TextMoe", "Llama4TextExperts", block_attr="feed_forward", router_attr="router",
            shared_experts=("shared_expert",),
            whole_block=WholeBlock(
                route=_llama4_route,
                shared_output=lambda block, x: block.shared_expert(x),
                pack_output=lambda block, hidden_states, out, router_logits: (out, router_logits),
                experts_layout=dict(transposed=True, weight_on_input=True),
            ),
        ),
    )
}
"""The supported families by name. Blocks are recognised by class name (or a subclass of it)."""

_FAMILY_OF_BLOCK_CLASS = {f.block_class: f for f in FAMILIES.values()}
_FAMILY_OF_EXPERTS_CLASS = {f.experts_class: f for f in FAMILIES.values()}

# Activation modules (``act_fn``) -> activation name, or a callable of the module for classes
# whose instances differ. Missing classes (an older transformers) are skipped.
_ACTIVATION_OF_CLASS: dict[type, str | Callable[[nn.Module], str]] = {
    cls: name
    for cls, name in (
        (nn.SiLU, "silu"),
        (nn.ReLU, "relu"),
        (nn.GELU, lambda act: "gelu_tanh" if act.approximate == "tanh" else "gelu"),
        (getattr(hf_activations, "SiLUActivation", None), "silu"),
        (getattr(hf_activations, "GELUActivation", None), "gelu"),
        (getattr(hf_activations, "GELUTanh", None), "gelu_tanh"),
        (getattr(hf_activations, "PytorchGELUTanh", None), "gelu_tanh"),
        (getattr(hf_activations, "NewGELUActivation", None), "gelu_tanh"),
        (getattr(hf_activations, "ReLUSquaredActivation", None), "relu2"),
    )
    if cls is not None
}

_INTERFACE_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")


class MoEBlock(NamedTuple):
    """One MoE block of a model: qualified name, the block, its experts module and their spec."""

    name: str
    block: nn.Module
    experts: nn.Module
    spec: ExpertsSpec

    @property
    def family(self) -> MoEFamily:
        return family_of_block(self.block)

    @property
    def dtype(self) -> torch.dtype:
        """The block's compute dtype, that of its LoRA tables: the experts' weight dtype, or for FP8
        experts the router's weight dtype (routers stay in the model's dtype in FP8 checkpoints)."""
        if not self.spec.quantized:
            return self.spec.w13(self.experts).dtype
        router = getattr(self.block, self.family.router_attr, None)
        weight = getattr(router, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dtype in FLOAT_DTYPES:
            return weight.dtype
        raise NotImplementedError(
            f"{self.name}: FP8 experts whose router ({self.family.router_attr}) has no float weight; the LoRA tables' "
            "dtype cannot be told"
        )


def _registered(module: nn.Module, table: Mapping[str, MoEFamily]) -> MoEFamily | None:
    for cls in type(module).__mro__:
        if cls.__name__ in table:
            return table[cls.__name__]
    return None


def family_of_block(block: nn.Module) -> MoEFamily | None:
    """The registered family whose MoE block class ``block`` is (or subclasses), else None."""
    return _registered(block, _FAMILY_OF_BLOCK_CLASS)


def is_interface_experts(experts: nn.Module) -> bool:
    """Whether ``experts`` carries the ``use_experts_implementation`` flags."""
    return all(hasattr(experts, flag) for flag in _INTERFACE_FLAGS)


def _supported() -> str:
    return ", ".join(f"{f.name} ({f.block_class})" for f in FAMILIES.values())


def activation_name(act_fn: nn.Module, owner: str = "experts") -> str:
    """The ``ACTIVATIONS`` name of an activation module such as an experts ``act_fn``.

    Args:
        act_fn: the activation module (``ACT2FN[...]`` instance or a ``torch.nn`` activation).
        owner: what holds it, for the error message.

    Returns:
        One of ``reference.ACTIVATIONS``.

    Raises:
        NotImplementedError: the activation class is not one the op implements.
    """
    for cls in type(act_fn).__mro__:
        name = _ACTIVATION_OF_CLASS.get(cls)
        if name is not None:
            return name if isinstance(name, str) else name(act_fn)
    known = sorted({c.__name__ for c in _ACTIVATION_OF_CLASS})
    raise NotImplementedError(
        f"{owner}: unsupported activation {type(act_fn).__name__}; supported activation classes: {', '.join(known)}"
    )


def _fp8_gate(experts: nn.Module) -> Mapping[str, object]:
    """``FP8Experts._apply_gate`` (transformers' FP8 experts, every family): gate and up halves, then
    GPT-OSS's clamped swiglu where the config has ``swiglu_alpha``, else ``act_fn(gate) * up``."""
    cls = type(experts).__name__
    if getattr(experts, "gate_softcap", None) is not None or getattr(experts, "up_softcap", None) is not None:
        raise NotImplementedError(f"{cls}: softcapped gate/up (gate_softcap, up_softcap) is not supported")
    if getattr(experts, "swiglu_alpha", None) is not None:
        return dict(activation="swigluoai", swiglu_alpha=float(experts.swiglu_alpha),
                    swiglu_limit=float(experts.swiglu_limit))  # fmt: skip
    if getattr(experts, "limit", None) is not None:
        raise NotImplementedError(
            f"{cls}: a clamped gate/up (swiglu_limit {experts.limit} without swiglu_alpha) is not an activation the op "
            f"implements ({', '.join(ACTIVATIONS)})"
        )
    return dict(activation=activation_name(experts.act_fn, cls))


_APPLY_GATE_OF_CLASS: dict[str, Callable[[nn.Module], Mapping[str, object]]] = {"FP8Experts": _fp8_gate}
"""``_apply_gate`` overrides of experts classes that no family owns (quantized experts), by class name."""


def _quantized_names(experts: nn.Module, w13_name: str) -> dict:
    """The scale names of FP8 experts (empty for weights in a float dtype); raises NotImplementedError
    for a quantized layout the op cannot run."""
    cls, weight = type(experts).__name__, getattr(experts, w13_name)
    if weight.dtype in FLOAT_DTYPES:
        return {}
    if weight.dtype not in FP8_DTYPES:
        raise NotImplementedError(
            f"{cls}: expert weights of dtype {weight.dtype} are not supported (the op runs float32/float16/bfloat16 "
            f"weights, and float8_e4m3fn with block scales)"
        )
    scale_names = (f"{w13_name}_scale_inv", "down_proj_scale_inv")
    if not all(hasattr(experts, n) for n in scale_names) or getattr(experts, "block_size", None) is None:
        raise NotImplementedError(
            f"{cls}: float8_e4m3fn expert weights without block scales ({' and '.join(scale_names)} with a "
            "block_size) are not supported; per-tensor FP8 experts are not a layout transformers loads"
        )
    return dict(w13_scale_name=scale_names[0], w2_scale_name=scale_names[1])


def _interface_spec(experts: nn.Module) -> ExpertsSpec:
    cls = type(experts).__name__
    if getattr(experts, "has_post_expert_norm", False):
        raise NotImplementedError(f"{cls}: experts with a post-expert norm (has_post_expert_norm=True) are not supported")
    w13_name = "gate_up_proj" if experts.has_gate else "up_proj"
    names = dict(
        w13_name=w13_name,
        w13_bias_name=("gate_up_proj_bias" if experts.has_gate else "up_proj_bias") if experts.has_bias else None,
        w2_bias_name="down_proj_bias" if experts.has_bias else None,
        **_quantized_names(experts, w13_name),
    )
    layout = dict(
        gated=experts.has_gate,
        interleaved=experts.has_gate and not experts.is_concatenated,
        transposed=experts.is_transposed,
        **names,
    )
    if not experts.has_gate:
        return ExpertsSpec(activation=activation_name(experts.act_fn, cls), **layout)
    apply_gate = type(experts)._apply_gate
    if apply_gate is getattr(hf_moe, "_default_apply_gate", None):
        if not experts.is_concatenated:
            raise NotImplementedError(
                f"{cls}: interleaved gate/up weights (is_concatenated=False) with the default _apply_gate, which "
                "splits gate and up in halves; the layout is ambiguous"
            )
        return ExpertsSpec(activation=activation_name(experts.act_fn, cls), **layout)
    owner = next(c for c in type(experts).__mro__ if "_apply_gate" in vars(c))
    if owner.__name__ in _APPLY_GATE_OF_CLASS:
        return ExpertsSpec(**layout, **_APPLY_GATE_OF_CLASS[owner.__name__](experts))
    family = _FAMILY_OF_EXPERTS_CLASS.get(owner.__name__)
    if family is None or family.apply_gate is None:
        raise NotImplementedError(
            f"{cls}: unsupported gating, {owner.__qualname__}._apply_gate overrides the default act(gate) * up and "
            "no registered family describes it"
        )
    return ExpertsSpec(**layout, **family.apply_gate(experts))


def experts_spec(experts: nn.Module) -> ExpertsSpec:
    """How to call the fused experts op for an experts module.

    Interface modules (``use_experts_implementation``) are read from their flags (``has_gate``,
    ``has_bias``, ``is_transposed``, ``is_concatenated``, ``has_post_expert_norm``), their
    ``act_fn`` and, where the class overrides ``_apply_gate``, the registry's description of that
    gating. The experts of whole-block families are read from the registry and their ``act_fn``.

    Args:
        experts: the experts module (``block.experts``).

    Returns:
        The module's ``ExpertsSpec``.

    Raises:
        NotImplementedError: naming the module class and the unsupported feature (post-expert norm,
            unknown activation class, unknown ``_apply_gate`` override, unknown experts class).
    """
    if is_interface_experts(experts):
        return _interface_spec(experts)
    cls = type(experts).__name__
    family = _registered(experts, _FAMILY_OF_EXPERTS_CLASS)
    if family is None or family.whole_block is None:
        raise NotImplementedError(
            f"{cls} is neither a `use_experts_implementation` experts module nor the experts class of a "
            f"registered family; supported families: {_supported()}"
        )
    return ExpertsSpec(activation=activation_name(experts.act_fn, cls), **family.whole_block.experts_layout)


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every MoE block of ``model`` that the registry recognises, in ``named_modules`` order.

    Args:
        model: any ``nn.Module``, typically a ``PreTrainedModel`` (wrappers such as PEFT models or
            multimodal models work: blocks are found anywhere in the module tree).

    Returns:
        ``MoEBlock(name, block, experts, spec)`` per block; ``name`` is the block's qualified name.

    Raises:
        NotImplementedError: the model has no recognised MoE block (the message lists the supported
            families), or a block's experts are unsupported (see ``experts_spec``).
    """
    blocks = []
    for name, module in model.named_modules():
        family = family_of_block(module)
        if family is not None:
            experts = getattr(module, family.experts_attr)
            blocks.append(MoEBlock(name, module, experts, experts_spec(experts)))
    if blocks:
        return blocks
    unregistered = sorted({type(m).__name__ for m in model.modules() if is_interface_experts(m)})
    hint = f" It has experts modules of unregistered families: {', '.join(unregistered)}." if unregistered else ""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise NotImplementedError(
        f"{type(model).__name__} (model_type {model_type!r}) has no supported MoE block.{hint} "
        f"Supported families: {_supported()}"
    )


def whole_block_forward(
    block: nn.Module,
    hidden_states: torch.Tensor,
    experts_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
):
    """Runs a block outside the experts interface, with ``experts_fn`` in place of its experts.

    Args:
        block: an MoE block of a family with ``whole_block`` set (Llama 4).
        hidden_states: the block's input ``[..., H]``.
        experts_fn: ``(x [T, H], topk_ids [T, K] int64, topk_weights [T, K]) -> [T, H]``, called with
            the block's own routing; it must honour the experts' ``ExpertsSpec`` (for Llama 4,
            ``weight_on_input=True``).

    Returns:
        What the block's own forward returns, in ``hidden_states.dtype``: for Llama 4 the tuple
        ``(out [T, H], router_logits [T, E])``.
    """
    family = family_of_block(block)
    if family is None or family.whole_block is None:
        raise ValueError(f"{type(block).__name__} is not the block of a registered whole-block family")
    recipe = family.whole_block
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    router_logits, topk_ids, topk_weights = recipe.route(block, x)
    out = recipe.shared_output(block, x) + experts_fn(x, topk_ids, topk_weights).to(x.dtype)
    return recipe.pack_output(block, hidden_states, out, router_logits)


class LegacyTarget(NamedTuple):
    """Where a 4.x per-expert projection lives now: block qualified name, expert index and role."""

    block_name: str
    expert: int
    role: str


def legacy_expert_target(family: MoEFamily | str, module_name: str) -> LegacyTarget | None:
    """Maps a 4.x per-expert module name (checkpoint or PEFT adapter) onto the transformers 5 block.

    For example, for Mixtral ``model.layers.3.block_sparse_moe.experts.7.w1`` is the gate
    projection of expert 7 of the block ``model.layers.3.mlp``.

    Args:
        family: a registered family or its name.
        module_name: the module's qualified name, without parameter or LoRA suffixes (any prefix,
            such as PEFT's ``base_model.model.``, is kept in ``block_name``).

    Returns:
        ``LegacyTarget(block_name, expert, role)`` with ``role`` in ``ROLES``, or None if the name is
        not a per-expert projection of that family (or the family never had per-expert modules).
    """
    family = FAMILIES[family] if isinstance(family, str) else family
    if family.legacy is None:
        return None
    projections = "|".join(map(re.escape, family.legacy.roles))
    match = re.fullmatch(
        rf"(?P<prefix>(?:.*\.)?){re.escape(family.legacy.block_attr)}\.experts\.(?P<expert>\d+)\.(?P<proj>{projections})",
        module_name,
    )
    if match is None:
        return None
    return LegacyTarget(
        match["prefix"] + family.block_attr, int(match["expert"]), family.legacy.roles[match["proj"]]
    )
