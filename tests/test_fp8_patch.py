"""``patch_model`` on models whose experts transformers holds as FP8 (``FP8Experts``, block-scaled
e4m3 weights): the patched FP8 model gives the logits of the same model with the experts
dequantized to float32 and patched, and PEFT's on that dequantized model; the LoRA tables take the
model's dtype; layouts the op cannot run are refused by name."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from utils import ROWS, assert_rows_match, batch_ids, fp8_models, no_v4_renaming, requires_cuda

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


@pytest.fixture
def fp8_linear_on_the_cpu(monkeypatch):
    """transformers' ``FP8Linear`` computing ``x (W * scales)^T + b`` in x's dtype: its own forward
    runs FP8 kernels that the CPU machine lacks. The LoRA wrapper calls whichever forward the class has."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    from torch_moe_lora.reference import dequantize_blocks_ref

    def forward(self, x):
        scale = self.weight_scale_inv[None]
        weight = dequantize_blocks_ref(self.weight[None], scale, self.block_size, torch.float32)[0]
        return torch.nn.functional.linear(x, weight.to(x.dtype), self.bias)

    monkeypatch.setattr(FP8Linear, "forward", forward)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_fp8_attention_projections_take_their_adapters(family, peft_adapters, fp8_linear_on_the_cpu):
    """q/k/v/o as ``FP8Linear`` (transformers' FP8 quantizer makes them so): the patched model adds
    each row's LoRA to their FP8 outputs, as the dequantized model patched does; the wrapper keeps
    the FP8 layer's state (weights, scales) as its own and its table in the model's dtype."""
    made = peft_adapters(family)
    model, dequantized = fp8_models(family, BLOCK, attention=True)
    fp8_names = {n for n, m in model.named_modules() if type(m).__name__ == "FP8Linear"}
    assert fp8_names, f"{family}: no attention projection was quantized"
    states = {n: set(model.get_submodule(n).state_dict()) for n in fp8_names}
    sources = {name: path for name, (path, _) in made.items()}
    handle = patch_model(model, sources)
    wrapped = {n: model.get_submodule(n) for n in fp8_names}
    targeted = {n for n, m in wrapped.items() if type(m).__name__ == "MultiLoRAFP8Linear"}
    assert targeted, f"{family}: the adapters target none of {sorted(fp8_names)}"
    for n in targeted:
        assert set(wrapped[n].state_dict()) == states[n], n
        assert wrapped[n].lora_a.dtype == torch.float32 and wrapped[n].weight.dtype == torch.float8_e4m3fn, n
    reference = patch_model(dequantized, sources)
    ids = batch_ids()
    with torch.no_grad(), handle.adapters(ROWS), reference.adapters(ROWS):
        out, want = model(ids).logits, dequantized(ids).logits
    assert_rows_match(out, want, ROWS, f"{family}: FP8 attention patched vs dequantized patched", rel=1e-5)
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad(), handle.adapters(ROWS):
        assert_rows_match(compiled(ids).logits, want, ROWS, f"{family}: FP8 attention compiled", rel=1e-5)
    assert backend.frame_count == 1, "one graph"
    torch._dynamo.reset()
    handle.unpatch()
    assert {type(model.get_submodule(n)).__name__ for n in fp8_names} == {"FP8Linear"}, "unpatch restores them"


@requires_cuda
def test_fp8_attention_with_transformers_own_fp8_forward_on_the_gpu(peft_adapters):
    """On the GPU ``FP8Linear`` runs transformers' own FP8 GEMM (activations quantized per token
    group, so its outputs are near, not equal to, the dequantized model's): in bfloat16 the patched
    FP8 model's rows are within 5% of the logits' scale of the dequantized model patched, and the
    adapters move their rows by more than that error."""
    from transformers.integrations import finegrained_fp8 as fp8

    load = getattr(fp8, "load_finegrained_fp8_kernel", None)  # transformers >= 5.17 fetch it from the Hub
    try:
        if load is not None:
            load()
    except ImportError as error:
        pytest.skip(f"transformers' FP8 GEMM for FP8Linear is not available here: {error}")
    family = "qwen3_moe"
    made = peft_adapters(family)
    model, dequantized = fp8_models(family, (16, 16), attention=True)
    model, dequantized = model.to("cuda"), dequantized.to("cuda", torch.bfloat16)
    for module in model.modules():  # FP8 weights and scales stay; the rest goes to bfloat16
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dtype == torch.float32 and not name.endswith("scale_inv"):
                setattr(module, name, torch.nn.Parameter(p.data.to(torch.bfloat16), requires_grad=False))
    sources = {name: path for name, (path, _) in made.items()}
    handle, reference = patch_model(model, sources), patch_model(dequantized, sources)
    ids = batch_ids().cuda()
    with torch.no_grad():
        plain = dequantized(ids).logits.float()
        with handle.adapters(ROWS), reference.adapters(ROWS):
            out, want = model(ids).logits.float(), dequantized(ids).logits.float()
    scale = want.abs().max()
    err = (out - want).abs().amax(dim=(1, 2))
    moved = (want - plain).abs().amax(dim=(1, 2))
    print(f"FP8 attention on the GPU: max err per row {err.tolist()}, adapters move rows by {moved.tolist()}")
    assert (err <= 0.05 * scale).all(), err
    for row, name in enumerate(ROWS):
        if name is not None:
            assert moved[row] > err[row], (row, name, moved[row], err[row])
