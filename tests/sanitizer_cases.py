"""Launches every CUDA align path, fused_experts calls (sorted and pair blocks, one shrink program
per slot or per sub-block, weight tiles through pointers or tensor descriptors, FP8 weights with a
scale per tile row and per element) and add_lora_linear
calls (one token per row and rows of several tokens, odd widths, slots without tokens; one
projection and groups of three and of five), for compute-sanitizer (GPU only).

    compute-sanitizer --tool memcheck python tests/sanitizer_cases.py
    compute-sanitizer --tool racecheck python tests/sanitizer_cases.py fused_experts  # some checks

Checks: align, fused_experts, fp8_experts, lora_linear (all when none is named).

Exits non-zero if any output disagrees with the reference, so a clean sanitizer report and exit
code 0 together mean: no bad access, no shared-memory race, right answers.
"""

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from utils import REL_TOL, assert_aligned, make_problem  # noqa: E402

from torch_moe_lora import WeightScales, add_lora_linear, add_lora_linear_group, fused_experts, slot_segments  # noqa: E402
from torch_moe_lora.ops.align import align_block_size  # noqa: E402
from torch_moe_lora.ops.fused_experts import ExpertOptions, launch_config  # noqa: E402
from torch_moe_lora.ops.fused_experts_triton import fused_experts_triton  # noqa: E402
from torch_moe_lora.reference import (  # noqa: E402
    align_block_size_ref, dequantize_blocks_ref, fused_experts_ref, lora_linear_ref, quantize_blocks_ref,
)  # fmt: skip

ALIGN_CASES = {  # name: (T, K, E, L, block_size)
    "single block, shared counters": (64, 8, 128, 8, 16),
    "single block, global counters": (128, 4, 8192, 8, 16),
    "grid, private histograms": (2048, 8, 128, 8, 64),
    "grid, global atomics": (1024, 8, 2048, 16, 16),
}


def check_align() -> None:
    gen = torch.Generator().manual_seed(0)
    for name, (T, K, E, L, block) in ALIGN_CASES.items():
        ids = torch.randint(-1, E + 1, (T, K), generator=gen, dtype=torch.int32)
        slots = torch.randint(-1, L, (T,), generator=gen, dtype=torch.int32)
        outputs = align_block_size(ids.cuda(), slots.cuda(), E, L, block)
        expected = align_block_size_ref(ids, slots, E, L, block)
        cpu = [t.cpu() for t in outputs]
        assert_aligned(cpu, expected, num_pairs=ids.numel(), num_experts=E, block_size=block, exact=False)
        print(f"align ok: {name}")


def check_fused_experts() -> None:
    """The op with its launch config, then the Triton path with pair blocks (no align op), with one
    shrink program per sub-block, with the shrink split over the input features, and with the weight
    tiles read through tensor descriptors."""
    for T in (3, 700):
        p = make_problem(T=T, H=64, I=32, E=8, K=2, L=3, R=8, dtype=torch.float16, bias=True).to("cuda")
        ref = fused_experts_ref(p.x, p.topk_ids, p.topk_weights, p.w13, p.w2, **p.kwargs())
        results = {"launch config": fused_experts(p.x, p.topk_ids, p.topk_weights, p.w13, p.w2, **p.kwargs())}
        config = launch_config(p.x, p.topk_ids, p.w2)
        variants = {
            "pair blocks": dict(pair_blocks=True),
            "one shrink program per sub-block": dict(shrink=dataclasses.replace(config.shrink, slot_programs=1)),
            "shrink split over the input features": dict(
                shrink=dataclasses.replace(config.shrink, block_k=16, k_per_program=16)
            ),
            "pair blocks, shrink split over the input features": dict(
                pair_blocks=True, shrink=dataclasses.replace(config.shrink, block_k=16, k_per_program=32)
            ),
            "weights through tensor descriptors": dict(tma=True),
            "pair blocks, weights through tensor descriptors": dict(pair_blocks=True, tma=True),
        }
        for what, changes in variants.items():
            results[what] = fused_experts_triton(
                p.x, p.topk_ids, p.topk_weights, p.w13, p.w2, w13_bias=p.w13_bias, w2_bias=p.w2_bias,
                token_lora=p.token_lora, lora=p.lora, options=ExpertOptions(),
                config=dataclasses.replace(config, **changes),
            )  # fmt: skip
        for what, result in results.items():
            rel = ((result.double() - ref).norm() / ref.norm()).item()
            assert rel <= REL_TOL[torch.float16], (what, rel)
            print(f"fused_experts ok: T={T}, {what}, relative error {rel:.2e}")


def check_fp8_experts() -> None:
    """FP8 weights: blocks of 128 (a scale per tile row) and of 24 x 20 (a scale per element), sorted
    and pair blocks, pointers and tensor descriptors; with blocks of 128 also FP8 activations."""
    for T, block in ((3, (128, 128)), (700, (24, 20))):
        p = make_problem(T=T, H=64, I=48, E=8, K=2, L=3, R=8, dtype=torch.float16)
        (w13, s13), (w2, s2) = quantize_blocks_ref(p.w13, block), quantize_blocks_ref(p.w2, block)
        dequantized = (p.x, p.topk_ids, p.topk_weights, dequantize_blocks_ref(w13, s13, block),
                       dequantize_blocks_ref(w2, s2, block))  # fmt: skip
        ref = fused_experts_ref(*dequantized, **p.kwargs())
        act_fp8 = block == (128, 128)  # FP8 activations: both GEMMs' K tiles inside one scale block
        quantized = fused_experts_ref(*dequantized, activation_group=block[1], **p.kwargs()) if act_fp8 else None
        p, w13, w2 = p.to("cuda"), w13.cuda(), w2.cuda()
        scales = WeightScales(s13.cuda(), s2.cuda(), *block)
        config = launch_config(p.x, p.topk_ids, w2)
        for what, changes in {"launch config": {}, "pair blocks": dict(pair_blocks=True), "tensor descriptors":
                              dict(tma=True)}.items():  # fmt: skip
            out = fused_experts_triton(
                p.x, p.topk_ids, p.topk_weights, w13, w2, token_lora=p.token_lora, lora=p.lora,
                options=ExpertOptions(), config=dataclasses.replace(config, **changes), scales=scales,
            )  # fmt: skip
            rel = ((out.double().cpu() - ref).norm() / ref.norm()).item()
            assert rel <= REL_TOL[torch.float16], (what, block, rel)
            print(f"fp8 fused_experts ok: T={T}, block {block}, {what}, relative error {rel:.2e}")
        if act_fp8:
            out = fused_experts_triton(
                p.x, p.topk_ids, p.topk_weights, w13, w2, token_lora=p.token_lora, lora=p.lora,
                options=ExpertOptions(), config=dataclasses.replace(config, fp8_activations=True), scales=scales,
            )  # fmt: skip
            rel = ((out.double().cpu() - quantized).norm() / quantized.norm()).item()
            assert rel <= 5e-2, ("fp8 activations", block, rel)  # tests/test_fp8_experts.py FP8_ACTIVATION_TOL
            print(f"fp8 fused_experts ok: T={T}, block {block}, fp8 activations, relative error {rel:.2e}")


def check_lora_linear() -> None:
    """Per-token LoRA on a linear: decode- and prefill-sized calls, rows of one and of several
    tokens, ranks below a tile and above one, widths that are not multiples of a tile."""
    gen = torch.Generator().manual_seed(1)
    for rows, tokens_per_row, slots, rank, n_in, n_out in ((3, 1, 4, 16, 200, 136), (5, 1, 4, 16, 1300, 136), (7, 100, 6, 20, 520, 1030), (7, 100, 6, 20, 2100, 72)):
        x = torch.randn(rows * tokens_per_row, n_in, generator=gen).half().cuda()
        a = (torch.randn(slots, rank, n_in, generator=gen) * n_in**-0.5).half().cuda()
        b = (torch.randn(slots, n_out, rank, generator=gen) * rank**-0.5).half().cuda()
        scale = torch.rand(slots, generator=gen).cuda()
        row_slot = torch.randint(-1, slots - 1, (rows,), generator=gen).cuda()  # the last slot has no rows
        base = torch.randn(rows * tokens_per_row, n_out, generator=gen).half().cuda()
        out = base.clone()
        add_lora_linear(out, x, *slot_segments(row_slot, slots), a, b, scale)
        ref = base.double() + lora_linear_ref(x, row_slot.repeat_interleave(tokens_per_row), a, b, scale)
        rel = ((out.double() - ref).norm() / ref.norm()).item()
        assert rel <= REL_TOL[torch.float16], (rows, tokens_per_row, rel)
        print(f"add_lora_linear ok: {rows} rows x {tokens_per_row} tokens, rank {rank}, relative error {rel:.2e}")
        widths = (n_out, 72, 40, 136, 8)[: 3 if tokens_per_row == 1 else 5]  # five: two launches
        bs = [b] + [(torch.randn(slots, w, rank, generator=gen) * rank**-0.5).half().cuda() for w in widths[1:]]
        bases = [base] + [torch.randn(rows * tokens_per_row, w, generator=gen).half().cuda() for w in widths[1:]]
        outs = [t.clone() for t in bases]
        a_s = [a] + [(torch.randn(slots, rank, n_in, generator=gen) * n_in**-0.5).half().cuda() for _ in widths[1:]]
        scales = [scale] + [torch.rand(slots, generator=gen).cuda() for _ in widths[1:]]
        add_lora_linear_group(outs, x, *slot_segments(row_slot, slots), a_s, bs, scales)
        for j, (o, t, aj, bj, sj) in enumerate(zip(outs, bases, a_s, bs, scales)):
            ref = t.double() + lora_linear_ref(x, row_slot.repeat_interleave(tokens_per_row), aj, bj, sj)
            rel = ((o.double() - ref).norm() / ref.norm()).item()
            assert rel <= REL_TOL[torch.float16], (rows, tokens_per_row, j, rel)
        print(f"add_lora_linear_group ok: {len(widths)} projections, {rows} rows x {tokens_per_row} tokens")


CHECKS = {"align": check_align, "fused_experts": check_fused_experts, "fp8_experts": check_fp8_experts,
          "lora_linear": check_lora_linear}

if __name__ == "__main__":
    # ``python tests/sanitizer_cases.py [check ...]``: the named checks (all by default), so that a
    # slow tool such as racecheck can run them in separate processes.
    names = sys.argv[1:] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        sys.exit(f"unknown checks {unknown}; expected some of {list(CHECKS)}")
    for name in names:
        CHECKS[name]()
    torch.cuda.synchronize()
