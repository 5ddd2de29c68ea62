"""Tunes the ``add_lora_linear`` launch configs on one GPU and writes ``torch_moe_lora/configs/lora_linear.json``.

For every token bucket it times ``add_lora_linear`` alone (CUDA-graph replay over rotated inputs)
on the attention projections of Qwen3-30B-A3B (q: 2048 -> 4096, k: 2048 -> 512, o: 4096 -> 2048),
16 slots of rank 16, every row on its own slot (cycling); a row is one token up to 256 tokens
(decode), 256 tokens above (prefill). The score of a config is the sum over the projections. It
searches one part at a time from the current bucket: the shrink (``block_m``, its K step and
stages, ``k_per_program``), then the expand tiles, and keeps a change only where it wins by
``WIN_MARGIN``. The file is written for every device (the kernels are latency-bound at decode and
the H200 is the GPU tuned on); the best time of each bucket goes to
``benchmarks/results/<gpu>/tuned_lora_linear_timings.json``.

    python benchmarks/tune_lora_linear.py [--buckets 16 64 ...] [--out torch_moe_lora/configs]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import torch
from triton.runtime.errors import OutOfResources

from torch_moe_lora import slot_segments
from torch_moe_lora.configs import CONFIG_DIR, LinearLoRAConfig, LinearLoRATiles, get_linear_lora_config
from torch_moe_lora.ops.lora_linear import add_lora_linear_triton

from common import NUM_SLOTS, results_dir, time_graph

PROJECTIONS = {"q_proj": (2048, 4096), "k_proj": (2048, 512), "o_proj": (4096, 2048)}
BUCKETS = (16, 64, 256, 1024, 4096, 16384)
RANK = 16
WIN_MARGIN = 0.02
"""A change must win by this fraction: smaller wins are within run-to-run noise."""


def make_timer(num_tokens: int, inputs: int = 4):
    """A function from a ``LinearLoRAConfig`` to its summed milliseconds per call over the projections."""
    per_row = 1 if num_tokens <= 256 else 256
    rows = num_tokens // per_row
    segments = slot_segments(torch.arange(rows, device="cuda") % NUM_SLOTS, NUM_SLOTS)
    scale = torch.full((NUM_SLOTS,), 0.5, device="cuda")
    problems = []
    for n_in, n_out in PROJECTIONS.values():
        a = torch.randn(NUM_SLOTS, RANK, n_in, dtype=torch.bfloat16, device="cuda") * n_in**-0.5
        b = torch.randn(NUM_SLOTS, n_out, RANK, dtype=torch.bfloat16, device="cuda") * RANK**-0.5
        xs = [torch.randn(num_tokens, n_in, dtype=torch.bfloat16, device="cuda") for _ in range(inputs)]
        outs = [torch.zeros(num_tokens, n_out, dtype=torch.bfloat16, device="cuda") for _ in range(inputs)]
        problems.append((a, b, xs, outs))

    def timer(config: LinearLoRAConfig) -> float:
        total = 0.0
        for a, b, xs, outs in problems:
            calls = [
                lambda x=x, out=out: add_lora_linear_triton([out], x, *segments, [a], [b], [scale], config=config)
                for x, out in zip(xs, outs)
            ]
            total += time_graph(calls, replays=10, budget_ms=40.0)
        return total

    return timer


def shrink_candidates(base: LinearLoRAConfig, num_tokens: int):
    block_ms = (16,) if num_tokens <= 64 else (16, 32, 64)
    for block_m, block, stages, k_per_program in itertools.product(block_ms, (64, 128, 256), (2, 3), (None, 128, 256, 512, 1024)):
        if k_per_program is not None and k_per_program % block:
            continue
        shrink = dataclasses.replace(base.shrink, block=block, num_stages=stages)
        yield dataclasses.replace(base, block_m=block_m, shrink=shrink, k_per_program=k_per_program)


def expand_candidates(base: LinearLoRAConfig):
    for block, warps in itertools.product((64, 128, 256), (4, 8)):
        yield dataclasses.replace(base, expand=LinearLoRATiles(block=block, num_warps=warps, num_stages=1))


def best_of(timer, base: LinearLoRAConfig, candidates, log) -> tuple[LinearLoRAConfig, float]:
    best, best_ms = base, timer(base)
    for config in candidates:
        if config == base:
            continue
        try:
            ms = timer(config)
        except OutOfResources:
            continue
        log(f"  {_as_dict(config)}: {ms:.4f} ms")
        if ms < best_ms * (1 - WIN_MARGIN):
            best, best_ms = config, ms
    return best, best_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--buckets", type=int, nargs="+", default=list(BUCKETS))
    parser.add_argument("--out", type=Path, default=CONFIG_DIR, help="folder of lora_linear.json")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name()
    log = print if args.verbose else (lambda *_: None)
    path = args.out / "lora_linear.json"
    tuned = json.loads(path.read_text()) if path.exists() else {}
    timings = {}
    for bucket in args.buckets:
        timer = make_timer(bucket)
        start = get_linear_lora_config(bucket)
        start_ms = timer(start)
        config, _ = best_of(timer, start, shrink_candidates(start, bucket), log)
        config, ms = best_of(timer, config, expand_candidates(config), log)
        print(f"T={bucket}: {start_ms:.4f} -> {ms:.4f} ms (q+k+o) {_as_dict(config)}")
        tuned[str(bucket)] = _as_dict(config)
        timings[str(bucket)] = dict(start_ms=start_ms, best_ms=ms)
    tuned = dict(sorted(tuned.items(), key=lambda kv: int(kv[0])))
    path.write_text(json.dumps(tuned, indent=2) + "\n")
    result = dict(device=gpu, projections=PROJECTIONS, slots=NUM_SLOTS, rank=RANK, buckets=timings)
    (results_dir(args.results, gpu) / "tuned_lora_linear_timings.json").write_text(json.dumps(result, indent=1) + "\n")


def _as_dict(config: LinearLoRAConfig) -> dict:
    out = dataclasses.asdict(config)
    if out["k_per_program"] is None:
        del out["k_per_program"]
    return out


if __name__ == "__main__":
    main()
