"""The fused experts benchmark's target check (``benchmarks/performance_targets.py``) on hand-made rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from performance_targets import misses, percent_target, summarize  # noqa: E402


def row(T, pct, overhead=0.01, byte_share=0.02, flop_share=0.02, speedup=3.0, **extra):
    return dict(
        shape="s", T=T, rank=16, scenario="uniform4", pct_roofline=pct, lora_overhead=overhead,
        lora_byte_share=byte_share, lora_flop_share=flop_share, speedup_vs_baseline=speedup, **extra,
    )  # fmt: skip


@pytest.mark.parametrize("T, target", [(1, 60), (4, 60), (16, 80), (256, 80), (1024, None), (4096, 60), (16384, 60)])
def test_percent_targets_by_token_count(T, target):
    assert percent_target(T) == target


def test_each_target_is_checked():
    assert misses(row(16, 85)) == []
    assert misses(row(16, 79.9)) == ["percent"]
    assert misses(row(1, 61, overhead=0.026, byte_share=0.02)) == ["overhead"], "2.6% > 1.25 x 2%"
    assert misses(row(1, 61, overhead=0.024, byte_share=0.02)) == []
    assert misses(row(64, 90, speedup=1.49)) == ["baseline"]
    assert misses(row(1024, 10)) == [], "no % target at T=1024"


def test_prefill_uses_the_roofline_and_the_flop_share():
    assert misses(row(4096, 59.0)) == ["percent"]
    assert misses(row(16384, 61.0)) == []
    assert misses(row(4096, 61, overhead=0.05, byte_share=0.5, flop_share=0.02)) == ["overhead"]
    assert misses(row(1024, 61, overhead=0.05, byte_share=0.5, flop_share=0.02)) == [], "byte share below T=4096"


def test_summary_counts_misses_per_shape_and_tokens():
    rows = [row(1, 50), row(1, 70), row(16, 85, speedup=1.2), row(16, 85)]
    text = summarize(rows)
    lines = text.splitlines()
    assert lines[1].split()[:4] == ["s", "1", "2", "1"] and "worst 50.0% < 60%" in lines[1]
    assert "worst 1.20x" in lines[2]
    assert lines[-1] == "all: 4 cells; under the % target 1, over the overhead rule 0, under 1.5x the baseline 1"
