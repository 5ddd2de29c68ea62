"""The fused experts benchmark's performance targets, checked cell by cell (plain Python: no
GPU, no torch).

Targets (cells with LoRA):

- % of roofline: at least 75% at T = 1 and 4, 80% at T = 16..256 (the byte roofline: touched expert
  and LoRA weights plus activations over the measured read bandwidth), 75% at T = 1024; at
  T >= 4096 at least 60% of the measured bf16 matmul rate, 65% for 16 adapters of rank 64. The
  roofline is the larger of the byte and the FLOP time, so at FLOP-bound prefill cells its % is the
  % of the matmul rate; a prefill cell whose bytes take longer than its FLOPs (fine-grained experts
  at T=4096, 16 adapters at rank 64) is held to the same % of the byte roofline.
- LoRA overhead (with / without LoRA - 1) at most 1.25x the LoRA share of the roofline's bytes
  (T < 4096) or FLOPs (T >= 4096).
- At least 1.5x faster than the ``torch._grouped_mm`` + per-adapter LoRA loop baseline.

Target of the base path (ours without LoRA; cells at T >= 4096 that have the ``grouped_mm`` column):
at least 1.3x ``grouped_mm_base`` (1.0x on Mixtral's shape, whose few large experts leave nothing
to win over CUTLASS), and at T = 4096 at least 65% of the matmul rate on the Qwen3 and DeepSeek
shapes.

``summarize`` gives, for every shape and token count, how many cells miss each target and by how
much; ``benchmarks/targets.py`` prints it for benchmark JSON files.
"""

from __future__ import annotations

PREFILL_TOKENS = 4096
OVERHEAD_FACTOR = 1.25
MIN_SPEEDUP = 1.5
MIN_VS_GROUPED_MM = {"mixtral_8x7b": 1.0}
"""Least ``base_vs_grouped_mm`` by shape; ``DEFAULT_VS_GROUPED_MM`` for the others."""
DEFAULT_VS_GROUPED_MM = 1.3
BASE_MATMUL_PERCENT = {"qwen3_30b_a3b": 65.0, "deepseek_v2_lite": 65.0}
"""Least ``no_lora_pct_matmul`` at T = 4096, by shape (none for the others)."""


def percent_target(num_tokens: int, rank: int = 16, scenario: str = "uniform4") -> float | None:
    """The % of roofline target of a cell, or None where there is none."""
    if num_tokens <= 4:
        return 75.0
    if num_tokens <= 256:
        return 80.0
    if num_tokens < PREFILL_TOKENS:
        return 75.0 if num_tokens == 1024 else None
    return 65.0 if (rank, scenario) == (64, "uniform16") else 60.0


def cell_target(row: dict) -> float | None:
    return percent_target(row["T"], row["rank"], row["scenario"])


def percent(row: dict) -> float:
    """The cell's % of its roofline, which ``percent_target`` applies to (see the module docstring
    for prefill cells)."""
    return row["pct_roofline"]


def lora_share(row: dict) -> float:
    return row["lora_flop_share"] if row["T"] >= PREFILL_TOKENS else row["lora_byte_share"]


def base_misses(row: dict) -> bool:
    """Whether the cell's base path (without LoRA) misses its target against ``grouped_mm``."""
    if row["T"] < PREFILL_TOKENS or row.get("base_vs_grouped_mm") is None:
        return False
    if row["base_vs_grouped_mm"] < MIN_VS_GROUPED_MM.get(row["shape"], DEFAULT_VS_GROUPED_MM):
        return True
    least = BASE_MATMUL_PERCENT.get(row["shape"])
    return row["T"] == PREFILL_TOKENS and least is not None and row["no_lora_pct_matmul"] < least


def misses(row: dict) -> list[str]:
    """Names of the targets the cell misses: ``percent``, ``overhead``, ``baseline``, ``grouped_mm``."""
    missed = []
    target = cell_target(row)
    if target is not None and percent(row) < target:
        missed.append("percent")
    if row["lora_overhead"] > OVERHEAD_FACTOR * lora_share(row):
        missed.append("overhead")
    if row["speedup_vs_baseline"] < MIN_SPEEDUP:
        missed.append("baseline")
    if base_misses(row):
        missed.append("grouped_mm")
    return missed


def summarize(rows: list[dict]) -> str:
    """One line per (shape, T): cells, and for each target the cells that miss it with the worst value."""
    names = ("percent", "overhead", "baseline", "grouped_mm")
    lines = [
        f"{'shape':<17}{'T':>6}{'cells':>6}  {'% target: misses (worst)':<30}{'overhead: misses':<18}"
        f"{'vs baseline: misses (worst)':<30}{'base vs grouped_mm: misses (worst)'}"
    ]
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["shape"], row["T"]), []).append(row)
    total = dict.fromkeys(("cells", *names), 0)
    for (shape, num_tokens), cells in groups.items():
        missed = [misses(r) for r in cells]
        count = {name: sum(name in m for m in missed) for name in names}
        total["cells"] += len(cells)
        for name, n in count.items():
            total[name] += n
        pct = "none" if all(cell_target(r) is None for r in cells) else "0"
        if count["percent"]:
            worst = min((r for r, m in zip(cells, missed) if "percent" in m), key=lambda r: percent(r) / cell_target(r))
            pct = f"{count['percent']} (worst {percent(worst):.1f}% < {cell_target(worst):.0f}%)"
        base = "0"
        if count["baseline"]:
            base = f"{count['baseline']} (worst {min(r['speedup_vs_baseline'] for r in cells):.2f}x)"
        grouped = "-" if all(r.get("base_vs_grouped_mm") is None for r in cells) or num_tokens < PREFILL_TOKENS else "0"
        if count["grouped_mm"]:
            worst = min(r["base_vs_grouped_mm"] for r, m in zip(cells, missed) if "grouped_mm" in m)
            least = MIN_VS_GROUPED_MM.get(shape, DEFAULT_VS_GROUPED_MM)
            grouped = f"{count['grouped_mm']} (worst {worst:.2f}x, target {least:.1f}x"
            if num_tokens == PREFILL_TOKENS and shape in BASE_MATMUL_PERCENT:
                grouped += f" and {BASE_MATMUL_PERCENT[shape]:.0f}% of matmul"
            grouped += ")"
        lines.append(f"{shape:<17}{num_tokens:>6}{len(cells):>6}  {pct:<30}{count['overhead']:<18}{base:<30}{grouped}")
    lines.append(
        f"all: {total['cells']} cells; under the % target {total['percent']}, over the overhead rule "
        f"{total['overhead']}, under {MIN_SPEEDUP}x the baseline {total['baseline']}, base under its grouped_mm "
        f"target {total['grouped_mm']}"
    )
    return "\n".join(lines)
