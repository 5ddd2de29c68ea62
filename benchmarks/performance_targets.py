"""The fused experts benchmark's performance targets, checked cell by cell (plain Python: no
GPU, no torch).

Targets (cells with LoRA):

- % of roofline: at least 60% at T = 1 and 4, at least 80% at T = 16..256 (the byte roofline:
  touched expert and LoRA weights plus activations over the measured read bandwidth); at T >= 4096
  at least 60% of the measured bf16 matmul rate. T = 1024 has no % target. The roofline is the
  larger of the byte and the FLOP time, so at FLOP-bound prefill cells its % is the % of the matmul
  rate; a prefill cell whose bytes take longer than its FLOPs (fine-grained experts at T=4096, 16
  adapters at rank 64) cannot reach 60% of the matmul rate and is held to 60% of the byte roofline.
- LoRA overhead (with / without LoRA - 1) at most 1.25x the LoRA share of the roofline's bytes
  (T < 4096) or FLOPs (T >= 4096).
- At least 1.5x faster than the ``torch._grouped_mm`` + per-adapter LoRA loop baseline.

``summarize`` gives, for every shape and token count, how many cells miss each target and by how
much; ``benchmarks/targets.py`` prints it for benchmark JSON files.
"""

from __future__ import annotations

PREFILL_TOKENS = 4096
OVERHEAD_FACTOR = 1.25
MIN_SPEEDUP = 1.5


def percent_target(num_tokens: int) -> float | None:
    """The % of roofline target of a cell with ``num_tokens`` tokens, or None where there is none."""
    if num_tokens <= 4:
        return 60.0
    if num_tokens <= 256:
        return 80.0
    if num_tokens >= PREFILL_TOKENS:
        return 60.0
    return None


def percent(row: dict) -> float:
    """The cell's % of its roofline, which ``percent_target`` applies to (see the module docstring
    for prefill cells)."""
    return row["pct_roofline"]


def lora_share(row: dict) -> float:
    return row["lora_flop_share"] if row["T"] >= PREFILL_TOKENS else row["lora_byte_share"]


def misses(row: dict) -> list[str]:
    """Names of the targets the cell misses: ``percent``, ``overhead``, ``baseline``."""
    missed = []
    target = percent_target(row["T"])
    if target is not None and percent(row) < target:
        missed.append("percent")
    if row["lora_overhead"] > OVERHEAD_FACTOR * lora_share(row):
        missed.append("overhead")
    if row["speedup_vs_baseline"] < MIN_SPEEDUP:
        missed.append("baseline")
    return missed


def summarize(rows: list[dict]) -> str:
    """One line per (shape, T): cells, and for each target the cells that miss it with the worst value."""
    lines = [f"{'shape':<17}{'T':>6}{'cells':>6}  {'% target: misses (worst)':<30}{'overhead: misses':<20}{'vs baseline: misses (worst)'}"]
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["shape"], row["T"]), []).append(row)
    total = {"cells": 0, "percent": 0, "overhead": 0, "baseline": 0}
    for (shape, num_tokens), cells in groups.items():
        missed = [misses(r) for r in cells]
        count = {name: sum(name in m for m in missed) for name in ("percent", "overhead", "baseline")}
        total["cells"] += len(cells)
        for name, n in count.items():
            total[name] += n
        target = percent_target(num_tokens)
        if target is None:
            pct = "none"
        else:
            pct = f"{count['percent']} (worst {min(percent(r) for r in cells):.1f}% < {target:.0f}%)" if count["percent"] else "0"
        base = f"{count['baseline']} (worst {min(r['speedup_vs_baseline'] for r in cells):.2f}x)" if count["baseline"] else "0"
        lines.append(f"{shape:<17}{num_tokens:>6}{len(cells):>6}  {pct:<30}{count['overhead']:<20}{base}")
    lines.append(
        f"all: {total['cells']} cells; under the % target {total['percent']}, over the overhead rule "
        f"{total['overhead']}, under {MIN_SPEEDUP}x the baseline {total['baseline']}"
    )
    return "\n".join(lines)

