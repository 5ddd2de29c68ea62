"""Multi-LoRA inference for Mixture-of-Experts models: fused ops and a Hugging Face model patcher."""

from .lora import ExpertLoRASlots, LoRAWeights
from .ops.fused_experts import fused_experts

__all__ = ["ExpertLoRASlots", "LoRAWeights", "fused_experts"]
__version__ = "0.1.0"
