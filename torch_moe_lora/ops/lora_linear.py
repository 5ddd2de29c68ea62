"""Per-token multi-LoRA for linear layers: ``out[t] += scale[s_t] * B[s_t] (A[s_t] x[t])``.

Each token pays for its own adapter only, and reads no other adapter's weights: a NaN, an Inf or
an overflow in one slot cannot reach another slot's tokens or the tokens without an adapter.

The tokens are grouped by slot through a *segment table* that the caller computes once per
mapping (``slot_segments``) and that every layer of a model shares: ``row_order [B]`` lists the
batch rows (or tokens) slot by slot, and ``slot_row_start [L + 1]`` gives where each slot's rows
start in it (rows without an adapter come after ``slot_row_start[L]``). A row holds
``T / B`` consecutive tokens, so one table serves every sequence length of a batch (prefill and
decode); a packed batch maps tokens one by one (``B == T``).

Projections of the same input (q, k and v; gate and up) go in one call: the op takes a list of
outputs and tables, and the GPU runs one shrink launch (``u = x A_j^T`` for every projection ``j``)
and one expand launch (``out_j += u_j B_j^T``) for up to ``MAX_PROJECTIONS`` of them.

Reading order: the segment table, the Triton kernels and their launcher, the registered op with
its fake and its portable PyTorch implementation (the CPU path), and the public functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..configs import LinearLoRAConfig, get_linear_lora_config
from .checks import FLOAT_DTYPES, INDEX_DTYPES, direct_call, spelled_shape
from .launch import dot_precision, rank_block

_OP = "moe_lora::add_lora_linear"


def slot_segments(slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The segment table of a row-to-slot mapping, computed on the mapping's device (no host sync).

    Args:
        slots: ``[B]`` int32/int64, the slot of each row in ``[0, num_slots)`` or ``-1`` for none.
            Other values raise on the CPU and trip a device-side assert on CUDA.
        num_slots: ``L``.

    Returns:
        ``row_order [B]`` int32 (rows of slot 0, then slot 1, ..., then rows without an adapter;
        in row order within a slot) and ``slot_row_start [L + 1]`` int32.
    """
    if slots.dim() != 1 or slots.dtype not in INDEX_DTYPES:
        raise ValueError(
            f"slot_segments: slots must be a 1-D int32/int64 tensor, got {slots.dtype} {spelled_shape(slots)}"
        )
    in_range = ((slots >= -1) & (slots < num_slots)).all()
    if slots.device.type == "cpu":
        if not bool(in_range):
            raise ValueError(f"slot_segments: slots must be in [-1, {num_slots}), got {slots.tolist()}")
    else:
        torch._assert_async(in_range, f"slot_segments: slots must be in [-1, {num_slots})")
    key = torch.where(slots < 0, num_slots, slots.long())
    row_order = torch.argsort(key, stable=True).to(torch.int32)
    counts = torch.zeros(num_slots + 1, dtype=torch.int32, device=slots.device)
    counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
    slot_row_start = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    return row_order, slot_row_start


@triton.jit
def _block_segment(
    block, slot_row_start_ptr, num_slots, num_rows, tokens_per_row, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr
):  # fmt: skip
    """(slot, first position, end position) of block ``block`` in the slot-sorted token order, or
    slot -1 past the last block. Slot ``l``'s blocks follow slot ``l - 1``'s; positions count
    tokens: row ``row_order[p // tokens_per_row]``, token ``p % tokens_per_row`` of it. The whole
    table is read in one vector load (``BLOCK_L >= L``), so a program pays one memory latency for
    it, and segment bounds are clamped to ``[0, num_rows]``: no table makes a program read past
    ``row_order``."""
    slots = tl.arange(0, BLOCK_L)
    present = slots < num_slots
    row_start = tl.minimum(tl.maximum(tl.load(slot_row_start_ptr + slots, mask=present, other=0), 0), num_rows)
    row_end = tl.load(slot_row_start_ptr + slots + 1, mask=present, other=0)
    row_end = tl.minimum(tl.maximum(row_end, row_start), num_rows)
    blocks = tl.cdiv((row_end - row_start) * tokens_per_row, BLOCK_M)
    blocks_after = tl.cumsum(blocks, 0)
    hit = (block >= blocks_after - blocks) & (block < blocks_after)
    slot = tl.max(tl.where(hit, slots, -1), 0)
    start = tl.sum(tl.where(hit, row_start * tokens_per_row + (block - blocks_after + blocks) * BLOCK_M, 0), 0)
    end = tl.sum(tl.where(hit, row_end * tokens_per_row, 0), 0)
    return slot, start, end


@triton.jit
def _block_tokens(start, end, row_order_ptr, num_rows, tokens_per_row, BLOCK_M: tl.constexpr):
    """Positions, validity and tokens (int64) of a block's rows; a row id outside ``[0, num_rows)``
    makes its tokens invalid (never read or written)."""
    pos = start + tl.arange(0, BLOCK_M)
    valid = pos < end
    row = tl.load(row_order_ptr + pos // tokens_per_row, mask=valid, other=0).to(tl.int64)
    valid = valid & (row >= 0) & (row < num_rows)
    return pos, valid, tl.where(valid, row, 0) * tokens_per_row + pos % tokens_per_row


MAX_PROJECTIONS = 4
"""Projections one shrink and one expand launch take; a larger group launches once per four."""


@triton.jit
def _pick(j, v0, v1, v2, v3):
    """``v<j>`` for a projection ``j`` in ``[0, MAX_PROJECTIONS)`` (a runtime scalar)."""
    v = v0
    if j == 1:
        v = v1
    if j == 2:
        v = v2
    if j == 3:
        v = v3
    return v


@triton.jit
def _shrink_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, a3_ptr, scale0_ptr, scale1_ptr, scale2_ptr, scale3_ptr, u_ptr,
    row_order_ptr, slot_row_start_ptr,
    num_slots, num_rows, tokens_per_row, in_features, rank, k_per_program,
    stride_x_m, stride_x_k, stride_a_l, stride_a_r, stride_a_k, stride_u_s, stride_u_m, stride_u_r,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
):  # fmt: skip
    """``u[split, pos, j R + r] = scale_j[slot] * x[token(pos), K] @ a_j[slot, r, K]`` for the tokens
    of one block (one slot), the input features ``K`` of split ``program_id(1)`` (``k_per_program``
    of them from ``split * k_per_program``) and projection ``j = program_id(2)``."""
    slot, start, end = _block_segment(
        tl.program_id(0), slot_row_start_ptr, num_slots, num_rows, tokens_per_row, BLOCK_M, BLOCK_L
    )
    if slot < 0:
        return
    j = tl.program_id(2)
    a_ptr = _pick(j, a0_ptr, a1_ptr, a2_ptr, a3_ptr)
    scale_ptr = _pick(j, scale0_ptr, scale1_ptr, scale2_ptr, scale3_ptr)
    pos, valid, token = _block_tokens(start, end, row_order_ptr, num_rows, tokens_per_row, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + token[:, None] * stride_x_m
    a_rows = a_ptr + slot.to(tl.int64) * stride_a_l + offs_r[None, :] * stride_a_r
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    split = tl.program_id(1)
    k_end = tl.minimum(in_features, (split + 1) * k_per_program)
    for k0 in range(split * k_per_program, k_end, BLOCK_K):
        k = k0 + offs_k
        xs = tl.load(x_rows + k[None, :] * stride_x_k, mask=valid[:, None] & (k[None, :] < k_end), other=0.0)
        a = tl.load(a_rows + k[:, None] * stride_a_k, mask=(offs_r[None, :] < rank) & (k[:, None] < k_end), other=0.0)
        acc += tl.dot(xs, a, input_precision=PRECISION)
    acc *= tl.load(scale_ptr + slot)
    u = u_ptr + split * stride_u_s + pos[:, None].to(tl.int64) * stride_u_m + (j * rank + offs_r)[None, :] * stride_u_r
    tl.store(u, acc.to(u_ptr.dtype.element_ty), mask=valid[:, None] & (offs_r[None, :] < rank))


@triton.jit
def _expand_kernel(
    u_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, out0_ptr, out1_ptr, out2_ptr, out3_ptr, row_order_ptr, slot_row_start_ptr,
    num_slots, num_rows, tokens_per_row, rank,
    out0_features, out1_features, out2_features, out3_features, tiles1, tiles2, tiles3,
    stride_u_s, stride_u_m, stride_u_r,
    stride_b0_l, stride_b1_l, stride_b2_l, stride_b3_l, stride_b_n, stride_b_r,
    stride_out0_m, stride_out1_m, stride_out2_m, stride_out3_m, stride_out_n,
    EXPAND_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    """``out_j[token(pos), n] += (sum over splits of u[split, pos, j R:(j + 1) R]) @ b_j[slot, n]^T``
    for one block and one column tile of one projection: column tiles ``[tiles_j, tiles_{j+1})`` of
    ``program_id(1)`` are projection ``j``'s (``tiles_0 = 0``; the partial sums added in split order)."""
    slot, start, end = _block_segment(
        tl.program_id(0), slot_row_start_ptr, num_slots, num_rows, tokens_per_row, BLOCK_M, BLOCK_L
    )
    if slot < 0:
        return
    tile = tl.program_id(1)
    j = (tile >= tiles1).to(tl.int32) + (tile >= tiles2).to(tl.int32) + (tile >= tiles3).to(tl.int32)
    b_ptr = _pick(j, b0_ptr, b1_ptr, b2_ptr, b3_ptr)
    out_ptr = _pick(j, out0_ptr, out1_ptr, out2_ptr, out3_ptr)
    out_features = _pick(j, out0_features, out1_features, out2_features, out3_features)
    stride_b_l = _pick(j, stride_b0_l, stride_b1_l, stride_b2_l, stride_b3_l)
    stride_out_m = _pick(j, stride_out0_m, stride_out1_m, stride_out2_m, stride_out3_m)
    tile -= _pick(j, 0, tiles1, tiles2, tiles3)
    pos, valid, token = _block_tokens(start, end, row_order_ptr, num_rows, tokens_per_row, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = offs_r < rank
    n_mask = offs_n < out_features
    u_rows = u_ptr + pos[:, None].to(tl.int64) * stride_u_m + (j * rank + offs_r)[None, :] * stride_u_r
    u_mask = valid[:, None] & r_mask[None, :]
    u = tl.load(u_rows, mask=u_mask, other=0.0)
    for split in tl.static_range(1, SPLITS):
        u += tl.load(u_rows + split * stride_u_s, mask=u_mask, other=0.0)
    b = tl.load(
        b_ptr + slot.to(tl.int64) * stride_b_l + offs_n[None, :] * stride_b_n + offs_r[:, None] * stride_b_r,
        mask=n_mask[None, :] & r_mask[:, None],
        other=0.0,
    )
    # u is float32: the expand multiplies in tf32 (float32 in full) rather than rounding u to x's dtype.
    delta = tl.dot(u, b.to(tl.float32), input_precision=EXPAND_PRECISION)
    out = out_ptr + token[:, None] * stride_out_m + offs_n[None, :] * stride_out_n
    mask = valid[:, None] & n_mask[None, :]
    base = tl.load(out, mask=mask, other=0.0)
    tl.store(out, (base.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=mask)


def _padded(values: list, count: int) -> list:
    """``values`` repeated from its first to ``count`` entries (the kernels' unused projections)."""
    return values + [values[0]] * (count - len(values))


def add_lora_linear_triton(
    outs, x, row_order, slot_row_start, lora_a, lora_b, lora_scale, config: LinearLoRAConfig | None = None
) -> None:
    """Launches the shrink and expand kernels, once for every ``MAX_PROJECTIONS`` projections;
    arguments as ``moe_lora::add_lora_linear`` (checked: lists of one entry per projection),
    ``config`` the launch config (default: ``lora_linear.json``'s bucket of the token count)."""
    num_tokens, in_features = x.shape
    num_slots, rank = lora_a[0].shape[0], lora_a[0].shape[1]
    if num_tokens == 0 or rank == 0:
        return
    cfg = get_linear_lora_config(num_tokens) if config is None else config
    block_m, block_r, block_l = cfg.block_m, rank_block(rank), triton.next_power_of_2(num_slots)
    tokens_per_row = num_tokens // row_order.shape[0]
    # Blocks of one slot never hold another's tokens: at most one partial block per slot.
    grid_m = triton.cdiv(num_tokens, block_m) + num_slots
    splits = cfg.shrink_splits(in_features)
    k_per_program = in_features if splits == 1 else cfg.k_per_program
    precision = dot_precision(x.dtype)
    segments = (row_order, slot_row_start, num_slots, row_order.shape[0], tokens_per_row)
    shrink, expand = cfg.shrink, cfg.expand
    for first in range(0, len(outs), MAX_PROJECTIONS):
        group = slice(first, first + MAX_PROJECTIONS)
        a, b, out, scale = lora_a[group], lora_b[group], outs[group], lora_scale[group]
        count = len(out)
        if any(t.stride() != a[0].stride() for t in a):
            a = [t.contiguous() for t in a]
        if any(t.stride()[1:] != b[0].stride()[1:] for t in b):
            b = [t.contiguous() for t in b]
        scale = [t.contiguous() for t in scale]
        u = x.new_empty(splits, num_tokens, count * rank, dtype=torch.float32)
        _shrink_kernel[(grid_m, splits, count)](
            x, *_padded(a, MAX_PROJECTIONS), *_padded(scale, MAX_PROJECTIONS), u, *segments,
            in_features, rank, k_per_program, *x.stride(), *a[0].stride(), *u.stride(),
            PRECISION=precision, BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=shrink.block, BLOCK_L=block_l,
            num_warps=shrink.num_warps, num_stages=shrink.num_stages,
        )  # fmt: skip
        tiles = [triton.cdiv(t.shape[1], expand.block) for t in out]
        starts = [sum(tiles[:j]) for j in range(1, MAX_PROJECTIONS)]
        starts = [s if j < count else 2**30 for j, s in enumerate(starts, 1)]
        _expand_kernel[(grid_m, sum(tiles))](
            u, *_padded(b, MAX_PROJECTIONS), *_padded(out, MAX_PROJECTIONS), *segments, rank,
            *_padded([t.shape[1] for t in out], MAX_PROJECTIONS), *starts, *u.stride(),
            *_padded([t.stride(0) for t in b], MAX_PROJECTIONS), *b[0].stride()[1:],
            *_padded([t.stride(0) for t in out], MAX_PROJECTIONS), out[0].stride(1),
            EXPAND_PRECISION=precision or "tf32", BLOCK_M=block_m, BLOCK_N=expand.block, BLOCK_R=block_r,
            BLOCK_L=block_l, SPLITS=splits,
            num_warps=expand.num_warps, num_stages=expand.num_stages,
        )  # fmt: skip


def _check_projection(out, x, lora_a, lora_b, lora_scale, name) -> None:
    """Checks one projection's ``out``, ``lora_a``, ``lora_b``, ``lora_scale`` against ``x``;
    ``name(arg)`` spells an argument in messages (with its index in a group)."""
    T, in_features = x.shape
    if lora_a.dim() != 3 or lora_a.shape[2] != in_features:
        raise ValueError(
            f"add_lora_linear: {name('lora_a')} must be [L, R, in] with in = {in_features}, got {spelled_shape(lora_a)}"
        )
    L, R = lora_a.shape[0], lora_a.shape[1]
    if lora_b.dim() != 3 or lora_b.shape[0] != L or lora_b.shape[2] != R:
        raise ValueError(
            f"add_lora_linear: {name('lora_b')} must be [L, out, R] = [{L}, out, {R}], got {spelled_shape(lora_b)}"
        )
    out_features = lora_b.shape[1]
    if out.shape != (T, out_features):
        raise ValueError(
            f"add_lora_linear: {name('out')} must be [T, out] = [{T}, {out_features}], got {spelled_shape(out)}"
        )
    if lora_scale.shape != (L,) or lora_scale.dtype != torch.float32:
        raise ValueError(
            f"add_lora_linear: {name('lora_scale')} must be float32 [L] = [{L}], got {lora_scale.dtype} "
            f"{spelled_shape(lora_scale)}"
        )
    for arg, t in (("out", out), ("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype != x.dtype:
            raise TypeError(f"add_lora_linear: {name(arg)} must have x's dtype {x.dtype}, got {t.dtype}")
    for arg, t in (("out", out), ("lora_a", lora_a), ("lora_b", lora_b), ("lora_scale", lora_scale)):
        if t.device != x.device:
            raise ValueError(f"add_lora_linear: {name(arg)} is on {t.device} but x is on {x.device}")


def check_add_lora_linear_args(outs, x, row_order, slot_row_start, lora_a, lora_b, lora_scale) -> None:
    """Validates shapes, dtypes and devices (no data is read); raises ValueError/TypeError.

    ``outs``, ``lora_a``, ``lora_b`` and ``lora_scale`` hold one entry per projection of ``x``."""
    if x.dim() != 2:
        raise ValueError(f"add_lora_linear: x must be [T, in], got {spelled_shape(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"add_lora_linear: x must be float32, float16 or bfloat16, got {x.dtype}")
    count = len(outs)
    if count == 0 or not len(lora_a) == len(lora_b) == len(lora_scale) == count:
        raise ValueError(
            f"add_lora_linear: give one out, lora_a, lora_b and lora_scale per projection, got {count} outs, "
            f"{len(lora_a)} lora_a, {len(lora_b)} lora_b and {len(lora_scale)} lora_scale"
        )
    for j in range(count):
        name = (lambda arg: arg) if count == 1 else (lambda arg, j=j: f"{arg}[{j}]")
        _check_projection(outs[j], x, lora_a[j], lora_b[j], lora_scale[j], name)
        if lora_a[j].shape != lora_a[0].shape:
            raise ValueError(
                f"add_lora_linear: the projections of one call share L and R: lora_a[{j}] is "
                f"{spelled_shape(lora_a[j])}, lora_a[0] {spelled_shape(lora_a[0])}"
            )
        if outs[j].stride(1) != outs[0].stride(1):
            raise ValueError(
                f"add_lora_linear: the outputs of one call share their column stride: outs[{j}] has "
                f"{outs[j].stride(1)}, outs[0] {outs[0].stride(1)}"
            )
    T, L = x.shape[0], lora_a[0].shape[0]
    if row_order.dim() != 1 or row_order.dtype not in INDEX_DTYPES:
        raise ValueError(
            f"add_lora_linear: row_order must be a 1-D int32/int64 tensor, got {row_order.dtype} "
            f"{spelled_shape(row_order)}"
        )
    rows = row_order.shape[0]
    if rows == 0 and T != 0 or rows != 0 and T % rows != 0:
        raise ValueError(
            f"add_lora_linear: {T} tokens are not a whole number of rows of the {rows}-row mapping; map one slot "
            "per batch row (each row's tokens consecutive) or one per token"
        )
    if slot_row_start.shape != (L + 1,) or slot_row_start.dtype not in INDEX_DTYPES:
        raise ValueError(
            f"add_lora_linear: slot_row_start must be int32/int64 [L + 1] = [{L + 1}], got "
            f"{slot_row_start.dtype} {spelled_shape(slot_row_start)}"
        )
    for name, t in (("row_order", row_order), ("slot_row_start", slot_row_start)):
        if t.device != x.device:
            raise ValueError(f"add_lora_linear: {name} is on {t.device} but x is on {x.device}")


@torch.library.custom_op(_OP, mutates_args=("outs",))
def _add_lora_linear_op(
    outs: list[torch.Tensor],
    x: torch.Tensor,
    row_order: torch.Tensor,
    slot_row_start: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    lora_scale: list[torch.Tensor],
) -> None:
    add_lora_linear_torch(outs, x, row_order, slot_row_start, lora_a, lora_b, lora_scale)


@_add_lora_linear_op.register_fake
def _(outs, x, row_order, slot_row_start, lora_a, lora_b, lora_scale) -> None:
    check_add_lora_linear_args(outs, x, row_order, slot_row_start, lora_a, lora_b, lora_scale)


@_add_lora_linear_op.register_kernel("cuda")
def add_lora_linear_cuda(outs, x, row_order, slot_row_start, lora_a, lora_b, lora_scale) -> None:
    """The op's CUDA implementation: checks, then the Triton kernels."""
    check_add_lora_linear_args(outs, x, row_order, slot_row_start, lora_a, lora_b, lora_scale)
    add_lora_linear_triton(outs, x, row_order.contiguous(), slot_row_start.contiguous(), lora_a, lora_b, lora_scale)


def add_lora_linear_torch(outs, x, row_order, slot_row_start, lora_a, lora_b, lora_scale) -> None:
    """Portable implementation in PyTorch ops (the CPU path): for each projection, a loop over the
    slots that have tokens, each computing in float32 on its own tokens only."""
    check_add_lora_linear_args(outs, x, row_order, slot_row_start, lora_a, lora_b, lora_scale)
    num_tokens, rows = x.shape[0], row_order.shape[0]
    if num_tokens == 0:
        return
    tokens_per_row = num_tokens // rows
    starts = slot_row_start.tolist()
    if starts[0] != 0 or any(b < a for a, b in zip(starts, starts[1:])) or starts[-1] > rows:
        raise ValueError(f"add_lora_linear: slot_row_start must rise from 0 to at most {rows}, got {starts}")
    offsets = torch.arange(tokens_per_row, device=x.device)
    for slot in range(lora_a[0].shape[0]):
        if starts[slot + 1] == starts[slot]:
            continue
        slot_rows = row_order[starts[slot] : starts[slot + 1]].long()
        tokens = (slot_rows[:, None] * tokens_per_row + offsets).reshape(-1)
        x_slot = x[tokens].float()
        for out, a, b, scale in zip(outs, lora_a, lora_b, lora_scale):
            delta = ((x_slot @ a[slot].float().T) @ b[slot].float().T) * scale[slot]
            out[tokens] = (out[tokens].float() + delta).to(out.dtype)


def add_lora_linear(
    out: torch.Tensor,
    x: torch.Tensor,
    row_order: torch.Tensor,
    slot_row_start: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_scale: torch.Tensor,
) -> None:
    """Adds each token's LoRA to ``out`` in place (``torch.ops.moe_lora.add_lora_linear``).

    ``out[t] += scale[s] * B[s] (A[s] x[t])`` with ``s`` the slot of token ``t``'s row; tokens of
    rows without an adapter are left as they are. Each token reads only its own slot's weights.

    Args:
        out: ``[T, out]`` in x's dtype, e.g. the base layer's output; updated in place.
        x: ``[T, in]`` float32, float16 or bfloat16.
        row_order, slot_row_start: the mapping's segment table (``slot_segments``): ``[B]`` and
            ``[L + 1]`` int32/int64, with ``B`` dividing ``T`` (row ``i`` holds tokens
            ``[i * T / B, (i + 1) * T / B)``).
        lora_a: ``[L, R, in]`` shrink matrices in x's dtype (rank rows past an adapter's own rank
            are zero).
        lora_b: ``[L, out, R]`` expand matrices in x's dtype.
        lora_scale: ``[L]`` float32 per-slot scaling (PEFT's ``alpha / r``).

    In eager mode on plain CPU or CUDA tensors it runs the op's implementation directly
    (``checks.direct_call``); compiled or traced, it calls the op.
    """
    add_lora_linear_group([out], x, row_order, slot_row_start, [lora_a], [lora_b], [lora_scale])


def add_lora_linear_group(
    outs: Sequence[torch.Tensor],
    x: torch.Tensor,
    row_order: torch.Tensor,
    slot_row_start: torch.Tensor,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    lora_scale: Sequence[torch.Tensor],
) -> None:
    """``add_lora_linear`` for several projections of the same ``x`` (q, k and v; gate and up):
    ``outs[j][t] += scale_j[s] * B_j[s] (A_j[s] x[t])``, one shrink and one expand launch on the
    GPU for every four projections in place of two launches per projection.

    Args:
        outs: one ``[T, out_j]`` tensor per projection in x's dtype, updated in place; every one
            with the same column stride.
        x, row_order, slot_row_start: as ``add_lora_linear``'s.
        lora_a: one ``[L, R, in]`` table per projection, all of the same shape.
        lora_b: one ``[L, out_j, R]`` table per projection.
        lora_scale: one ``[L]`` float32 tensor per projection.
    """
    outs, lora_a, lora_b, lora_scale = list(outs), list(lora_a), list(lora_b), list(lora_scale)
    args = (outs, x, row_order, slot_row_start, lora_a, lora_b, lora_scale)
    if direct_call(x, row_order, slot_row_start, *outs, *lora_a, *lora_b, *lora_scale):
        (add_lora_linear_cuda if x.is_cuda else add_lora_linear_torch)(*args)
    else:
        torch.ops.moe_lora.add_lora_linear(*args)
