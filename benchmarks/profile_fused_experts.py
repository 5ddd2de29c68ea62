"""Per-kernel GPU time of one fused experts call, from torch.profiler (GPU).

Calls run eagerly (``common.ExpertsRunner``, one input set) with the tuned launch config, changed by
``--set`` as in ``compare_configs.py`` (``--set pdl=false`` keeps a kernel's wait for the previous
one out of its time).

    python benchmarks/profile_fused_experts.py --shape qwen3_30b_a3b --tokens 1 1024 --ranks 64 --scenario uniform16
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from torch_moe_lora.configs import get_config

from common import SHAPES, ExpertsRunner, with_changes


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
    shape = SHAPES[args.shape]
    hidden, inter, num_experts, top_k = shape
    for rank in args.ranks:
        for num_tokens in args.tokens:
            runner = ExpertsRunner(shape, num_tokens, rank=rank, scenario=args.scenario, rotations=1)
            config = with_changes(
                get_config(torch.cuda.get_device_name(), num_experts, hidden, inter, top_k, num_tokens), args.changes
            )
            for label, with_lora in (("LoRA", True), ("no LoRA", False)):
                times = kernel_times(lambda: runner.call(config, with_lora=with_lora))
                total = sum(times.values())
                print(f"{args.shape} T={num_tokens} rank={rank} {args.scenario} {label}: {total:.1f} us of kernels")
                for name, us in times.items():
                    print(f"    {us:9.1f} us  {name}")


if __name__ == "__main__":
    main()
