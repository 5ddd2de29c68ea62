"""The fused experts op against the eager reference: values, registration, compile, bad input."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from expecttest import TestCase
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from utils import (
    HAS_CUDA,
    NONFINITE_B,
    POISONS,
    assert_close_verbose,
    assert_poison_stays_in_its_rows,
    make_problem,
    problems,
)

from torch_moe_lora import ExpertLoRASlots, LoRAWeights, fused_experts
from torch_moe_lora.ops.fused_experts import ExpertOptions
from torch_moe_lora.reference import fused_experts_ref

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def run_and_compare(problem, device, what):
    problem = problem.to(device)
    out = fused_experts(problem.x, problem.topk_ids, problem.topk_weights, problem.w13, problem.w2, **problem.kwargs())
    ref = fused_experts_ref(
        problem.x, problem.topk_ids, problem.topk_weights, problem.w13, problem.w2, **problem.kwargs()
    )
    assert out.dtype == problem.x.dtype and out.shape == problem.x.shape
    assert_close_verbose(out, ref, problem.x.dtype, what)


@pytest.mark.parametrize("device", DEVICES)
@given(problem=problems())
def test_matches_reference(device, problem):
    run_and_compare(problem, device, "fused_experts")


@pytest.mark.parametrize("device", DEVICES)
@given(problem=problems().filter(lambda p: p.lora is not None), data=st.data())
def test_a_poisoned_slot_changes_no_other_token(device, problem, data):
    """The registered op: NaN, Inf or overflow in one slot leaves every token of the other slots,
    and every token without an adapter, bit-identical (a non-finite B: on the PyTorch path)."""
    problem = problem.to(device)
    victim = data.draw(st.integers(0, problem.lora.num_slots - 1))
    poison = data.draw(st.sampled_from(sorted(POISONS) + (sorted(NONFINITE_B) if device == "cpu" else [])))

    def run(p):
        return fused_experts(p.x, p.topk_ids, p.topk_weights, p.w13, p.w2, **p.kwargs())

    assert_poison_stays_in_its_rows(run, problem, victim, poison)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mixed_adapters_fixed_case(device, dtype):
    problem = make_problem(T=33, H=64, I=48, E=8, K=2, L=5, R=8, dtype=dtype, ranks=[1, 8, 3, 8, 5], bias=True)
    run_and_compare(problem, device, "fixed case")


def merged_weights(w13, w2, slots: ExpertLoRASlots, adapter: dict, gate_rows: torch.Tensor):
    """The adapter merged into dense weights, the way PEFT's merge would do it (independent of the op's LoRA path)."""
    w13, w2 = w13.clone().double(), w2.clone().double()
    if "gate_up" in adapter:
        a, b = adapter["gate_up"]
        w13 += adapter["gate_up_scale"] * (b.double() @ a.double())
    for name, rows in (("gate", gate_rows), ("up", ~gate_rows)):
        if name in adapter:
            a, b = adapter[name]
            w13[:, rows] += adapter["gate_up_scale"] * (b.double() @ a.double())
    a, b = adapter["down"]
    w2 += adapter["down_scale"] * (b.double() @ a.double())
    return w13, w2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_slot_table_is_lossless_against_merged_weights(device, interleaved):
    """Adapters of different ranks, joint and separate gate/up, share one split table without loss."""
    g = torch.Generator().manual_seed(1)
    T, H, I, E, K, R = 40, 32, 16, 6, 2, 8
    rand = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    adapters = [
        dict(gate_up=(rand(E, 3, H), rand(E, 2 * I, 3)), down=(rand(E, 3, I), rand(E, H, 3))),
        dict(gate=(rand(E, 8, H), rand(E, I, 8)), up=(rand(E, 2, H), rand(E, I, 2)), down=(rand(E, 5, I), rand(E, H, 5))),
        dict(gate_up=(rand(E, 8, H), rand(E, 2 * I, 8)), down=(rand(E, 1, I), rand(E, H, 1))),
    ]
    slots = ExpertLoRASlots(len(adapters), E, H, I, R, split_gate_up=True, interleaved=interleaved)
    for slot, adapter in enumerate(adapters):
        adapter.update(gate_up_scale=0.5 + slot, down_scale=2.0 - slot)
        slots.set_slot(slot, **adapter)
    x, w13, w2 = rand(T, H) * 3, rand(E, 2 * I, H), rand(E, H, I)
    topk_ids = torch.randint(0, E, (T, K), generator=g)
    topk_weights = torch.rand(T, K, generator=g)
    token_lora = torch.arange(T) % (len(adapters) + 1) - 1
    opts = dict(interleaved=interleaved, activation="gelu")
    out = fused_experts(
        *(t.to(device) for t in (x, topk_ids, topk_weights, w13, w2)),
        token_lora=token_lora.to(device),
        lora=LoRAWeights(*(t.to(device) for t in slots.weights)),
        **opts,
    ).cpu()
    gate_rows = torch.arange(2 * I) % 2 == 0 if interleaved else torch.arange(2 * I) < I
    expected = fused_experts_ref(x, topk_ids, topk_weights, w13, w2, **opts)
    for slot, adapter in enumerate(adapters):
        rows = token_lora == slot
        mw13, mw2 = merged_weights(w13, w2, slots, adapter, gate_rows)
        expected[rows] = fused_experts_ref(x[rows], topk_ids[rows], topk_weights[rows], mw13, mw2, **opts)
    assert_close_verbose(out, expected, torch.float32, "slot table vs merged weights")


class SchemaTest(TestCase):
    def test_fused_experts_schema(self):
        self.assertExpectedInline(
            str(torch.ops.moe_lora.fused_experts.default._schema),
            """moe_lora::fused_experts(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor w13, Tensor w2, Tensor? w13_bias, Tensor? w2_bias, Tensor? token_lora, Tensor? gate_up_a, Tensor? gate_up_b, Tensor? down_a, Tensor? down_b, Tensor? gate_up_scale, Tensor? down_scale, str activation, bool gated, bool interleaved, float swiglu_alpha, float swiglu_limit, bool weight_on_input, Tensor? w13_scale=None, Tensor? w2_scale=None, SymInt block_n=0, SymInt block_k=0) -> Tensor""",
        )


def op_args(problem):
    """The registered op's flat argument list for ``problem``."""
    lora = tuple(problem.lora) if problem.lora is not None else (None,) * 6
    return (
        problem.x, problem.topk_ids, problem.topk_weights, problem.w13, problem.w2,
        problem.w13_bias, problem.w2_bias, problem.token_lora, *lora, *ExpertOptions(**problem.options),
    )  # fmt: skip


OPCHECK_CASES = {
    "empty": dict(T=0, H=8, I=4, E=3, K=2, L=2, R=2),
    "one_token": dict(T=1, H=8, I=4, E=3, K=2, L=2, R=2),
    "no_lora": dict(T=5, H=16, I=8, E=4, K=2, L=0, R=2),
    "odd_sizes_bias_split": dict(T=7, H=24, I=12, E=5, K=3, L=3, R=3, bias=True, split_gate_up=True),
    "gpt_oss_like": dict(T=6, H=16, I=8, E=4, K=2, L=2, R=4, bias=True, interleaved=True, activation="swigluoai"),
    "ungated_bf16": dict(T=4, H=16, I=8, E=3, K=1, L=1, R=2, gated=False, activation="relu2", dtype=torch.bfloat16),
    "weight_on_input_fp16": dict(T=9, H=16, I=8, E=2, K=1, L=2, R=2, weight_on_input=True, dtype=torch.float16),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck(device, case):
    problem = make_problem(**OPCHECK_CASES[case]).to(device)
    torch.library.opcheck(torch.ops.moe_lora.fused_experts.default, op_args(problem))


class RecordedOps(TorchDispatchMode):
    """Records the ops that reach the dispatcher's Python key (a custom op as one call)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_public_function_is_one_call_of_the_registered_op(device):
    """``fused_experts`` is one call of ``torch.ops.moe_lora.fused_experts`` (what torch.compile,
    opcheck and the CUDA kernel registration see), its arguments in the schema's places: the op
    called with ``op_args`` gives the same bits. Every option is off its default and the two LoRA
    scales differ, so an argument dropped or put in another's place changes the output."""
    problem = make_problem(T=9, H=16, I=8, E=4, K=2, L=3, R=4, bias=True, split_gate_up=True, interleaved=True)
    problem.options.update(activation="swigluoai", swiglu_alpha=1.3, swiglu_limit=1.5, weight_on_input=True)
    problem = problem.to(device)
    args = (problem.x, problem.topk_ids, problem.topk_weights, problem.w13, problem.w2)
    with RecordedOps() as recorded:
        out = fused_experts(*args, **problem.kwargs())
    assert recorded.ops == [torch.ops.moe_lora.fused_experts.default], recorded.ops
    assert torch.equal(out, torch.ops.moe_lora.fused_experts.default(*op_args(problem)))
    ref = fused_experts_ref(*args, **problem.kwargs())
    assert_close_verbose(out, ref, problem.x.dtype, "every option off its default")


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_no_recompile_on_mapping_change(device):
    torch._dynamo.reset()
    problem = make_problem(T=12, H=32, I=16, E=4, K=2, L=3, R=4, bias=True).to(device)

    def layer(x, ids, weights, token_lora):
        y = fused_experts(torch.tanh(x), ids, weights, problem.w13, problem.w2, token_lora=token_lora, lora=problem.lora)
        return y * 2 + x

    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    args = (problem.x, problem.topk_ids, problem.topk_weights)
    for mapping in (problem.token_lora, torch.full_like(problem.token_lora, -1), problem.token_lora.flip(0)):
        torch.testing.assert_close(compiled(*args, mapping), layer(*args, mapping))
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for 3 adapter mappings"


@pytest.mark.parametrize("device", DEVICES)
def test_compile_inductor_dynamic_tokens(device):
    torch._dynamo.reset()
    big = make_problem(T=20, H=32, I=16, E=4, K=2, L=2, R=4).to(device)
    compiled = torch.compile(
        lambda x, ids, w, tl: fused_experts(x, ids, w, big.w13, big.w2, token_lora=tl, lora=big.lora),
        fullgraph=True,
        dynamic=True,
    )
    for T in (20, 7, 1):
        args = (big.x[:T], big.topk_ids[:T], big.topk_weights[:T], big.token_lora[:T])
        ref = fused_experts(*args[:3], big.w13, big.w2, token_lora=args[3], lora=big.lora)
        torch.testing.assert_close(compiled(*args), ref)


BAD_INPUTS = [
    ("x", lambda p: dict(x=p.x[None]), ValueError, "x must be \\[T, H\\]"),
    ("x dtype", lambda p: dict(x=p.x.double()), TypeError, "x must be float32, float16 or bfloat16"),
    ("topk_ids rows", lambda p: dict(topk_ids=p.topk_ids[:-1]), ValueError, "topk_ids must be \\[T, K\\]"),
    ("topk_ids dtype", lambda p: dict(topk_ids=p.topk_ids.float()), TypeError, "topk_ids must be int32 or int64"),
    ("topk_weights", lambda p: dict(topk_weights=p.topk_weights[:, :1]), ValueError, "topk_weights must have shape"),
    ("w13 hidden", lambda p: dict(w13=p.w13[:, :, :-1]), ValueError, "w13 must have shape"),
    ("w13 odd rows", lambda p: dict(w13=p.w13[:, :-1]), ValueError, "even row count"),
    ("w2", lambda p: dict(w2=p.w2[:, :, :-1]), ValueError, "w2 must have shape"),
    ("w2 dtype", lambda p: dict(w2=p.w2.half()), TypeError, "w2 must have x's dtype"),
    ("token_lora length", lambda p: dict(token_lora=p.token_lora[:-1]), ValueError, "token_lora must have shape"),
    ("token_lora dtype", lambda p: dict(token_lora=p.token_lora.float()), TypeError, "token_lora must be int32"),
    ("slot too large", lambda p: dict(token_lora=torch.full_like(p.token_lora, 3)), ValueError, "token_lora values must be in \\[-1, 3\\)"),
    ("slot below -1", lambda p: dict(token_lora=torch.full_like(p.token_lora, -2)), ValueError, "token_lora values"),
    ("adapter without table", lambda p: dict(lora=None), ValueError, "token_lora values must be in \\[-1, 0\\)"),
    ("lora rank", lambda p: dict(lora=p.lora._replace(gate_up_a=p.lora.gate_up_a[:, :, :3])), ValueError, "gate_up_a's rank dim"),
    ("lora experts", lambda p: dict(lora=p.lora._replace(down_b=p.lora.down_b[:, :2])), ValueError, "down_b must have shape"),
    ("lora dtype", lambda p: dict(lora=p.lora._replace(down_a=p.lora.down_a.half())), TypeError, "down_a must have x's dtype"),
    ("scale dtype", lambda p: dict(lora=p.lora._replace(down_scale=p.lora.down_scale.double())), TypeError, "down_scale must be float32"),
    ("activation", lambda p: dict(activation="tanh"), ValueError, "activation must be one of"),
    ("bias", lambda p: dict(w2_bias=torch.zeros(3)), ValueError, "w2_bias must have shape"),
    ("device", lambda p: dict(token_lora=p.token_lora.to("meta")), ValueError, "token_lora is on meta"),
]


@pytest.mark.parametrize("name,change,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(name, change, exc, match):
    p = make_problem(T=6, H=16, I=8, E=4, K=2, L=3, R=4)
    args = dict(x=p.x, topk_ids=p.topk_ids, topk_weights=p.topk_weights, w13=p.w13, w2=p.w2)
    kwargs = dict(token_lora=p.token_lora, lora=p.lora)
    changed = change(p)
    for key in list(changed):
        (args if key in args else kwargs)[key] = changed[key]
    with pytest.raises(exc, match=match):
        fused_experts(*args.values(), **kwargs)
