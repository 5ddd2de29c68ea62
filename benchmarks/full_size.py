"""Full-size MoE models with random weights and random PEFT-layout adapters, made on the device
directly (no host copy, no disk): what ``bench_e2e.py`` and ``profile_e2e.py`` measure.

Models: the shapes of Qwen3-30B-A3B (48 layers, 128 experts of 768, top-8; ``sdpa``) and GPT-OSS-20B
(24 layers, 32 experts of 2880, top-4, sliding and full attention; eager, as transformers has no
``sdpa`` path for its sinks), or tiny ones of the same families. Adapters of a given rank on the
experts (PEFT ``target_parameters``) and on q/k/v/o are ``(state_dict, config)`` pairs keyed as PEFT
saves them (``adapter_layout``).
"""

from __future__ import annotations

import functools
import math
import time

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GptOssConfig, Qwen3MoeConfig

PEFT_PREFIX = "base_model.model."
LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_TARGETS = ["experts.gate_up_proj", "experts.down_proj"]
TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MODELS = {
    "qwen3_30b_a3b": (Qwen3MoeConfig, "sdpa", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, max_position_embeddings=4096,
    ), dict(TINY, head_dim=16, intermediate_size=128, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2)),
    "gpt_oss_20b": (GptOssConfig, "eager", dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
    ), dict(TINY, head_dim=16, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, sliding_window=8)),
}  # fmt: skip
"""Config class, attention implementation, full-size and tiny shapes of each model."""


def build_model(name: str, layers: int | None, tiny: bool, device: str, dtype: torch.dtype) -> nn.Module:
    """Model ``name`` (``layers`` layers, or all) with random weights, made on ``device`` in ``dtype``
    directly (no host copy), the experts redrawn from N(0, 0.02) so that routing spreads over them."""
    config_class, attention, full, tiny_sizes = MODELS[name]
    sizes = {**full, **tiny_sizes} if tiny else dict(full)
    sizes["num_hidden_layers"] = layers = layers or sizes["num_hidden_layers"]
    if "sliding_window" in sizes:
        sizes["layer_types"] = [("sliding_attention", "full_attention")[i % 2] for i in range(layers)]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config_class(**sizes), attn_implementation=attention, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for module in model.modules():
            for weight in (getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)):
                if isinstance(weight, nn.Parameter) and weight.dim() == 3:
                    weight.normal_(0, 0.02)
    return model.eval()


def quantize_experts(model: nn.Module, block: tuple[int, int] = (128, 128)) -> None:
    """Replaces every experts module of ``model`` by transformers' ``FP8Experts`` holding the same
    weights quantized to e4m3 in ``block`` (rows, columns) blocks with float32 scales, the FP8
    checkpoints' layout (``reference.quantize_blocks_ref``), on the weights' device, one layer at a
    time. Experts with biases (GPT-OSS) are refused: ``FP8Experts`` has none."""
    from transformers.integrations import finegrained_fp8 as fp8
    from transformers.integrations.moe import use_experts_implementation

    from torch_moe_lora.models import find_moe_blocks
    from torch_moe_lora.reference import quantize_blocks_ref

    for moe in find_moe_blocks(model):
        experts = moe.experts
        if moe.spec.w13_bias(experts) is not None:
            raise NotImplementedError(f"{type(experts).__name__} has biases, which FP8Experts cannot hold")
        cls = use_experts_implementation(
            experts_class=fp8.FP8Experts, experts_interface=fp8.ALL_FP8_EXPERTS_FUNCTIONS, has_gate=experts.has_gate
        )
        with torch.device(moe.spec.w2(experts).device):
            new = cls(experts.config, block_size=block)
        for weight, name in ((moe.spec.w13(experts), "gate_up_proj"), (moe.spec.w2(experts), "down_proj")):
            quantized, scale = quantize_blocks_ref(weight.detach(), block, rows=2 if name == "gate_up_proj" else None)
            setattr(new, name, nn.Parameter(quantized, requires_grad=False))
            setattr(new, f"{name}_scale_inv", nn.Parameter(scale, requires_grad=False))
        setattr(moe.block, moe.family.experts_attr, new.eval())


def lora_config(rank: int) -> dict:
    targets = dict(target_modules=LINEAR_TARGETS, target_parameters=EXPERT_TARGETS)
    return dict(peft_type="LORA", r=rank, lora_alpha=2 * rank, **targets)


def adapter_layout(model: nn.Module, rank: int) -> dict[str, tuple[int, int]]:
    """The keys and shapes of PEFT's state dict (``get_peft_model_state_dict``) of a rank-``rank`` LoRA
    on ``LINEAR_TARGETS`` and ``EXPERT_TARGETS`` of the unpatched ``model``, without a PEFT model.

    A linear gets ``lora_A [r, in]`` and ``lora_B [out, r]``. A 3-D parameter ``[E, d1, d2]`` gets
    ``lora_A [E*r, in]`` and ``lora_B [out, r*E]``, ``in, out = d1, d2`` where the experts module says
    ``is_transposed``, else ``d2, d1``; several of one module nest PEFT's wrappers, the first in the
    module's parameter order innermost (``experts.base_layer``), the last at ``experts``.
    """
    layout = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rpartition(".")[2] in LINEAR_TARGETS:
            layout[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (rank, module.in_features)
            layout[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (module.out_features, rank)
        targeted = [
            param for param_name, param in module.named_parameters(recurse=False)
            if param.dim() == 3 and any(f"{name}.{param_name}".endswith(f".{t}") for t in EXPERT_TARGETS)
        ]  # fmt: skip
        for depth, param in enumerate(targeted):
            experts, d1, d2 = param.shape
            fan_in, fan_out = (d1, d2) if getattr(module, "is_transposed", False) else (d2, d1)
            key = PEFT_PREFIX + name + ".base_layer" * (len(targeted) - 1 - depth)
            layout[f"{key}.lora_A.weight"] = (experts * rank, fan_in)
            layout[f"{key}.lora_B.weight"] = (fan_out, rank * experts)
    return layout


def adapter_bytes(layout: dict, dtype: torch.dtype) -> int:
    return sum(math.prod(shape) for shape in layout.values()) * torch.finfo(dtype).bits // 8


def random_adapter(layout: dict, seed: int, device, dtype, std: float = 0.02) -> dict[str, torch.Tensor]:
    """A state dict of ``layout`` drawn from N(0, std) on ``device``; the same for the same seed."""
    generator = torch.Generator(device).manual_seed(seed)
    draw = functools.partial(torch.randn, generator=generator, device=device, dtype=dtype)
    return {key: draw(shape).mul_(std) for key, shape in layout.items()}


def register(handle, layout: dict, rank: int, indices: range, device, dtype) -> None:
    """Makes adapters ``lora<i>`` (seed ``i``) of ``layout`` one at a time and registers each (the
    handle keeps a host copy): into a free slot while there is one, else into host memory only."""
    start = time.perf_counter()
    for i in indices:
        source = (random_adapter(layout, i, device, dtype), lora_config(rank))
        if len(handle.adapter_names) < handle.max_loras:
            handle.load_adapter(f"lora{i}", source)
        else:
            handle.add_adapter(f"lora{i}", source)
        del source
    print(f"registered {len(indices)} adapters of rank {rank} in {time.perf_counter() - start:.1f} s", flush=True)
