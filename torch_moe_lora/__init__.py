"""Multi-LoRA inference for Mixture-of-Experts models: fused ops and a Hugging Face model patcher."""

from .lora import ExpertLoRASlots, LoRAWeights
from .ops import align as _align  # noqa: F401  (registers torch.ops.moe_lora.align_block_size)
from .ops.fused_experts import WeightScales, fused_experts
from .ops.lora_linear import add_lora_linear, add_lora_linear_group, slot_segments
from .patch import patch_model

__all__ = [
    "ExpertLoRASlots",
    "LoRAWeights",
    "WeightScales",
    "add_lora_linear",
    "add_lora_linear_group",
    "fused_experts",
    "patch_model",
    "slot_segments",
]
__version__ = "0.1.0"
