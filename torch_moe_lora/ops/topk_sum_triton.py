"""Triton kernels for the last step of the fused experts op: ``out[t] = sum_k y[t * K + k]``.

Two ways, chosen by the launch config's ``fuse_sum``:

- ``sum_topk_kernel``, a launch of its own after the down kernel (one program per token and
  column tile);
- inside the down kernel (``sum_topk_when_last``): every program counts the rows it wrote into
  per-(token, column tile) counters, and the program that writes a token's last row for a column
  tile sums that token's rows. No launch, for decode, where the launch costs more than the sum.
  The gate_up kernel zeroes the counters (``reset_topk_sum``) so that a call needs no memset.

Both add a token's rows in increasing ``k`` in float32, so the two give the same bits.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .lora_triton import wait_for_previous_kernel

RESET_BLOCK = tl.constexpr(32)
"""Counters one program of the gate_up kernel resets per step."""

@triton.jit
def sum_topk_kernel(
    y_ptr, topk_ids_ptr, out_ptr, num_experts, hidden, top_k,
    stride_y_m, stride_out_m, stride_out_n,
    BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """``out[t, n] = sum_k y[t * K + k, n]`` over the k whose expert is in ``[0, num_experts)``."""
    wait_for_previous_kernel(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k in range(0, top_k):
        expert = tl.load(topk_ids_ptr + token * top_k + k)
        if (expert >= 0) & (expert < num_experts):
            acc += tl.load(y_ptr + (token * top_k + k) * stride_y_m + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_out_m + offs_n * stride_out_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def local_pairs(topk_ids_ptr, token, mask, num_experts, top_k):
    """Number of pairs of each token whose expert is in ``[0, num_experts)``."""
    count = tl.zeros(token.shape, dtype=tl.int32)
    for k in range(0, top_k):
        expert = tl.load(topk_ids_ptr + token.to(tl.int64) * top_k + k, mask=mask, other=-1)
        count += ((expert >= 0) & (expert < num_experts)).to(tl.int32)
    return count


@triton.jit
def reset_topk_sum(
    counters_ptr, out_ptr, topk_ids_ptr, num_tokens, num_col_tiles, num_experts, top_k, hidden,
    stride_out_m, stride_out_n, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Called by the gate_up kernel's programs before ``sum_topk_when_last`` runs in the down kernel:
    zero the (token, column tile) counters, and write zeros to the ``BLOCK_N``-column tiles of
    ``out`` of tokens without a local pair (no down program counts them). Program ``i`` takes
    counters ``[i * RESET_BLOCK, (i + 1) * RESET_BLOCK)`` and every grid-size stride after."""
    num_counters = num_tokens * num_col_tiles
    for start in range(tl.program_id(0) * RESET_BLOCK, num_counters, tl.num_programs(0) * RESET_BLOCK):
        offs = start + tl.arange(0, RESET_BLOCK)
        in_range = offs < num_counters
        tl.store(counters_ptr + offs, tl.zeros((RESET_BLOCK,), tl.int32), mask=in_range)
        token = offs // num_col_tiles
        no_pair = in_range & (local_pairs(topk_ids_ptr, token, in_range, num_experts, top_k) == 0)
        cols = (offs % num_col_tiles)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(
            out_ptr + token[:, None].to(tl.int64) * stride_out_m + cols * stride_out_n,
            tl.zeros((RESET_BLOCK, BLOCK_N), out_ptr.dtype.element_ty),
            mask=no_pair[:, None] & (cols < hidden),
        )


@triton.jit
def sum_topk_when_last(
    y_ptr, out_ptr, counters_ptr, topk_ids_ptr, token, valid, offs_n, n_mask, pid_n, num_col_tiles,
    num_experts, top_k, stride_y_m, stride_y_n, stride_out_m, stride_out_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The top-k sum inside the down kernel, called once its rows of ``y`` are stored.

    Each valid row adds one to its (token, ``pid_n``) counter. A row that brings the counter to its
    token's number of local pairs (experts in ``[0, num_experts)``) was the token's last one in
    this column tile: its program sums the token's local rows of ``y`` into ``out``. The barrier and
    the release of the count make this program's ``y`` stores visible to the summing program; the
    acquire and the second barrier make the other programs' stores visible to this one's loads,
    which skip L1.
    """
    tl.debug_barrier()
    num_local = local_pairs(topk_ids_ptr, token, valid, num_experts, top_k)
    counter = counters_ptr + token.to(tl.int64) * num_col_tiles + pid_n
    before = tl.atomic_add(counter, tl.full((BLOCK_M,), 1, tl.int32), mask=valid, sem="acq_rel", scope="gpu")
    last = valid & (before == num_local - 1)
    if tl.max(last.to(tl.int32), axis=0) > 0:
        tl.debug_barrier()
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, top_k):
            pair = token.to(tl.int64) * top_k + k
            expert = tl.load(topk_ids_ptr + pair, mask=last, other=-1)
            take = last & (expert >= 0) & (expert < num_experts)
            acc += tl.load(
                y_ptr + pair[:, None] * stride_y_m + offs_n[None, :] * stride_y_n,
                mask=take[:, None] & n_mask[None, :],
                other=0.0,
                cache_modifier=".cg",
            ).to(tl.float32)
        tl.store(
            out_ptr + token[:, None].to(tl.int64) * stride_out_m + offs_n[None, :] * stride_out_n,
            acc.to(out_ptr.dtype.element_ty),
            mask=last[:, None] & n_mask[None, :],
        )
