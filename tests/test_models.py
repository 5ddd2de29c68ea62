"""The model registry against tiny random transformers models of every supported family.

For each family, the routing a block hands its experts is captured and ``fused_experts_ref``, driven
by ``experts_spec``, must reproduce the experts' own output; blocks replaced whole (Llama 4) must be
reproduced by ``whole_block_forward`` around the reference; and a model whose experts (or whole
blocks) are swapped for the spec-driven reference must give the eager model's logits. Runs on
transformers 5.17 and 5.24.
"""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from utils import COMMON, TINY, assert_close_verbose, tiny_model

from torch_moe_lora.models import (
    FAMILIES,
    ROLES,
    ExpertsSpec,
    LegacyTarget,
    experts_spec,
    find_moe_blocks,
    is_interface_experts,
    legacy_expert_target,
    whole_block_forward,
)
from torch_moe_lora.reference import fused_experts_ref

INTERFACE = [name for name in TINY if FAMILIES[name].whole_block is None]
WHOLE = [name for name in TINY if FAMILIES[name].whole_block is not None]


def input_ids() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))


def assert_matches(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """float32 against the float64 reference: the shared tolerances, and max |diff| <= 1e-5 x max |ref|."""
    assert_close_verbose(out, ref, torch.float32, what)
    assert (out.double() - ref.double()).abs().max() <= 1e-5 * ref.double().abs().max(), what


def reference_experts(experts: nn.Module, spec: ExpertsSpec):
    return functools.partial(fused_experts_ref, **spec.op_kwargs(experts))


def capture(module: nn.Module, store: list):
    def hook(module, args, kwargs, output):
        store.append((tuple(args) + tuple(kwargs.values()), output))

    return module.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", list(TINY))
def test_registry_matches_model(family):
    model = tiny_model(family)
    blocks = find_moe_blocks(model)
    entry = FAMILIES[family]
    assert len(blocks) == TINY[family][2], [b.name for b in blocks]
    hidden = COMMON["hidden_size"]
    for block in blocks:
        experts, spec = block.experts, block.spec
        assert block.family is entry and block.name.endswith(f".{entry.block_attr}")
        assert type(experts).__name__ == entry.experts_class
        assert is_interface_experts(experts) == (entry.whole_block is None)
        assert all(hasattr(block.block, attr) for attr in (entry.router_attr, *entry.shared_experts))
        w13, w2 = spec.w13(experts), spec.w2(experts)
        num_experts, rows, _ = w13.shape
        assert w13.shape[2] == hidden and w2.shape == (num_experts, hidden, rows // (2 if spec.gated else 1))
        for view, param_name in ((w13, spec.w13_name), (w2, spec.w2_name)):
            param = getattr(experts, param_name)
            assert view.data_ptr() == param.data_ptr() and view._base is (param if spec.transposed else None)
        if spec.w13_bias_name is not None:
            assert spec.w13_bias(experts).shape == (num_experts, rows)
            assert spec.w2_bias(experts).shape == (num_experts, hidden)


@pytest.mark.parametrize("experts_implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("family", INTERFACE)
def test_spec_reproduces_interface_experts(family, experts_implementation):
    model = tiny_model(family, experts_implementation)
    blocks = find_moe_blocks(model)
    calls = {block.name: [] for block in blocks}
    handles = [capture(block.experts, calls[block.name]) for block in blocks]
    with torch.no_grad():
        model(input_ids())
    for handle in handles:
        handle.remove()
    for name, _, experts, spec in blocks:
        ((x, topk_ids, topk_weights), out), *more = calls[name]
        assert not more
        ref = fused_experts_ref(x, topk_ids, topk_weights, **spec.op_kwargs(experts))
        assert_matches(out, ref, f"{family}/{experts_implementation} {name} {spec}")


@pytest.mark.parametrize("family", WHOLE)
def test_whole_block_forward_reproduces_block(family):
    model = tiny_model(family)
    blocks = find_moe_blocks(model)
    calls = {block.name: [] for block in blocks}
    handles = [capture(block.block, calls[block.name]) for block in blocks]
    with torch.no_grad():
        model(input_ids())
    for handle in handles:
        handle.remove()
    for name, block, experts, spec in blocks:
        ((hidden_states,), (out, router_logits)), *more = calls[name]
        assert not more
        with torch.no_grad():
            ref_out, ref_logits = whole_block_forward(block, hidden_states, reference_experts(experts, spec))
        assert ref_out.dtype == out.dtype and torch.equal(ref_logits, router_logits)
        assert_matches(out, ref_out, f"{family} {name} {spec}")


@pytest.mark.parametrize("family", list(TINY))
def test_reference_swapped_in_gives_model_logits(family):
    """The way the patcher will work: an experts implementation registered with transformers (or
    the whole block's forward replaced), driven only by the spec, gives the eager model's logits."""
    model = tiny_model(family, "eager" if family in INTERFACE else None)
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids).logits

    calls = []

    def spec_driven_experts(experts, hidden_states, top_k_index, top_k_weights):
        calls.append(type(experts).__name__)
        out = fused_experts_ref(hidden_states, top_k_index, top_k_weights, **experts_spec(experts).op_kwargs(experts))
        return out.to(hidden_states.dtype)

    implementation = "torch_moe_lora_reference"
    ALL_EXPERTS_FUNCTIONS[implementation] = spec_driven_experts
    try:
        if family in INTERFACE:
            model.set_experts_implementation(implementation)
        blocks = find_moe_blocks(model)
        for block in blocks:
            if family in WHOLE:
                experts_fn = functools.partial(spec_driven_experts, block.experts)
                block.block.forward = functools.partial(whole_block_forward, block.block, experts_fn=experts_fn)
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        del ALL_EXPERTS_FUNCTIONS[implementation]
    assert calls == [FAMILIES[family].experts_class] * len(blocks)
    assert_matches(logits, expected, f"{family} logits")


def test_non_moe_model_raises_listing_families():
    config = transformers.LlamaConfig(**COMMON, intermediate_size=48)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with pytest.raises(NotImplementedError, match="LlamaForCausalLM") as error:
        find_moe_blocks(model)
    assert all(name in str(error.value) for name in FAMILIES)


def test_unregistered_interface_family_is_named():
    """A model with interface experts the registry does not know: the error names the experts class."""
    model = tiny_model("mixtral")
    for name, module in model.named_modules():
        if name.endswith(".mlp"):
            module.__class__ = type("OtherMoeBlock", (nn.Module,), {"forward": type(module).forward})
    with pytest.raises(NotImplementedError, match="unregistered families: MixtralExperts"):
        find_moe_blocks(model)


def mixtral_experts() -> nn.Module:
    return find_moe_blocks(tiny_model("mixtral"))[0].experts


def test_post_expert_norm_is_refused():
    experts = mixtral_experts()
    experts.has_post_expert_norm = True
    with pytest.raises(NotImplementedError, match="MixtralExperts.*post-expert norm"):
        experts_spec(experts)


@pytest.mark.parametrize(
    "act_fn, name",
    [
        (nn.SiLU(), "silu"),
        (nn.GELU(), "gelu"),
        (nn.GELU(approximate="tanh"), "gelu_tanh"),
        (transformers.activations.ACT2FN["gelu_pytorch_tanh"], "gelu_tanh"),
        (transformers.activations.ACT2FN["gelu_new"], "gelu_tanh"),
        (transformers.activations.ACT2FN["gelu"], "gelu"),
        (transformers.activations.ACT2FN["relu"], "relu"),
        (transformers.activations.ACT2FN["relu2"], "relu2"),
    ],
)
def test_activation_classes(act_fn, name):
    experts = mixtral_experts()
    experts.act_fn = act_fn
    assert experts_spec(experts).activation == name


def test_unknown_activation_is_refused():
    experts = mixtral_experts()
    experts.act_fn = nn.Tanh()
    with pytest.raises(NotImplementedError, match="MixtralExperts: unsupported activation Tanh"):
        experts_spec(experts)


def test_unknown_gate_override_is_refused():
    experts = mixtral_experts()
    experts.__class__ = type("SquaredGateExperts", (type(experts),), {"_apply_gate": lambda self, h: h.square()})
    with pytest.raises(NotImplementedError, match="SquaredGateExperts: unsupported gating"):
        experts_spec(experts)


def test_interleaved_with_default_gate_is_refused():
    experts = mixtral_experts()
    experts.is_concatenated = False
    with pytest.raises(NotImplementedError, match="MixtralExperts: interleaved"):
        experts_spec(experts)


def test_unknown_experts_class_is_refused():
    with pytest.raises(NotImplementedError, match="Linear is neither"):
        experts_spec(nn.Linear(2, 2))


@pytest.mark.parametrize(
    "family, module_name, target",
    [
        ("mixtral", "model.layers.3.block_sparse_moe.experts.7.w1", LegacyTarget("model.layers.3.mlp", 7, "gate")),
        ("mixtral", "base_model.model.model.layers.0.block_sparse_moe.experts.12.w3",
         LegacyTarget("base_model.model.model.layers.0.mlp", 12, "up")),
        ("phimoe", "model.layers.1.block_sparse_moe.experts.0.w2", LegacyTarget("model.layers.1.mlp", 0, "down")),
        ("qwen2_moe", "model.layers.2.mlp.experts.5.up_proj", LegacyTarget("model.layers.2.mlp", 5, "up")),
        ("deepseek_v3", "model.layers.2.mlp.experts.5.down_proj", LegacyTarget("model.layers.2.mlp", 5, "down")),
        ("qwen2_moe", "model.layers.2.mlp.shared_expert.gate_proj", None),
        ("deepseek_v3", "model.layers.2.mlp.shared_experts.gate_proj", None),
        ("mixtral", "model.layers.3.block_sparse_moe.gate", None),
        ("mixtral", "model.layers.3.mlp.experts.7.gate_proj", None),
        ("gpt_oss", "model.layers.0.mlp.experts.gate_up_proj", None),
    ],
)  # fmt: skip
def test_legacy_expert_target(family, module_name, target):
    assert legacy_expert_target(family, module_name) == target


def test_legacy_roles_are_complete():
    for family in FAMILIES.values():
        if family.legacy is not None:
            assert sorted(family.legacy.roles.values()) == sorted(ROLES), family.name
