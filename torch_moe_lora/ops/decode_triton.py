"""The unsorted path of the fused experts op: two launches for decode-sized batches.

At a few tokens per call, sorting the (token, k) pairs by expert, the ``y`` round trip and the
top-k sum cost launches and latency that a memory-bound layer cannot hide. Where the launch config
says ``"unsorted": true`` (tuned per decode bucket), the op runs two kernels instead:

1. ``_gate_up_pair_kernel``, one program per (pair, ``BLOCK_N`` intermediate columns):
   ``h[pair] = act(w13[e] x + b13 + gate_up_b[slot, e] s1)`` with ``s1`` computed in registers
   (``shrink_in_registers``), then the pair's share of the down shrink over its columns,
   ``s2_part[pair, tile] = h[pair, tile] . down_a[slot, e, :, tile]``, a float32 partial sum.
2. ``_down_token_kernel``, one program per (token, ``BLOCK_N`` hidden columns): the token's ``K``
   pairs are the rows of one tile; row ``k`` multiplies ``h[pair_k]`` with ``w2[e_k]``, adds the
   expand of ``scale * sum_tiles s2_part`` and the bias, scales by its top-k weight, and the rows'
   sum is written to ``out[token]``.

No align op, no ``y`` buffer and no top-k sum launch; every buffer is sized from ``T * K``. An
expert read by two pairs is read twice (from L2 when close in time), so the tuner enables this
path only for the buckets where it wins. Pairs with an expert outside ``[0, E)`` write nothing
and are masked out of the down kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_experts_triton import _dot_precision, _launch_options, _rank_block, _shared_memory_limit, apply_activation, fit_shared_memory, gate_up_k_loop
from .lora_triton import NO_SLOT, expand_from_registers, shrink_in_registers


@triton.jit
def _gate_up_pair_kernel(
    x_ptr, w13_ptr, b13_ptr, gu_a_ptr, gu_scale_ptr, gu_b_ptr, d_a_ptr, h_ptr, s2_part_ptr,
    topk_ids_ptr, token_lora_ptr, topk_weights_ptr,
    num_experts, top_k, hidden, inter, rank, down_rank, alpha, limit,
    stride_x_m, stride_x_k,
    stride_w_e, stride_w_n, stride_w_k,
    stride_b13_e, stride_b13_n,
    stride_ga_l, stride_ga_e, stride_ga_r, stride_ga_k,
    stride_gb_l, stride_gb_e, stride_gb_n, stride_gb_r,
    stride_da_l, stride_da_e, stride_da_r, stride_da_k,
    stride_h_m, stride_h_n,
    stride_p_m, stride_p_t, stride_p_r,
    GATED: tl.constexpr, INTERLEAVED: tl.constexpr, SPLIT_GATE_UP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr, ACTIVATION: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, SHRINK_K: tl.constexpr,
):  # fmt: skip
    """``h[pair, n]`` for the ``BLOCK_N`` columns of one program, and the pair's ``s2`` partial.

    Grid: (T * K * cdiv(inter, BLOCK_N),). Row 0 of the ``BLOCK_M``-row tile is the pair; the other
    rows are masked (``tl.dot`` needs 16 rows).
    """
    num_n = tl.cdiv(inter, BLOCK_N)
    pair = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    expert = tl.load(topk_ids_ptr + pair)
    if (expert < 0) | (expert >= num_experts):
        return
    expert = expert.to(tl.int64)
    token = pair // top_k
    rows = tl.arange(0, BLOCK_M)
    valid = rows == 0
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter
    if INTERLEAVED:
        gate_rows = 2 * offs_n
        up_rows = 2 * offs_n + 1
    else:
        gate_rows = offs_n
        up_rows = inter + offs_n
    x_rows = x_ptr + (token.to(tl.int64) * stride_x_m + rows[:, None] * 0)
    acc_gate, acc_up = gate_up_k_loop(
        x_rows, valid, w13_ptr + expert * stride_w_e, gate_rows, up_rows, n_mask, hidden,
        stride_x_k, stride_w_n, stride_w_k, GATED, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    if HAS_LORA:
        token_slot = tl.load(token_lora_ptr + token).to(tl.int32)
        slot = tl.where(valid, token_slot, -1)
        first = tl.where(token_slot >= 0, token_slot, NO_SLOT)
        count = (token_slot >= 0).to(tl.int32)
        if SPLIT_GATE_UP:
            up_col0 = rank
        else:
            up_col0 = 0
        s = shrink_in_registers(
            x_rows, hidden, gu_a_ptr, expert, slot, first, count, up_col0 + rank,
            stride_x_k, stride_ga_l, stride_ga_e, stride_ga_r, stride_ga_k, BLOCK_M, BLOCK_R, SHRINK_K, PRECISION,
        )  # fmt: skip
        s = (s * tl.load(gu_scale_ptr + slot, mask=slot >= 0, other=0.0)[:, None]).to(gu_b_ptr.dtype.element_ty)
        acc_gate = expand_from_registers(
            acc_gate, s, 0, rank, gu_b_ptr, expert, slot, first, count, gate_rows, n_mask,
            stride_gb_l, stride_gb_e, stride_gb_n, stride_gb_r, BLOCK_R, PRECISION,
        )  # fmt: skip
        if GATED:
            acc_up = expand_from_registers(
                acc_up, s, up_col0, rank, gu_b_ptr, expert, slot, first, count, up_rows, n_mask,
                stride_gb_l, stride_gb_e, stride_gb_n, stride_gb_r, BLOCK_R, PRECISION,
            )  # fmt: skip
    if WEIGHT_ON_INPUT:
        w = tl.load(topk_weights_ptr + pair).to(tl.float32)
        acc_gate *= w
        acc_up *= w
    if HAS_BIAS:
        b_base = b13_ptr + expert * stride_b13_e
        acc_gate += tl.load(b_base + gate_rows * stride_b13_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(b_base + up_rows * stride_b13_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    h = apply_activation(acc_gate, acc_up, ACTIVATION, GATED, alpha, limit).to(h_ptr.dtype.element_ty)
    row_base = pair.to(tl.int64) + rows[:, None] * 0
    tl.store(h_ptr + row_base * stride_h_m + offs_n[None, :] * stride_h_n, h, mask=valid[:, None] & n_mask[None, :])
    if HAS_LORA:
        if token_slot >= 0:
            # This tile's share of s2 = h . down_a^T, from the h just stored (as the down GEMM reads it).
            offs_r = tl.arange(0, BLOCK_R)
            r_mask = offs_r < down_rank
            a = tl.load(
                d_a_ptr + token_slot.to(tl.int64) * stride_da_l + expert * stride_da_e
                + offs_r[None, :] * stride_da_r + offs_n[:, None] * stride_da_k,
                mask=r_mask[None, :] & n_mask[:, None],
                other=0.0,
            )  # fmt: skip
            part = tl.dot(tl.where(n_mask[None, :], h, tl.zeros_like(h)), a, input_precision=PRECISION)
            tl.store(
                s2_part_ptr + row_base * stride_p_m + pid_n * stride_p_t + offs_r[None, :] * stride_p_r,
                part,
                mask=valid[:, None] & r_mask[None, :],
            )


@triton.jit
def _down_token_kernel(
    h_ptr, w2_ptr, b2_ptr, s2_part_ptr, d_scale_ptr, d_b_ptr, out_ptr,
    topk_ids_ptr, token_lora_ptr, topk_weights_ptr,
    num_experts, top_k, hidden, inter, down_rank, num_parts,
    stride_h_m, stride_h_k,
    stride_w_e, stride_w_n, stride_w_k,
    stride_b2_e, stride_b2_n,
    stride_p_m, stride_p_t, stride_p_r,
    stride_db_l, stride_db_e, stride_db_n, stride_db_r,
    stride_out_m, stride_out_n,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``out[t, n] = sum_k w_tk (h[pair_k] . w2[e_k, n] + b2[e_k, n] + lora_k)`` for ``BLOCK_N`` columns.

    Grid: (T * cdiv(hidden, BLOCK_N),); row ``k < K`` of the tile is the token's pair ``k``. The K
    loop runs over (k, ``BLOCK_K`` columns of I): each step reads one expert's ``w2`` tile and
    multiplies it with row ``k`` only, so every row meets its own expert.
    """
    num_n = tl.cdiv(hidden, BLOCK_N)
    token = (tl.program_id(0) // num_n).to(tl.int64)
    pid_n = tl.program_id(0) % num_n
    rows = tl.arange(0, BLOCK_M)
    pair = token * top_k + rows
    ids = tl.load(topk_ids_ptr + pair, mask=rows < top_k, other=-1).to(tl.int32)
    live = (ids >= 0) & (ids < num_experts)
    experts = tl.where(live, ids, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + pair[:, None] * stride_h_m
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_steps = tl.cdiv(inter, BLOCK_K)
    for step in range(0, top_k * k_steps):
        row = step // k_steps
        this = rows == row
        expert = tl.sum(tl.where(this, experts, 0))
        # A pair without a local expert reads nothing: its columns end at 0 instead of ``inter``.
        k = (step % k_steps) * BLOCK_K + offs_k
        k_mask = k < tl.max(tl.where(this & live, inter, 0))
        hs = tl.load(h_rows + k[None, :] * stride_h_k, mask=this[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(
            w2_ptr + expert * stride_w_e + offs_n[None, :] * stride_w_n + k[:, None] * stride_w_k,
            mask=n_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        acc += tl.dot(hs, w, input_precision=PRECISION)
    if HAS_LORA:
        token_slot = tl.load(token_lora_ptr + token).to(tl.int32)
        if token_slot >= 0:
            offs_r = tl.arange(0, BLOCK_R)
            r_mask = offs_r < down_rank
            parts = s2_part_ptr + pair[:, None] * stride_p_m + offs_r[None, :] * stride_p_r
            s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for part in range(0, num_parts):
                s += tl.load(parts + part * stride_p_t, mask=live[:, None] & r_mask[None, :], other=0.0)
            s = (s * tl.load(d_scale_ptr + token_slot)).to(d_b_ptr.dtype.element_ty)
            b_base = d_b_ptr + token_slot.to(tl.int64) * stride_db_l + offs_n[None, :] * stride_db_n + offs_r[:, None] * stride_db_r
            for row in range(0, top_k):
                this = rows == row
                expert = tl.sum(tl.where(this, experts, 0))
                r_live = offs_r < tl.max(tl.where(this & live, down_rank, 0))
                b = tl.load(b_base + expert * stride_db_e, mask=n_mask[None, :] & r_live[:, None], other=0.0)
                acc += tl.dot(tl.where(this[:, None], s, tl.zeros_like(s)), b, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(
            b2_ptr + experts[:, None] * stride_b2_e + offs_n[None, :] * stride_b2_n,
            mask=live[:, None] & n_mask[None, :],
            other=0.0,
        ).to(tl.float32)
    if not WEIGHT_ON_INPUT:
        acc *= tl.load(topk_weights_ptr + pair, mask=live, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + token * stride_out_m + offs_n * stride_out_n, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=n_mask)


def shrink_block_k(block_k: int, block_r: int) -> int:
    """The K step of an in-register shrink: the GEMM's ``block_k``, cut so an A tile stays <= 8192 elements."""
    return max(16, min(block_k, 8192 // block_r))


def fused_experts_unsorted(
    x, topk_ids, topk_weights, w13, w2, w13_bias, w2_bias, token_lora,
    gate_up_a, gate_up_b, down_a, down_b, gate_up_scale, down_scale,
    activation_code, gated, interleaved, swiglu_alpha, swiglu_limit, weight_on_input,
    config: dict, out: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Runs the two unsorted kernels; arguments as ``fused_experts_triton`` (``topk_ids``,
    ``topk_weights`` and ``token_lora`` contiguous, ``activation_code`` an ``ACTIVATION_CODES`` value)."""
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_experts, inter = w2.shape[0], w2.shape[2]
    num_pairs = num_tokens * top_k
    has_lora = gate_up_a is not None and token_lora is not None
    dummy = x.new_empty(1)
    smem = _shared_memory_limit(x.device)
    precision = _dot_precision(x.dtype)
    gate_up_cfg = fit_shared_memory(config["gate_up"], 16, 2 if gated else 1, x.element_size(), smem)
    num_parts = triton.cdiv(inter, gate_up_cfg["block_n"])
    if has_lora:
        rank, down_rank = gate_up_b.shape[3], down_b.shape[3]
        block_r = _rank_block(max(gate_up_a.shape[2], down_rank))
        s2_part = torch.empty(num_pairs, num_parts, down_rank, dtype=torch.float32, device=x.device)
    else:
        rank = down_rank = 0
        block_r = 16
        s2_part = torch.empty(1, 1, 1, dtype=torch.float32, device=x.device)
        gate_up_a = gate_up_b = down_a = down_b = x.new_empty(1, 1, 1, 1)
        gate_up_scale = down_scale = token_lora = dummy
    h = x.new_empty(num_pairs, inter)
    _gate_up_pair_kernel[(num_pairs * num_parts,)](
        x, w13, w13_bias if w13_bias is not None else dummy, gate_up_a, gate_up_scale, gate_up_b, down_a, h, s2_part,
        topk_ids, token_lora, topk_weights,
        num_experts, top_k, hidden, inter, rank, down_rank, float(swiglu_alpha), float(swiglu_limit),
        *x.stride(), *w13.stride(), *(w13_bias.stride() if w13_bias is not None else (0, 0)),
        *gate_up_a.stride(), *gate_up_b.stride(), *down_a.stride(), *h.stride(), *s2_part.stride(),
        GATED=gated, INTERLEAVED=interleaved, SPLIT_GATE_UP=has_lora and gate_up_a.shape[2] != rank,
        HAS_BIAS=w13_bias is not None, HAS_LORA=has_lora, WEIGHT_ON_INPUT=weight_on_input,
        ACTIVATION=activation_code, PRECISION=precision, BLOCK_M=16, BLOCK_N=gate_up_cfg["block_n"],
        BLOCK_K=gate_up_cfg["block_k"], BLOCK_R=block_r, SHRINK_K=shrink_block_k(gate_up_cfg["block_k"], block_r),
        **_launch_options(gate_up_cfg),
    )  # fmt: skip
    block_m = max(16, triton.next_power_of_2(top_k))
    down_cfg = fit_shared_memory(config["down"], block_m, 1, x.element_size(), smem)
    _down_token_kernel[(num_tokens * triton.cdiv(hidden, down_cfg["block_n"]),)](
        h, w2, w2_bias if w2_bias is not None else dummy, s2_part, down_scale, down_b, out,
        topk_ids, token_lora, topk_weights,
        num_experts, top_k, hidden, inter, down_rank, num_parts,
        *h.stride(), *w2.stride(), *(w2_bias.stride() if w2_bias is not None else (0, 0)),
        *s2_part.stride(), *down_b.stride(), *out.stride(),
        HAS_BIAS=w2_bias is not None, HAS_LORA=has_lora, WEIGHT_ON_INPUT=weight_on_input, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=down_cfg["block_n"], BLOCK_K=down_cfg["block_k"], BLOCK_R=block_r,
        **_launch_options(down_cfg),
    )  # fmt: skip
    return out
