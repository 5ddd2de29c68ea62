"""Benchmark of the fused experts + multi-LoRA op against the roofline and a torch baseline (GPU).

For every cell (model shape, tokens T, LoRA rank, adapter scenario) it prints and saves:
ours with LoRA and without (all tokens on no adapter), the baseline (``torch._grouped_mm`` experts
plus a per-adapter LoRA loop, what transformers + PEFT-style code runs today, eager), the roofline
(touched expert and LoRA weight bytes plus activations over the measured read bandwidth of a kernel
that streams a buffer well over L2, FLOPs over the measured bf16 matmul rate; the larger of the
two), our % of roofline, the LoRA overhead and the share of LoRA in the roofline's bytes/FLOPs;
then, per shape and token count, the cells that miss the performance targets (``targets.py``).

    python benchmarks/bench_fused_experts.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import measure_ceilings, random_lora, random_routing, time_eager, time_graph, token_mapping  # noqa: E402
from targets import summarize  # noqa: E402

from torch_moe_lora import fused_experts  # noqa: E402
from torch_moe_lora.configs import device_file_name  # noqa: E402

SHAPES = {  # name: (H, I, E, K)
    "qwen3_30b_a3b": (2048, 768, 128, 8),
    "deepseek_v2_lite": (2048, 1408, 64, 6),
    "mixtral_8x7b": (4096, 14336, 8, 2),
    "fine_grained": (2048, 512, 512, 10),
}
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
RANKS = (16, 64)
SCENARIOS = ("uniform1", "uniform4", "uniform16", "one", "half_none")
NUM_SLOTS = 16


def torch_baseline(x, topk_ids, topk_weights, w13, w2, token_lora, lora):
    """Experts through ``torch._grouped_mm`` and LoRA through one grouped_mm pair per adapter present."""
    num_tokens, top_k = topk_ids.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    expert_sorted = flat[order]
    offsets = torch.bincount(expert_sorted, minlength=num_experts).cumsum(0).int()
    xs = x[order // top_k]
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


def roofline(shape, topk_ids, token_lora, rank, dtype_bytes, ceilings):
    """(seconds, bytes, flops, lora byte share, lora flop share) for one input set."""
    hidden, inter, num_experts, top_k = shape
    experts = torch.unique(topk_ids)
    base_bytes = experts.numel() * 3 * hidden * inter * dtype_bytes
    slots = token_lora.long()[:, None].expand_as(topk_ids)
    with_lora = slots >= 0
    pairs = torch.unique((slots * num_experts + topk_ids.long())[with_lora])
    lora_bytes = pairs.numel() * rank * (2 * hidden + 3 * inter) * dtype_bytes
    act_bytes = 2 * topk_ids.shape[0] * hidden * dtype_bytes
    num_pairs = topk_ids.numel()
    base_flops = 2 * num_pairs * 3 * hidden * inter
    lora_flops = 2 * int(with_lora.sum()) * rank * (2 * hidden + 3 * inter)
    total_bytes = base_bytes + lora_bytes + act_bytes
    total_flops = base_flops + lora_flops
    seconds = max(total_bytes / ceilings.read_bytes_per_s, total_flops / ceilings.matmul_flops_per_s)
    return seconds, total_bytes, total_flops, lora_bytes / total_bytes, lora_flops / total_flops


def run_shape(name, shape, tokens, ranks, scenarios, ceilings, dtype=torch.bfloat16):
    hidden, inter, num_experts, top_k = shape
    w13 = torch.randn(num_experts, 2 * inter, hidden, dtype=dtype, device="cuda") * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, dtype=dtype, device="cuda") * inter**-0.5
    rows = []
    for num_tokens in tokens:
        rotations = 4 if num_tokens <= 256 else 2
        inputs = []
        for _ in range(rotations):
            x = torch.randn(num_tokens, hidden, dtype=dtype, device="cuda")
            inputs.append((x, *random_routing(num_tokens, num_experts, top_k)))
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
                roof = [roofline(shape, i[1], m, rank, w13.element_size(), ceilings) for i, m in zip(inputs, mappings)]
                roof_ms = 1e3 * sum(r[0] for r in roof) / len(roof)
                flops = sum(r[2] for r in roof) / len(roof)
                row = dict(
                    shape=name, H=hidden, I=inter, E=num_experts, K=top_k, T=num_tokens, rank=rank, scenario=scenario,
                    ours_ms=ours_ms, ours_no_lora_ms=base_ms, baseline_ms=baseline_ms, roofline_ms=roof_ms,
                    pct_roofline=100 * roof_ms / ours_ms, lora_overhead=ours_ms / base_ms - 1,
                    bytes=sum(r[1] for r in roof) / len(roof), flops=flops,
                    pct_matmul=100 * flops / (ours_ms * 1e-3) / ceilings.matmul_flops_per_s,
                    lora_byte_share=sum(r[3] for r in roof) / len(roof), lora_flop_share=sum(r[4] for r in roof) / len(roof),
                    speedup_vs_baseline=baseline_ms / ours_ms,
                )  # fmt: skip
                rows.append(row)
                print(format_row(row), flush=True)
            del lora
        del inputs
    return rows


HEADER = (
    f"{'shape':<17}{'T':>6}{'r':>4} {'scenario':<10}{'ours ms':>9}{'no-LoRA':>9}{'baseline':>10}"
    f"{'roof ms':>9}{'%roof':>7}{'LoRA ovh':>9}{'share':>7}{'vs base':>8}"
)


def format_row(r):
    share = r["lora_byte_share"] if r["T"] < 4096 else r["lora_flop_share"]
    return (
        f"{r['shape']:<17}{r['T']:>6}{r['rank']:>4} {r['scenario']:<10}{r['ours_ms']:>9.4f}{r['ours_no_lora_ms']:>9.4f}"
        f"{r['baseline_ms']:>10.4f}{r['roofline_ms']:>9.4f}{r['pct_roofline']:>6.1f}%{100 * r['lora_overhead']:>8.1f}%"
        f"{100 * share:>6.1f}%{r['speedup_vs_baseline']:>7.2f}x"
    )


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for rank in sorted({r["rank"] for r in rows}):
            sel = [r for r in rows if r["shape"] == shape and r["rank"] == rank and r["scenario"] == "uniform16"]
            ax.plot([r["T"] for r in sel], [r["pct_roofline"] for r in sel], marker="o", label=f"rank {rank}, 16 adapters")
        ax.set_xscale("log", base=2)
        # The byte ceiling is the measured read bandwidth, so cells should stay under 100%; the range
        # still stretches to show any that pass it.
        ax.set_ylim(0, max(100, max((r["pct_roofline"] for r in rows if r["shape"] == shape), default=0) + 10))
        ax.axhline(100, color="gray", lw=0.8)
        ax.set_title(shape)
        ax.set_xlabel("tokens")
        ax.set_ylabel("% of roofline")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
    out_dir = args.out / device_file_name(device).removesuffix(".json")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "fused_experts_" + "_".join(args.shapes) if args.shapes != list(SHAPES) else "fused_experts"
    rows = []
    for name in args.shapes:
        rows += run_shape(name, SHAPES[name], args.tokens, args.ranks, args.scenarios, ceilings)
        torch.cuda.empty_cache()
        # Written after every shape, so that a run cut short keeps what it measured.
        (out_dir / f"{stem}.json").write_text(
            json.dumps(dict(device=device, ceilings=vars(ceilings), rows=rows), indent=1)
        )
    plot(rows, out_dir / f"{stem}.png")
    print(HEADER)
    for r in rows:
        print(format_row(r))
    print()
    print(summarize(rows))


if __name__ == "__main__":
    main()
