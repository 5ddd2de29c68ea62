"""The fused experts benchmark's target check (``benchmarks/performance_targets.py``) on hand-made rows."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from performance_targets import misses, percent_target, summarize  # noqa: E402


def row(T, pct, overhead=0.01, byte_share=0.02, flop_share=0.02, speedup=3.0, rank=16, scenario="uniform4", **extra):
    return dict(
        shape="s", T=T, rank=rank, scenario=scenario, pct_roofline=pct, lora_overhead=overhead,
        lora_byte_share=byte_share, lora_flop_share=flop_share, speedup_vs_baseline=speedup, **extra,
    )  # fmt: skip


@pytest.mark.parametrize(
    "T, target", [(1, 75), (4, 75), (16, 80), (256, 80), (512, None), (1024, 75), (4096, 60), (16384, 60)]
)
def test_percent_targets_by_token_count(T, target):
    assert percent_target(T) == target


def test_prefill_with_16_adapters_of_rank_64_has_its_own_target():
    assert percent_target(4096, 64, "uniform16") == 65 and percent_target(4096, 64, "uniform4") == 60
    assert misses(row(4096, 64, rank=64, scenario="uniform16")) == ["percent"]
    assert misses(row(4096, 64, rank=64, scenario="uniform4")) == []


def test_each_target_is_checked():
    assert misses(row(16, 85)) == []
    assert misses(row(16, 79.9)) == ["percent"]
    assert misses(row(1, 76, overhead=0.026, byte_share=0.02)) == ["overhead"], "2.6% > 1.25 x 2%"
    assert misses(row(1, 76, overhead=0.024, byte_share=0.02)) == []
    assert misses(row(1, 74)) == ["percent"]
    assert misses(row(64, 90, speedup=1.49)) == ["baseline"]
    assert misses(row(1024, 74)) == ["percent"] and misses(row(512, 10)) == [], "no % target at T=512"


def test_prefill_uses_the_roofline_and_the_flop_share():
    assert misses(row(4096, 59.0)) == ["percent"]
    assert misses(row(16384, 61.0)) == []
    assert misses(row(4096, 61, overhead=0.05, byte_share=0.5, flop_share=0.02)) == ["overhead"]
    assert misses(row(1024, 76, overhead=0.05, byte_share=0.5, flop_share=0.02)) == [], "byte share below T=4096"


def test_base_path_against_grouped_mm():
    def prefill(shape, T, ratio, matmul=70.0):
        return row(T, 70, base_vs_grouped_mm=ratio, no_lora_pct_matmul=matmul) | {"shape": shape}

    assert misses(prefill("qwen3_30b_a3b", 4096, 1.31)) == []
    assert misses(prefill("qwen3_30b_a3b", 4096, 1.29)) == ["grouped_mm"]
    assert misses(prefill("qwen3_30b_a3b", 4096, 1.4, matmul=64.0)) == ["grouped_mm"], "65% of matmul at T=4096"
    assert misses(prefill("qwen3_30b_a3b", 16384, 1.4, matmul=64.0)) == [], "the matmul % is for T=4096 only"
    assert misses(prefill("fine_grained", 4096, 1.4, matmul=30.0)) == [], "no matmul % for fine-grained"
    assert misses(prefill("mixtral_8x7b", 16384, 0.99)) == ["grouped_mm"]
    assert misses(prefill("mixtral_8x7b", 16384, 1.01)) == []
    assert misses(row(1024, 80, base_vs_grouped_mm=0.5, no_lora_pct_matmul=10.0)) == [], "prefill only"
    text = summarize([prefill("mixtral_8x7b", 16384, 0.9), prefill("mixtral_8x7b", 16384, 1.2)])
    assert "1 (worst 0.90x, target 1.0x)" in text.splitlines()[1]
    assert text.splitlines()[-1].endswith("base under its grouped_mm target 1")


def test_summary_counts_misses_per_shape_and_tokens():
    rows = [row(1, 50), row(1, 80), row(16, 85, speedup=1.2), row(16, 85)]
    text = summarize(rows)
    lines = text.splitlines()
    assert lines[1].split()[:4] == ["s", "1", "2", "1"] and "worst 50.0% < 75%" in lines[1]
    assert "worst 1.20x" in lines[2]
    assert lines[-1] == (
        "all: 4 cells; under the % target 1, over the overhead rule 0, under 1.5x the baseline 1, "
        "base under its grouped_mm target 0"
    )


def test_fp8_benchmark_names_its_misses():
    """The FP8 benchmark's target check names each cell under a target."""
    from bench_fp8_experts import fp8_misses

    cell = dict(shape="s", pct_fp8_roofline=85.0, speedup=2.0)
    assert fp8_misses([dict(cell, T=64)]) == []
    assert fp8_misses([dict(cell, T=64, speedup=1.5)]) == ["s T=64: 1.50x the bf16 op (target 1.6x)"]
    assert fp8_misses([dict(cell, T=256, pct_fp8_roofline=79.0)]) == ["s T=256: 79.0% of the FP8 roofline (target 80%)"]
    assert fp8_misses([dict(cell, T=1024, pct_fp8_roofline=10.0, speedup=1.0)]) == [], "no target at T=1024"
    assert len(fp8_misses([dict(cell, T=1, pct_fp8_roofline=10.0, speedup=1.4)])) == 1, "no % target at T=1"
