"""Benchmark of one MoE + multi-LoRA layer split over two GPUs (NCCL) against one GPU.

Qwen3-30B-A3B layer shapes (H 2048, I 768, E 128, K 8), bfloat16, 16 rank-16 adapters with tokens
spread uniformly over them, uniform random routing. For T = 1, 64, 4096 tokens it times, per layer
(median over CUDA-graph replays of a few rotated input sets, the same number of replays on both
ranks, the slower rank counting):

* ``TP=1``: the whole layer on one GPU;
* ``TP=2``: each GPU keeps I/2 of every expert (and its LoRA slices), then one all-reduce of [T, H];
* ``EP=2``: each GPU keeps E/2 experts, every token replicated, then one all-reduce of [T, H];
* ``EP=2 dp``: data-parallel tokens (each GPU holds T/2 of them) dispatched and combined by
  ``fused_experts_expert_parallel`` (all-gather, reduce-scatter); not run at T = 1;
* ``all-reduce``: the [T, H] all-reduce alone, for scale.

Every split output is checked against the one-GPU output (max |diff| over max |ref|). Writes
``<out>/<gpu>/parallel.json`` and ``parallel_table.txt``; ``plot.py`` draws the JSON.

    python benchmarks/bench_parallel.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed import _functional_collectives as funcol

from torch_moe_lora import LoRAWeights, fused_experts
from torch_moe_lora.parallel import ExpertSharding, fused_experts_expert_parallel

from common import (
    NUM_SLOTS, SHAPES, random_experts, random_lora, random_tokens, results_dir, time_graph, token_mapping,
)  # fmt: skip

SHAPE = SHAPES["qwen3_30b_a3b"]
HIDDEN, INTER, EXPERTS, TOP_K = SHAPE
TOKENS = (1, 64, 4096)
RANK = 16
INPUT_SETS = 4
WORLD = 2
REPLAYS = 30


def tensor_shard(w13, w2, lora: LoRAWeights, rank: int):
    """Rank ``rank``'s intermediate columns: gate rows and up rows of w13, input columns of w2."""
    share = INTER // WORLD
    cols = torch.arange(rank * share, (rank + 1) * share, device=w13.device)
    rows = torch.cat([cols, INTER + cols])
    lora = lora._replace(gate_up_b=lora.gate_up_b[:, :, rows].contiguous(), down_a=lora.down_a[..., cols].contiguous())
    return w13[:, rows].contiguous(), w2[..., cols].contiguous(), lora


def expert_shard(w13, w2, lora: LoRAWeights, rank: int):
    share = EXPERTS // WORLD
    span = slice(rank * share, (rank + 1) * share)
    return w13[span].contiguous(), w2[span].contiguous(), lora.experts(span.start, span.stop)


def settled(out: torch.Tensor) -> torch.Tensor:
    """The collective's result waited for (inside a captured graph too)."""
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


def max_rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def run(rank: int, init_file: str, out_file: str, tokens: list[int]) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    group = dist.group.WORLD
    torch.manual_seed(0)  # the same weights, inputs and routing on both ranks
    dtype = torch.bfloat16
    w13, w2 = random_experts(SHAPE, dtype)
    lora = random_lora(NUM_SLOTS, EXPERTS, HIDDEN, INTER, RANK, dtype)
    tp = tensor_shard(w13, w2, lora, rank)
    ep = expert_shard(w13, w2, lora, rank)
    sharding = ExpertSharding("expert", group, rank, WORLD)
    rows = []
    for num_tokens in tokens:
        inputs = [
            (*random_tokens(SHAPE, num_tokens, dtype), token_mapping(num_tokens, f"uniform{NUM_SLOTS}", NUM_SLOTS))
            for _ in range(INPUT_SETS)
        ]

        def whole(x, ids, weights, slots):
            return fused_experts(x, ids, weights, w13, w2, token_lora=slots, lora=lora)

        def tensor_parallel(x, ids, weights, slots):
            out = fused_experts(x, ids, weights, tp[0], tp[1], token_lora=slots, lora=tp[2])
            return funcol.all_reduce(out, "sum", group)

        def expert_parallel(x, ids, weights, slots):
            local = sharding.local_ids(ids, EXPERTS // WORLD)
            out = fused_experts(x, local, weights, ep[0], ep[1], token_lora=slots, lora=ep[2])
            return funcol.all_reduce(out, "sum", group)

        half = num_tokens // WORLD
        mine = slice(rank * half, (rank + 1) * half)

        def data_parallel(x, ids, weights, slots):
            return fused_experts_expert_parallel(
                x[mine], ids[mine], weights[mine], ep[0], ep[1], group=group, token_lora=slots[mine], lora=ep[2]
            )

        def all_reduce(x, ids, weights, slots):
            return funcol.all_reduce(x, "sum", group)

        layers = {"TP=2": tensor_parallel, "EP=2": expert_parallel, "EP=2 dp": data_parallel, "all-reduce": all_reduce}
        if num_tokens < WORLD:
            del layers["EP=2 dp"]
        ref = whole(*inputs[0])
        refs = {"TP=2": ref, "EP=2": ref, "EP=2 dp": ref[mine]}
        diffs = {name: max_rel_diff(settled(layers[name](*inputs[0])), refs[name]) for name in layers if name in refs}
        times = {}
        dist.barrier()
        if rank == 0:
            times["TP=1"] = time_graph([lambda i=i: whole(*i) for i in inputs], replays=REPLAYS, budget_ms=float("inf"))
        dist.barrier()
        for name, layer in layers.items():
            torch.cuda.synchronize()
            dist.barrier()
            calls = [lambda i=i, f=layer: settled(f(*i)) for i in inputs]
            times[name] = time_graph(calls, replays=REPLAYS, budget_ms=float("inf"))
        slowest = [None] * WORLD
        dist.all_gather_object(slowest, times)
        for name in ["TP=1", *layers]:
            ms = max(t[name] for t in slowest if name in t)
            rows.append(dict(tokens=num_tokens, layer=name, ms=ms, max_rel_diff=diffs.get(name)))
    if rank == 0:
        Path(out_file).write_text(json.dumps(rows))
    dist.destroy_process_group()


def format_rows(rows: list[dict], device: str) -> str:
    lines = [
        f"{device} x{WORLD}, NCCL; Qwen3-30B-A3B layer (H {HIDDEN}, I {INTER}, E {EXPERTS}, K {TOP_K}), bf16, "
        f"{NUM_SLOTS} adapters of rank {RANK}, tokens uniform over them",
        f"{'T':>6} {'layer':<11} {'ms':>8} {'speed-up':>9} {'max rel diff':>13}",
    ]
    base = {r["tokens"]: r["ms"] for r in rows if r["layer"] == "TP=1"}
    for r in rows:
        speedup = "" if r["layer"] == "all-reduce" else f"{base[r['tokens']] / r['ms']:.2f}x"
        diff = "" if r["max_rel_diff"] is None else f"{r['max_rel_diff']:.2e}"
        lines.append(f"{r['tokens']:>6} {r['layer']:<11} {r['ms']:>8.4f} {speedup:>9} {diff:>13}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tokens", nargs="*", type=int, default=list(TOKENS))
    args = parser.parse_args()
    if torch.cuda.device_count() < WORLD:
        raise SystemExit(f"needs {WORLD} GPUs, found {torch.cuda.device_count()}")
    device = torch.cuda.get_device_name()
    out_dir = results_dir(args.out, device)
    init_file, json_file = out_dir / "parallel_init", out_dir / "parallel.json"
    if init_file.exists():
        os.remove(init_file)
    mp.spawn(run, args=(str(init_file), str(json_file), args.tokens), nprocs=WORLD, join=True)
    if init_file.exists():
        os.remove(init_file)
    rows = json.loads(json_file.read_text())
    json_file.write_text(json.dumps(dict(device=device, world=WORLD, rows=rows), indent=1))
    table = format_rows(rows, device)
    (out_dir / "parallel_table.txt").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
