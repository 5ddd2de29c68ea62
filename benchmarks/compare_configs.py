"""Times the tuned launch config against the same config with some keys changed, side by side.

For one model shape, every token count and rank (0: no LoRA), both configs run the whole op
(``common.ExpertsRunner``: CUDA-graph replay over rotated inputs), alternately twice each; the
faster of each pair of medians is printed with the ratio, and the outputs' largest difference.
Keys are ``name=value`` with a JSON value, names as in ``torch_moe_lora.configs.LaunchConfig``; a
dotted name reaches into a kernel's tiles (``common.with_changes``).

    python benchmarks/compare_configs.py --shape qwen3_30b_a3b --set pdl=false
    python benchmarks/compare_configs.py --shape qwen3_30b_a3b --set pair_blocks=true gate_up.block_n=32
    python benchmarks/compare_configs.py --fp8 --tokens 1024 4096 --set fp8_activations=true gate_up.block_k=128

``--fp8``: the experts in float8 e4m3 with 128x128 block scales, against the config FP8 calls take.
"""

from __future__ import annotations

import argparse

import torch

from torch_moe_lora.configs import get_config

from common import FP8_BLOCK, SHAPES, ExpertsRunner, with_changes


def compare(shape, num_tokens, rank, changes, scenario, fp8=False) -> str:
    runner = ExpertsRunner(shape, num_tokens, rank=rank, scenario=scenario, fp8_block=FP8_BLOCK if fp8 else None)
    hidden, inter, num_experts, top_k = shape
    weights = "fp8" if fp8 else None
    tuned = get_config(torch.cuda.get_device_name(), num_experts, hidden, inter, top_k, num_tokens, weights)
    changed = with_changes(tuned, changes)
    diff = (runner.call(tuned).float() - runner.call(changed).float()).abs().max().item()
    times = {"tuned": [], "changed": []}
    for _ in range(2):
        for name, config in (("tuned", tuned), ("changed", changed)):
            times[name].append(runner.time(config, replays=10, budget_ms=100))
    a, b = min(times["tuned"]) * 1e3, min(times["changed"]) * 1e3
    return f"r{rank}: tuned {a:8.1f} us, changed {b:8.1f} us ({a / b:.3f}x, max diff {diff:.1e})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen3_30b_a3b", choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=[1, 4, 16, 64, 256, 1024, 4096])
    parser.add_argument("--ranks", nargs="*", type=int, default=[0, 16, 64])
    parser.add_argument("--scenario", default="uniform4")
    parser.add_argument("--set", dest="changes", nargs="+", required=True, metavar="NAME=JSON")
    parser.add_argument("--fp8", action="store_true", help="FP8 experts (128x128 block scales)")
    args = parser.parse_args()
    fp8 = " fp8 experts" if args.fp8 else ""
    print(f"{torch.cuda.get_device_name()} {args.shape}{fp8} {args.scenario}: tuned vs {' '.join(args.changes)} (ratio > 1: changed is faster)")
    for num_tokens in args.tokens:
        cells = [
            compare(SHAPES[args.shape], num_tokens, rank, args.changes, args.scenario, args.fp8) for rank in args.ranks
        ]
        print(f"T={num_tokens:6d} | " + " | ".join(cells), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
