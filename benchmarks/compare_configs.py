"""Times the tuned launch config against the same config with some keys changed, side by side.

For one model shape, every token count and rank (0: no LoRA), both configs run the whole op
(CUDA-graph replay over rotated inputs, as ``bench_fused_experts.py``), alternately twice each;
the faster of each pair of medians is printed with the ratio, and the outputs' largest difference.
Keys are ``name=value`` with a JSON value, names as in ``torch_moe_lora.configs.LaunchConfig``; a
dotted name reaches into a kernel's tiles.

    python benchmarks/compare_configs.py --shape qwen3_30b_a3b --set pdl=false
    python benchmarks/compare_configs.py --shape qwen3_30b_a3b --set pair_blocks=true gate_up.block_n=32
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_fused_experts import SHAPES  # noqa: E402
from common import random_lora, random_routing, time_graph, token_mapping  # noqa: E402

from torch_moe_lora.configs import LaunchConfig, get_config  # noqa: E402
from torch_moe_lora.ops.fused_experts import ExpertOptions  # noqa: E402
from torch_moe_lora.ops.fused_experts_triton import fused_experts_triton  # noqa: E402


def with_changes(config: LaunchConfig, changes: list[str]) -> LaunchConfig:
    """``config`` with each ``name=JSON`` of ``changes`` set (``part.name`` inside a kernel's tiles)."""
    data = config.to_dict()
    for change in changes:
        name, _, value = change.partition("=")
        *path, key = name.split(".")
        target = data
        for part in path:
            target = target.setdefault(part, {})
        target[key] = json.loads(value)
    return LaunchConfig.from_dict(data, f"--set {' '.join(changes)}")


def compare(shape, num_tokens, rank, changes, scenario, rotations=3) -> str:
    hidden, inter, num_experts, top_k = shape
    dtype = torch.bfloat16
    w13 = torch.randn(num_experts, 2 * inter, hidden, dtype=dtype, device="cuda") * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, dtype=dtype, device="cuda") * inter**-0.5
    lora = random_lora(16, num_experts, hidden, inter, rank, dtype) if rank else None
    inputs = [
        (
            torch.randn(num_tokens, hidden, dtype=dtype, device="cuda"),
            *random_routing(num_tokens, num_experts, top_k),
            token_mapping(num_tokens, scenario, 16) if rank else None,
        )
        for _ in range(rotations)
    ]
    tuned = get_config(torch.cuda.get_device_name(), num_experts, hidden, inter, top_k, num_tokens)
    changed = with_changes(tuned, changes)

    def call(i, config):
        return fused_experts_triton(
            i[0], i[1], i[2], w13, w2, token_lora=i[3], lora=lora, options=ExpertOptions(), config=config
        )

    diff = (call(inputs[0], tuned).float() - call(inputs[0], changed).float()).abs().max().item()
    times = {"tuned": [], "changed": []}
    for _ in range(2):
        for name, config in (("tuned", tuned), ("changed", changed)):
            times[name].append(time_graph([lambda i=i, c=config: call(i, c) for i in inputs], replays=10, budget_ms=100))
    a, b = min(times["tuned"]) * 1e3, min(times["changed"]) * 1e3
    return f"r{rank}: tuned {a:8.1f} us, changed {b:8.1f} us ({a / b:.3f}x, max diff {diff:.1e})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen3_30b_a3b", choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=[1, 4, 16, 64, 256, 1024, 4096])
    parser.add_argument("--ranks", nargs="*", type=int, default=[0, 16, 64])
    parser.add_argument("--scenario", default="uniform4")
    parser.add_argument("--set", dest="changes", nargs="+", required=True, metavar="NAME=JSON")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()} {args.shape} {args.scenario}: tuned vs {' '.join(args.changes)} (ratio > 1: changed is faster)")
    for num_tokens in args.tokens:
        cells = [compare(SHAPES[args.shape], num_tokens, rank, args.changes, args.scenario) for rank in args.ranks]
        print(f"T={num_tokens:6d} | " + " | ".join(cells), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
