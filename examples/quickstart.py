"""Quickstart: one MoE model, several LoRA adapters, one mixed batch.

Builds a tiny Qwen3-MoE-like model from an embedded config (no downloads), makes three LoRA adapters
with PEFT (experts through ``target_parameters``, attention through ``target_modules``), patches the
model with ``torch_moe_lora.patch_model`` and generates greedily for a batch whose rows use different
adapters (one row none). Then PEFT runs each row alone with that row's adapter, and the script
prints, per row, the tokens, whether they agree with PEFT token for token, and the largest logit
difference; and the patched model's tokens per second. It uses the GPU in bfloat16 when there is
one, else the CPU in float32.

    python examples/quickstart.py
    python examples/quickstart.py --model /path/to/moe-checkpoint --adapter math=/path/a --adapter code=/path/b
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from torch_moe_lora import patch_model

TINY_CONFIG = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
    max_position_embeddings=128, initializer_range=0.2, norm_topk_prob=True,
)  # fmt: skip
DEMO_ADAPTERS = {
    "a": dict(r=8, lora_alpha=16),
    "b": dict(r=4, lora_alpha=4, use_rslora=True),
    "c": dict(r=2, lora_alpha=8, rank_pattern={"experts.down_proj": 6}),
}
DEMO_TARGETS = dict(
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    target_parameters=["experts.gate_up_proj", "experts.down_proj"],
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "2 + 2 ="]

# PEFT 0.21 checks rank_pattern keys only against the modules it targets (target_modules), not against
# the parameters (target_parameters), so for adapter "c" it warns that "experts.down_proj" matched
# nothing and was ignored. It is applied: that LoRA has rank 6 (A is [E * 6, I]). Only this warning goes.
warnings.filterwarnings(
    "ignore",
    message=r"The following rank_pattern keys did not match any targeted module and were ignored: "
    r"\['experts\.down_proj'\]",
    category=RuntimeWarning,
    module=r"peft\.",
)


def named_adapter(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` -> ``(NAME, PATH)``; the name is required (it is what the batch rows are mapped by)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (e.g. math=/path/to/adapter), got {spec!r}")
    return name, path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a local transformers MoE checkpoint (default: a tiny random Qwen3-MoE)")
    parser.add_argument(
        "--adapter", action="append", default=[], type=named_adapter, metavar="NAME=PATH",
        help="a named PEFT LoRA adapter directory (repeatable; default: three random demo adapters)",
    )  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    names = [name for name, _ in args.adapter]
    if len(set(names)) < len(names):
        parser.error(f"argument --adapter: each NAME once, got {names}")
    return args


def load_model(path: str | None, device: torch.device, dtype: torch.dtype):
    """The base model (eval mode) and its tokenizer (None for the tiny model or without tokenizer files)."""
    if path is None:
        torch.manual_seed(0)
        config = transformers.Qwen3MoeConfig(**TINY_CONFIG)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
        return model.to(device).eval(), None
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device).eval()
    if not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        return model, None
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def make_demo_adapters(model, root: str) -> dict[str, str]:
    """Three random LoRA adapters made and saved by PEFT; name -> directory. Leaves ``model`` as it was."""
    paths = {}
    for seed, (name, kwargs) in enumerate(DEMO_ADAPTERS.items()):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **DEMO_TARGETS, **kwargs))
        with torch.no_grad():  # a visible effect: B is random but small by default
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name:
                    param.mul_(4.0)
        paths[name] = f"{root}/{name}"
        peft_model.save_pretrained(paths[name])
        model = peft_model.unload()
    return paths


def make_batch(tokenizer, rows: int, model_vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    if tokenizer is None:
        vocab = min(TINY_CONFIG["vocab_size"], model_vocab)
        ids = torch.randint(0, vocab, (rows, 6), generator=torch.Generator().manual_seed(1))
        return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids, device=device))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(rows)]
    return {k: v.to(device) for k, v in tokenizer(prompts, return_tensors="pt", padding=True).items()}


def generate(model, batch: dict, max_new_tokens: int) -> torch.Tensor:
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else 0
    return model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)


def peft_row(model, path: str | None, batch: dict, row: int, max_new_tokens: int):
    """PEFT (or the base model, for ``path`` None) on one row alone: prompt logits and tokens."""
    keep = batch["attention_mask"][row].bool()
    alone = {k: v[row : row + 1, keep] for k, v in batch.items()}
    runner = model if path is None else PeftModel.from_pretrained(model, path).eval()
    logits = runner(**alone).logits[0]
    tokens = generate(runner, alone, max_new_tokens)[0, alone["input_ids"].shape[1] :]
    if path is not None:
        runner.unload()
    return logits, tokens


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, tokenizer = load_model(args.model, device, dtype)
    with tempfile.TemporaryDirectory() as root:
        adapters = dict(args.adapter) or make_demo_adapters(model, root)
        rows = [*adapters, None]
        batch = make_batch(tokenizer, len(rows), model.config.get_text_config().vocab_size, device)
        prompt_len = batch["input_ids"].shape[1]

        handle = patch_model(model, adapters)
        with torch.no_grad(), handle.adapters(rows):
            logits = model(**batch).logits
            generate(model, batch, 2)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            tokens = generate(model, batch, args.max_new_tokens)[:, prompt_len:]
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        handle.unpatch()

        print(f"{type(model).__name__} on {device} ({dtype}), adapters {list(adapters)}, rows {rows}")
        agree = True
        with torch.no_grad():
            for row, name in enumerate(rows):
                ref_logits, ref_tokens = peft_row(model, adapters.get(name), batch, row, args.max_new_tokens)
                keep = batch["attention_mask"][row].bool()
                diff = (logits[row, keep].float() - ref_logits.float()).abs().max().item()
                same = torch.equal(tokens[row, : ref_tokens.shape[0]], ref_tokens)
                agree &= same
                text = f" {tokenizer.decode(tokens[row])!r}" if tokenizer is not None else ""
                print(
                    f"row {row} adapter={name!s:8} tokens={tokens[row].tolist()}{text} "
                    f"| PEFT alone: {'same tokens' if same else 'DIFFERENT tokens ' + str(ref_tokens.tolist())}, "
                    f"max logit diff {diff:.2e} (logit scale {ref_logits.float().abs().max().item():.2e})"
                )
        new_tokens = tokens.numel()
        print(f"patched generate: {new_tokens} new tokens in {seconds:.3f} s = {new_tokens / seconds:.1f} tokens/s")
        print("all rows agree with PEFT" if agree else "some rows differ from PEFT (expected only in low precision)")


if __name__ == "__main__":
    main()
