"""Draws the plots of the benchmark results from their JSON (matplotlib; no GPU).

For every GPU folder given (default: each folder under ``benchmarks/results/``), each JSON file that
a benchmark wrote gets a PNG of the same name beside it:

* ``fused_experts*.json`` (``bench_fused_experts.py``): % of roofline against tokens, a panel per
  shape, a line per LoRA rank, 16 adapters in the batch;
* ``parallel.json`` (``bench_parallel.py``): each split's speed-up over one GPU, per token count;
* ``lora_linear.json`` (``bench_lora_linear.py``): the LoRA time (with it minus without) of
  ``add_lora_linear`` and of the all-slots formulation, and the LoRA roofline, per batch;
* ``e2e.json`` (``bench_e2e.py``): generated tokens per second of each setup, a panel per model,
  the bars grouped by static batch size and by continuous-batching workload.

    python benchmarks/plot.py [benchmarks/results/<gpu> ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"


def plot_fused_experts(result: dict):
    rows = result["rows"]
    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for rank in sorted({r["rank"] for r in rows}):
            sel = [r for r in rows if r["shape"] == shape and r["rank"] == rank and r["scenario"] == "uniform16"]
            label = f"rank {rank}, 16 adapters"
            ax.plot([r["T"] for r in sel], [r["pct_roofline"] for r in sel], marker="o", label=label)
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
    return fig


def plot_parallel(result: dict):
    rows = result["rows"]
    tokens = sorted({r["tokens"] for r in rows})
    one_gpu = {r["tokens"]: r["ms"] for r in rows if r["layer"] == "TP=1"}
    layouts = [name for name in dict.fromkeys(r["layer"] for r in rows) if name not in ("TP=1", "all-reduce")]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(layouts)
    for i, name in enumerate(layouts):
        ms = {r["tokens"]: r["ms"] for r in rows if r["layer"] == name}
        xs = [j + (i - (len(layouts) - 1) / 2) * width for j, t in enumerate(tokens) if t in ms]
        ax.bar(xs, [one_gpu[t] / ms[t] for t in tokens if t in ms], width, label=name)
    ax.set_ylim(0, 1.3 * ax.get_ylim()[1])  # room for the legend above the bars
    ax.axhline(1, color="gray", lw=0.8)
    ax.set_xticks(range(len(tokens)), [f"T={t}\n(1 GPU: {one_gpu[t]:.3f} ms)" for t in tokens])
    ax.set_ylabel(f"speed-up over one GPU ({result['world']} GPUs)")
    ax.set_title(f"{result['device']}: one Qwen3-30B-A3B layer, 16 adapters of rank 16")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return fig


def plot_lora_linear(result: dict):
    rows = result["rows"]
    projections = list(dict.fromkeys(r["projection"] for r in rows))
    fig, axes = plt.subplots(1, len(projections), figsize=(6 * len(projections), 4), squeeze=False)
    bars = {
        "add_lora_linear": lambda r: r["ours_ms"] - r["base_ms"],
        "all slots, masked": lambda r: r["all_slots_ms"] - r["base_ms"],
        "LoRA roofline": lambda r: r["lora_roofline_ms"],
    }
    width = 0.8 / len(bars)
    for ax, projection in zip(axes[0], projections):
        sel = [r for r in rows if r["projection"] == projection]
        for i, (label, value) in enumerate(bars.items()):
            xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(sel))]
            ax.bar(xs, [1e3 * value(r) for r in sel], width, label=label)
        ax.set_xticks(range(len(sel)), [f"{r['rows']}x{r['tokens_per_row']}" for r in sel])
        ax.set_yscale("log")
        ax.set_ylim(top=30 * ax.get_ylim()[1])  # room for the legend above the bars
        ax.set_xlabel("batch rows x tokens per row (each row on its own slot)")
        ax.set_ylabel("LoRA time, us (with LoRA minus without)")
        ax.set_title(f"{result['device']} {projection}: {sel[0]['slots']} slots of rank {sel[0]['rank']}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    return fig


def plot_e2e(result: dict):
    rows = [r for r in result["rows"] if r["tokens_per_s"]]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 1, figsize=(13, 5 * len(models)), squeeze=False)
    palette = plt.get_cmap("tab20")
    colors = {setup: palette(i % 20) for i, setup in enumerate(dict.fromkeys(r["setup"] for r in rows))}
    for ax, model in zip(axes[:, 0], models):
        groups = {}
        for r in rows:
            if r["model"] == model:
                groups.setdefault(f"{r['requests']} requests" if r["requests"] else f"batch {r['batch']}", []).append(r)
        width = 0.8 / max(len(group) for group in groups.values())
        for j, group in enumerate(groups.values()):
            for k, r in enumerate(group):
                ax.bar(j + (k - (len(group) - 1) / 2) * width, r["tokens_per_s"], width, color=colors[r["setup"]],
                       label=r["setup"])  # fmt: skip
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7, ncol=2, loc="upper left")
        ax.set_xticks(range(len(groups)), list(groups))
        ax.set_yscale("log")
        lowest = min(r["tokens_per_s"] for group in groups.values() for r in group)
        ax.set_ylim(lowest / 2, 30 * ax.get_ylim()[1])  # room for the legend above the bars
        ax.set_ylabel("generated tokens per second")
        swaps = [f"{1e3 * r['swap_in_s']:.1f} ms" for r in result["rows"] if r["model"] == model and r["swap_in_s"]]
        ax.set_title(f"{result['device']}: {model}" + (f" (swap-in of one adapter: {swaps[0]})" if swaps else ""))
        ax.grid(alpha=0.3, axis="y")
    return fig


PLOTS = {
    "fused_experts*.json": plot_fused_experts,
    "parallel.json": plot_parallel,
    "lora_linear.json": plot_lora_linear,
    "e2e.json": plot_e2e,
}
"""The results each plot draws, by file-name pattern."""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path, help="GPU folders of results (default: all)")
    args = parser.parse_args()
    matplotlib.use("Agg")
    folders = args.folders or sorted(path for path in RESULTS.iterdir() if path.is_dir())
    for folder in folders:
        for pattern, plot in PLOTS.items():
            for path in sorted(folder.glob(pattern)):
                fig = plot(json.loads(path.read_text()))
                fig.tight_layout()
                fig.savefig(path.with_suffix(".png"), dpi=110)
                plt.close(fig)
                print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
