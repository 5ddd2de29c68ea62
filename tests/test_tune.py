"""The tuner's switch decisions (``benchmarks/tune.py``) against a stand-in timer: a switch is kept
only where it wins by the margin, and the FP8 decisions only with FP8 experts."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import tune  # noqa: E402
from common import SHAPES  # noqa: E402

from torch_moe_lora.configs import get_config  # noqa: E402

QWEN3 = SHAPES["qwen3_30b_a3b"]


def config_for(num_tokens):
    shape = QWEN3
    return get_config(None, shape.num_experts, shape.hidden, shape.inter, shape.top_k, num_tokens)


def fake_timers(monkeypatch, ms_of):
    """``tune.make_timer`` replaced: each timer returns ``ms_of(config, rank, adapters)``; the calls made
    are recorded as (rank, adapters)."""
    made = []

    def make_timer(shape, num_tokens, rank=16, adapters=4):
        made.append((rank, adapters))
        return lambda config: ms_of(config, rank, adapters)

    monkeypatch.setattr(tune, "make_timer", make_timer)
    return made


@pytest.mark.parametrize("gain, fp8, kept", [(0.9, True, True), (0.99, True, False), (0.9, False, False)])
def test_fp8_activations_kept_where_they_win_by_the_margin_with_fp8_experts(monkeypatch, gain, fp8, kept):
    fake_timers(monkeypatch, lambda config, rank, adapters: gain if config.fp8_activations else 1.0)
    monkeypatch.setattr(tune, "fp8_block", 128 if fp8 else None)
    decided = tune.decide(QWEN3, 4096, config_for(4096), lambda _: None, which=("fp8_activations",))
    assert decided.fp8_activations is kept
    assert tune.weights() == ("fp8" if fp8 else None)


def test_fp8_activations_not_decided_at_decode(monkeypatch):
    made = fake_timers(monkeypatch, lambda config, rank, adapters: 0.5 if config.fp8_activations else 1.0)
    monkeypatch.setattr(tune, "fp8_block", 128)
    assert not tune.decide(QWEN3, 16, config_for(16), lambda _: None, which=("fp8_activations",)).fp8_activations
    assert not made, "no timing for a decision a decode bucket does not take"


@pytest.mark.parametrize(
    "ms, expected",
    [
        ({None: 1.0, 256: 0.8, 512: 0.9, 1024: 0.95}, 256),  # the fastest at rank 16 of those that win
        ({None: 1.0, 256: 0.99, 512: 0.99, 1024: 0.99}, None),  # wins inside the margin: no split
    ],
)
def test_shrink_split_takes_the_fastest_winning_split(monkeypatch, ms, expected):
    fake_timers(monkeypatch, lambda config, rank, adapters: ms[config.shrink.k_per_program])
    base = config_for(16)
    base = dataclasses.replace(base, shrink=dataclasses.replace(base.shrink, block_k=128))
    assert tune.shrink_split(QWEN3, 16, base, lambda _: None).shrink.k_per_program == expected


def test_shrink_split_must_win_at_both_ranks(monkeypatch):
    made = fake_timers(
        monkeypatch, lambda config, rank, adapters: 0.8 if config.shrink.k_per_program and rank == 16 else 1.0
    )
    base = config_for(16)
    base = dataclasses.replace(base, shrink=dataclasses.replace(base.shrink, block_k=128))
    assert tune.shrink_split(QWEN3, 16, base, lambda _: None).shrink.k_per_program is None
    assert (64, 16) in made, "rank 64 with 16 adapters was timed"
