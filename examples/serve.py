"""Serving many adapters to many requests: transformers' continuous batching, an adapter per request.

Builds a tiny Qwen3-MoE-like model (no downloads), makes six LoRA adapters with PEFT, patches the
model with only two slots (the other adapters wait in host memory and are swapped in as requests
need them) and sends requests of mixed prompt and output lengths through a continuous-batching
manager: half at the start, the rest while those run, one naming an adapter that does not exist
(it fails alone). Prints each request's adapter, status and first tokens, whether its tokens agree
with PEFT running that prompt alone, and the throughput. GPU in bfloat16 when there is one (where
greedy tokens may part from float32 PEFT's after a few steps), else the CPU in float32.

    python examples/serve.py
    python examples/serve.py --requests 200 --slots 4 --adapters 16
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import tempfile
import time

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from torch_moe_lora import patch_model

TINY_CONFIG = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
    max_position_embeddings=256, initializer_range=0.2, norm_topk_prob=True,
)  # fmt: skip
TARGETS = dict(
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    target_parameters=["experts.gate_up_proj", "experts.down_proj"],
)


def make_adapters(model, count: int, root: str) -> dict[str, str]:
    """``count`` PEFT adapters of ranks 2-8 with random weights, saved under ``root``."""
    paths = {}
    for i in range(count):
        torch.manual_seed(100 + i)
        rank = 2 + 2 * (i % 4)
        peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False, **TARGETS))
        paths[f"tenant{i}"] = f"{root}/tenant{i}"
        peft_model.save_pretrained(paths[f"tenant{i}"])
        model = peft_model.unload()
    return paths


def peft_tokens(model, path: str | None, prompt: list[int], new_tokens: int) -> list[int]:
    from peft import PeftModel

    ids = torch.tensor([prompt], device=model.device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if path is None:
        return model.generate(ids, **kwargs)[0, len(prompt) :].tolist()
    peft_model = PeftModel.from_pretrained(model, path).eval()
    out = peft_model.generate(ids, **kwargs)[0, len(prompt) :].tolist()
    peft_model.unload()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--check", type=int, default=16, help="compare this many requests with PEFT")
    args = parser.parse_args()
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**TINY_CONFIG)
    model = transformers.Qwen3MoeForCausalLM(config).to(device, dtype).eval()
    model.config._attn_implementation = "sdpa"
    with tempfile.TemporaryDirectory() as root:
        paths = make_adapters(model, args.adapters, root)
        handle = patch_model(model, paths, max_loras=args.slots, max_rank=8)
        print(
            f"{len(handle.registered_adapters)} adapters registered, {args.slots} slots: "
            f"{handle.adapter_names} resident"
        )

        rng = random.Random(0)
        workload = []
        for i in range(args.requests):
            prompt = [rng.randrange(1, TINY_CONFIG["vocab_size"]) for _ in range(rng.randint(3, 24))]
            adapter = rng.choice([*paths, None])
            workload.append((prompt, "no-such-adapter" if i == args.requests // 3 else adapter, rng.randint(2, 16)))
        generation = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=-1, pad_token_id=0)
        page = (
            "page_size"
            if "page_size" in {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
            else "block_size"
        )
        cache = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=128, **{page: 16})  # a small paged KV cache
        manager = handle.init_continuous_batching(generation, cache)
        submitted, results = {}, {}
        start = time.perf_counter()
        with torch.no_grad():
            manager.start()
            try:
                for i, (prompt, adapter, new_tokens) in enumerate(workload):
                    if i == len(workload) // 2:  # the second half joins while the first runs
                        out = manager.get_result(timeout=30)
                        results[out.request_id] = out
                    try:
                        rid = handle.add_request(manager, prompt, adapter=adapter, max_new_tokens=new_tokens)
                    except KeyError as error:
                        print(f"request {i} refused alone: {error}")
                        continue
                    submitted[rid] = (prompt, adapter, new_tokens)
                while len(results) < len(submitted):
                    out = manager.get_result(timeout=30)
                    if out is None:
                        raise RuntimeError("the manager stopped answering")
                    if out.is_finished():
                        results[out.request_id] = out
            finally:
                manager.stop(block=True)
            seconds = time.perf_counter() - start
            handle.unpatch()
            agree = checked = 0
            for rid, (prompt, adapter, new_tokens) in submitted.items():
                out = results[rid]
                line = f"{rid:>13} {adapter or '(base)':>9} prompt {len(prompt):>2} {out.status.name:<8} "
                line += str(out.generated_tokens[:6])
                if checked < args.check:
                    same = out.generated_tokens == peft_tokens(model, paths.get(adapter), prompt, new_tokens)
                    agree, checked = agree + same, checked + 1
                    line += "  agrees with PEFT" if same else "  differs from PEFT"
                print(line)
    generated = sum(len(out.generated_tokens) for out in results.values())
    print(f"{agree} of {checked} checked requests agree with PEFT token for token")
    print(
        f"{len(results)} requests, {generated} tokens in {seconds:.2f} s: {generated / seconds:.1f} tokens/s ({device})"
    )


if __name__ == "__main__":
    main()
