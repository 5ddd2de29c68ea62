"""Tensor or expert parallelism: the quickstart's model and adapters split over a process group.

Every rank builds the same tiny Qwen3-MoE-like model and calls ``patch_model(...,
process_group=..., parallelism=...)``: tensor parallelism keeps ``I / world`` intermediate columns
of every expert per rank, expert parallelism ``E / world`` experts; each rank reads only its slices
of the adapter files, and every MoE layer ends in one all-reduce. The script runs a mixed-adapter
batch on every rank and prints each rank's largest logit difference from the same model patched
on one process, and whether the greedy tokens agree. Without enough GPUs it runs on the CPU with
gloo.

    python examples/parallel.py --parallelism tensor --world 2
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from quickstart import generate, load_model, make_batch, make_demo_adapters

from torch_moe_lora import patch_model

ROWS = ["a", "b", None, "c"]


def run(model, adapters: dict, batch: dict, **parallel) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches ``model``, and returns the batch's logits and greedy tokens with ``ROWS``' adapters."""
    handle = patch_model(model, adapters, **parallel)
    with torch.no_grad(), handle.adapters(ROWS):
        return model(**batch).logits.float().cpu(), generate(model, batch, max_new_tokens=6).cpu()


def worker(rank: int, world: int, parallelism: str, adapters: dict, root: str) -> None:
    use_gpus = torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if use_gpus else torch.device("cpu")
    if use_gpus:
        torch.cuda.set_device(device)
    backend = "nccl" if use_gpus else "gloo"
    dist.init_process_group(backend, init_method=f"file://{root}/init", rank=rank, world_size=world)
    try:
        model, _ = load_model(None, device, torch.float32)
        batch = make_batch(None, len(ROWS), model.config.vocab_size, device)
        logits, tokens = run(model, adapters, batch, process_group=dist.group.WORLD, parallelism=parallelism)
        torch.save((logits, tokens), os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallelism", choices=["tensor", "expert"], default="tensor")
    parser.add_argument("--world", type=int, default=2, help="processes (one GPU each if there are enough)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        device = torch.device("cpu")
        model, _ = load_model(None, device, torch.float32)
        adapters = make_demo_adapters(model, root)
        batch = make_batch(None, len(ROWS), model.config.vocab_size, device)
        ref_logits, ref_tokens = run(model, adapters, batch)
        mp.spawn(worker, args=(args.world, args.parallelism, adapters, root), nprocs=args.world, join=True)
        scale = ref_logits.abs().max().item()
        print(f"{args.parallelism} parallelism over {args.world} ranks; rows use adapters {ROWS}")
        for rank in range(args.world):
            logits, tokens = torch.load(os.path.join(root, f"rank{rank}.pt"))
            diff = (logits - ref_logits).abs().max().item()
            same = "the same greedy tokens" if torch.equal(tokens, ref_tokens) else "DIFFERENT greedy tokens"
            print(f"rank {rank}: max |logit - one-process logit| = {diff:.2e} (logit scale {scale:.2f}), {same}")


if __name__ == "__main__":
    main()
