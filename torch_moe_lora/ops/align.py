"""``moe_lora::align_block_size``: sorts the (token, k) pairs into blocks of one expert each.

The kernels are compiled (``csrc/align_block_size.cpp`` for CPU, ``csrc/align_block_size_cuda.cu`` for
CUDA) and registered by the extension ``torch_moe_lora._C``. This module loads it, registers the
op's fake (outputs have static sizes, so CUDA graphs can capture the op and ``torch.compile`` knows
every shape) and wraps the op in ``align_block_size``, which checks its arguments.
"""

from __future__ import annotations

import torch

from .._extension import load_extension
from .checks import INDEX_DTYPES

load_extension()  # loading torch_moe_lora._C registers the ops


def max_num_blocks(num_pairs, num_experts, block_size):
    """Upper bound on the number of blocks: ``(N + min(E, N) * (block_size - 1)) // block_size``.

    At most ``min(E, N)`` of the ``E`` experts get pairs, and padding an expert's ``n`` pairs adds
    at most ``block_size - 1`` entries. Works on ints and SymInts.
    """
    return (num_pairs + torch.sym_min(num_experts, num_pairs) * (block_size - 1)) // block_size


@torch.library.register_fake("moe_lora::align_block_size")
def _align_block_size_fake(topk_ids, token_lora, num_experts, max_loras, block_size):
    num_blocks_bound = max_num_blocks(topk_ids.numel(), num_experts, block_size)

    def empty_int32(size):
        return topk_ids.new_empty(size, dtype=torch.int32)

    return empty_int32(num_blocks_bound * block_size), empty_int32(num_blocks_bound), empty_int32(1)


def _check_index_tensor(name: str, value, dim: int, layout: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {value.dtype}")
    if value.dim() != dim:
        raise ValueError(f"{name} must be a {dim}-D tensor {layout}, got shape {tuple(value.shape)}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def align_block_size(
    topk_ids: torch.Tensor,
    token_lora: torch.Tensor | None,
    num_experts: int,
    max_loras: int,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorts the flattened (token, k) pairs into blocks of ``block_size`` pairs of one expert each.

    ``align_block_size_ref`` in ``torch_moe_lora.reference`` defines the result. Pair ``t * K + k``
    belongs to expert ``topk_ids[t, k]`` and adapter slot ``token_lora[t]``. Experts are visited in
    order; an expert's pairs are ordered by slot, slot ``-1`` last, and padded to a multiple of
    ``block_size``. Pairs whose expert is outside ``[0, num_experts)`` are dropped. On CPU the pairs
    of one (expert, slot) keep their flattened order; on CUDA that order is not deterministic (the
    set of pairs of each (expert, slot) and all padding positions are).

    Outputs have static sizes, an upper bound computed from the shapes and arguments alone:
    ``max_blocks = max_num_blocks(T * K, num_experts, block_size)``. The op never synchronises with
    the host.

    Args:
        topk_ids: ``[T, K]`` int32 or int64, the experts of each token (``T >= 0``, ``K >= 1``).
        token_lora: ``[T]`` int32 or int64 on ``topk_ids``' device, each token's adapter slot in
            ``[-1, max_loras)`` (``-1``: no adapter), or None for no adapters at all. A value
            outside that range raises on CPU and fails a device-side assert on CUDA.
        num_experts: ``E >= 1``, the number of experts.
        max_loras: ``L >= 0``, the number of adapter slots.
        block_size: ``>= 1``, the number of pairs per block.

    Returns:
        ``(sorted_pair_ids, expert_of_block, num_blocks)``, all int32 on ``topk_ids``' device:

        * ``sorted_pair_ids [max_blocks * block_size]``: pair ids grouped and padded; padding and
          entries past the ``num_blocks * block_size`` valid ones hold ``N = T * K``.
        * ``expert_of_block [max_blocks]``: the expert of each block, ``-1`` past the valid blocks.
        * ``num_blocks [1]``: the number of valid blocks.

    Raises:
        TypeError: an argument has the wrong type or dtype.
        ValueError: a shape, device or integer argument is out of range.
    """
    _check_index_tensor("topk_ids", topk_ids, 2, "[T, K]")
    if topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must have K >= 1 columns, got shape {tuple(topk_ids.shape)}")
    if token_lora is not None:
        _check_index_tensor("token_lora", token_lora, 1, "[T]")
        if token_lora.shape[0] != topk_ids.shape[0]:
            raise ValueError(
                f"token_lora must have length T = {topk_ids.shape[0]} (topk_ids.shape[0]), "
                f"got {token_lora.shape[0]}"
            )
        if token_lora.device != topk_ids.device:
            raise ValueError(f"token_lora must be on topk_ids' device {topk_ids.device}, got {token_lora.device}")
    _check_int("num_experts", num_experts, 1)
    _check_int("max_loras", max_loras, 0)
    _check_int("block_size", block_size, 1)
    return torch.ops.moe_lora.align_block_size.default(topk_ids, token_lora, num_experts, max_loras, block_size)
