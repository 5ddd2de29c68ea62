"""benchmarks/bench_e2e.py: its tiny grid runs every row the GPU grid runs (on the CPU, less the
compiled ones), and the adapters it makes without PEFT are PEFT's (keys, shapes, logits)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from utils import assert_rows_match

from torch_moe_lora import patch_model

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
MODELS = ["qwen3_30b_a3b", "gpt_oss_20b"]
RANK = 16
# Every row of `--tiny --grid full` on a machine without CUDA: (setup, batch), per model.
CPU_ROWS = [
    ("unpatched, eager", 1), ("unpatched, eager", 4),
    ("patched, no mapping, eager", 4), ("patched, 1 adapters r16, eager", 4), ("patched, 16 adapters r16, eager", 4),
    ("patched, no mapping, eager", 4), ("patched, 32 adapters r16, eager", 4),
    ("continuous batching, no adapter", None), ("continuous batching, 16 adapters r16", None),
    ("same requests as static batches, 16 adapters r16, eager", 4),
    ("continuous batching, 64 adapters r16 via 16 slots", None), ("swap-in of one adapter r16 (0.00 GiB)", None),
    ("patched, 16 adapters r64, eager", 4),
]  # fmt: skip


def run_bench(*args: str, script: str = "bench_e2e.py") -> subprocess.CompletedProcess:
    """Runs ``benchmarks/<script> args`` on the CPU; asserts it succeeded and returns what it printed."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, whatever the machine
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, env=env, timeout=300
    )
    print(done.stdout, done.stderr[-3000:])
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def load(name: str):
    """``benchmarks/<name>.py`` as a module (the benchmarks import their own folder's modules)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(scope="module")
def bench():
    return load("bench_e2e")


@pytest.fixture(scope="module")
def full_size():
    return load("full_size")


def test_tiny_full_grid_measures_every_row(tmp_path, bench):
    run_bench("--tiny", "--grid", "full", "--out", str(tmp_path))
    result = json.loads((tmp_path / "cpu" / "e2e.json").read_text())
    assert result["device"] == "cpu" and len(result["runs"]) == 1
    measured = [(r["model"], r["setup"], r["batch"]) for r in result["rows"]]
    assert measured == [(model, setup, batch) for model in MODELS for setup, batch in CPU_ROWS]
    for row in result["rows"]:
        assert (row["swap_in_s"] if row["kind"] == "swap" else row["tokens_per_s"]) > 0, row
        assert row["kind"] == "swap" or row["first_call_s"] > 0, row
    # Without CUDA the static ratios read the eager rows: every target ratio of both models is there.
    assert [(r["model"], r["what"]) for r in result["ratios"]] == [(m, r[0]) for m in MODELS for r in bench.RATIOS]
    table = (tmp_path / "cpu" / "e2e_table.txt").read_text().splitlines()
    assert table[1].startswith("model") and len(table) == 2 + len(result["rows"]) + 1 + len(result["ratios"])
    # The patched static rows of one handle and batch are timed interleaved: one key, a rate per round.
    for model in MODELS:
        keys = {
            slots: {r["interleave"] for r in result["rows"] if r["model"] == model and r["kind"] == "static"
                    and r["patched"] and r["batch"] == 4 and r["slots"] == slots and r["rank"] in (None, RANK)}
            for slots in (16, 32)
        }  # fmt: skip
        assert all(len(k) == 1 and None not in k for k in keys.values()) and keys[16] != keys[32], keys
    for row in result["rows"]:
        if row["kind"] == "static":
            assert len(row["round_tokens_per_s"]) == 1 and row["tokens_per_s"] == row["round_tokens_per_s"][0], row
    for entry in result["ratios"]:
        if entry["what"].startswith("static batch"):
            assert entry["round_ratios"] == [entry["ratio"]], entry
            line = next(line for line in table if entry["what"] in line and entry["model"] in line)
            assert "interleaved: 1 rounds" in line, line
        else:
            assert "round_ratios" not in entry, entry


def fake_row(model: str, setup: str, kind: str, adapters: int) -> dict:
    return dict(model=model, layers=2, setup=setup,  # layers: the tiny models'
                kind=kind, patched=True, compiled=False, batch=None, requests=8,
                adapters=adapters, slots=16, rank=RANK if adapters else None, tokens_per_s=-1.0, first_call_s=1.0,
                swap_in_s=None, peak_gib=None)  # fmt: skip


def test_tiny_minimal_grid_merges_into_the_rows_there(tmp_path):
    """The default grid on the CPU: the compiled rows skipped, the eager unpatched rows (``--unpatched``)
    and the serving rows of Qwen3 (continuous batching, the same requests as static batches, the
    swap-in) measured; with ``--merge`` a row of an earlier run it does not measure stays, one it
    measures again is replaced."""
    kept = fake_row("gpt_oss_20b", "continuous batching, 16 adapters r16", "continuous", 16)
    replaced = fake_row("qwen3_30b_a3b", "continuous batching, no adapter", "continuous", 0)
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "e2e.json").write_text(json.dumps(dict(runs=[{}], rows=[kept, replaced])))
    done = run_bench(
        "--tiny", "--merge", "--static-adapters", "16", "--unpatched", "--commit", "abc1234", "--out", str(tmp_path)
    )
    lines = [line for line in done.stdout.splitlines() if "skipped: compiled rows need CUDA" in line]
    skipped = [line.split(",")[0].split(maxsplit=1)[1] for line in lines]  # Qwen3 (parts static, slots32), GPT-OSS
    assert skipped == ["unpatched", "patched", "patched", "patched", "unpatched", "patched"], skipped
    assert [line.split(",")[1].strip() for line in lines if "patched," in line and "unpatched" not in line] == [
        "16 adapters r16",
        "no mapping",
        "32 adapters r16",
        "16 adapters r16",
    ]
    result = json.loads((tmp_path / "cpu" / "e2e.json").read_text())
    assert len(result["runs"]) == 2 and result["rows"][0] == kept
    assert [(r["model"], r["setup"]) for r in result["rows"][1:]] == [
        ("qwen3_30b_a3b", "unpatched, eager"),
        ("qwen3_30b_a3b", "continuous batching, no adapter"),
        ("qwen3_30b_a3b", "continuous batching, 16 adapters r16"),
        ("qwen3_30b_a3b", "same requests as static batches, 16 adapters r16, eager"),
        ("qwen3_30b_a3b", "continuous batching, 64 adapters r16 via 16 slots"),
        ("qwen3_30b_a3b", "swap-in of one adapter r16 (0.00 GiB)"),
        ("gpt_oss_20b", "unpatched, eager"),
    ]
    assert all((r["tokens_per_s"] or r["swap_in_s"]) > 0 for r in result["rows"][1:])
    assert {r["commit"] for r in result["rows"][1:]} == {"abc1234"} and "commit" not in result["rows"][0]
    assert all(entry["trees"] == ["abc1234"] for entry in result["ratios"]), result["ratios"]


@pytest.mark.parametrize("model_name", MODELS)
def test_generated_adapters_are_pefts(full_size, model_name):
    """``adapter_layout`` is PEFT's state dict layout, and PEFT and the patched model give the same
    logits on an adapter made from it (the adapter changing them by far more than they differ)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    # A fixed model, whatever ran before in this process: with the global generator's state that
    # two README snippets left, a Qwen3 router had two experts 9e-8 apart for one token, and the
    # two float orders of PEFT and the patched model picked different ones.
    torch.manual_seed(0)
    model = full_size.build_model(model_name, None, True, "cpu", torch.float32)
    layout = full_size.adapter_layout(model, RANK)
    config = full_size.lora_config(RANK)
    peft_model = get_peft_model(
        copy.deepcopy(model), LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"})
    )
    assert {key: tuple(value.shape) for key, value in get_peft_model_state_dict(peft_model).items()} == layout
    assert any(key.endswith("experts.base_layer.lora_A.weight") for key in layout)  # the expert LoRAs are in it
    state = full_size.random_adapter(layout, 7, "cpu", torch.float32, std=0.1)
    assert not set_peft_model_state_dict(peft_model, state).unexpected_keys
    ids = torch.randint(1, model.config.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, base = peft_model(input_ids=ids).logits, model(input_ids=ids).logits
        handle = patch_model(model, {"generated": (state, config)})
        with handle.adapters(["generated"] * 3):
            got = model(input_ids=ids).logits
    assert_rows_match(got, want, ["generated"] * 3, f"{model_name}: patched against PEFT")
    assert (want - base).abs().max() > 100 * (got - want).abs().max()


def test_profile_splits_the_mapping_between_experts_and_linears(tmp_path):
    """``benchmarks/profile_e2e.py --tiny``: every variant is timed and profiled (step, prefill, host
    functions), and each variant with a mapping changes the logits (its LoRA runs) while the variant
    without one does not."""
    run_bench("--tiny", "--out", str(tmp_path), script="profile_e2e.py")
    result = json.loads((tmp_path / "cpu" / "profile_e2e.json").read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert [(r["variant"], r["mode"]) for r in result["rows"]] == [
        (v, "eager") for v in ("none", "both", "experts", "linears")
    ]
    assert all(r["step_ms"] > 0 and r["issue_ms"] > 0 and r["wall_ms"] > 0 and r["top"] for r in rows.values())
    assert rows["none"]["delta"] == 0
    assert min(rows[v]["delta"] for v in ("both", "experts", "linears")) > 1e-4
    assert all(r["prefill_ms"] > 0 and r["host"] for r in rows.values())
    # The eager step runs the linears' LoRA where the linears see the mapping (host functions by own time).
    calls = {variant: any("add_lora_linear" in h["name"] for h in row["host"]) for variant, row in rows.items()}
    assert calls == dict(none=False, both=True, experts=False, linears=True), calls


def test_host_benchmark_times_both_ways_of_calling_each_op(tmp_path):
    """``benchmarks/bench_host.py --tiny``: a row per op, each with a positive host time through the
    dispatcher and called directly."""
    run_bench("--tiny", "--out", str(tmp_path), script="bench_host.py")
    lines = (tmp_path / "cpu" / "host_table.txt").read_text().splitlines()
    rows = [line.rsplit(maxsplit=5) for line in lines[2:]]
    assert [row[0].strip() for row in rows] == [
        "add_lora_linear q_proj",
        "fused_experts, no LoRA",
        "fused_experts, LoRA",
    ]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 and float(row[5]) > 0 for row in rows), rows


def test_tiny_fp8_experts_rows_and_their_ratio_to_bf16(tmp_path):
    """``--fp8-experts``: the patched rows of the model with FP8Experts (no unpatched rows), under
    ``<model>+fp8``, merged beside the bf16 rows; the FP8 target's ratio is the FP8 16-adapter row
    over the bf16 one."""
    common = ("--tiny", "--grid", "full", "--models", "qwen3_30b_a3b", "--parts", "static",
              "--static-adapters", "16", "--out", str(tmp_path))  # fmt: skip
    run_bench(*common)
    done = run_bench(*common, "--fp8-experts", "--merge")
    assert "experts quantized to FP8" in done.stdout
    result = json.loads((tmp_path / "cpu" / "e2e.json").read_text())
    fp8 = [r for r in result["rows"] if r["model"] == "qwen3_30b_a3b+fp8"]
    assert [(r["setup"], r["batch"]) for r in fp8] == [("patched, 16 adapters r16, eager", 4)], fp8
    assert all(r["tokens_per_s"] > 0 and r["layers"] == 2 for r in fp8)
    bf16 = next(r for r in result["rows"] if r["model"] == "qwen3_30b_a3b" and r["setup"] == fp8[0]["setup"])
    entry = next(e for e in result["ratios"] if e["what"] == "static batch, 16 adapters, FP8 experts / bf16 experts")
    assert entry["model"] == "qwen3_30b_a3b+fp8" and entry["target"] == ">= 1.4"
    assert entry["ratio"] == pytest.approx(fp8[0]["tokens_per_s"] / bf16["tokens_per_s"])
