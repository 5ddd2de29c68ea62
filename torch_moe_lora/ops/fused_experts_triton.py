"""Triton kernels for the fused experts op on the GPU, and their launcher.

The pairs (token, k) are first sorted by expert with ``align_block_size``: every block of
``BLOCK_M`` rows belongs to one expert, and inside an expert rows are ordered by adapter slot
(adapter-less rows last). The base GEMMs therefore never pay for per-adapter padding.

Kernels, in launch order after the align op (``pos`` is a row of the sorted order; the LoRA
building blocks are in ``lora_triton.py``, the top-k sum in ``topk_sum_triton.py``):

1. ``lora_shrink_kernel`` on x:  ``s1[pos] = scale * x[token(pos)] @ gate_up_a[slot, e]^T``
2. ``_gate_up_kernel``:           ``h[pos] = act(w13[e] x + b13 + gate_up_b[slot, e] s1)``
3. ``lora_shrink_kernel`` on h:  ``s2[pos] = scale * h[pos] @ down_a[slot, e]^T``
4. ``_down_kernel``:              ``y[pair] = w * (w2[e] h + b2 + down_b[slot, e] s2)``
5. ``sum_topk_kernel``:           ``out[t] = sum_k y[t, k]`` over the pairs with a local expert

Without LoRA, kernels 1 and 3 are not launched. With ``fp8_activations`` (below) x is quantized
before kernel 1 and h before kernel 3 (``quant_triton.quantize_groups``). The LoRA expand runs in each GEMM after its K loop,
into the same accumulator: for every slot present in the block, ``cdiv(rank, BLOCK_K)`` steps whose
A operand is that slot's rows of ``s`` (other rows masked to zero) and whose B operand is the
slot's LoRA B; the step count is known before the loop, so its loads pipeline. A shrink program
takes one slot of one ``sub_m``-row sub-block, so the shrink reads each (slot, expert) A once per
sub-block that holds it and does no work for other rows.

The launch config (``torch_moe_lora.configs.LaunchConfig``) sets the tiles and these switches:

* ``pair_blocks`` (decode buckets, where an expert rarely gets two pairs): the align op is not
  launched; block ``b`` is pair ``b`` alone and its expert is read from ``topk_ids``, so an expert
  read by two pairs is read twice.
* ``tma`` (gate block then up block, experts stacked contiguously, rows 16-byte aligned; sm_90+):
  the GEMMs read their expert weight tiles through tensor descriptors (the copy engine) instead of
  computed pointers.
* ``pdl`` (sm_90+): programmatic dependent launch; each kernel launches while the previous one
  drains and waits for its writes (``griddepcontrol.wait``) only before reading them. With LoRA
  the GEMMs run their base K loop before waiting for the shrink kernel (``OVERLAP_SHRINK``).
* ``shrink.slot_programs``: fewer shrink programs per sub-block, each taking several slots.
* ``shrink.k_per_program``: the shrink's input features split over several programs, each writing
  float32 partial sums (``s1[split]``, ``s2[split]``) that the GEMMs' LoRA steps add in split order.
* ``fp8_activations`` (FP8 weights whose scale blocks hold whole K tiles, of at least 32): the GEMMs
  read x and h quantized to FP8 per token and scale block along K, and run FP8 tensor-core dots
  times both scales; the shrinks read x and h unquantized.

FP8 (e4m3) expert weights come with their block scales: the GEMMs load FP8 tiles and convert them
to x's dtype for the dot; where the K tile lies inside one scale block (``block_k % BLOCK_K == 0``,
the checkpoints' 128) each tile row's scale multiplies the tile's dot product, else every element
is scaled before the dot (``_scaled_dot``).

Programs past ``num_blocks`` exit on the device, so grids come from static bounds and CUDA graphs
can capture the launch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    lora_shrink_kernel,
    lora_steps,
    wait_for_previous_kernel,
)
from .quant_triton import quantize_groups
from .topk_sum_triton import sum_topk_kernel

if TYPE_CHECKING:
    from ..configs import LaunchConfig, ShrinkTiles
    from ..lora import LoRAWeights
    from .fused_experts import ExpertOptions, WeightScales

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
def _scaled_dot(acc, xs, w, s_ptr, expert, rows, k0, k, row_mask, k_mask, stride_s_e, stride_s_n, stride_s_k,
                x_scale, PRECISION: tl.constexpr, SCALE: tl.constexpr, SCALE_BN: tl.constexpr,
                SCALE_BK: tl.constexpr, ACT_FP8: tl.constexpr):  # fmt: skip
    """``acc + xs @ w`` for a tile of weights in x's dtype (``SCALE == 0``), or of FP8 weights
    ``w[expert, rows, k]^T`` times their float32 block scales, the tile converted to x's dtype for
    the dot: with ``SCALE == 1`` (the K tile inside one scale block) one scale per row, which
    multiplies the tile's dot product; with ``SCALE == 2`` one per element, which multiplies the
    tile. (Each branch loads its own scales: a helper returning either shape does not compile.)
    With ``ACT_FP8`` (``SCALE == 1`` only) ``xs`` is FP8 too, ``x_scale`` its rows' scales of this K
    tile's group: an FP8 tensor-core dot, times both scales."""
    if SCALE == 0:
        acc += tl.dot(xs, w, input_precision=PRECISION)
    elif SCALE == 1:
        scale = tl.load(s_ptr + expert * stride_s_e + (rows // SCALE_BN) * stride_s_n + (k0 // SCALE_BK) * stride_s_k, mask=row_mask, other=0.0)
        if ACT_FP8:
            acc += tl.dot(xs, w, out_dtype=tl.float32) * (x_scale[:, None] * scale[None, :])
        else:
            acc += tl.dot(xs, w.to(xs.dtype), input_precision=PRECISION) * scale[None, :]
    else:
        scale = tl.load(
            s_ptr + expert * stride_s_e + (rows // SCALE_BN)[None, :] * stride_s_n + (k // SCALE_BK)[:, None] * stride_s_k,
            mask=row_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        acc += tl.dot(xs, (w.to(tl.float32) * scale).to(xs.dtype), input_precision=PRECISION)
    return acc


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
    x_ptr, w13_ptr, b13_ptr, s1_ptr, gu_b_ptr, h_ptr, w13_scale_ptr, x_scale_ptr,
    sorted_pair_ids_ptr, expert_of_block_ptr, num_blocks_ptr, token_lora_ptr, topk_weights_ptr,
    num_pairs, top_k, num_experts, hidden, inter, rank, max_blocks, alpha, limit,
    stride_x_m, stride_x_k, stride_xs_m,
    stride_w_e, stride_w_n, stride_w_k,
    stride_ws_e, stride_ws_n, stride_ws_k,
    stride_b13_e, stride_b13_n,
    stride_s_s, stride_s_m, stride_s_r,
    stride_gb_l, stride_gb_e, stride_gb_n, stride_gb_r,
    stride_h_m, stride_h_n,
    GATED: tl.constexpr, INTERLEAVED: tl.constexpr, SPLIT_GATE_UP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr, ACTIVATION: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PAIR_BLOCKS: tl.constexpr, PDL: tl.constexpr, OVERLAP_SHRINK: tl.constexpr,
    TMA: tl.constexpr, SCALE: tl.constexpr, SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr,
    SPLITS: tl.constexpr, ACT_FP8: tl.constexpr,
):  # fmt: skip
    """``h[pos, n] = act(gate, up)`` for the ``BLOCK_N`` intermediate columns ``n`` of one program.

    FP8 ``w13`` (``SCALE`` 1 or 2) is multiplied by its ``[SCALE_BN, SCALE_BK]`` block scales
    (``_scaled_dot``); with ``ACT_FP8`` ``x_ptr`` is x quantized per token group of ``SCALE_BK``
    (``quant_triton.quantize_groups``) and ``x_scale_ptr`` its scales.

    Gate and up accumulate separately: gate row of column ``n`` is ``n`` (``2n`` interleaved), up
    row is ``inter + n`` (``2n + 1``). Grid: (max_blocks * cdiv(inter, BLOCK_N),). With ``TMA``
    (gate block then up block only) ``w13_ptr`` is a tensor descriptor (``_weight_tile``).

    With ``OVERLAP_SHRINK`` (programmatic dependent launch after the shrink kernel) the base K loop
    runs before waiting for the previous kernel, overlapping the shrink: the shrink waited for
    everything this program reads before ``s1`` before it let this kernel launch.
    """
    if not OVERLAP_SHRINK:
        wait_for_previous_kernel(PDL)
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
        x_scale = 0.0
        if ACT_FP8:
            x_scale = tl.load(x_scale_ptr + token.to(tl.int64) * stride_xs_m + k0 // SCALE_BK, mask=valid, other=0.0)
        w_gate = _weight_tile(
            w13_ptr, expert, gate_rows, pid_n * BLOCK_N, k0, k, n_mask, k_mask, rows_per_expert,
            stride_w_e, stride_w_n, stride_w_k, TMA,
        )  # fmt: skip
        acc_gate = _scaled_dot(
            acc_gate, xs, w_gate, w13_scale_ptr, expert, gate_rows, k0, k, n_mask, k_mask,
            stride_ws_e, stride_ws_n, stride_ws_k, x_scale, PRECISION, SCALE, SCALE_BN, SCALE_BK, ACT_FP8,
        )  # fmt: skip
        if GATED:
            w_up = _weight_tile(
                w13_ptr, expert, up_rows, inter + pid_n * BLOCK_N, k0, k, n_mask, k_mask, rows_per_expert,
                stride_w_e, stride_w_n, stride_w_k, TMA,
            )  # fmt: skip
            acc_up = _scaled_dot(
                acc_up, xs, w_up, w13_scale_ptr, expert, up_rows, k0, k, n_mask, k_mask,
                stride_ws_e, stride_ws_n, stride_ws_k, x_scale, PRECISION, SCALE, SCALE_BN, SCALE_BK, ACT_FP8,
            )  # fmt: skip
    if HAS_LORA:
        if OVERLAP_SHRINK:
            wait_for_previous_kernel(PDL)
        first_slot, num_slots = block_slots(slot)
        if SPLIT_GATE_UP:
            up_col0 = rank
        else:
            up_col0 = 0
        acc_gate = lora_steps(
            acc_gate, s1_ptr, 0, gu_b_ptr, expert, slot, first_slot, num_slots, pos, gate_rows, n_mask, rank,
            stride_s_s, stride_s_m, stride_s_r, stride_gb_l, stride_gb_e, stride_gb_n, stride_gb_r,
            BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, SPLITS,
        )  # fmt: skip
        if GATED:
            acc_up = lora_steps(
                acc_up, s1_ptr, up_col0, gu_b_ptr, expert, slot, first_slot, num_slots, pos, up_rows, n_mask,
                rank, stride_s_s, stride_s_m, stride_s_r, stride_gb_l, stride_gb_e, stride_gb_n, stride_gb_r,
                BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, SPLITS,
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
    h_ptr, w2_ptr, b2_ptr, s2_ptr, d_b_ptr, y_ptr, w2_scale_ptr, h_scale_ptr,
    sorted_pair_ids_ptr, expert_of_block_ptr, num_blocks_ptr, token_lora_ptr, topk_weights_ptr,
    num_pairs, top_k, num_experts, hidden, inter, rank, max_blocks,
    stride_h_m, stride_h_k, stride_hs_m,
    stride_w_e, stride_w_n, stride_w_k,
    stride_ws_e, stride_ws_n, stride_ws_k,
    stride_b2_e, stride_b2_n,
    stride_s_s, stride_s_m, stride_s_r,
    stride_db_l, stride_db_e, stride_db_n, stride_db_r,
    stride_y_m, stride_y_n,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PAIR_BLOCKS: tl.constexpr, PDL: tl.constexpr, OVERLAP_SHRINK: tl.constexpr, TMA: tl.constexpr,
    SCALE: tl.constexpr, SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr, SPLITS: tl.constexpr,
    ACT_FP8: tl.constexpr,
):  # fmt: skip
    """``y[pair, n] = w * (h[pos] . w2[e, n] + b2[e, n] + lora)`` for ``BLOCK_N`` hidden columns
    (FP8 ``w2`` times its block scales, and with ``ACT_FP8`` ``h_ptr`` FP8 with its group scales
    ``h_scale_ptr``, as in ``_gate_up_kernel``).

    With ``PDL`` the align op's outputs are read before waiting for the previous kernel: that kernel
    waited for them before it let this one launch. With ``OVERLAP_SHRINK`` (after the shrink kernel)
    the base K loop over ``h`` runs before the wait too, overlapping the shrink. With ``TMA``
    ``w2_ptr`` is a tensor descriptor (``_weight_tile``).
    """
    block, pid_n = _program_tile(max_blocks, hidden, BLOCK_N, GROUP_M)
    expert = block_expert(block, expert_of_block_ptr, num_blocks_ptr, num_experts, PAIR_BLOCKS)
    if expert < 0:
        return
    pos, pair, valid, _, slot = block_rows(
        block, sorted_pair_ids_ptr, token_lora_ptr, num_pairs, top_k, BLOCK_M, HAS_LORA, PAIR_BLOCKS
    )
    if not OVERLAP_SHRINK:
        wait_for_previous_kernel(PDL)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + pos[:, None].to(tl.int64) * stride_h_m
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < inter
        hs = tl.load(h_rows + k[None, :] * stride_h_k, mask=valid[:, None] & k_mask[None, :], other=0.0)
        h_scale = 0.0
        if ACT_FP8:
            h_scale = tl.load(h_scale_ptr + pos.to(tl.int64) * stride_hs_m + k0 // SCALE_BK, mask=valid, other=0.0)
        w = _weight_tile(
            w2_ptr, expert, offs_n, pid_n * BLOCK_N, k0, k, n_mask, k_mask, hidden,
            stride_w_e, stride_w_n, stride_w_k, TMA,
        )  # fmt: skip
        acc = _scaled_dot(
            acc, hs, w, w2_scale_ptr, expert, offs_n, k0, k, n_mask, k_mask,
            stride_ws_e, stride_ws_n, stride_ws_k, h_scale, PRECISION, SCALE, SCALE_BN, SCALE_BK, ACT_FP8,
        )  # fmt: skip
    if HAS_LORA:
        if OVERLAP_SHRINK:
            wait_for_previous_kernel(PDL)
        first_slot, num_slots = block_slots(slot)
        acc = lora_steps(
            acc, s2_ptr, 0, d_b_ptr, expert, slot, first_slot, num_slots, pos, offs_n, n_mask, rank,
            stride_s_s, stride_s_m, stride_s_r, stride_db_l, stride_db_e, stride_db_n, stride_db_r,
            BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, SPLITS,
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


def fused_experts_triton(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    token_lora: torch.Tensor | None = None,
    lora: LoRAWeights | None = None,
    options: ExpertOptions,
    config: LaunchConfig,
    out: torch.Tensor | None = None,
    scales: WeightScales | None = None,
) -> torch.Tensor:
    """Runs the kernels (align, [shrink], gate_up, [shrink], down, top-k sum) of
    ``moe_lora::fused_experts``; tensors as ``fused_experts`` takes them (already validated), the
    op's other arguments in ``options``; ``scales`` for FP8 ``w13``/``w2`` (dequantized tile by tile
    in the GEMMs' K loops).

    ``config`` is the call's launch config; ``out`` an optional ``[T, H]`` output buffer. All
    buffers are sized from static bounds; nothing here reads device data on the host.
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
    token_lora = None if token_lora is None else token_lora.contiguous()
    has_lora = lora is not None and token_lora is not None
    num_slots = lora.num_slots if lora is not None else 0
    pair_blocks = config.pair_blocks
    if pair_blocks:
        # No align launch: block b is pair b alone (16-row tiles, one row used), and row b of h and
        # s. Decode-sized calls, where an expert rarely has two pairs; the kernels read the expert
        # from topk_ids.
        block_m = sub_m = 16
        sorted_pair_ids = num_blocks = topk_ids.new_empty(1)
        expert_of_block = topk_ids.view(-1)
        max_blocks = num_rows = num_pairs
    else:
        block_m, sub_m = config.block_m, config.sub_m
        sorted_pair_ids, expert_of_block, num_blocks = align_block_size(
            topk_ids, token_lora if has_lora else None, num_experts, num_slots, block_m
        )
        max_blocks = expert_of_block.shape[0]
        num_rows = sorted_pair_ids.shape[0]
    h = x.new_empty(num_rows, inter)
    y = x.new_empty(num_pairs, hidden)
    dummy = x.new_empty(1)
    rows = (sorted_pair_ids, expert_of_block, num_blocks, token_lora if has_lora else dummy, topk_weights)
    precision = dot_precision(x.dtype)
    pdl = config.pdl and supports_pdl(x.device)
    smem = shared_memory_limit(x.device)
    b_tiles = 2 if options.gated else 1
    # The shrinks' float32 partial sums per split of the input features, which the GEMMs' LoRA steps add.
    splits1, splits2 = (config.shrink.splits(hidden), config.shrink.splits(inter)) if has_lora else (1, 1)
    gate_up_tiles = fit_shared_memory(
        config.gate_up, block_m, b_tiles * config.gate_up.block_n, x.element_size(), smem, _weight_bytes(w13, scales),
        splits1,
    )  # fmt: skip
    down_tiles = fit_shared_memory(
        config.down, block_m, config.down.block_n, x.element_size(), smem, _weight_bytes(w2, scales), splits2
    )
    # FP8 tensor-core GEMMs: both GEMMs' K tiles inside one scale block and at least one FP8 MMA
    # step deep (else the dequantizing dot).
    act_fp8 = (
        config.fp8_activations and scales is not None
        and all(_scale_mode(scales, t.block_k) == 1 and t.block_k >= FP8_DOT_MIN_K for t in (gate_up_tiles, down_tiles))
    )  # fmt: skip
    # Quantized before the shrink: a GEMM that runs its base K loop before waiting for the shrink
    # (``OVERLAP_SHRINK``) reads it, and the shrink waited for it.
    x_base, x_scale = quantize_groups(x, scales.block_k) if act_fp8 else (x, dummy)
    if has_lora:
        gate_up_a, gate_up_b, down_a, down_b = lora.gate_up_a, lora.gate_up_b, lora.down_a, lora.down_b
        gate_up_scale, down_scale = lora.gate_up_scale.contiguous(), lora.down_scale.contiguous()
        rank, down_rank = gate_up_b.shape[3], down_b.shape[3]
        shrink = (
            sorted_pair_ids, expert_of_block, num_blocks, token_lora,
            num_pairs, top_k, num_experts, num_slots, block_m, sub_m, pair_blocks,
        )  # fmt: skip
        # The shrinks' outputs: one row per sorted position, or float32 partial sums per split.
        s1 = x.new_empty(splits1, num_rows, gate_up_a.shape[2], dtype=torch.float32 if splits1 > 1 else x.dtype)
        s2 = x.new_empty(splits2, num_rows, down_rank, dtype=torch.float32 if splits2 > 1 else x.dtype)
        _shrink(x, gate_up_a, gate_up_scale, s1, *shrink, by_token=True, tiles=config.shrink, pdl=pdl)
    else:
        rank = down_rank = 0
        s1 = s2 = x.new_empty(1, 1, 1)
        gate_up_b = down_b = x.new_empty(1, 1, 1, 1)
    overlap_shrink = pdl and has_lora  # the base K loop before the wait for the shrink
    tma = config.tma and not options.interleaved and supports_tma(x.device)
    w13_desc = weight_descriptor(w13, gate_up_tiles.block_n, gate_up_tiles.block_k) if tma else None
    w2_desc = weight_descriptor(w2, down_tiles.block_n, down_tiles.block_k) if tma else None
    tma = w13_desc is not None and w2_desc is not None
    tiles = gate_up_tiles
    w13_scale, gate_up_scaling = _scaling(scales, 0, tiles.block_k, dummy)
    _gate_up_kernel[(max_blocks * triton.cdiv(inter, tiles.block_n),)](
        x_base, w13_desc if tma else w13, w13_bias if w13_bias is not None else dummy, s1, gate_up_b, h, w13_scale,
        x_scale, *rows, num_pairs, top_k, num_experts, hidden, inter, rank, max_blocks,
        float(options.swiglu_alpha), float(options.swiglu_limit),
        *x_base.stride(), x_scale.stride(0), *w13.stride(), *_strides(w13_scale, scales),
        *(w13_bias.stride() if w13_bias is not None else (0, 0)),
        *s1.stride(), *gate_up_b.stride(), *h.stride(),
        GATED=options.gated, INTERLEAVED=options.interleaved, SPLIT_GATE_UP=has_lora and gate_up_a.shape[2] != rank,
        HAS_BIAS=w13_bias is not None, HAS_LORA=has_lora, WEIGHT_ON_INPUT=options.weight_on_input,
        ACTIVATION=ACTIVATION_CODES[options.activation], PRECISION=precision, SPLITS=splits1, ACT_FP8=act_fp8,
        BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
        PAIR_BLOCKS=pair_blocks, OVERLAP_SHRINK=overlap_shrink, TMA=tma, **gate_up_scaling,
        **launch_options(tiles, pdl),
    )  # fmt: skip
    h_base, h_scale = quantize_groups(h, scales.block_k) if act_fp8 else (h, dummy)  # before the shrink, as x's
    if has_lora:
        _shrink(h, down_a, down_scale, s2, *shrink, by_token=False, tiles=config.shrink, pdl=pdl)
    tiles = down_tiles
    w2_scale, down_scaling = _scaling(scales, 1, tiles.block_k, dummy)
    _down_kernel[(max_blocks * triton.cdiv(hidden, tiles.block_n),)](
        h_base, w2_desc if tma else w2, w2_bias if w2_bias is not None else dummy, s2, down_b, y, w2_scale, h_scale,
        *rows, num_pairs, top_k, num_experts, hidden, inter, down_rank, max_blocks,
        *h_base.stride(), h_scale.stride(0), *w2.stride(), *_strides(w2_scale, scales),
        *(w2_bias.stride() if w2_bias is not None else (0, 0)),
        *s2.stride(), *down_b.stride(), *y.stride(),
        HAS_BIAS=w2_bias is not None, HAS_LORA=has_lora, WEIGHT_ON_INPUT=options.weight_on_input, PRECISION=precision,
        SPLITS=splits2, ACT_FP8=act_fp8,
        BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
        PAIR_BLOCKS=pair_blocks, OVERLAP_SHRINK=overlap_shrink, TMA=tma, **down_scaling,
        **launch_options(tiles, pdl),
    )  # fmt: skip
    sum_tiles = config.sum
    sum_topk_kernel[(num_tokens, triton.cdiv(hidden, sum_tiles.block_n))](
        y, topk_ids, out, num_experts, hidden, top_k, y.stride(0), *out.stride(),
        BLOCK_N=sum_tiles.block_n, num_warps=sum_tiles.num_warps, PDL=pdl, launch_pdl=pdl,
    )  # fmt: skip
    return out


def _scaling(scales: WeightScales | None, which: int, block_k: int, dummy: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The scale tensor (float32) of weight ``which`` (0: w13, 1: w2) and the GEMM kernel's scale
    switches: ``SCALE`` 0 for weights in x's dtype, 1 where the K tile lies inside one scale block
    (one scale per row of the tile), else 2 (one per element)."""
    if scales is None:
        return dummy, dict(SCALE=0, SCALE_BN=1, SCALE_BK=1)
    scale = scales[which]
    scale = scale if scale.dtype == torch.float32 else scale.float()  # UE8M0: powers of two, exact in float32
    return scale, dict(SCALE=_scale_mode(scales, block_k), SCALE_BN=scales.block_n, SCALE_BK=scales.block_k)


FP8_DOT_MIN_K = 32
"""The least K of an FP8 ``tl.dot`` (the FP8 tensor cores' step; Triton refuses less on the GPU)."""


def _scale_mode(scales: WeightScales, block_k: int) -> int:
    return 1 if scales.block_k % block_k == 0 else 2


def _weight_bytes(w: torch.Tensor, scales: WeightScales | None):
    """Shared-memory bytes per weight element of a GEMM's K tile of ``block_k`` (for
    ``fit_shared_memory``): the weight's, plus a float32 scale per element in ``_scaling``'s mode 2."""
    if scales is None:
        return None
    return lambda block_k: w.element_size() + (4 if _scale_mode(scales, block_k) == 2 else 0)


def _strides(scale: torch.Tensor, scales: WeightScales | None) -> tuple[int, int, int]:
    return scale.stride() if scales is not None else (0, 0, 0)


def _shrink(
    inp, a, scale, out, sorted_pair_ids, expert_of_block, num_blocks, token_lora,
    num_pairs, top_k, num_experts, num_slots, block_m, sub_m, pair_blocks, *, by_token: bool, tiles: ShrinkTiles,
    pdl: bool,
):  # fmt: skip
    """Launches ``lora_shrink_kernel``: ``out[split] = scale * inp[:, K_split] @ a[..., K_split]^T`` per
    sub-block and slot, ``inp`` read by token (``by_token``: x) or by sorted position (h); ``out``
    holds ``tiles.splits(in_features)`` splits (one: all the input features)."""
    rank_total, in_features = a.shape[2], a.shape[3]
    splits = out.shape[0]
    k_per_program = in_features if splits == 1 else tiles.k_per_program
    block_r = min(tiles.max_block_r, rank_block(rank_total))
    r_blocks = triton.cdiv(rank_total, block_r)
    tiles = fit_shared_memory(tiles, sub_m, block_r, inp.element_size(), shared_memory_limit(inp.device))
    # Programs per sub-block: by default one per slot a sub-block can hold. With fewer
    # (``slot_programs``), each takes every slot_programs-th slot present: fewer programs that exit
    # at once, less parallel work.
    most_slots = 1 if pair_blocks else min(sub_m, num_slots)
    slot_programs = most_slots if tiles.slot_programs is None else min(most_slots, tiles.slot_programs)
    grid = (expert_of_block.shape[0] * (block_m // sub_m), slot_programs, r_blocks * splits)
    lora_shrink_kernel[grid](
        inp, a, scale, out, sorted_pair_ids, expert_of_block, num_blocks, token_lora,
        num_pairs, top_k, num_experts, in_features, rank_total, k_per_program, r_blocks,
        *inp.stride(), *a.stride(), *out.stride(),
        INPUT_BY_TOKEN=by_token, PRECISION=dot_precision(inp.dtype), BLOCK_M=sub_m, BLOCK_R=block_r,
        BLOCK_K=tiles.block_k, SUBBLOCKS=block_m // sub_m, PAIR_BLOCKS=pair_blocks,
        FEWER_SLOT_PROGRAMS=slot_programs < most_slots, **launch_options(tiles, pdl),
    )  # fmt: skip
