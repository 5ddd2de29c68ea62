"""Many tenants on one patched model: a broken adapter is refused or stays in its own rows,
mappings do not leak between threads or nested blocks, and bad input at the public API raises an
error naming it.

Tiny random models and PEFT adapters; the poisoned adapters are PEFT files with NaN, Inf or
float16-overflowing values written into them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from utils import batch_ids, make_peft_adapters, requires_cuda, tiny_model

from torch_moe_lora import ExpertLoRASlots, fused_experts, patch_model
from torch_moe_lora.linear import MultiLoRALinear, SlotMapping

FAMILY = "qwen3_moe"
ROWS = ["a", None, "broken", "b"]


def poisoned_copy(path: str, root, name: str, poison) -> str:
    """A copy of the PEFT adapter at ``path`` with ``poison(key, tensor)`` applied to its weights."""
    target = root / name
    shutil.copytree(path, target)
    weights = load_file(str(target / "adapter_model.safetensors"))
    save_file({k: poison(k, v) for k, v in weights.items()}, str(target / "adapter_model.safetensors"))
    return str(target)


def one_nan_in_q_proj_a(key, t):
    if "layers.0.self_attn.q_proj.lora_A" in key:
        t = t.clone()
        t[0, 0] = float("nan")
    return t


def inf_in_expert_b(key, t):
    return torch.full_like(t, float("inf")) if "experts" in key and "lora_B" in key else t


def nan_everywhere(key, t):
    return torch.full_like(t, float("nan"))


def float16_overflow(key, t):
    """LoRA A that stays finite in float16 (largest |a| 6e4) but whose shrink overflows it."""
    return t * (6e4 / t.abs().max()) if "lora_A" in key else t


POISONS = {"one_nan_in_q_proj_a": one_nan_in_q_proj_a, "inf_in_expert_b": inf_in_expert_b, "nan_everywhere": nan_everywhere}


def logits_of(model, handle, rows, ids):
    with torch.no_grad(), handle.adapters(rows):
        return model(ids).logits


@pytest.mark.parametrize("poison", list(POISONS))
def test_a_broken_adapter_is_refused_and_names_itself(poison, peft_adapters, tmp_path):
    """The issue's reproduction (a NaN in one q_proj lora_A turned every row of every batch NaN):
    an adapter with NaN or Inf weights is refused at load, naming it, its directory and the
    module; the resident adapters' rows are bit-identical to before, and so is patch_model's
    refusal of it among several."""
    made = peft_adapters(FAMILY)
    ids = batch_ids()
    model = tiny_model(FAMILY)
    handle = patch_model(model, {"a": made["a"][0], "b": made["b"][0]}, max_loras=3, max_rank=5)
    rows = ["a", None, "b", "a"]
    before = logits_of(model, handle, rows, ids)
    broken = poisoned_copy(made["a"][0], tmp_path, poison, POISONS[poison])
    with pytest.raises(ValueError, match=rf"adapter 'broken' \({broken}\): .*(lora_A|lora_B) holds NaN or Inf"):
        handle.load_adapter("broken", broken)
    assert handle.adapter_names == ["a", "b"]
    assert torch.equal(logits_of(model, handle, rows, ids), before)
    with pytest.raises(ValueError, match=r"adapter 'broken' .* holds NaN or Inf"):
        patch_model(tiny_model(FAMILY), {"a": made["a"][0], "broken": broken, "b": made["b"][0]})


def test_an_adapter_that_overflows_the_model_dtype_is_refused(peft_adapters, tmp_path):
    made = peft_adapters(FAMILY)
    model = tiny_model(FAMILY).to(torch.float16)
    handle = patch_model(model, {"a": made["a"][0]}, max_loras=2)
    huge = poisoned_copy(made["a"][0], tmp_path, "huge", lambda k, t: t * 1e6 if "lora_B" in k else t)
    with pytest.raises(ValueError, match=r"adapter 'huge' .*lora_B overflows torch.float16, the model's dtype"):
        handle.load_adapter("huge", huge)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_float16_overflow_stays_in_its_rows(device, peft_adapters, tmp_path):
    made = peft_adapters(FAMILY)
    ids = batch_ids().to(device)
    model = tiny_model(FAMILY).to(device=device, dtype=torch.float16)
    handle = patch_model(model, {"a": made["a"][0], "b": made["b"][0]}, max_loras=3, max_rank=5)
    clean = logits_of(model, handle, ["a", None, None, "b"], ids)
    handle.load_adapter("broken", poisoned_copy(made["c"][0], tmp_path, "overflow", float16_overflow))
    poisoned = logits_of(model, handle, ROWS, ids)
    for row in (0, 1, 3):
        assert torch.equal(poisoned[row], clean[row]), f"row {row} changed"
    assert not torch.isfinite(poisoned[2]).all()


def test_an_overflowing_adapter_changes_only_its_rows_when_compiled(peft_adapters, tmp_path):
    made = peft_adapters(FAMILY)
    ids = batch_ids()
    model = tiny_model(FAMILY).to(torch.float16)
    handle = patch_model(model, {"a": made["a"][0], "b": made["b"][0]}, max_loras=3, max_rank=5)
    handle.load_adapter("broken", poisoned_copy(made["c"][0], tmp_path, "overflow", float16_overflow))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        handle.set_adapters(["a", None, None, "b"])
        clean = compiled(ids).logits
        handle.set_adapters(ROWS)
        poisoned = compiled(ids).logits
        handle.set_adapters(None)
    torch._dynamo.reset()
    for row in (0, 1, 3):
        assert torch.equal(poisoned[row], clean[row]), f"row {row} changed"
    assert not torch.isfinite(poisoned[2]).all()


def test_threads_each_get_their_own_mapping(peft_adapters):
    """Two threads, each running its own adapter in ``adapters()`` blocks: every output is its own
    adapter's, and the model is unmapped after both exit."""
    made = peft_adapters(FAMILY)
    ids = batch_ids()
    model = tiny_model(FAMILY)
    handle = patch_model(model, {"a": made["a"][0], "b": made["b"][0]})
    expected = {name: logits_of(model, handle, [name] * 4, ids) for name in ("a", "b")}
    base = logits_of(model, handle, None, ids)
    wrong = []

    def worker(name):
        for _ in range(15):
            with torch.no_grad(), handle.adapters([name] * 4):
                out = model(ids).logits
            if not torch.equal(out, expected[name]):
                wrong.append(name)

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"{len(wrong)} of 30 outputs used another thread's adapter"
    assert handle.mapping.row_slot is None
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


def test_a_forward_waits_for_another_threads_block(peft_adapters):
    """A plain call from another thread while a block is open runs after the block, unmapped."""
    made = peft_adapters(FAMILY)
    ids = batch_ids()
    model = tiny_model(FAMILY)
    handle = patch_model(model, {"a": made["a"][0]})
    base = logits_of(model, handle, None, ids)
    entered, result = threading.Event(), {}

    def other():
        entered.wait()
        with torch.no_grad():
            result["logits"] = model(ids).logits
        result["done"] = time.monotonic()

    thread = threading.Thread(target=other)
    thread.start()
    with handle.adapters(["a"] * 4):
        entered.set()
        time.sleep(0.3)
        assert "done" not in result, "the other thread's forward ran inside this thread's block"
        exited = time.monotonic()
    thread.join()
    assert result["done"] >= exited
    assert torch.equal(result["logits"], base)


def test_nested_blocks_and_unloads_restore_what_was_there(peft_adapters):
    made = peft_adapters(FAMILY)
    model = tiny_model(FAMILY)
    handle = patch_model(model, {n: made[n][0] for n in ("a", "b", "c")})
    with handle.adapters(["a", None, "a", "b"]):
        with handle.adapters(["c", "c", None, None]):
            with pytest.raises(ValueError, match="'a' is in the mapping an enclosing adapters\\(\\) block restores"):
                handle.unload_adapter("a")
            with pytest.raises(ValueError, match="'c' is mapped"):
                handle.unload_adapter("c")
            with pytest.raises(RuntimeError, match="inside an adapters"):
                handle.unpatch()
        assert handle.mapping.slots == [0, -1, 0, 1]
        with pytest.raises(ZeroDivisionError), handle.adapters(["b"] * 4):
            1 / 0
        assert handle.mapping.slots == [0, -1, 0, 1]
        handle.unload_adapter("c")
    assert handle.mapping.row_slot is None and handle.adapter_names == ["a", "b"]


@pytest.mark.parametrize(
    "names, error, message",
    [
        ("abc", TypeError, r"for one row, write \['abc'\]"),
        (["a", 3], TypeError, r"adapter names \(str\) or None, got \[3\]"),
        ([], ValueError, "names is empty"),
        (["zzz"], KeyError, "'zzz'"),
        (5, TypeError, "sequence of adapter names"),
    ],
)
def test_bad_mappings_are_refused(names, error, message, peft_adapters):
    made = peft_adapters(FAMILY)
    handle = patch_model(tiny_model(FAMILY), {"a": made["a"][0]})
    with pytest.raises(error, match=message):
        handle.set_adapters(names)
    with pytest.raises(error, match=message):
        with handle.adapters(names):
            pass
    assert handle.mapping.row_slot is None


@pytest.mark.parametrize("targets", ["linears_and_experts", "experts_only"])
def test_inner_model_call_must_match_the_mapping(targets, tmp_path):
    """``model.model(one_row)`` under a two-row mapping bypasses the top-level check; the patched
    layers refuse it instead of splitting the row's tokens between adapters."""
    config = dict(r=2, lora_alpha=4, target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    if targets == "linears_and_experts":
        config["target_modules"] = ["q_proj"]
    made = make_peft_adapters(FAMILY, tmp_path, {"a": config})
    model = tiny_model(FAMILY)
    handle = patch_model(model, {"a": made["a"][0]})
    with torch.no_grad(), handle.adapters(["a", None]):
        with pytest.raises(ValueError, match="got a batch of 1 rows but set_adapters was given 2 names"):
            model.model(batch_ids(1, 6))
        model.model(batch_ids(2, 6))


def test_fused_experts_refuses_lora_without_token_lora():
    E, H, I = 3, 8, 4
    slots = ExpertLoRASlots(2, E, H, I, 2)
    x, ids, weights = torch.randn(5, H), torch.randint(0, E, (5, 2)), torch.rand(5, 2)
    with pytest.raises(ValueError, match="lora was given without token_lora"):
        fused_experts(x, ids, weights, torch.randn(E, 2 * I, H), torch.randn(E, H, I), lora=slots.weights)


def test_slot_writes_refuse_integer_and_complex_tensors():
    E, H, I = 2, 8, 4
    slots = ExpertLoRASlots(2, E, H, I, 2)
    for bad in (torch.ones(E, 2, H, dtype=torch.int64), torch.ones(E, 2, H, dtype=torch.complex64)):
        with pytest.raises(TypeError, match="gate_up A must be a real floating-point tensor"):
            slots.set_slot(0, gate_up=(bad, torch.ones(E, 2 * I, 2)))
    with pytest.raises(TypeError, match="down_scale must be a real number"):
        slots.set_slot(0, down=(torch.ones(E, 2, I), torch.ones(E, H, 2)), down_scale="2")
    linear = MultiLoRALinear(torch.nn.Linear(8, 4), 2, 2, SlotMapping(2))
    with pytest.raises(TypeError, match="b must be a real floating-point tensor"):
        linear.set_slot(0, torch.ones(2, 8), torch.ones(4, 2, dtype=torch.int32), 1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e6])
def test_slot_writes_refuse_non_finite_values_and_leave_the_slot_as_it_was(bad):
    """A NaN, an Inf or a value that overflows the table's dtype (float16 here) is refused before the
    slot changes; a later write of a lower rank leaves nothing of the higher-rank adapter it replaces."""
    E, H, I, R = 2, 8, 4, 4
    slots = ExpertLoRASlots(2, E, H, I, R, split_gate_up=True, interleaved=True, dtype=torch.float16)
    linear = MultiLoRALinear(torch.nn.Linear(H, I).half(), 2, R, SlotMapping(2))
    pair = lambda r, i, o: (torch.rand(E, r, i) + 0.5, torch.rand(E, o, r) + 0.5)  # noqa: E731
    slots.set_slot(1, gate=pair(R, H, I), up=pair(R, H, I), down=pair(R, I, H), gate_up_scale=2.0)
    linear.set_slot(1, torch.rand(R, H), torch.rand(I, R), 2.0)
    before = [t.clone() for t in (*slots.weights, linear.lora_a, linear.lora_b, linear.lora_scale)]
    for role in ("gate", "up", "down"):
        a, b = pair(2, I if role == "down" else H, H if role == "down" else I)
        b[0, 1, 1] = bad
        with pytest.raises(ValueError, match=f"{role} B holds NaN or Inf in the table's dtype torch.float16"):
            slots.set_slot(1, **{role: (a, b)})
    with pytest.raises(ValueError, match="must be finite in the table's dtype torch.float16"):
        linear.set_slot(1, torch.full((2, H), bad), torch.rand(I, 2), 1.0)
    after = [*slots.weights, linear.lora_a, linear.lora_b, linear.lora_scale]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    gate, down = pair(2, H, I), pair(1, I, H)
    slots.set_slot(1, gate=gate, down=down, down_scale=0.5)
    w = slots.weights
    assert torch.equal(w.gate_up_a[1, :, :2], gate[0].half()) and not w.gate_up_a[1, :, 2:].any()
    assert torch.equal(w.gate_up_b[1, :, 0::2, :2], gate[1].half()) and not w.gate_up_b[1, :, 1::2].any()
    assert not w.gate_up_b[1, :, :, 2:].any() and torch.equal(w.down_b[1, :, :, :1], down[1].half())
    assert not w.down_a[1, :, 1:].any() and not w.down_b[1, :, :, 1:].any()
    assert w.gate_up_scale[1] == 1.0 and w.down_scale[1] == 0.5 and not any(t[0].any() for t in w)


def test_import_registers_every_op():
    code = "import torch, torch_moe_lora; torch.ops.moe_lora.align_block_size; torch.ops.moe_lora.add_lora_linear"
    subprocess.run([sys.executable, "-c", code], check=True)

