"""Host-side helpers of the fused experts launchers: device capabilities, shared-memory fitting,
tensor descriptors of the expert weights, tile and precision choices."""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor


def launch_options(tiles, pdl: bool) -> dict:
    """Triton's launch options of a kernel with tiles ``tiles`` (a ``configs`` tile class), and its ``PDL`` flag."""
    return dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages, PDL=pdl, launch_pdl=pdl)


def fit_shared_memory(
    tiles, block_m: int, b_cols: int, element_size: int, limit: int | None, b_element_size=None, partial_sums: int = 1
):
    """``tiles`` (with ``num_stages`` and ``block_k``) with fewer pipeline stages, then a smaller K
    tile, until one kernel's tiles fit ``limit`` bytes.

    Tuned configs are for 16-bit operands; float32 doubles the bytes of every stage. Each stage
    holds one ``[block_m, block_k]`` A tile of ``element_size`` bytes an element and ``[block_k,
    b_cols]`` of B tiles of ``b_element_size(block_k)`` bytes (default ``element_size``; FP8 weights
    with a float32 scale per element take 1 + 4). Triton keeps ``num_stages - 1`` stages in shared
    memory; counting ``num_stages`` leaves room for its other buffers. With ``partial_sums`` > 1
    (the LoRA shrink split over the input features) the kernel's LoRA loop, pipelined with the same
    stages, holds that many float32 ``[block_m, block_k]`` tiles a stage (and B tiles of at most
    ``b_cols`` columns in ``element_size``); the larger of the two loops must fit.
    """
    if limit is None:
        return tiles
    num_stages, block_k = tiles.num_stages, tiles.block_k
    b_bytes = b_element_size or (lambda _: element_size)

    def need() -> int:
        base = block_m * element_size + b_cols * b_bytes(block_k)
        lora = partial_sums * block_m * 4 + b_cols * element_size if partial_sums > 1 else 0
        return num_stages * block_k * max(base, lora)

    while need() > limit and num_stages > 2:
        num_stages -= 1
    while need() > limit and block_k > 16:
        block_k //= 2
    return dataclasses.replace(tiles, num_stages=num_stages, block_k=block_k)


def dot_precision(dtype: torch.dtype) -> str | None:
    """float32 operands multiply in full precision (as torch's default matmul does), not tf32."""
    return "ieee" if dtype == torch.float32 else None


@functools.cache
def shared_memory_per_device(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


@functools.cache
def pdl_per_device(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def supports_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch (each kernel launches while the previous one finishes): sm_90+."""
    return device.type == "cuda" and pdl_per_device(device.index)


def supports_tma(device: torch.device) -> bool:
    """Tensor-descriptor loads: the copy engine on sm_90+; the interpreter runs them on the CPU."""
    return supports_pdl(device) or device.type == "cpu"


def weight_descriptor(w: torch.Tensor, block_n: int, block_k: int) -> TensorDescriptor | None:
    """``w`` (``[E, N, K]``) as a tensor descriptor of ``[E * N, K]`` with ``[block_n, block_k]``
    tiles, or None where the copy engine cannot read it so: experts not stacked row after row, ``K``
    not contiguous, or row stride or base not 16-byte aligned."""
    num_experts, rows, cols = w.shape
    stacked = w.stride(2) == 1 and w.stride(0) == rows * w.stride(1)
    aligned = (w.stride(1) * w.element_size()) % 16 == 0 and w.data_ptr() % 16 == 0
    if not (stacked and aligned and num_experts * rows < 2**31 and max(block_n, block_k) <= 256):
        return None
    return TensorDescriptor(w, [num_experts * rows, cols], [w.stride(1), 1], [block_n, block_k])


def shared_memory_limit(device: torch.device) -> int | None:
    """Opt-in shared memory per block of a CUDA device (None elsewhere, e.g. the interpreter)."""
    return shared_memory_per_device(device.index) if device.type == "cuda" else None


def rank_block(rank: int) -> int:
    """A rank tile: a power of two >= 16 (tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(max(rank, 1)))
