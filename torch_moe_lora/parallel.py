"""Tensor and expert parallelism of the patched MoE blocks over a ``torch.distributed`` group.

Every rank runs the whole model on the whole batch (attention, embeddings, shared experts and the
router stay replicated); only the routed experts and their LoRA tables are split, and each MoE
layer ends in one all-reduce of its ``[T, H]`` output, issued once for base and LoRA together
through functional collectives (so ``torch.compile`` traces it without a graph break).

* ``"tensor"``: each rank keeps the intermediate columns ``[r I / W, (r + 1) I / W)`` of every
  expert: gate/up rows (column-parallel) and down input columns (row-parallel), and the matching
  LoRA slices (gate_up B rows, down A columns; gate_up A and down B replicated). The down bias is
  added by rank 0 only. FP8 experts keep the scale blocks of their rows and columns, so ``I / W``
  must be whole scale blocks.
* ``"expert"``: each rank keeps experts ``[r E / W, (r + 1) E / W)`` and their LoRA; the router's
  global expert ids are mapped to local ones, other experts to an out-of-range id that the op skips.
  Since every rank already holds every token, dispatching them and combining the results is the
  same all-reduce.

Adapters are read sharded: each rank reads only its slices of the expert LoRAs from the file
(``adapters.read_adapter(..., sharding)``).

Where the tokens are data-parallel instead (each rank its own batch, e.g. behind data-parallel
attention), ``fused_experts_expert_parallel`` dispatches them to the ranks that own their experts
and combines the partial outputs back.

Sharded parameters replace the module's own (the full weights are freed); the full shapes are kept
on the module, as meta tensors, for reading adapters written for the whole model.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import _functional_collectives as funcol

from .lora import LoRAWeights
from .models import MoEBlock
from .ops.fused_experts import fused_experts

MODES = ("tensor", "expert")

FULL_PARAMETERS_ATTR = "_moe_lora_full_parameters"
"""Attribute of an experts module whose parameters were sharded here: name -> a meta tensor of the
whole parameter's shape, against which adapters written for the whole model are read."""


def whole_parameter(experts: nn.Module, name: str) -> torch.Tensor:
    """The parameter ``name`` as the whole model has it (its full-shape meta tensor on a shard)."""
    return getattr(experts, FULL_PARAMETERS_ATTR, {}).get(name, getattr(experts, name))


@dataclass(frozen=True)
class ExpertSharding:
    """One rank's share of the experts.

    Attributes:
        mode: ``"tensor"`` or ``"expert"``.
        group: the process group; ``rank`` and ``world`` are this rank's index and the group size.
    """

    mode: str
    group: dist.ProcessGroup
    rank: int
    world: int

    @classmethod
    def create(cls, group: dist.ProcessGroup, mode: str) -> ExpertSharding:
        if mode not in MODES:
            raise ValueError(f"parallelism must be one of {MODES}, got {mode!r}")
        return cls(mode, group, dist.get_rank(group), dist.get_world_size(group))

    def check(self, block: MoEBlock) -> None:
        """Raises a clear error when the block does not split evenly over the group (for FP8 experts
        under tensor parallelism: into whole blocks of their scales)."""
        num_experts, _, inter = block.spec.w2(block.experts).shape
        size, what = (inter, "intermediate size I") if self.mode == "tensor" else (num_experts, "expert count E")
        if size % self.world:
            raise ValueError(
                f"{block.name}: {self.mode} parallelism over {self.world} ranks needs the {what} ({size}) to be a "
                f"multiple of {self.world}"
            )
        scales = block.spec.scales(block.experts)
        if scales is None or self.mode != "tensor":
            return
        if block.spec.interleaved:
            raise NotImplementedError(f"{block.name}: FP8 experts with interleaved gate/up rows under tensor parallelism")
        share = inter // self.world
        if share % scales.block_n or share % scales.block_k:
            raise ValueError(
                f"{block.name}: tensor parallelism over {self.world} ranks of FP8 experts needs each rank's share of "
                f"the intermediate size ({inter} / {self.world} = {share}) to be whole blocks of the weight scales "
                f"({scales.block_n} gate/up rows, {scales.block_k} down columns)"
            )

    def _span(self, size: int) -> slice:
        share = size // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def _gate_up_rows(self, block: MoEBlock, rows: int) -> torch.Tensor:
        """Indices of this rank's gate_up rows in the op's row order (gate shard then up shard)."""
        spec = block.spec
        inter = rows // 2 if spec.gated else rows
        cols = torch.arange(inter)[self._span(inter)]
        if not spec.gated:
            return cols
        if spec.interleaved:
            return torch.stack([2 * cols, 2 * cols + 1], dim=1).flatten()
        return torch.cat([cols, inter + cols])

    def shard_block(self, block: MoEBlock) -> None:
        """Replaces the experts' parameters with this rank's shard, in place."""
        self.check(block)
        experts, spec = block.experts, block.spec
        full = {}
        names = [spec.w13_name, spec.w2_name, spec.w13_bias_name, spec.w2_bias_name, spec.w13_scale_name,
                 spec.w2_scale_name]  # fmt: skip
        for name in names:
            if name is not None:
                full[name] = torch.empty_like(getattr(experts, name), device="meta")
        w13, w2 = spec.w13(experts), spec.w2(experts)
        w13_bias, w2_bias = spec.w13_bias(experts), spec.w2_bias(experts)
        if self.mode == "expert":
            experts_span = self._span(w2.shape[0])
            new = {name: getattr(experts, name)[experts_span] for name in names if name is not None}
        else:
            rows = self._gate_up_rows(block, w13.shape[1]).to(w13.device)
            cols = self._span(w2.shape[2])
            new_w13, new_w2 = w13[:, rows], w2[:, :, cols]
            new = {
                spec.w13_name: new_w13.transpose(1, 2) if spec.transposed else new_w13,
                spec.w2_name: new_w2.transpose(1, 2) if spec.transposed else new_w2,
            }
            if w13_bias is not None:
                new[spec.w13_bias_name] = w13_bias[:, rows]
            if w2_bias is not None:
                new[spec.w2_bias_name] = w2_bias if self.rank == 0 else torch.zeros_like(w2_bias)
            scales = spec.scales(experts)
            if scales is not None:  # whole scale blocks (check): one scale row per block_n kept rows
                new[spec.w13_scale_name] = scales.w13_scale[:, rows[:: scales.block_n] // scales.block_n]
                new[spec.w2_scale_name] = scales.w2_scale[:, :, cols.start // scales.block_k : cols.stop // scales.block_k]
        for name, value in new.items():
            setattr(experts, name, nn.Parameter(value.contiguous(), requires_grad=False))
        setattr(experts, FULL_PARAMETERS_ATTR, full)

    def lora_shard(
        self, block: MoEBlock, role: str, num_experts: int, split_size: int
    ) -> tuple[range, list[slice] | None]:
        """What this rank keeps of a whole-model expert LoRA.

        Args:
            role: ``"gate_up"`` (joint, ``split_size`` its ``2I`` output rows in the op's row order),
                ``"gate"``/``"up"`` (separate, ``I`` output rows) or ``"down"`` (``I`` input columns).

        Returns:
            ``(experts, runs)``: the kept experts, and the kept runs of the split dimension (None:
            all of it). Expert parallelism keeps a range of experts, tensor parallelism runs.
        """
        if self.mode == "expert":
            span = self._span(num_experts)
            return range(span.start, span.stop), None
        if role == "gate_up":
            rows = self._gate_up_rows(block, split_size).tolist()
            starts = [i for i, row in enumerate(rows) if i == 0 or row != rows[i - 1] + 1] + [len(rows)]
            return range(num_experts), [slice(rows[i], rows[j - 1] + 1) for i, j in itertools.pairwise(starts)]
        return range(num_experts), [self._span(split_size)]

    def local_ids(self, topk_ids: torch.Tensor, num_local_experts: int) -> torch.Tensor:
        """Global expert ids to this rank's (expert parallelism); ids of other ranks' experts become
        ``num_local_experts``, which the op skips."""
        if self.mode != "expert":
            return topk_ids
        local = topk_ids - self.rank * num_local_experts
        return torch.where((local >= 0) & (local < num_local_experts), local, num_local_experts)

    def reduce(self, out: torch.Tensor) -> torch.Tensor:
        """Sums the ranks' partial ``[T, H]`` outputs (functional all-reduce)."""
        return funcol.all_reduce(out, "sum", self.group)


def fused_experts_expert_parallel(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    group: dist.ProcessGroup,
    token_lora: torch.Tensor | None = None,
    lora: LoRAWeights | None = None,
    **op_kwargs,
) -> torch.Tensor:
    """``fused_experts`` with the experts split over ``group`` and each rank holding its own tokens.

    Rank ``r`` of ``W`` owns experts ``[r E_local, (r + 1) E_local)``. Dispatch gathers every rank's
    tokens, routing and adapter slots to every rank; each rank runs the pairs of its own experts
    (the others map to a skipped id), and a reduce-scatter returns to each rank the sum over ranks
    of its tokens' rows. Shapes stay static (no host sync, CUDA-graph capturable, functional
    collectives under ``torch.compile``): this is the all-to-all in which each token goes to each
    rank once. A token none of whose experts a rank owns costs that rank only its row of the
    buffers; sending routed tokens alone would need the per-rank counts on the host.

    Args:
        x: ``[T, H]`` this rank's tokens; ``T`` must be the same on every rank (pad).
        topk_ids: ``[T, K]`` global expert ids; topk_weights: ``[T, K]``.
        w13: ``[E_local, 2I, H]``, w2: ``[E_local, H, I]``: this rank's experts.
        group: the process group the experts are split over.
        token_lora: ``[T]`` int adapter slot per token or None; lora: this rank's experts' slot
            table (every rank holds the same adapters in the same slots; ``LoRAWeights.experts``
            cuts a whole table to a rank's span).
        op_kwargs: the remaining ``fused_experts`` arguments (biases of the local experts,
            activation, ...).

    Returns:
        ``[T, H]`` in ``x.dtype``: this rank's tokens' outputs.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sharding = ExpertSharding("expert", group, rank, world)
    gathered_x = funcol.all_gather_tensor(x, 0, group)
    gathered_ids = funcol.all_gather_tensor(topk_ids, 0, group)
    gathered_weights = funcol.all_gather_tensor(topk_weights, 0, group)
    gathered_lora = None if token_lora is None else funcol.all_gather_tensor(token_lora, 0, group)
    local_ids = sharding.local_ids(gathered_ids, w2.shape[0])
    partial = fused_experts(
        gathered_x, local_ids, gathered_weights, w13, w2, token_lora=gathered_lora, lora=lora, **op_kwargs
    )
    return funcol.reduce_scatter_tensor(partial, "sum", 0, group)
