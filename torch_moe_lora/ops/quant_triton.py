"""Per-token-group FP8 quantization of activations, for the FP8 tensor-core GEMMs of the fused experts
op (launch config ``fp8_activations``): the FP8 checkpoints' recipe, one float32 scale per row and
``group`` consecutive features, ``scale = amax / 448`` (the e4m3 maximum), ``q = v / scale``.
``reference.quantize_groups_ref`` is the same rule in PyTorch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
"""The largest finite float8 e4m3 (``fn``) value."""
MIN_SCALE = 1e-12
"""The smallest scale (a group of zeros); as the weights' ``reference.quantize_blocks_ref``."""


@triton.jit
def _quantize_groups_kernel(
    x_ptr, q_ptr, scale_ptr, cols, group,
    stride_x_m, stride_x_k, stride_q_m, stride_s_m,
    BLOCK: tl.constexpr, MIN: tl.constexpr, MAX: tl.constexpr,
):  # fmt: skip
    """One program per (row, group): the group's scale and its FP8 values. A row's NaN or Inf stays
    in that row's groups."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs = g * group + tl.arange(0, BLOCK)
    mask = (tl.arange(0, BLOCK) < group) & (offs < cols)
    v = tl.load(x_ptr + row * stride_x_m + offs * stride_x_k, mask=mask, other=0.0).to(tl.float32)
    # Rounded divisions (``/`` on float32 is approximate on the GPU): the reference's values exactly.
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(v)), MAX), MIN)
    tl.store(q_ptr + row * stride_q_m + offs, tl.math.div_rn(v, scale).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row * stride_s_m + g, scale)


def quantize_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` as float8 e4m3 ``[M, K]`` and float32 scales ``[M, cdiv(K, group)]``
    (``x ~ q * scale`` group by group). Static shapes; nothing read on the host.

    On CPU tensors (the GEMM kernels under Triton's interpreter) the same rule runs in PyTorch
    (``reference.quantize_groups_ref``): the interpreter of triton 3.6-3.9 rounds float32 to e4m3
    wrongly where the rounding carries into the exponent (7.95 to 4, not 8).
    """
    if not x.is_cuda:
        from ..reference import quantize_groups_ref

        return quantize_groups_ref(x, group)
    rows, cols = x.shape
    groups = triton.cdiv(cols, group)
    q = x.new_empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = x.new_empty(rows, groups, dtype=torch.float32)
    if rows:
        _quantize_groups_kernel[(rows, groups)](
            x, q, scale, cols, group, *x.stride(), q.stride(0), scale.stride(0),
            BLOCK=triton.next_power_of_2(group), MIN=MIN_SCALE, MAX=FP8_MAX,
        )  # fmt: skip
    return q, scale
