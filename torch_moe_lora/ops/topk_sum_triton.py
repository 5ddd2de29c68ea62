"""Triton kernel of the last step of the fused experts op: ``out[t] = sum_k y[t * K + k]``."""

from __future__ import annotations

import triton
import triton.language as tl

from .lora_triton import wait_for_previous_kernel


@triton.jit
def sum_topk_kernel(
    y_ptr, topk_ids_ptr, out_ptr, num_experts, hidden, top_k,
    stride_y_m, stride_out_m, stride_out_n,
    BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """``out[t, n] = sum_k y[t * K + k, n]`` over the k whose expert is in ``[0, num_experts)``, in
    increasing ``k`` in float32; one program per token and ``BLOCK_N`` columns."""
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(0, top_k):
        expert = tl.load(topk_ids_ptr + token * top_k + k)
        if (expert >= 0) & (expert < num_experts):
            acc += tl.load(y_ptr + (token * top_k + k) * stride_y_m + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_out_m + offs_n * stride_out_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)
