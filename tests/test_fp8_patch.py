"""``patch_model`` on models whose experts transformers holds as FP8 (``FP8Experts``, block-scaled
e4m3 weights): the patched FP8 model gives the logits of the same model with the experts
dequantized to float32 and patched, and PEFT's on that dequantized model; the LoRA tables take the
model's dtype; layouts the op cannot run are refused by name."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from utils import ROWS, assert_rows_match, batch_ids, fp8_models, no_v4_renaming, tiny_model

from torch_moe_lora import patch_model
from torch_moe_lora.models import find_moe_blocks

pytest.importorskip("transformers.integrations.finegrained_fp8")

BLOCK = (16, 8)  # neither divides every tiny width: partial blocks on both axes


def quantized_models(family: str):
    return fp8_models(family, BLOCK)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "mixtral"])
def test_fp8_model_is_the_dequantized_model(family, peft_adapters):
    made = peft_adapters(family)
    model, dequantized = quantized_models(family)
    assert {type(b.experts).__name__ for b in find_moe_blocks(model)} == {"FP8Experts"}
    sources = {name: path for name, (path, _) in made.items()}
    handle = patch_model(model, sources)
    assert {t.weights.gate_up_a.dtype for t in handle._tables.values()} == {torch.float32}, "the model's dtype"
    reference = patch_model(dequantized, sources)
    ids = batch_ids()
    with torch.no_grad(), handle.adapters(ROWS), reference.adapters(ROWS):
        out, want = model(ids).logits, dequantized(ids).logits
    assert_rows_match(out, want, ROWS, f"{family}: FP8 patched vs dequantized patched", rel=1e-5)
    with torch.no_grad():
        plain = model(ids).logits  # no mapping: the FP8 experts alone
    assert (plain - out).abs().amax(dim=(1, 2))[[0, 1, 3]].min() > 1e-3, "the adapters change their rows"


def test_fp8_model_agrees_with_peft_on_the_dequantized_model(peft_adapters):
    family = "qwen3_moe"
    made = peft_adapters(family)
    model, dequantized = quantized_models(family)
    handle = patch_model(model, {name: path for name, (path, _) in made.items()})
    ids = batch_ids()
    with torch.no_grad():
        with handle.adapters(ROWS):
            out = model(ids).logits
        for row, name in enumerate(ROWS):
            if name is None:
                want = dequantized(ids[row : row + 1]).logits
            else:
                with no_v4_renaming():
                    peft_model = PeftModel.from_pretrained(copy.deepcopy(dequantized), made[name][0]).eval()
                want = peft_model(ids[row : row + 1]).logits
            scale = want.abs().max()
            err = (out[row : row + 1] - want).abs().max()
            assert err <= 1e-4 * scale, f"row {row} ({name}): {err:.3e} against PEFT (logits up to {scale:.3e})"


def test_fp8_layouts_the_op_cannot_run_are_refused():
    model, _ = quantized_models("qwen3_moe")
    block = find_moe_blocks(model)[0]
    block.experts.limit = 7.0  # a clamped gate/up without swiglu_alpha
    with pytest.raises(NotImplementedError, match=r"FP8Experts: a clamped gate/up \(swiglu_limit 7.0 without"):
        patch_model(model, {}, max_loras=1, max_rank=4)
    block.experts.limit, block.experts.block_size = None, None
    with pytest.raises(NotImplementedError, match="without block scales"):
        patch_model(model, {}, max_loras=1, max_rank=4)
    block.experts.block_size = BLOCK
    block.experts.gate_up_proj = torch.nn.Parameter(block.experts.gate_up_proj.view(torch.int8), requires_grad=False)
    with pytest.raises(NotImplementedError, match="expert weights of dtype torch.int8 are not supported"):
        patch_model(model, {}, max_loras=1, max_rank=4)
