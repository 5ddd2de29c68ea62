"""Triton kernels for the fused experts op on the GPU.

The pairs (token, k) are first sorted by expert with ``align_block_size(pad_per_adapter=False)``:
every block of ``BLOCK_M`` rows belongs to one expert, and inside an expert rows are ordered by
adapter slot (adapter-less rows last). The base GEMMs therefore never pay for per-adapter padding.

Kernels, in launch order after the align op (``pos`` is a row of the sorted order; the LoRA
building blocks are in ``lora_triton.py``):

1. ``lora_shrink_kernel`` on x:  ``s1[pos] = scale * x[token(pos)] @ gate_up_a[slot, e]^T``
2. ``_gate_up_kernel``:           ``h[pos] = act(w13[e] x + b13 + gate_up_b[slot, e] s1)``
3. ``lora_shrink_kernel`` on h:  ``s2[pos] = scale * h[pos] @ down_a[slot, e]^T``
4. ``_down_kernel``:              ``y[pair] = w * (w2[e] h + b2 + down_b[slot, e] s2)``
5. ``sum_topk_kernel``:           ``out[t] = sum_k y[t, k]`` over the pairs with a local expert

The LoRA expand runs in each GEMM after its K loop, into the same accumulator: for every slot
present in the block, ``cdiv(rank, BLOCK_K)`` steps whose A operand is that slot's rows of ``s``
(other rows masked to zero) and whose B operand is the slot's LoRA B; the step count is known before
the loop, so its loads pipeline. A shrink program takes one slot of one 16-row sub-block, so the
shrink reads each (slot, expert) A once per sub-block that holds it and does no work for other rows.

Where the launch config says so (``fuse_shrink_max_rank`` >= the LoRA A ranks; tuned for decode,
where launches dominate), kernels 1 and 3 are not launched: each GEMM program computes its block's
``s`` in registers after its K loop (``shrink_in_registers``, reading A from L2 once per column
tile) and expands from there, so a call is four launches instead of six.

With ``"pair_blocks": true`` in the launch config (for decode buckets, where an expert rarely gets
two pairs) the align op is not launched: block ``b`` is pair ``b`` alone and its expert is read
from ``topk_ids``; an expert read by two pairs is then read twice. With ``"fuse_sum": true`` kernel 5
is not launched: the down kernel does the top-k sum (``topk_sum_triton.py``). At T=1 both together
leave two launches.

With ``"tma": true`` (gate block then up block, experts stacked contiguously, rows 16-byte
aligned; sm_90+) the GEMMs read their expert weight tiles through tensor descriptors (the copy
engine) instead of computed pointers.

On sm_90+ the kernels use programmatic dependent launch: each launches while the previous one
drains and waits for its writes (``griddepcontrol.wait``) only before reading them; after a
separate shrink kernel the GEMMs run their base K loop before that wait (``"overlap_shrink": false``
turns that off, ``"pdl": false`` all of it).

Programs past ``num_blocks`` exit on the device, so grids come from static bounds and CUDA graphs
can capture the launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import (
    dot_precision,
    fit_shared_memory,
    launch_options,
    rank_block,
    shared_memory_limit,
    supports_pdl,
    supports_tma,
    weight_descriptor,
)
from .lora_triton import (
    block_expert,
    block_rows,
    block_slots,
    expand_from_registers,
    lora_shrink_kernel,
    lora_steps,
    shrink_in_registers,
    wait_for_previous_kernel,
)
from .topk_sum_triton import reset_topk_sum, sum_topk_kernel, sum_topk_when_last

ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "relu2": 4, "swigluoai": 5}
@triton.jit
def _activation(gate, up, ACTIVATION: tl.constexpr, GATED: tl.constexpr, alpha, limit):
    if ACTIVATION == 5:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
    if ACTIVATION == 0:
        a = gate * tl.sigmoid(gate)
    elif ACTIVATION == 1:
        a = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    elif ACTIVATION == 2:
        # 0.5 x (1 + tanh(z)) == x * sigmoid(2 z), z = sqrt(2 / pi) (x + 0.044715 x^3)
        a = gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
    elif ACTIVATION == 3:
        a = tl.maximum(gate, 0.0)
    else:
        a = tl.maximum(gate, 0.0)
        a = a * a
    if GATED:
        return a * up
    return a


@triton.jit
def _weight_tile(
    w_ptr, expert, rows, row0, k0, k, row_mask, k_mask, rows_per_expert, stride_w_e, stride_w_n, stride_w_k,
    TMA: tl.constexpr,
):  # fmt: skip
    """The ``[BLOCK_K, BLOCK_N]`` tile ``w[expert, rows, k]^T`` (``rows`` is ``row0 + arange``
    where ``TMA``), zero outside ``row_mask`` and ``k_mask``.

    With ``TMA`` ``w_ptr`` is a tensor descriptor of ``w`` seen as ``[E * rows_per_expert, K]``
    (tiles ``[BLOCK_N, BLOCK_K]``), loaded by the copy engine. Rows past the expert's last then
    come from the next expert (or are zero past the tensor): callers mask those columns out of
    what they store. Columns past ``K`` are zero.
    """
    if TMA:
        tile = w_ptr.load([(expert * rows_per_expert + row0).to(tl.int32), k0]).T
    else:
        tile = tl.load(
            w_ptr + expert * stride_w_e + rows[None, :] * stride_w_n + k[:, None] * stride_w_k,
            mask=row_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
    return tile


@triton.jit
def _program_tile(max_blocks, num_cols, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(block, column tile) of this program; ``GROUP_M`` blocks share a column tile for L2 reuse."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(num_cols, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    group_size = tl.minimum(max_blocks - first_m, GROUP_M)
    return first_m + (pid % group_size), (pid % (GROUP_M * num_n)) // group_size


@triton.jit
def _gate_up_kernel(
    x_ptr, w13_ptr, b13_ptr, s1_ptr, gu_a_ptr, gu_scale_ptr, gu_b_ptr, h_ptr, counters_ptr, out_ptr, topk_ids_ptr,
    sorted_pair_ids_ptr, expert_of_block_ptr, num_blocks_ptr, token_lora_ptr, topk_weights_ptr,
    num_pairs, top_k, num_experts, hidden, inter, rank, max_blocks, alpha, limit,
    stride_x_m, stride_x_k,
    stride_w_e, stride_w_n, stride_w_k,
    stride_b13_e, stride_b13_n,
    stride_s_m, stride_s_r,
    stride_ga_l, stride_ga_e, stride_ga_r, stride_ga_k,
    stride_gb_l, stride_gb_e, stride_gb_n, stride_gb_r,
    stride_h_m, stride_h_n, stride_out_m, stride_out_n,
    GATED: tl.constexpr, INTERLEAVED: tl.constexpr, SPLIT_GATE_UP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr, ACTIVATION: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, FUSE_SHRINK: tl.constexpr, BLOCK_R: tl.constexpr, PAIR_BLOCKS: tl.constexpr,
    FUSE_SUM: tl.constexpr, DOWN_BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr, LATE_WAIT: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """``h[pos, n] = act(gate, up)`` for the ``BLOCK_N`` intermediate columns ``n`` of one program.

    Gate and up accumulate separately: gate row of column ``n`` is ``n`` (``2n`` interleaved), up
    row is ``inter + n`` (``2n + 1``). Grid: (max_blocks * cdiv(inter, BLOCK_N),). With
    ``FUSE_SHRINK`` the program computes its rows' ``s1`` from ``gate_up_a`` itself (``s1_ptr`` is
    unused). With ``FUSE_SUM`` the programs reset the down kernel's top-k sum (``reset_topk_sum``,
    ``DOWN_BLOCK_N`` columns per counter). With ``TMA`` (gate block then up block only) ``w13_ptr``
    is a tensor descriptor (``_weight_tile``).

    With ``LATE_WAIT`` (programmatic dependent launch after the separate shrink kernel) the base K
    loop runs before waiting for the previous kernel, overlapping the shrink: the shrink waited for
    everything this program reads before ``s1`` (and what it resets is this call's own)
    before it let this kernel launch.
    """
    if not LATE_WAIT:
        wait_for_previous_kernel(USE_PDL)
    if FUSE_SUM:
        reset_topk_sum(
            counters_ptr, out_ptr, topk_ids_ptr, num_pairs // top_k, tl.cdiv(hidden, DOWN_BLOCK_N), num_experts, top_k,
            hidden, stride_out_m, stride_out_n, DOWN_BLOCK_N,
        )  # fmt: skip
    block, pid_n = _program_tile(max_blocks, inter, BLOCK_N, GROUP_M)
    expert = block_expert(block, expert_of_block_ptr, num_blocks_ptr, num_experts, PAIR_BLOCKS)
    if expert < 0:
        return
    pos, pair, valid, token, slot = block_rows(
        block, sorted_pair_ids_ptr, token_lora_ptr, num_pairs, top_k, BLOCK_M, HAS_LORA, PAIR_BLOCKS
    )
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter
    if INTERLEAVED:
        gate_rows = 2 * offs_n
        up_rows = 2 * offs_n + 1
    else:
        gate_rows = offs_n
        up_rows = inter + offs_n
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + token[:, None].to(tl.int64) * stride_x_m
    rows_per_expert = inter
    if GATED:
        rows_per_expert = 2 * inter
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < hidden
        xs = tl.load(x_rows + k[None, :] * stride_x_k, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w_gate = _weight_tile(
            w13_ptr, expert, gate_rows, pid_n * BLOCK_N, k0, k, n_mask, k_mask, rows_per_expert,
            stride_w_e, stride_w_n, stride_w_k, TMA,
        )  # fmt: skip
        acc_gate += tl.dot(xs, w_gate, input_precision=PRECISION)
        if GATED:
            w_up = _weight_tile(
                w13_ptr, expert, up_rows, inter + pid_n * BLOCK_N, k0, k, n_mask, k_mask, rows_per_expert,
                stride_w_e, stride_w_n, stride_w_k, TMA,
            )  # fmt: skip
            acc_up += tl.dot(xs, w_up, input_precision=PRECISION)
    if HAS_LORA:
        if LATE_WAIT:
            wait_for_previous_kernel(USE_PDL)
        first_slot, num_slots = block_slots(slot)
        if SPLIT_GATE_UP:
            up_col0 = rank
        else:
            up_col0 = 0
        if FUSE_SHRINK:
            s = shrink_in_registers(
                x_rows, hidden, gu_a_ptr, expert, slot, first_slot, num_slots, up_col0 + rank,
                stride_x_k, stride_ga_l, stride_ga_e, stride_ga_r, stride_ga_k, BLOCK_M, BLOCK_R, BLOCK_K, PRECISION,
            )  # fmt: skip
            s = (s * tl.load(gu_scale_ptr + slot, mask=slot >= 0, other=0.0)[:, None]).to(gu_b_ptr.dtype.element_ty)
            acc_gate = expand_from_registers(
                acc_gate, s, 0, rank, gu_b_ptr, expert, slot, first_slot, num_slots, gate_rows, n_mask,
                stride_gb_l, stride_gb_e, stride_gb_n, stride_gb_r, BLOCK_R, PRECISION,
            )  # fmt: skip
            if GATED:
                acc_up = expand_from_registers(
                    acc_up, s, up_col0, rank, gu_b_ptr, expert, slot, first_slot, num_slots, up_rows, n_mask,
                    stride_gb_l, stride_gb_e, stride_gb_n, stride_gb_r, BLOCK_R, PRECISION,
                )  # fmt: skip
        else:
            acc_gate = lora_steps(
                acc_gate, s1_ptr, 0, gu_b_ptr, expert, slot, first_slot, num_slots, pos, gate_rows, n_mask, rank,
                stride_s_m, stride_s_r, stride_gb_l, stride_gb_e, stride_gb_n, stride_gb_r,
                BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
            )  # fmt: skip
            if GATED:
                acc_up = lora_steps(
                    acc_up, s1_ptr, up_col0, gu_b_ptr, expert, slot, first_slot, num_slots, pos, up_rows, n_mask,
                    rank, stride_s_m, stride_s_r, stride_gb_l, stride_gb_e, stride_gb_n, stride_gb_r,
                    BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
                )  # fmt: skip
    if WEIGHT_ON_INPUT:
        w = tl.load(topk_weights_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        acc_gate *= w[:, None]
        acc_up *= w[:, None]
    if HAS_BIAS:
        b_base = b13_ptr + expert * stride_b13_e
        acc_gate += tl.load(b_base + gate_rows * stride_b13_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(b_base + up_rows * stride_b13_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    h = _activation(acc_gate, acc_up, ACTIVATION, GATED, alpha, limit)
    tl.store(
        h_ptr + pos[:, None].to(tl.int64) * stride_h_m + offs_n[None, :] * stride_h_n,
        h.to(h_ptr.dtype.element_ty),
        mask=valid[:, None] & n_mask[None, :],
    )


@triton.jit
def _down_kernel(
    h_ptr, w2_ptr, b2_ptr, s2_ptr, d_a_ptr, d_scale_ptr, d_b_ptr, y_ptr, out_ptr, counters_ptr, topk_ids_ptr,
    sorted_pair_ids_ptr, expert_of_block_ptr, num_blocks_ptr, token_lora_ptr, topk_weights_ptr,
    num_pairs, top_k, num_experts, hidden, inter, rank, max_blocks,
    stride_h_m, stride_h_k,
    stride_w_e, stride_w_n, stride_w_k,
    stride_b2_e, stride_b2_n,
    stride_s_m, stride_s_r,
    stride_da_l, stride_da_e, stride_da_r, stride_da_k,
    stride_db_l, stride_db_e, stride_db_n, stride_db_r,
    stride_y_m, stride_y_n, stride_out_m, stride_out_n,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FUSE_SHRINK: tl.constexpr, BLOCK_R: tl.constexpr, PAIR_BLOCKS: tl.constexpr, FUSE_SUM: tl.constexpr,
    USE_PDL: tl.constexpr, LATE_WAIT: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """``y[pair, n] = w * (h[pos] . w2[e, n] + b2[e, n] + lora)`` for ``BLOCK_N`` hidden columns.

    With ``FUSE_SHRINK`` the program computes its rows' ``s2`` from ``down_a`` itself; with
    ``FUSE_SUM`` it also does the top-k sum into ``out`` (``sum_topk_when_last``). With ``USE_PDL``
    the align op's outputs are read before waiting for the previous kernel: that kernel waited for
    them before it let this one launch. With ``LATE_WAIT`` (after the separate shrink kernel) the
    base K loop over ``h`` runs before the wait too, overlapping the shrink. With ``TMA``
    ``w2_ptr`` is a tensor descriptor (``_weight_tile``).
    """
    block, pid_n = _program_tile(max_blocks, hidden, BLOCK_N, GROUP_M)
    expert = block_expert(block, expert_of_block_ptr, num_blocks_ptr, num_experts, PAIR_BLOCKS)
    if expert < 0:
        return
    pos, pair, valid, token, slot = block_rows(
        block, sorted_pair_ids_ptr, token_lora_ptr, num_pairs, top_k, BLOCK_M, HAS_LORA, PAIR_BLOCKS
    )
    if not LATE_WAIT:
        wait_for_previous_kernel(USE_PDL)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + pos[:, None].to(tl.int64) * stride_h_m
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < inter
        hs = tl.load(h_rows + k[None, :] * stride_h_k, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = _weight_tile(
            w2_ptr, expert, offs_n, pid_n * BLOCK_N, k0, k, n_mask, k_mask, hidden,
            stride_w_e, stride_w_n, stride_w_k, TMA,
        )  # fmt: skip
        acc += tl.dot(hs, w, input_precision=PRECISION)
    if HAS_LORA:
        if LATE_WAIT:
            wait_for_previous_kernel(USE_PDL)
        first_slot, num_slots = block_slots(slot)
        if FUSE_SHRINK:
            s = shrink_in_registers(
                h_rows, inter, d_a_ptr, expert, slot, first_slot, num_slots, rank,
                stride_h_k, stride_da_l, stride_da_e, stride_da_r, stride_da_k, BLOCK_M, BLOCK_R, BLOCK_K, PRECISION,
            )  # fmt: skip
            s = (s * tl.load(d_scale_ptr + slot, mask=slot >= 0, other=0.0)[:, None]).to(d_b_ptr.dtype.element_ty)
            acc = expand_from_registers(
                acc, s, 0, rank, d_b_ptr, expert, slot, first_slot, num_slots, offs_n, n_mask,
                stride_db_l, stride_db_e, stride_db_n, stride_db_r, BLOCK_R, PRECISION,
            )  # fmt: skip
        else:
            acc = lora_steps(
                acc, s2_ptr, 0, d_b_ptr, expert, slot, first_slot, num_slots, pos, offs_n, n_mask, rank,
                stride_s_m, stride_s_r, stride_db_l, stride_db_e, stride_db_n, stride_db_r,
                BLOCK_M, BLOCK_N, BLOCK_K, PRECISION,
            )  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(b2_ptr + expert * stride_b2_e + offs_n * stride_b2_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if not WEIGHT_ON_INPUT:
        acc *= tl.load(topk_weights_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(
        y_ptr + pair[:, None].to(tl.int64) * stride_y_m + offs_n[None, :] * stride_y_n,
        acc.to(y_ptr.dtype.element_ty),
        mask=valid[:, None] & n_mask[None, :],
    )
    if FUSE_SUM:
        sum_topk_when_last(
            y_ptr, out_ptr, counters_ptr, topk_ids_ptr, token, valid, offs_n, n_mask, pid_n, tl.cdiv(hidden, BLOCK_N),
            num_experts, top_k, stride_y_m, stride_y_n, stride_out_m, stride_out_n, BLOCK_M, BLOCK_N,
        )  # fmt: skip


def fused_experts_triton(
    x, topk_ids, topk_weights, w13, w2, w13_bias, w2_bias, token_lora,
    gate_up_a, gate_up_b, down_a, down_b, gate_up_scale, down_scale,
    activation, gated, interleaved, swiglu_alpha, swiglu_limit, weight_on_input,
    config: dict,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Runs the kernels (align, [shrink], gate_up, [shrink], down, top-k sum); arguments as
    ``moe_lora::fused_experts`` (already validated).

    ``config`` holds ``block_m``, ``sub_m`` and per-kernel tile sizes (see
    ``torch_moe_lora/configs``); with ``"pair_blocks": true`` the align op is not launched and
    every pair is a block of its own. ``out`` is an optional ``[T, H]`` output buffer. All buffers
    are sized from static bounds; nothing here reads device data on the host.
    """
    from .align import align_block_size

    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    num_experts, inter = w2.shape[0], w2.shape[2]
    num_pairs = num_tokens * top_k
    out = torch.empty_like(x) if out is None else out
    if num_tokens == 0:
        return out
    # The kernels index these by pair, token and slot: give them unit strides (no copy when they have them).
    topk_ids, topk_weights = topk_ids.contiguous(), topk_weights.contiguous()
    token_lora, gate_up_scale, down_scale = (
        None if t is None else t.contiguous() for t in (token_lora, gate_up_scale, down_scale)
    )
    has_lora = gate_up_a is not None and token_lora is not None
    num_slots = gate_up_a.shape[0] if gate_up_a is not None else 0
    pair_blocks = config.get("pair_blocks", False)
    if pair_blocks:
        # No align launch: block b is pair b alone (16-row tiles, one row used), and row b of h and
        # s. Decode-sized calls, where an expert rarely has two pairs; the kernels read the expert
        # from topk_ids.
        block_m = sub_m = 16
        sorted_pair_ids = num_blocks = topk_ids.new_empty(1)
        expert_of_block = topk_ids.view(-1)
        max_blocks = num_rows = num_pairs
    else:
        block_m, sub_m = config["block_m"], config.get("sub_m", 16)
        if block_m % sub_m != 0:
            raise ValueError(f"launch config: block_m {block_m} must be a multiple of sub_m {sub_m}")
        sorted_pair_ids, expert_of_block, _, num_blocks = align_block_size(
            topk_ids, token_lora if has_lora else None, num_experts, num_slots, block_m, pad_per_adapter=False
        )
        max_blocks = expert_of_block.shape[0]
        num_rows = sorted_pair_ids.shape[0]
    h = x.new_empty(num_rows, inter)
    y = x.new_empty(num_pairs, hidden)
    dummy = x.new_empty(1)
    rows = (sorted_pair_ids, expert_of_block, num_blocks, token_lora if has_lora else dummy, topk_weights)
    precision = dot_precision(x.dtype)
    pdl = config.get("pdl", True) and supports_pdl(x.device)
    fuse = has_lora and max(gate_up_a.shape[2], down_a.shape[2]) <= config.get("fuse_shrink_max_rank", 0)
    if has_lora:
        rank, down_rank = gate_up_b.shape[3], down_b.shape[3]
        block_r = rank_block(max(gate_up_a.shape[2], down_rank))
        shrink = (
            sorted_pair_ids, expert_of_block, num_blocks, token_lora,
            num_pairs, top_k, num_experts, num_slots, block_m, sub_m, pair_blocks,
        )  # fmt: skip
        s1 = s2 = x.new_empty(1, 1)
        if not fuse:
            s1 = x.new_empty(num_rows, gate_up_a.shape[2])
            s2 = x.new_empty(num_rows, down_rank)
            _shrink(x, gate_up_a, gate_up_scale, s1, *shrink, True, config["shrink"], pdl)
    else:
        rank = down_rank = 0
        block_r = 16
        s1 = s2 = x.new_empty(1, 1)
        gate_up_a = gate_up_b = down_a = down_b = x.new_empty(1, 1, 1, 1)
        gate_up_scale = down_scale = dummy
    smem = shared_memory_limit(x.device)
    gate_up_cfg = fit_shared_memory(config["gate_up"], block_m, 2 if gated else 1, x.element_size(), smem)
    down_cfg = fit_shared_memory(config["down"], block_m, 1, x.element_size(), smem)
    fuse_sum = config.get("fuse_sum", False)
    # One counter per (token, down column tile) for the top-k sum in the down kernel, zeroed by gate_up.
    num_counters = num_tokens * triton.cdiv(hidden, down_cfg["block_n"]) if fuse_sum else 1
    counters = torch.empty(num_counters, dtype=torch.int32, device=x.device)
    late_wait = pdl and has_lora and not fuse and config.get("overlap_shrink", True)
    tma = config.get("tma", False) and not interleaved and supports_tma(x.device)
    w13_tiles = weight_descriptor(w13, gate_up_cfg) if tma else None
    w2_tiles = weight_descriptor(w2, down_cfg) if tma else None
    tma = w13_tiles is not None and w2_tiles is not None
    cfg = gate_up_cfg
    _gate_up_kernel[(max_blocks * triton.cdiv(inter, cfg["block_n"]),)](
        x, w13_tiles if tma else w13, w13_bias if w13_bias is not None else dummy, s1, gate_up_a, gate_up_scale, gate_up_b, h, counters, out,
        topk_ids, *rows, num_pairs, top_k, num_experts, hidden, inter, rank, max_blocks,
        float(swiglu_alpha), float(swiglu_limit),
        *x.stride(), *w13.stride(), *(w13_bias.stride() if w13_bias is not None else (0, 0)),
        *s1.stride(), *gate_up_a.stride(), *gate_up_b.stride(), *h.stride(), *out.stride(),
        GATED=gated, INTERLEAVED=interleaved, SPLIT_GATE_UP=has_lora and gate_up_a.shape[2] != rank,
        HAS_BIAS=w13_bias is not None, HAS_LORA=has_lora, WEIGHT_ON_INPUT=weight_on_input,
        ACTIVATION=ACTIVATION_CODES[activation], PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], GROUP_M=cfg["group_m"],
        FUSE_SHRINK=fuse, BLOCK_R=block_r, PAIR_BLOCKS=pair_blocks, FUSE_SUM=fuse_sum, LATE_WAIT=late_wait,
        DOWN_BLOCK_N=down_cfg["block_n"], TMA=tma, **launch_options(cfg, pdl),
    )  # fmt: skip
    if has_lora and not fuse:
        _shrink(h, down_a, down_scale, s2, *shrink, False, config["shrink"], pdl)
    cfg = down_cfg
    _down_kernel[(max_blocks * triton.cdiv(hidden, cfg["block_n"]),)](
        h, w2_tiles if tma else w2, w2_bias if w2_bias is not None else dummy, s2, down_a, down_scale, down_b, y, out, counters, topk_ids,
        *rows, num_pairs, top_k, num_experts, hidden, inter, down_rank, max_blocks,
        *h.stride(), *w2.stride(), *(w2_bias.stride() if w2_bias is not None else (0, 0)),
        *s2.stride(), *down_a.stride(), *down_b.stride(), *y.stride(), *out.stride(),
        HAS_BIAS=w2_bias is not None, HAS_LORA=has_lora, WEIGHT_ON_INPUT=weight_on_input, PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], GROUP_M=cfg["group_m"],
        FUSE_SHRINK=fuse, BLOCK_R=block_r, PAIR_BLOCKS=pair_blocks, FUSE_SUM=fuse_sum, LATE_WAIT=late_wait,
        TMA=tma, **launch_options(cfg, pdl),
    )  # fmt: skip
    if not fuse_sum:
        cfg = config["sum"]
        sum_topk_kernel[(num_tokens, triton.cdiv(hidden, cfg["block_n"]))](
            y, topk_ids, out, num_experts, hidden, top_k, y.stride(0), *out.stride(),
            BLOCK_N=cfg["block_n"], num_warps=cfg["num_warps"], USE_PDL=pdl, launch_pdl=pdl,
        )  # fmt: skip
    return out


def _shrink(
    inp, a, scale, out, sorted_pair_ids, expert_of_block, num_blocks, token_lora,
    num_pairs, top_k, num_experts, num_slots, block_m, sub_m, pair_blocks, by_token, cfg, pdl,
):  # fmt: skip
    rank_total, in_features = a.shape[2], a.shape[3]
    block_r = min(cfg["max_block_r"], rank_block(rank_total))
    cfg = fit_shared_memory({**cfg, "block_n": block_r}, sub_m, 1, inp.element_size(), shared_memory_limit(inp.device))
    # Programs per sub-block: by default one per slot a sub-block can hold. With fewer
    # (``slot_programs``), each takes every slot_programs-th slot present: fewer programs that exit
    # at once, less parallel work.
    most_slots = 1 if pair_blocks else min(sub_m, num_slots)
    slots_per_sub = min(most_slots, cfg.get("slot_programs", most_slots))
    grid = (expert_of_block.shape[0] * (block_m // sub_m), slots_per_sub, triton.cdiv(rank_total, block_r))
    lora_shrink_kernel[grid](
        inp, a, scale, out, sorted_pair_ids, expert_of_block, num_blocks, token_lora,
        num_pairs, top_k, num_experts, in_features, rank_total,
        *inp.stride(), *a.stride(), *out.stride(),
        INPUT_BY_TOKEN=by_token, PRECISION=dot_precision(inp.dtype), BLOCK_M=sub_m, BLOCK_R=block_r,
        BLOCK_K=cfg["block_k"], SUBBLOCKS=block_m // sub_m, PAIR_BLOCKS=pair_blocks, LOOP_SLOTS=slots_per_sub < most_slots,
        **launch_options(cfg, pdl),
    )  # fmt: skip
