"""Are two builds of the library bit-for-bit the same on the GPU, and as fast? (for refactors)

``dump`` runs the public ``fused_experts`` op of whichever ``torch_moe_lora`` is on ``sys.path``
(its tuned launch configs included) over fixed problems of the benchmark shapes, decode to prefill,
without LoRA and with 16 adapters of rank 16, and saves the outputs; ``compare`` loads two dumps and
prints, per problem, whether they are equal element for element.

    PYTHONPATH=OLD_TREE python benchmarks/compare_builds.py dump old.pt
    python benchmarks/compare_builds.py dump new.pt
    python benchmarks/compare_builds.py compare old.pt new.pt
    PYTHONPATH=OLD_TREE python benchmarks/compare_builds.py time   # then without PYTHONPATH

``time`` prints the CUDA-graph time of the op on the Qwen3-30B-A3B shape, decode to prefill, with
16 adapters of rank 16 and without LoRA: run it for each build alternately in one lease and compare.
Only the op's public signature is used (and ``common``, which imports only public names at its
top), so any two versions of the library can be compared.
"""

from __future__ import annotations

import sys

import torch

from common import NUM_SLOTS, SHAPES, time_graph

PROBLEM_TOKENS = (1, 4, 64, 1024, 4096)
RANK = 16


def problems():
    """(name, x, topk_ids, topk_weights, w13, w2, token_lora, lora tensors) from fixed seeds."""
    for shape, (H, I, E, K) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        randn = lambda *s, std: torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16) * std  # noqa: E731
        w13, w2 = randn(E, 2 * I, H, std=H**-0.5), randn(E, H, I, std=I**-0.5)
        lora = (
            randn(NUM_SLOTS, E, RANK, H, std=H**-0.5), randn(NUM_SLOTS, E, 2 * I, RANK, std=RANK**-0.5),
            randn(NUM_SLOTS, E, RANK, I, std=I**-0.5), randn(NUM_SLOTS, E, H, RANK, std=RANK**-0.5),
            torch.full((NUM_SLOTS,), 0.5, device="cuda"), torch.full((NUM_SLOTS,), 0.25, device="cuda"),
        )  # fmt: skip
        for T in PROBLEM_TOKENS:
            x = randn(T, H, std=1.0)
            scores = torch.rand(T, E, generator=g, device="cuda")
            weights, ids = scores.topk(K, dim=1)
            token_lora = torch.randint(-1, NUM_SLOTS, (T,), generator=g, device="cuda")
            yield f"{shape} T={T}", x, ids, weights / weights.sum(1, keepdim=True), w13, w2, token_lora, lora


def dump(path: str) -> None:
    from torch_moe_lora import LoRAWeights, fused_experts

    outputs = {}
    for name, x, ids, weights, w13, w2, token_lora, lora in problems():
        outputs[f"{name} no LoRA"] = fused_experts(x, ids, weights, w13, w2).cpu()
        outputs[f"{name} LoRA"] = fused_experts(x, ids, weights, w13, w2, token_lora=token_lora, lora=LoRAWeights(*lora)).cpu()
    torch.save(outputs, path)
    print(f"{len(outputs)} outputs saved to {path}")


def time_builds() -> None:
    from torch_moe_lora import LoRAWeights, fused_experts

    for name, x, ids, weights, w13, w2, token_lora, lora in problems():
        if not name.startswith("qwen3") or name.endswith("T=4"):
            continue
        lora = LoRAWeights(*lora)
        with_lora = time_graph([lambda: fused_experts(x, ids, weights, w13, w2, token_lora=token_lora, lora=lora)])
        without = time_graph([lambda: fused_experts(x, ids, weights, w13, w2)])
        print(f"{name:24} LoRA {with_lora:.4f} ms   no LoRA {without:.4f} ms")


def compare(old_path: str, new_path: str) -> None:
    old, new = torch.load(old_path), torch.load(new_path)
    different = [name for name in old if not torch.equal(old[name], new[name])]
    for name in old:
        diff = (old[name].float() - new[name].float()).abs().max().item()
        print(f"{name:40} {'equal' if name not in different else f'DIFFERENT (max |diff| {diff:.3e})'}")
    print(f"{len(old) - len(different)} of {len(old)} outputs equal element for element")
    sys.exit(1 if different else 0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["dump"]:
        dump(sys.argv[2])
    elif sys.argv[1:2] == ["time"]:
        time_builds()
    elif sys.argv[1:2] == ["compare"]:
        compare(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
