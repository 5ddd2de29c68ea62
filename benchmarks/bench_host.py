"""Host time of one eager call of each op, through the dispatcher and called directly (GPU; ``--tiny`` runs anywhere).

A model's prefill runs eagerly (``generate`` compiles only the decode step), and there the host
issues every kernel: a patched layer's calls must cost the host little. For the Qwen3-30B-A3B
shapes (the q_proj linear 2048 -> 4096 and the experts) with 16 adapters of rank 16, at a decode and
a prefill token count, each row gives the host microseconds of one call, issued ``--calls`` times
back to back without waiting on the device (fewer kernels than the launch queue holds, so the host
never blocks):

* ``op``: ``torch.ops.moe_lora.<op>`` (the dispatcher: the custom op's Python wrappers);
* ``direct``: the public function, which in eager mode runs the implementation directly
  (``ops.checks.direct_call``);
* ``device``: the device milliseconds of one call (synchronized, for scale).

Writes ``<out>/<gpu>/host_table.txt``.

    python benchmarks/bench_host.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import SHAPES, MoEShape, random_experts, random_lora, random_tokens, results_dir, token_mapping

from torch_moe_lora import add_lora_linear, slot_segments
from torch_moe_lora.ops.fused_experts import fused_experts

CUDA = torch.cuda.is_available()


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def host_us(call, calls: int, repeats: int = 5) -> float:
    """The least over ``repeats`` of the host microseconds per call of ``calls`` calls issued back to back."""
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
        synchronize()
    return 1e6 * best


def device_ms(call, calls: int) -> float:
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    synchronize()
    return 1e3 * (time.perf_counter() - start) / calls


def linear_calls(tokens: int, slots: int, rank: int, dtype, device):
    """(through the op, direct) calls of add_lora_linear on q_proj's shape."""
    in_features, out_features = (2048, 4096) if device == "cuda" else (64, 128)
    x = torch.randn(tokens, in_features, dtype=dtype, device=device)
    out = torch.zeros(tokens, out_features, dtype=dtype, device=device)
    a = torch.randn(slots, rank, in_features, dtype=dtype, device=device) * in_features**-0.5
    b = torch.randn(slots, out_features, rank, dtype=dtype, device=device) * rank**-0.5
    scale = torch.full((slots,), 0.5, device=device)
    segments = slot_segments(torch.arange(tokens, device=device) % slots, slots)
    op_args = ([out], x, *segments, [a], [b], [scale])
    through_op = lambda: torch.ops.moe_lora.add_lora_linear(*op_args)  # noqa: E731
    return through_op, (lambda: add_lora_linear(out, x, *segments, a, b, scale))


def experts_calls(shape: MoEShape, tokens: int, slots: int, rank: int, lora: bool, dtype, device):
    """(through the op, direct) calls of fused_experts, with a slot table and a mapping over every slot or without."""
    w13, w2 = random_experts(shape, dtype, device)
    x, ids, weights = random_tokens(shape, tokens, dtype, device)
    table = random_lora(slots, shape.num_experts, shape.hidden, shape.inter, rank, dtype, device) if lora else None
    token_lora = token_mapping(tokens, f"uniform{slots}", slots, device) if lora else None
    lora_args = tuple(table) if lora else (None,) * 6

    def op():
        return torch.ops.moe_lora.fused_experts(
            x, ids, weights, w13, w2, None, None, token_lora, *lora_args, "silu", True, False, 1.702, 7.0, False
        )

    return op, (lambda: fused_experts(x, ids, weights, w13, w2, token_lora=token_lora, lora=table))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 4096])
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes in float32 (the CPU): a smoke test")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device, dtype = ("cuda", torch.bfloat16) if CUDA and not args.tiny else ("cpu", torch.float32)
    if args.tiny:
        args.tokens, args.slots, args.rank, args.calls = [8], 4, 8, 3
    shape = SHAPES["qwen3_30b_a3b"] if not args.tiny else MoEShape(hidden=64, inter=32, num_experts=8, top_k=2)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    title = (
        f"{gpu}: torch {torch.__version__}, qwen3_30b_a3b shapes, {args.slots} adapters r{args.rank}, host us a call"
    )
    lines = [title, f"{'call':<34} {'T':>6} {'op us':>9} {'direct us':>10} {'op/direct':>10} {'device ms':>10}"]
    print(title, flush=True)
    with torch.no_grad():
        for tokens in args.tokens:
            cases = [
                ("add_lora_linear q_proj", linear_calls(tokens, args.slots, args.rank, dtype, device)),
                ("fused_experts, no LoRA", experts_calls(shape, tokens, args.slots, args.rank, False, dtype, device)),
                ("fused_experts, LoRA", experts_calls(shape, tokens, args.slots, args.rank, True, dtype, device)),
            ]
            for name, (op, direct) in cases:
                for call in (op, direct, op, direct):  # compile, warm
                    call()
                op_us, direct_us = host_us(op, args.calls), host_us(direct, args.calls)
                line = (f"{name:<34} {tokens:>6} {op_us:9.1f} {direct_us:10.1f} {op_us / direct_us:10.2f} "
                        f"{device_ms(direct, args.calls):10.4f}")  # fmt: skip
                lines.append(line)
                print(line, flush=True)
    (results_dir(args.out, gpu) / "host_table.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
