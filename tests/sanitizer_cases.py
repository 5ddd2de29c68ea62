"""Launches every CUDA align path and fused_experts calls (shrink separate and fused, sorted and
pair blocks, top-k sum separate and in the down kernel, one shrink program per slot or per
sub-block, weight tiles through pointers or tensor descriptors), for compute-sanitizer (GPU only).

    compute-sanitizer --tool memcheck python tests/sanitizer_cases.py
    compute-sanitizer --tool racecheck python tests/sanitizer_cases.py

Exits non-zero if any output disagrees with the reference, so a clean sanitizer report and exit
code 0 together mean: no bad access, no shared-memory race, right answers.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from moe_problems import make_problem  # noqa: E402
from test_align import assert_aligned  # noqa: E402

from torch_moe_lora import fused_experts  # noqa: E402
from torch_moe_lora.ops.align import align_block_size  # noqa: E402
from torch_moe_lora.ops.fused_experts import launch_config  # noqa: E402
from torch_moe_lora.ops.fused_experts_triton import fused_experts_triton  # noqa: E402
from torch_moe_lora.reference import align_block_size_ref, fused_experts_ref  # noqa: E402

ALIGN_CASES = {  # name: (T, K, E, L, block_size)
    "single block, shared counters": (64, 8, 128, 8, 16),
    "single block, global counters": (128, 4, 8192, 8, 16),
    "grid, private histograms": (2048, 8, 128, 8, 64),
    "grid, global atomics": (1024, 8, 2048, 16, 16),
}


def check_align() -> None:
    gen = torch.Generator().manual_seed(0)
    for name, (T, K, E, L, block) in ALIGN_CASES.items():
        for pad_per_adapter in (True, False):
            ids = torch.randint(-1, E + 1, (T, K), generator=gen, dtype=torch.int32)
            slots = torch.randint(-1, L, (T,), generator=gen, dtype=torch.int32)
            outputs = align_block_size(ids.cuda(), slots.cuda(), E, L, block, pad_per_adapter=pad_per_adapter)
            expected = align_block_size_ref(ids, slots, E, L, block, pad_per_adapter)
            groups = E * L if pad_per_adapter else E
            cpu = [t.cpu() for t in outputs]
            assert_aligned(cpu, expected, num_pairs=ids.numel(), num_groups=groups, block_size=block, exact=False)
            print(f"align ok: {name}, pad_per_adapter={pad_per_adapter}")


def check_fused_experts() -> None:
    """The op with its launch config, then the Triton path with the shrink fused into the GEMMs and
    with pair blocks (no align op; shrink separate and fused), with the top-k sum in the down
    kernel, and with the weight tiles read through tensor descriptors."""
    for T in (3, 700):
        p = make_problem(T=T, H=64, I=32, E=8, K=2, L=3, R=8, dtype=torch.float16, bias=True).to("cuda")
        ref = fused_experts_ref(p.x, p.topk_ids, p.topk_weights, p.w13, p.w2, **p.kwargs())
        results = {"launch config": fused_experts(p.x, p.topk_ids, p.topk_weights, p.w13, p.w2, **p.kwargs())}
        config = launch_config(p.x, p.topk_ids, p.w2)
        variants = {
            "fused shrink": {"fuse_shrink_max_rank": 512},
            "pair blocks": {"pair_blocks": True, "fuse_shrink_max_rank": 0},
            "pair blocks, fused shrink": {"pair_blocks": True, "fuse_shrink_max_rank": 512},
            "sum in down": {"fuse_sum": True, "fuse_shrink_max_rank": 0},
            "one shrink program per sub-block": {"fuse_shrink_max_rank": 0, "shrink": {**config["shrink"], "slot_programs": 1}},
            "pair blocks, fused shrink, sum in down": {"pair_blocks": True, "fuse_shrink_max_rank": 512, "fuse_sum": True},
            "weights through tensor descriptors": {"tma": True, "fuse_shrink_max_rank": 0},
            "pair blocks, weights through tensor descriptors": {"pair_blocks": True, "tma": True},
        }
        for what, changes in variants.items():
            results[what] = fused_experts_triton(
                p.x, p.topk_ids, p.topk_weights, p.w13, p.w2, p.w13_bias, p.w2_bias, p.token_lora, *p.lora,
                "silu", True, False, 1.702, 7.0, False, config={**config, **changes},
            )  # fmt: skip
        for what, result in results.items():
            rel = ((result.double() - ref).norm() / ref.norm()).item()
            assert rel < 5e-3, (what, rel)
            print(f"fused_experts ok: T={T}, {what}, relative error {rel:.2e}")


if __name__ == "__main__":
    check_align()
    check_fused_experts()
    torch.cuda.synchronize()
