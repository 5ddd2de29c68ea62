"""Benchmark of the fused experts + multi-LoRA op against the roofline and a torch baseline (GPU).

For every cell (model shape, tokens T, LoRA rank, adapter scenario) it prints and saves:
ours with LoRA and without (all tokens on no adapter), the baseline (``torch._grouped_mm`` experts
plus a per-adapter LoRA loop, what transformers + PEFT-style code runs today, eager), the roofline
(touched expert and LoRA weight bytes plus activations over the measured read bandwidth of a kernel
that streams a buffer well over L2, FLOPs over the measured bf16 matmul rate; the larger of the
two), our % of roofline, the LoRA overhead and the share of LoRA in the roofline's bytes/FLOPs;
at T >= 1024 also the base experts through ``torch._grouped_mm`` (``grouped_mm_base``: the two
grouped GEMMs and the activation between them on rows already sorted by expert, CUDA graph; the
sort, the row gather, the top-k weighting and sum are not timed) against ours without LoRA (which
times all of them); then, per shape and token count, the cells that miss the performance targets
(``performance_targets.py``). Writes ``<out>/<gpu>/fused_experts.json`` (``fused_experts_<shapes>.json``
for a subset of the shapes); ``plot.py`` draws it.

    python benchmarks/bench_fused_experts.py --out benchmarks/results
    python benchmarks/plot.py benchmarks/results/<gpu>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from torch_moe_lora import fused_experts

from common import (
    NUM_SLOTS, SHAPES, TOKENS, measure_ceilings, moe_roofline, random_experts, random_lora, random_tokens, results_dir,
    time_eager, time_graph, token_mapping,
)  # fmt: skip
from performance_targets import summarize

RANKS = (16, 64)
SCENARIOS = ("uniform1", "uniform4", "uniform16", "one", "half_none")


def sort_by_expert(x, topk_ids, num_experts):
    """``(order, xs, offsets)``: the (token, k) pairs in expert order, ``x``'s row of each, and the
    int32 end offset of each expert's rows (what ``torch._grouped_mm`` takes)."""
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    offsets = torch.bincount(flat, minlength=num_experts).cumsum(0).int()
    return order, x[order // topk_ids.shape[1]], offsets


def torch_baseline(x, topk_ids, topk_weights, w13, w2, token_lora, lora):
    """Experts through ``torch._grouped_mm`` and LoRA through one grouped_mm pair per adapter present."""
    num_tokens, top_k = topk_ids.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    order, xs, offsets = sort_by_expert(x, topk_ids, num_experts)
    expert_sorted = topk_ids.reshape(-1).long()[order]
    gate_up = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offsets)
    slot_sorted = token_lora.long()[order // top_k]
    groups = []
    for slot in torch.unique(slot_sorted).tolist():
        if slot < 0:
            continue
        rows = (slot_sorted == slot).nonzero().squeeze(1)
        offs = torch.bincount(expert_sorted[rows], minlength=num_experts).cumsum(0).int()
        groups.append((slot, rows, offs))
        shrunk = torch._grouped_mm(xs[rows], lora.gate_up_a[slot].transpose(1, 2), offs=offs)
        delta = torch._grouped_mm(shrunk, lora.gate_up_b[slot].transpose(1, 2), offs=offs)
        gate_up.index_add_(0, rows, delta * lora.gate_up_scale[slot].to(delta.dtype))
    h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offsets)
    for slot, rows, offs in groups:
        shrunk = torch._grouped_mm(h[rows], lora.down_a[slot].transpose(1, 2), offs=offs)
        delta = torch._grouped_mm(shrunk, lora.down_b[slot].transpose(1, 2), offs=offs)
        y.index_add_(0, rows, delta * lora.down_scale[slot].to(delta.dtype))
    y = y * topk_weights.reshape(-1)[order, None].to(y.dtype)
    out = torch.empty_like(y)
    out[order] = y
    return out.view(num_tokens, top_k, -1).sum(1)


GROUPED_MM_TOKENS = 1024
"""Token counts from which the table has the ``grouped_mm`` base column."""


def grouped_mm_base(xs, offsets, w13, w2):
    """The base experts of rows sorted by expert (``sort_by_expert``) through ``torch._grouped_mm``:
    ``silu(gate) * up`` of ``xs @ w13[e]^T``, then ``@ w2[e]^T``; per pair, not weighted or summed."""
    inter = w2.shape[2]
    gate_up = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offsets)
    return torch._grouped_mm(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2.transpose(1, 2), offs=offsets)


def run_shape(name, shape, tokens, ranks, scenarios, ceilings, dtype=torch.bfloat16):
    hidden, inter, num_experts, top_k = shape
    w13, w2 = random_experts(shape, dtype)
    rows = []
    for num_tokens in tokens:
        rotations = 4 if num_tokens <= 256 else 2
        inputs = [random_tokens(shape, num_tokens, dtype) for _ in range(rotations)]
        grouped_ms = None
        if num_tokens >= GROUPED_MM_TOKENS:
            grouped = [sort_by_expert(x, topk_ids, num_experts)[1:] for x, topk_ids, _ in inputs]
            grouped_ms = time_graph([lambda g=g: grouped_mm_base(*g, w13, w2) for g in grouped])
            del grouped
        base_flops = 2 * num_tokens * top_k * 3 * hidden * inter
        for rank in ranks:
            lora = random_lora(NUM_SLOTS, num_experts, hidden, inter, rank, dtype)
            none = token_mapping(num_tokens, "none", NUM_SLOTS)
            base_ms = time_graph(
                [lambda i=i: fused_experts(*i, w13, w2, token_lora=none, lora=lora) for i in inputs]
            )
            for scenario in scenarios:
                mappings = [token_mapping(num_tokens, scenario, NUM_SLOTS) for _ in inputs]
                calls = [
                    lambda i=i, m=m: fused_experts(*i, w13, w2, token_lora=m, lora=lora) for i, m in zip(inputs, mappings)
                ]
                ours_ms = time_graph(calls)
                baseline_ms = time_eager(
                    [lambda i=i, m=m: torch_baseline(*i, w13, w2, m, lora) for i, m in zip(inputs, mappings)]
                )
                roof = [moe_roofline(shape, i[1], m, rank, ceilings, w13.element_size(), w13.element_size())
                        for i, m in zip(inputs, mappings)]  # fmt: skip
                roof_ms = 1e3 * sum(r[0] for r in roof) / len(roof)
                flops = sum(r[2] for r in roof) / len(roof)
                row = dict(
                    shape=name, H=hidden, I=inter, E=num_experts, K=top_k, T=num_tokens, rank=rank, scenario=scenario,
                    ours_ms=ours_ms, ours_no_lora_ms=base_ms, baseline_ms=baseline_ms, roofline_ms=roof_ms,
                    pct_roofline=100 * roof_ms / ours_ms, lora_overhead=ours_ms / base_ms - 1,
                    bytes=sum(r[1] for r in roof) / len(roof), flops=flops,
                    pct_matmul=100 * flops / (ours_ms * 1e-3) / ceilings.matmul_flops_per_s,
                    lora_byte_share=sum(r[3] for r in roof) / len(roof), lora_flop_share=sum(r[4] for r in roof) / len(roof),
                    speedup_vs_baseline=baseline_ms / ours_ms, grouped_mm_base_ms=grouped_ms,
                    base_vs_grouped_mm=None if grouped_ms is None else grouped_ms / base_ms,
                    no_lora_pct_matmul=100 * base_flops / (base_ms * 1e-3) / ceilings.matmul_flops_per_s,
                )  # fmt: skip
                rows.append(row)
                print(format_row(row), flush=True)
            del lora
        del inputs
    return rows


HEADER = (
    f"{'shape':<17}{'T':>6}{'r':>4} {'scenario':<10}{'ours ms':>9}{'no-LoRA':>9}{'baseline':>10}"
    f"{'roof ms':>9}{'%roof':>7}{'LoRA ovh':>9}{'share':>7}{'vs base':>8}{'grouped_mm':>11}{'vs gmm':>7}"
)


def format_row(r):
    share = r["lora_byte_share"] if r["T"] < 4096 else r["lora_flop_share"]
    grouped = r.get("grouped_mm_base_ms")
    grouped = "" if grouped is None else f"{grouped:>11.4f}{r['base_vs_grouped_mm']:>6.2f}x"
    return (
        f"{r['shape']:<17}{r['T']:>6}{r['rank']:>4} {r['scenario']:<10}{r['ours_ms']:>9.4f}{r['ours_no_lora_ms']:>9.4f}"
        f"{r['baseline_ms']:>10.4f}{r['roofline_ms']:>9.4f}{r['pct_roofline']:>6.1f}%{100 * r['lora_overhead']:>8.1f}%"
        f"{100 * share:>6.1f}%{r['speedup_vs_baseline']:>7.2f}x{grouped}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    parser.add_argument("--ranks", nargs="*", type=int, default=list(RANKS))
    parser.add_argument("--scenarios", nargs="*", default=list(SCENARIOS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    ceilings = measure_ceilings()
    print(
        f"{device}: read {ceilings.read_bytes_per_s / 1e12:.2f} TB/s (roofline bytes), "
        f"copy {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s (read+write), "
        f"bf16 matmul {ceilings.matmul_flops_per_s / 1e12:.0f} TFLOP/s",
        flush=True,
    )
    print(HEADER, flush=True)
    out_dir = results_dir(args.out, device)
    stem = "fused_experts_" + "_".join(args.shapes) if args.shapes != list(SHAPES) else "fused_experts"
    rows = []
    for name in args.shapes:
        rows += run_shape(name, SHAPES[name], args.tokens, args.ranks, args.scenarios, ceilings)
        torch.cuda.empty_cache()
        # Written after every shape, so that a run cut short keeps what it measured.
        (out_dir / f"{stem}.json").write_text(
            json.dumps(dict(device=device, ceilings=vars(ceilings), rows=rows), indent=1)
        )
    print(HEADER)
    for r in rows:
        print(format_row(r))
    print()
    print(summarize(rows))


if __name__ == "__main__":
    main()
