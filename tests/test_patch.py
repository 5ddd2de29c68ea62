"""``patch_model`` against PEFT itself, on tiny random models of every registered family.

For each family the three adapters of ``utils.ADAPTERS`` are made with PEFT (experts through
``target_parameters``, attention, shared-expert and dense-MLP linears through ``target_modules``;
random non-zero B; different ranks; one with ``rank_pattern``/``alpha_pattern``, one with
``use_rslora``) and saved. The patched model runs a mixed batch (rows on different adapters, one on
none) and must give, row by row, the logits and greedy tokens of the PEFT model of that row's
adapter run alone. Also: live load/unload, ``torch.compile`` without graph breaks or recompiles, the
batch checks, ``unpatch``, and ``MultiLoRALinear`` against a per-token loop. Runs on transformers
5.17 and 5.24.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM
from utils import (
    ADAPTERS,
    COMMON,
    GENERATE,
    ROWS,
    TINY,
    assert_error_is_pefts_own,
    assert_rows_match,
    batch_ids,
    requires_cuda,
    row_references,
    seed_all,
    tiny_model,
)

from torch_moe_lora import patch_model
from torch_moe_lora.linear import MultiLoRALinear, SharedInputGroup, SlotMapping
from torch_moe_lora.models import find_moe_blocks


def linear_names(handle) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name in handle._linears}


@pytest.mark.parametrize("family", list(TINY))
def test_mixed_batch_matches_peft(family, peft_adapters):
    made = peft_adapters(family)
    base = tiny_model(family)
    models = {None: base, **{name: peft_model for name, (_, peft_model) in made.items()}}
    ids = batch_ids()
    ref_logits, ref_tokens = row_references(ROWS, models, ids)
    with torch.no_grad():
        base_logits = base(ids).logits

    model = tiny_model(family)
    handle = patch_model(model, {name: path for name, (path, _) in made.items()})
    assert handle.adapter_names == list(ADAPTERS) and handle.max_rank == 5 and handle.max_loras == 3
    assert {"q_proj", "v_proj"} & linear_names(handle) or {"kv_a_proj_with_mqa"} & linear_names(handle)
    with torch.no_grad(), handle.adapters(ROWS):
        logits = model(ids).logits
        tokens = model.generate(ids, **GENERATE)
    assert_rows_match(logits, ref_logits, ROWS, f"{family} mixed batch vs PEFT")
    lora_effect = (ref_logits - base_logits).abs().amax(dim=(1, 2))
    assert all(lora_effect[i] > 0.05 * ref_logits.abs().max() for i, n in enumerate(ROWS) if n is not None)
    assert torch.equal(tokens, ref_tokens), f"{family}: greedy tokens {tokens.tolist()} != PEFT {ref_tokens.tolist()}"

    with torch.no_grad():
        unmapped = model(ids).logits
        with handle.adapters([None] * len(ROWS)):
            all_none = model(ids).logits
    assert_rows_match(unmapped, base_logits, ROWS, f"{family} no mapping vs unpatched", rel=1e-5)
    assert_rows_match(all_none, base_logits, ROWS, f"{family} all rows None vs unpatched", rel=1e-5)


@requires_cuda
@pytest.mark.parametrize("family", list(TINY))
def test_mixed_batch_matches_peft_on_gpu(family, peft_adapters):
    """The GPU path (Triton kernels): float32 logits and greedy tokens equal PEFT's per row; in bf16
    the patched model's error against float32 PEFT is at most twice PEFT's own bf16 error (+1e-3)."""
    made = peft_adapters(family)
    models = {None: tiny_model(family).cuda(), **{n: copy.deepcopy(m).cuda() for n, (_, m) in made.items()}}
    ids = batch_ids().cuda()
    ref_logits, ref_tokens = row_references(ROWS, models, ids)
    model = tiny_model(family).cuda()
    handle = patch_model(model, {name: path for name, (path, _) in made.items()})
    with torch.no_grad(), handle.adapters(ROWS):
        logits = model(ids).logits
        tokens = model.generate(ids, **GENERATE)
    assert_rows_match(logits, ref_logits, ROWS, f"{family} GPU float32 mixed batch vs PEFT")
    assert torch.equal(tokens, ref_tokens), (
        f"{family}: GPU greedy tokens {tokens.tolist()} != PEFT {ref_tokens.tolist()}"
    )

    bf16_models = {n: copy.deepcopy(m).to(torch.bfloat16) for n, m in models.items()}
    with torch.no_grad():
        peft_bf16 = torch.stack([bf16_models[n](input_ids=ids[i : i + 1]).logits[0] for i, n in enumerate(ROWS)])
    model_bf16 = tiny_model(family).cuda().to(torch.bfloat16)
    handle_bf16 = patch_model(model_bf16, {name: path for name, (path, _) in made.items()})
    with torch.no_grad(), handle_bf16.adapters(ROWS):
        ours_bf16 = model_bf16(ids).logits
    assert_error_is_pefts_own(ours_bf16, peft_bf16, ref_logits, f"{family} GPU bf16")


@requires_cuda
def test_patched_layers_never_wait_on_the_device_on_gpu(peft_adapters):
    """Eager calls of every patched experts module and linear, with a mapping per batch row and with
    a packed (per-token) one, never synchronize the host with the device: each layer's call, recorded
    in a forward and made again under ``torch.cuda.set_sync_debug_mode("error")``, raises on any sync."""
    family = "qwen3_moe"
    made = peft_adapters(family)
    model = tiny_model(family).cuda()
    handle = patch_model(model, {name: path for name, (path, _) in made.items()})
    layers = [b.experts for b in find_moe_blocks(model)]
    layers += [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: calls.append((m, a, k)), with_kwargs=True)
             for layer in layers]  # fmt: skip
    ids = batch_ids().cuda()
    packed = dict(names=["a", None, "c"], lengths=[5, 4, 3], ids=ids.view(1, -1)[:, :12])
    mappings = [dict(names=ROWS, ids=ids), packed]
    try:
        for mapping in mappings:
            with torch.no_grad(), handle.adapters(mapping["names"], lengths=mapping.get("lengths")):
                calls.clear()
                model(mapping["ids"])  # records every layer's call (and compiles the kernels)
                recorded = list(calls)  # the calls below are recorded too
                assert {id(m) for m, _, _ in recorded} == {id(layer) for layer in layers}
                want = [m(*a, **k) for m, a, k in recorded]
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    got = [m(*a, **k) for m, a, k in recorded]
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            for g, w in zip(got, want):
                assert torch.equal(g, w)
    finally:
        for hook in hooks:
            hook.remove()


def test_load_and_unload_live(peft_adapters):
    family = "qwen3_moe"
    made = peft_adapters(family)
    models = {None: tiny_model(family), **{name: peft_model for name, (_, peft_model) in made.items()}}
    ids = batch_ids()
    model = tiny_model(family)
    handle = patch_model(model, {"a": made["a"][0], "b": made["b"][0]}, max_loras=3, max_rank=5)

    def run(rows):
        ref = torch.stack([models[n](input_ids=ids[i : i + 1]).logits[0] for i, n in enumerate(rows)])
        with handle.adapters(rows):
            out = model(ids).logits
        assert_rows_match(out, ref, rows, f"live {rows}")

    with torch.no_grad():
        run(["a", "b", None, "a"])
        assert handle.load_adapter("c", made["c"][0]) == 2
        run(["c", "a", None, "b"])
        handle.unload_adapter("b")
        assert handle.adapter_names == ["a", "c"]
        run(["c", None, "a", "a"])
        with handle.adapters(["c", None, "a", "a"]), pytest.raises(ValueError, match="'c' is mapped"):
            handle.unload_adapter("c")
        assert handle.load_adapter("b2", made["b"][0]) == 1
        # Every slot taken: c, the least recently used adapter, gives up its slot and stays registered.
        assert handle.load_adapter("d", made["c"][0]) == 2
        assert handle.adapter_names == ["a", "b2", "d"] and handle.registered_adapters == ["a", "c", "b2", "d"]
        with handle.adapters(["a", "b2", "d", None]), pytest.raises(ValueError, match="all 3 slots are used"):
            handle.load_adapter("e", made["c"][0])
        assert "e" not in handle.registered_adapters
        with pytest.raises(ValueError, match="'a' is already loaded"):
            handle.load_adapter("a", made["a"][0])
        models["b2"], models["d"] = models["b"], models["c"]
        run(["b2", "c", "a", None])  # c swaps back in, into the slot of d
        assert handle.slot_of("c") == 2 and handle.slot_of("d") is None
        run(["d", "c", "b2", None])  # d takes the slot of a, the one adapter this mapping does not name
        assert handle.slot_of("d") == 0 and handle.slot_of("a") is None
        with pytest.raises(ValueError, match=r"\['a'\] need 1 slot but only 0 of the 3 can be freed"):
            handle.set_adapters(["a", "b2", "c", "d"])


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_next", "deepseek_v3", "gpt_oss", "llama4"])
def test_compile_has_no_graph_break_or_recompile(family, peft_adapters):
    """``torch.compile(fullgraph=True)`` traces the patched model in one graph; remapping rows and
    loading an adapter into a free slot reuse it."""
    from torch._dynamo.testing import CompileCounterWithBackend

    made = peft_adapters(family)
    model = tiny_model(family)
    handle = patch_model(model, {"a": made["a"][0], "b": made["b"][0]}, max_loras=3, max_rank=5)
    ids = batch_ids()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        for rows, load in ((["a", "b", None, "a"], None), (["b", None, "a", "a"], None), (["c", "a", None, "b"], "c")):
            if load:
                handle.load_adapter(load, made[load][0])
            handle.set_adapters(rows)
            out, ref = compiled(ids).logits, model(ids).logits
            assert_rows_match(out, ref, rows, f"{family} compiled vs eager", rel=1e-5)
    print(f"{family}: frames compiled {backend.frame_count}, counters {dict(torch._dynamo.utils.counters)}")
    assert backend.frame_count == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    torch._dynamo.reset()


@requires_cuda
def test_compiled_reduce_overhead_on_gpu(peft_adapters):
    """``torch.compile(mode="reduce-overhead")`` (CUDA graphs) on a patched model: one graph, no graph
    break, right answers after remapping rows and loading an adapter into a free slot."""
    family = "qwen3_moe"
    made = peft_adapters(family)
    model = tiny_model(family).cuda()
    handle = patch_model(model, {"a": made["a"][0], "b": made["b"][0]}, max_loras=3, max_rank=5)
    ids = batch_ids().cuda()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for rows, load in ((["a", "b", None, "a"], None), (["b", None, "a", "a"], None), (["c", "a", None, "b"], "c")):
            if load:
                handle.load_adapter(load, made[load][0])
            handle.set_adapters(rows)
            for _ in range(3):
                out = compiled(ids).logits.clone()
            assert_rows_match(out, model(ids).logits, rows, f"{family} reduce-overhead vs eager", rel=1e-4)
    counters = torch._dynamo.utils.counters
    print(f"{family} reduce-overhead: {dict(counters['stats'])}")
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    assert not counters["inductor"]["cudagraph_skips"]  # the graph runs as a CUDA graph, not as plain launches
    torch._dynamo.reset()


def test_batch_must_match_the_mapping(peft_adapters):
    made = peft_adapters("qwen3_moe")
    model = tiny_model("qwen3_moe")
    handle = patch_model(model, {"a": made["a"][0]})
    with handle.adapters(["a", None, "a", None]), torch.no_grad():
        with pytest.raises(ValueError, match="batch has 2 rows but set_adapters was given 4"):
            model(batch_ids(2))
        with pytest.raises(KeyError, match="'zzz'"):
            handle.set_adapters(["zzz"] * 4)
    with pytest.raises(ValueError, match="not a multiple of the 3 batch rows"):
        handle.mapping.set([0, 0, -1], torch.device("cpu"))
        handle.mapping.token_slots(7, torch.device("cpu"))


def test_unpatch_restores_the_model(peft_adapters):
    made = peft_adapters("llama4")
    model = tiny_model("llama4")
    ids = batch_ids()
    with torch.no_grad():
        expected = model(ids).logits
        state = {k: v.clone() for k, v in model.state_dict().items()}
        handle = patch_model(model, {name: path for name, (path, _) in made.items()})
        assert model.state_dict().keys() == state.keys()
        assert handle.unpatch() is model
        assert not any(isinstance(m, MultiLoRALinear) for m in model.modules())
        assert torch.equal(model(ids).logits, expected)
    patch_model(model, {"a": made["a"][0]})


def test_patch_refusals():
    model = tiny_model("qwen3_moe")
    with pytest.raises(ValueError, match="parallelism must be one of"):
        patch_model(model, {}, max_loras=2, max_rank=4, process_group=object(), parallelism="pipeline")
    with pytest.raises(ValueError, match="give max_loras and max_rank"):
        patch_model(model, {})
    dense = AutoModelForCausalLM.from_config(transformers.LlamaConfig(**COMMON, intermediate_size=48))
    with pytest.raises(NotImplementedError, match="has no supported MoE block"):
        patch_model(dense, {}, max_loras=1, max_rank=1)
    patch_model(model, {}, max_loras=1, max_rank=2)
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, {}, max_loras=1, max_rank=2)


def test_multi_lora_linear_matches_a_token_loop():
    seed_all(0)
    linear = nn.Linear(12, 10)
    linear.forward = lambda x: nn.Linear.forward(linear, x)  # a forward on the instance, as accelerate sets one
    linear.tag = "kept"
    row_slots = SlotMapping(3)
    wrapped = MultiLoRALinear(linear, num_slots=3, max_rank=4, row_slots=row_slots)
    loras = {slot: (torch.randn(rank, 12), torch.randn(10, rank), 0.5 * slot + 0.25) for slot, rank in ((0, 4), (2, 1))}
    for slot, (a, b, scale) in loras.items():
        wrapped.set_slot(slot, a, b, scale)
    x = torch.randn(4, 5, 12)
    assert torch.equal(wrapped(x), linear(x))
    row_slot = [2, -1, 0, 1]
    row_slots.set(row_slot, torch.device("cpu"))
    out = wrapped(x)
    for row, slot in enumerate(row_slot):
        expected = linear(x[row])
        if slot in loras:
            a, b, scale = loras[slot]
            expected = expected + scale * (x[row] @ a.T) @ b.T
        torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-5)
    assert wrapped.state_dict().keys() == linear.state_dict().keys()
    assert wrapped.weight is linear.weight and wrapped.bias is linear.bias and wrapped.tag == "kept"
    with pytest.raises(ValueError, match="rank 5 > max_rank 4"):
        wrapped.set_slot(1, torch.randn(5, 12), torch.randn(10, 5), 1.0)


class _LinearOpCalls(TorchDispatchMode):
    """Counts ``moe_lora::add_lora_linear`` calls (eager public calls go through the op under a mode)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.moe_lora.add_lora_linear.default
        return func(*args, **(kwargs or {}))


def test_shared_input_linears_share_one_lora_call(peft_adapters):
    """q, k and v (and gate and up) of a layer run their LoRAs in one op call, and the logits equal,
    bit for bit, those of the same model with every linear on its own."""
    made = peft_adapters("qwen3_moe")
    model = tiny_model("qwen3_moe")
    handle = patch_model(model, {name: path for name, (path, _) in made.items()})
    wrapped = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    attention = next(m for m in model.modules() if isinstance(getattr(m, "q_proj", None), MultiLoRALinear))
    assert attention.q_proj.shared_input.members == [attention.q_proj, attention.k_proj, attention.v_proj]
    groups = {id(m.shared_input): m.shared_input for m in wrapped if m.shared_input is not None}.values()
    ids = batch_ids()
    with torch.no_grad(), handle.adapters(ROWS):
        with _LinearOpCalls() as grouped:
            logits = model(ids).logits
        assert all(group.pending is None for group in groups)
        for m in wrapped:
            SharedInputGroup.join([m])
        with _LinearOpCalls() as alone:
            alone_logits = model(ids).logits
    assert torch.equal(logits, alone_logits)
    assert alone.count == len(wrapped) and grouped.count == len(wrapped) - sum(len(g.members) - 1 for g in groups)
    assert grouped.count < alone.count


def test_shared_input_group_gives_each_member_its_own_output_in_any_order():
    seed_all(0)
    mapping = SlotMapping(2)
    layers = [MultiLoRALinear(nn.Linear(6, width), num_slots=2, max_rank=3, row_slots=mapping) for width in (5, 4, 4)]
    for j, layer in enumerate(layers):
        for slot in range(2):
            layer.set_slot(slot, torch.randn(3, 6), torch.randn(layer.out_features, 3), 0.5 + j)
    x = torch.randn(2, 3, 6)
    mapping.set([1, 0], torch.device("cpu"))
    with torch.no_grad():
        want = [layer(x) for layer in layers]
        SharedInputGroup.join(layers)
        group = layers[0].shared_input
        for order in ([0, 1, 2], [2, 0, 1], [1, 1, 0, 2]):  # a member called again computes the group anew
            for j in order:
                assert torch.equal(layers[j](x), want[j]), f"member {j} in order {order}"
            assert group.pending is None
        assert torch.equal(layers[1](x), want[1]) and torch.equal(layers[2](x.clone()), want[2])  # another tensor
        compiled = torch.compile(lambda x: [layer(x) for layer in layers], fullgraph=True, backend="aot_eager")
        for got, expected in zip(compiled(torch.cat([x[:1], x[1:]])), want):
            torch.testing.assert_close(got, expected)
    assert group.pending is None  # the compiled call took every output it kept
    torch._dynamo.reset()


def test_routing_and_dense_layers_stay_the_models_own(peft_adapters):
    """Only targeted linears are wrapped; routers, experts' parameters and the rest are untouched."""
    made = peft_adapters("deepseek_v3")
    model = tiny_model("deepseek_v3")
    params = dict(model.named_parameters())
    handle = patch_model(model, {name: path for name, (path, _) in made.items()})
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    wrapped = set(handle._linears)
    assert "model.layers.1.mlp.shared_experts.gate_proj" in wrapped and "model.layers.0.mlp.down_proj" in wrapped
    assert not any(name.endswith(".gate") for name in wrapped)
    assert [b.name for b in find_moe_blocks(model)] == [b.name for b in handle.blocks]


@pytest.mark.parametrize("family", ["qwen3_moe", "llama4"])
def test_bfloat16_error_is_pefts_own(family, peft_adapters):
    """In bfloat16 the patched model's error against PEFT in float32 is at most 2x PEFT's bfloat16 error."""
    made = peft_adapters(family)
    ids = batch_ids()
    with torch.no_grad():
        fp32 = {None: tiny_model(family), **{n: m for n, (_, m) in made.items()}}
        ref32 = torch.stack([fp32[n](input_ids=ids[i : i + 1]).logits[0] for i, n in enumerate(ROWS)])
        bf16 = {n: copy.deepcopy(m).to(torch.bfloat16) for n, m in fp32.items()}
        peft16 = torch.stack([bf16[n](input_ids=ids[i : i + 1]).logits[0].float() for i, n in enumerate(ROWS)])
        model = tiny_model(family).to(torch.bfloat16)
        handle = patch_model(model, {name: path for name, (path, _) in made.items()})
        with handle.adapters(ROWS):
            ours16 = model(ids).logits.float()
    assert_error_is_pefts_own(ours16, peft16, ref32, f"{family} bfloat16")
