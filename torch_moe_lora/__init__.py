"""Multi-LoRA inference for Mixture-of-Experts models: fused ops and a Hugging Face model patcher."""

from .lora import ExpertLoRASlots, LoRAWeights
from .ops.fused_experts import fused_experts
from .patch import patch_model

__all__ = ["ExpertLoRASlots", "LoRAWeights", "fused_experts", "patch_model"]
__version__ = "0.1.0"
