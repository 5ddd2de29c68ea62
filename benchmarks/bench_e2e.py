"""End-to-end decode throughput of a patched model against the unpatched model and PEFT (GPU).

The model has Qwen3-30B-A3B's layer shapes (hidden 2048, 128 experts of 768, top-8, 32/4 heads)
with fewer layers and random weights. Adapters (rank 16 on the experts' gate_up/down and the
attention projections) are made with PEFT and saved; ``patch_model`` serves 1, 4 or 16 of them in
one batch, each row on its own adapter. PEFT serves one adapter per batch (every row on it). Writes
``<out>/<gpu>/e2e_qwen3_30b_a3b_layers.json``; ``plot.py`` draws it.

    python benchmarks/bench_e2e.py --layers 4 --batch 16 --new-tokens 64 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from torch_moe_lora import patch_model

from common import SHAPES, results_dir


def qwen3_30b_layers(num_layers: int) -> Qwen3MoeConfig:
    hidden, inter, num_experts, top_k = SHAPES["qwen3_30b_a3b"]
    return Qwen3MoeConfig(
        vocab_size=151936, hidden_size=hidden, intermediate_size=6144, moe_intermediate_size=inter,
        num_hidden_layers=num_layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True, max_position_embeddings=4096,
    )  # fmt: skip


def make_adapters(model, count: int, root: Path, rank: int) -> dict[str, str]:
    """``count`` PEFT adapters with random non-zero weights, saved under ``root``."""
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    paths = {}
    for i in range(count):
        torch.manual_seed(1000 + i)
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.data.normal_(0, 0.02)
        path = root / f"adapter{i}"
        peft_model.save_pretrained(str(path))
        paths[f"adapter{i}"] = str(path)
    peft_model.unload()
    return paths


def tokens_per_second(model, ids, new_tokens: int, repeats: int = 2, compiled: bool = False) -> float:
    """Generated tokens per second over ``repeats`` greedy generations after a warm-up one.

    ``compiled``: a static KV cache, with which transformers compiles the decode step
    (``torch.compile``, CUDA graphs) on its own.
    """
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if compiled:
        kwargs["cache_implementation"] = "static"
    with torch.no_grad():
        model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model.generate(ids, **kwargs)
        torch.cuda.synchronize()
    return repeats * ids.shape[0] * new_tokens / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--adapter-dir", type=Path, default=Path("/tmp/moe_lora_e2e_adapters"))
    parser.add_argument("--compiled", action="store_true", help="also time the unpatched and patched models compiled")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16
    model = Qwen3MoeForCausalLM(qwen3_30b_layers(args.layers)).to("cuda", dtype).eval()
    for module in model.modules():
        if hasattr(module, "gate_up_proj"):
            module.gate_up_proj.data.normal_(0, 0.02)
            module.down_proj.data.normal_(0, 0.02)
    adapters = make_adapters(model, 16, args.adapter_dir, args.rank)
    ids = torch.randint(0, 151936, (args.batch, args.prompt), device="cuda")
    rows = []

    def record(name, tps):
        rows.append(dict(setup=name, tokens_per_s=tps))
        print(f"{name:<44}{tps:>12.1f} tokens/s", flush=True)

    device = torch.cuda.get_device_name()
    print(f"{device}: {args.layers} layers of Qwen3-30B-A3B shapes, batch {args.batch}, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, rank {args.rank}", flush=True)  # fmt: skip
    record("unpatched, no LoRA (transformers default)", tokens_per_second(model, ids, args.new_tokens))

    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, adapters["adapter0"]).eval()
    record("transformers + PEFT, 1 adapter for the batch", tokens_per_second(peft_model, ids, args.new_tokens))
    model = peft_model.unload()

    handle = patch_model(model, adapters, max_loras=16, max_rank=args.rank)
    for in_batch in (1, 4, 16):
        names = [f"adapter{i % in_batch}" for i in range(args.batch)]
        with handle.adapters(names):
            record(f"patched, {in_batch} adapters in the batch", tokens_per_second(model, ids, args.new_tokens))
    with handle.adapters([None] * args.batch):
        record("patched, no adapter", tokens_per_second(model, ids, args.new_tokens))
    if args.compiled:
        for in_batch in (1, 16):
            names = [f"adapter{i % in_batch}" for i in range(args.batch)]
            with handle.adapters(names):
                tps = tokens_per_second(model, ids, args.new_tokens, compiled=True)
            record(f"patched + compiled, {in_batch} adapters in the batch", tps)
        handle.unpatch()
        record("unpatched + compiled, no LoRA", tokens_per_second(model, ids, args.new_tokens, compiled=True))
    setup = {key: value for key, value in vars(args).items() if key not in ("out", "adapter_dir")}
    result = dict(device=device, args=setup, rows=rows)
    (results_dir(args.out, device) / "e2e_qwen3_30b_a3b_layers.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
