"""Per-kernel GPU time of one fused experts call, from torch.profiler (GPU).

Calls run eagerly with the tuned launch config, changed by ``--set`` as in ``compare_configs.py``
(``--set pdl=false`` keeps a kernel's wait for the previous one out of its time).

    python benchmarks/profile_fused_experts.py --shape qwen3_30b_a3b --tokens 1 1024 --ranks 64 --scenario uniform16
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_fused_experts import SHAPES  # noqa: E402
from common import random_lora, random_routing, token_mapping  # noqa: E402
from compare_configs import with_changes  # noqa: E402

from torch_moe_lora.configs import get_config  # noqa: E402
from torch_moe_lora.ops.fused_experts import ExpertOptions  # noqa: E402
from torch_moe_lora.ops.fused_experts_triton import fused_experts_triton  # noqa: E402


def kernel_times(fn, repeats: int = 10) -> dict[str, float]:
    """Mean microseconds per call of every kernel ``fn`` launches."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:60]] += event.device_time / repeats
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen3_30b_a3b", choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="*", type=int, default=[1, 64, 1024, 4096])
    parser.add_argument("--ranks", nargs="*", type=int, default=[16, 64])
    parser.add_argument("--scenario", default="uniform16")
    parser.add_argument("--set", dest="changes", nargs="*", default=[], metavar="NAME=JSON")
    args = parser.parse_args()
    hidden, inter, num_experts, top_k = SHAPES[args.shape]
    dtype = torch.bfloat16
    w13 = torch.randn(num_experts, 2 * inter, hidden, dtype=dtype, device="cuda") * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, dtype=dtype, device="cuda") * inter**-0.5
    for rank in args.ranks:
        lora = random_lora(16, num_experts, hidden, inter, rank, dtype)
        for num_tokens in args.tokens:
            x = torch.randn(num_tokens, hidden, dtype=dtype, device="cuda")
            ids, weights = random_routing(num_tokens, num_experts, top_k)
            mapping = token_mapping(num_tokens, args.scenario, 16)
            config = with_changes(
                get_config(torch.cuda.get_device_name(), num_experts, hidden, inter, top_k, num_tokens), args.changes
            )
            for label, token_lora, table in (("LoRA", mapping, lora), ("no LoRA", None, None)):
                times = kernel_times(
                    lambda: fused_experts_triton(
                        x, ids, weights, w13, w2, token_lora=token_lora, lora=table, options=ExpertOptions(),
                        config=config,
                    )  # fmt: skip
                )
                total = sum(times.values())
                print(f"{args.shape} T={num_tokens} rank={rank} {args.scenario} {label}: {total:.1f} us of kernels")
                for name, us in times.items():
                    print(f"    {us:9.1f} us  {name}")


if __name__ == "__main__":
    main()
