"""Triton building blocks of the multi-LoRA part of the fused experts kernels.

A block's rows (``BLOCK_M`` positions of the sorted pair order) carry their adapter slot; every
helper here walks the distinct slots present in a block in increasing order (``first_slot``,
``next_slot``), so that each (slot, expert) LoRA is read once per block and rows of other slots are
masked to zero. ``fused_experts_triton`` holds the GEMM kernels that call them and the launchers.
"""

from __future__ import annotations

import triton
import triton.language as tl

NO_SLOT = tl.constexpr(2**30)
"""Larger than any slot: what ``first_slot``/``next_slot`` return when no slot is left."""


@triton.jit
def pair_expert(pair, topk_ids_ptr, num_experts):
    """The expert of a pair as int64, or -1 if it is routed outside ``[0, num_experts)`` (no work).

    With ``PAIR_BLOCKS`` (no align op; block ``b`` is pair ``b`` alone) the kernels get the flat
    ``topk_ids`` in place of ``expert_of_block``.
    """
    expert = tl.load(topk_ids_ptr + pair).to(tl.int64)
    return tl.where((expert >= 0) & (expert < num_experts), expert, -1)


@triton.jit
def block_expert(block, expert_of_block_ptr, num_blocks_ptr, num_experts, PAIR_BLOCKS: tl.constexpr):
    """The expert of a block as int64, or -1 where the block has no work: past ``num_blocks``
    (sorted blocks), or a pair routed outside ``[0, num_experts)`` (``PAIR_BLOCKS``, where
    ``expert_of_block_ptr`` is the flat ``topk_ids``)."""
    if PAIR_BLOCKS:
        expert = pair_expert(block, expert_of_block_ptr, num_experts)
    else:
        expert = tl.where(block < tl.load(num_blocks_ptr), tl.load(expert_of_block_ptr + block).to(tl.int64), -1)
    return expert


@triton.jit
def block_rows(
    block, sorted_pair_ids_ptr, token_lora_ptr, num_pairs, top_k,
    BLOCK_M: tl.constexpr, HAS_LORA: tl.constexpr, PAIR_BLOCKS: tl.constexpr,
):  # fmt: skip
    """Rows of one block: positions (rows of ``h`` and ``s``), pair ids, validity, tokens and adapter
    slots (-1: none).

    With ``PAIR_BLOCKS`` row 0 of block ``b`` is pair ``b`` at position ``b`` and the other rows are
    padding (every access to them is masked), so ``h`` and ``s`` need one row per pair.
    """
    if PAIR_BLOCKS:
        pos = block + tl.arange(0, BLOCK_M) * 0
        pair = tl.where(tl.arange(0, BLOCK_M) == 0, block, num_pairs)
    else:
        pos = block * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pair_ids_ptr + pos)
    valid = pair < num_pairs
    token = tl.where(valid, pair // top_k, 0)
    if HAS_LORA:
        slot = tl.load(token_lora_ptr + token, mask=valid, other=-1).to(tl.int32)
    else:
        slot = tl.full((BLOCK_M,), -1, tl.int32)
    return pos, pair, valid, token, slot


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """With programmatic dependent launch, block until the previous kernel's writes are visible,
    then let the next kernel launch (it waits in turn). A no-op without it."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def first_slot(slot):
    return tl.min(tl.where(slot >= 0, slot, NO_SLOT))


@triton.jit
def next_slot(slot, current):
    return tl.min(tl.where(slot > current, slot, NO_SLOT))


@triton.jit
def block_slots(slot):
    """(smallest slot >= 0 among the rows, or ``NO_SLOT`` if none; number of distinct slots >= 0)."""
    first = first_slot(slot)
    count = 0
    current = first
    while current < NO_SLOT:
        count += 1
        current = next_slot(slot, current)
    return first, count


@triton.jit
def lora_shrink_kernel(
    inp_ptr, a_ptr, scale_ptr, out_ptr,
    sorted_pair_ids_ptr, expert_of_block_ptr, num_blocks_ptr, token_lora_ptr,
    num_pairs, top_k, num_experts, in_features, rank, k_per_program, r_blocks,
    stride_in_m, stride_in_k,
    stride_a_l, stride_a_e, stride_a_r, stride_a_k,
    stride_out_s, stride_out_m, stride_out_r,
    INPUT_BY_TOKEN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SUBBLOCKS: tl.constexpr,
    PAIR_BLOCKS: tl.constexpr, FEWER_SLOT_PROGRAMS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """``out[split, pos, r] = scale[slot] * inp[row, K] . a[slot, e, r, K]`` for the slots of one
    sub-block, over the input features ``K`` of one split (``k_per_program`` of them from
    ``split * k_per_program``; one split covering all of them unless the launch config's
    ``shrink.k_per_program`` says fewer).

    Grid: (max_blocks * SUBBLOCKS, G, r_blocks * splits), ``r_blocks = cdiv(rank, BLOCK_R)``;
    program ``(sub, j, split * r_blocks + r_block)`` takes the ``j``-th slot present in sub-block
    ``sub`` and exits if there is none. ``G`` is the most slots a sub-block can hold; with
    ``FEWER_SLOT_PROGRAMS`` (the launch config's ``shrink.slot_programs`` below that) it is smaller
    and the program also takes the ``(j + G)``-th, ``(j + 2G)``-th, ... slots. ``row`` is the token
    (``INPUT_BY_TOKEN``, reading x) or the sorted position (reading h).
    """
    wait_for_previous_kernel(PDL)
    sub = tl.program_id(0)
    expert = block_expert(sub // SUBBLOCKS, expert_of_block_ptr, num_blocks_ptr, num_experts, PAIR_BLOCKS)
    if expert < 0:
        return
    pos, pair, valid, token, slot = block_rows(
        sub, sorted_pair_ids_ptr, token_lora_ptr, num_pairs, top_k, BLOCK_M, True, PAIR_BLOCKS
    )
    current = first_slot(slot)
    for _ in range(0, tl.program_id(1)):
        current = next_slot(slot, current)
    if current >= NO_SLOT:
        return
    row = token if INPUT_BY_TOKEN else pos
    split = tl.program_id(2) // r_blocks
    offs_r = (tl.program_id(2) % r_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
    k_start = split * k_per_program
    k_end = tl.minimum(in_features, k_start + k_per_program)
    out_ptr += split.to(tl.int64) * stride_out_s
    if FEWER_SLOT_PROGRAMS:
        while current < NO_SLOT:
            _shrink_slot(
                inp_ptr, row, a_ptr, scale_ptr, out_ptr, current, expert, slot, pos, offs_r, k_start, k_end, rank,
                stride_in_m, stride_in_k, stride_a_l, stride_a_e, stride_a_r, stride_a_k, stride_out_m, stride_out_r,
                PRECISION, BLOCK_M, BLOCK_R, BLOCK_K,
            )  # fmt: skip
            for _ in range(0, tl.num_programs(1)):
                current = next_slot(slot, current)
    else:
        _shrink_slot(
            inp_ptr, row, a_ptr, scale_ptr, out_ptr, current, expert, slot, pos, offs_r, k_start, k_end, rank,
            stride_in_m, stride_in_k, stride_a_l, stride_a_e, stride_a_r, stride_a_k, stride_out_m, stride_out_r,
            PRECISION, BLOCK_M, BLOCK_R, BLOCK_K,
        )  # fmt: skip


@triton.jit
def _shrink_slot(
    inp_ptr, row, a_ptr, scale_ptr, out_ptr, current, expert, slot, pos, offs_r, k_start, k_end, rank,
    stride_in_m, stride_in_k, stride_a_l, stride_a_e, stride_a_r, stride_a_k, stride_out_m, stride_out_r,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``lora_shrink_kernel``'s work for the rows of slot ``current`` (the others are masked), the
    ranks ``offs_r`` and the input features ``[k_start, k_end)``."""
    in_slot = slot == current
    offs_k = tl.arange(0, BLOCK_K)
    in_rows = inp_ptr + row[:, None].to(tl.int64) * stride_in_m
    a_base = a_ptr + current.to(tl.int64) * stride_a_l + expert * stride_a_e + offs_r[None, :] * stride_a_r
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        xs = tl.load(in_rows + k[None, :] * stride_in_k, mask=in_slot[:, None] & (k[None, :] < k_end), other=0.0)
        a = tl.load(a_base + k[:, None] * stride_a_k, mask=(offs_r[None, :] < rank) & (k[:, None] < k_end), other=0.0)
        acc += tl.dot(xs, a, input_precision=PRECISION)
    acc *= tl.load(scale_ptr + current)
    tl.store(
        out_ptr + pos[:, None].to(tl.int64) * stride_out_m + offs_r[None, :] * stride_out_r,
        acc.to(out_ptr.dtype.element_ty),
        mask=in_slot[:, None] & (offs_r[None, :] < rank),
    )


@triton.jit
def lora_steps(
    acc, s_ptr, s_col0, b_ptr, expert, slot, first_slot, num_slots, pos, b_rows, b_row_mask, rank,
    stride_s_s, stride_s_m, stride_s_r, stride_b_l, stride_b_e, stride_b_n, stride_b_r,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    SPLITS: tl.constexpr,
):  # fmt: skip
    """``acc[m, n] += sum_r s[pos_m, s_col0 + r] * b[slot_m, expert, b_rows_n, r]`` (``s`` is pre-scaled;
    with ``SPLITS`` > 1 it is the sum of the shrink's float32 partial sums ``s[0] + s[1] + ...``, in
    that order, rounded to B's dtype).

    One step per (slot present in the block, ``BLOCK_K`` ranks): the A operand is the slot's rows of
    ``s`` (other rows masked to zero), the B operand its LoRA B. Other rows add ``0 * B``: exactly
    zero for a finite B, which is why slot tables refuse non-finite values (``ExpertLoRASlots``);
    a NaN or Inf written into a B directly would reach them. (Reading B's non-finite entries as
    zero, or selecting each step's product per row, cost 18-31% at prefill on the H200.) ``first_slot`` and ``num_slots`` are
    ``block_slots(slot)``, computed once per program by the caller. A ``for`` loop over a step count
    known before it starts, so the compiler pipelines the loads of the next slots with this one's dot.
    """
    r_steps = tl.cdiv(rank, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    s_rows = s_ptr + pos[:, None].to(tl.int64) * stride_s_m
    current = first_slot
    for step in range(0, num_slots * r_steps):
        r = (step % r_steps) * BLOCK_K + offs_k
        r_mask = r < rank
        s_mask = (slot == current)[:, None] & r_mask[None, :]
        s = tl.load(s_rows + (s_col0 + r)[None, :] * stride_s_r, mask=s_mask, other=0.0)
        for split in tl.static_range(1, SPLITS):
            s += tl.load(s_rows + split * stride_s_s + (s_col0 + r)[None, :] * stride_s_r, mask=s_mask, other=0.0)
        b = tl.load(
            b_ptr + current.to(tl.int64) * stride_b_l + expert * stride_b_e
            + b_rows[None, :] * stride_b_n + r[:, None] * stride_b_r,
            mask=b_row_mask[None, :] & r_mask[:, None],
            other=0.0,
        )
        acc += tl.dot(s.to(b.dtype), b, input_precision=PRECISION)
        current = tl.where(step % r_steps == r_steps - 1, next_slot(slot, current), current)
    return acc
