"""``moe_lora::add_lora_linear`` (per-token LoRA on linear layers) against its eager reference.

Both implementations run everywhere: the PyTorch path on the CPU, and the Triton kernels compiled
on a GPU or in Triton's interpreter on CPU tensors (float32/float16 only there: the interpreter
computes ``tl.dot`` on bfloat16 operands wrongly). Rows without an adapter must come back
bit-identical, and a slot holding NaN, Inf or values that overflow must leave every other row
bit-identical to the run without it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from utils import HAS_CUDA, assert_close_verbose, interpreted_examples, requires_cuda

from torch_moe_lora import add_lora_linear, add_lora_linear_group, slot_segments
from torch_moe_lora.configs import LinearLoRAConfig, LinearLoRATiles
from torch_moe_lora.ops.lora_linear import add_lora_linear_torch, add_lora_linear_triton
from torch_moe_lora.reference import lora_linear_ref

DEVICE = "cuda" if HAS_CUDA else "cpu"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16) if HAS_CUDA else (torch.float32, torch.float16)
IMPLEMENTATIONS = ("torch", "triton")


def make_case(rows, tokens_per_row, slots, rank, in_features, out_features, dtype, device, seed, row_slot=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows * tokens_per_row, in_features, generator=g)
    a = torch.randn(slots, rank, in_features, generator=g) * in_features**-0.5
    b = torch.randn(slots, out_features, rank, generator=g) * max(rank, 1) ** -0.5
    for slot in range(slots):  # each slot's own rank <= R: the rest of the table stays zero
        own = int(torch.randint(0, rank + 1, (1,), generator=g))
        a[slot, own:], b[slot, :, own:] = 0, 0
    scale = torch.rand(slots, generator=g) + 0.5
    if row_slot is None:
        row_slot = torch.randint(-1, slots, (rows,), generator=g)
    base = torch.randn(rows * tokens_per_row, out_features, generator=g)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return dict(x=cast(x), a=cast(a), b=cast(b), scale=scale.to(device), row_slot=row_slot.to(device), base=cast(base))


def run(implementation, case, a=None, b=None, scale=None, config=None):
    out = case["base"].clone()
    row_order, slot_row_start = slot_segments(case["row_slot"], case["a"].shape[0])
    a, b = case["a"] if a is None else a, case["b"] if b is None else b
    scale = case["scale"] if scale is None else scale
    args = ([out], case["x"], row_order, slot_row_start, [a], [b], [scale])
    if implementation == "triton":
        add_lora_linear_triton(*args, config=config)
    else:
        add_lora_linear_torch(*args)
    return out


@st.composite
def linear_configs(draw):
    """Launch configs of the Triton kernels: small tiles, so that the cases' few tokens and input
    features span several blocks, column tiles and shrink splits (``k_per_program``)."""
    block_k = draw(st.sampled_from([16, 32]))
    tiles = lambda block: LinearLoRATiles(block=block, num_warps=draw(st.sampled_from([1, 4])), num_stages=draw(st.sampled_from([1, 2])))  # noqa: E731
    return LinearLoRAConfig(
        block_m=draw(st.sampled_from([16, 32])),
        shrink=tiles(block_k),
        expand=tiles(draw(st.sampled_from([16, 64]))),
        k_per_program=draw(st.sampled_from([None, block_k, 2 * block_k])),
    )


def expected(case):
    tokens_per_row = case["x"].shape[0] // case["row_slot"].shape[0]
    token_slot = case["row_slot"].repeat_interleave(tokens_per_row)
    return case["base"].double() + lora_linear_ref(case["x"], token_slot, case["a"], case["b"], case["scale"])


@st.composite
def cases(draw, dtypes):
    return make_case(
        rows=draw(st.integers(1, 9)),
        tokens_per_row=draw(st.sampled_from([1, 2, 3, 5])),
        slots=draw(st.integers(1, 5)),
        rank=draw(st.sampled_from([1, 2, 4, 7, 16, 20])),
        in_features=draw(st.sampled_from([1, 8, 24, 40, 130])),
        out_features=draw(st.sampled_from([1, 8, 17, 64, 200])),
        dtype=draw(st.sampled_from(dtypes)),
        device=DEVICE,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def check_matches_reference(implementation, case, config=None):
    if implementation == "torch":
        case = {k: v.cpu() for k, v in case.items()}
    out = run(implementation, case, config=config)
    assert_close_verbose(out, expected(case), case["x"].dtype, f"add_lora_linear {implementation}")
    tokens_per_row = case["x"].shape[0] // case["row_slot"].shape[0]
    untouched = (case["row_slot"] < 0).repeat_interleave(tokens_per_row)
    assert torch.equal(out[untouched], case["base"][untouched]), "rows without an adapter changed"


@given(case=cases((torch.float32, torch.float16, torch.bfloat16)))
def test_torch_matches_reference(case):
    check_matches_reference("torch", case)


@interpreted_examples(100)  # interpreted: 30-130 ms an example: 7-10 s on 2 CPU cores
@given(case=cases(TRITON_DTYPES), config=linear_configs())
def test_triton_matches_reference(case, config):
    check_matches_reference("triton", case, config)


POISONS = {
    "nan_in_a": lambda a, b, s, v: (a.index_fill(0, v, float("nan")), b, s),
    "inf_in_b": lambda a, b, s, v: (a, b.index_fill(0, v, float("inf")), s),
    "nan_one_entry_of_b": lambda a, b, s, v: (a, b.index_put((v, torch.zeros_like(v), torch.zeros_like(v)), torch.tensor(float("nan"), dtype=b.dtype, device=b.device)), s),
    "overflowing_scale": lambda a, b, s, v: (a, b, s.index_fill(0, v, 3e38)),
    "overflowing_weights": lambda a, b, s, v: (a.index_fill(0, v, 6e4 if a.dtype == torch.float16 else 3e38), b, s),
}  # fmt: skip


def check_poisoned_slot_changes_no_other_row(implementation, data, poison):
    """NaN, Inf or overflow in one resident slot: every row of the other slots, and every row
    without an adapter, is bit-identical to the run without the poison."""
    case = data.draw(cases(TRITON_DTYPES))
    if implementation == "torch":
        case = {k: v.cpu() for k, v in case.items()}
    slots = case["a"].shape[0]
    victim = torch.tensor([data.draw(st.integers(0, slots - 1))], device=case["a"].device)
    config = data.draw(linear_configs()) if implementation == "triton" else None
    clean = run(implementation, case, config=config)
    poisoned = run(implementation, case, *POISONS[poison](case["a"], case["b"], case["scale"], victim), config=config)
    tokens_per_row = case["x"].shape[0] // case["row_slot"].shape[0]
    others = (case["row_slot"] != victim).repeat_interleave(tokens_per_row)
    assert torch.equal(poisoned[others], clean[others]), f"{poison} in slot {victim.item()} reached other rows"
    assert torch.isfinite(poisoned[others]).all()


@given(data=st.data(), poison=st.sampled_from(list(POISONS)))
def test_torch_poisoned_slot_changes_no_other_row(data, poison):
    check_poisoned_slot_changes_no_other_row("torch", data, poison)


@interpreted_examples(60)  # interpreted: two runs of 30-150 ms an example: 7-11 s on 2 CPU cores
@given(data=st.data(), poison=st.sampled_from(list(POISONS)))
def test_triton_poisoned_slot_changes_no_other_row(data, poison):
    check_poisoned_slot_changes_no_other_row("triton", data, poison)


@st.composite
def group_cases(draw, dtypes):
    """Several projections of one ``x`` (one to six: past ``MAX_PROJECTIONS``, a second launch),
    each with its own width, tables and scales, sharing the mapping."""
    rows, tokens_per_row = draw(st.integers(1, 5)), draw(st.sampled_from([1, 2, 3]))
    slots, rank = draw(st.integers(1, 4)), draw(st.sampled_from([1, 4, 7, 16]))
    in_features, dtype = draw(st.sampled_from([1, 8, 40, 130])), draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    widths = draw(st.lists(st.sampled_from([1, 8, 17, 64]), min_size=1, max_size=6))
    first = make_case(rows, tokens_per_row, slots, rank, in_features, widths[0], dtype, DEVICE, seed)
    projections = [first] + [
        make_case(
            rows, tokens_per_row, slots, rank, in_features, width, dtype, DEVICE, seed + j, first["row_slot"].cpu()
        )
        for j, width in enumerate(widths[1:], 1)
    ]
    for case in projections:
        case["x"] = first["x"]
    return projections


def run_group(implementation, projections, config=None, poison=None):
    """Every projection's output after one call for all of them; ``poison(j, a)`` edits table ``j``'s A."""
    first = projections[0]
    outs = [case["base"].clone() for case in projections]
    lora_a = [case["a"] if poison is None else poison(j, case["a"]) for j, case in enumerate(projections)]
    row_order, slot_row_start = slot_segments(first["row_slot"], first["a"].shape[0])
    lora_b, lora_scale = [c["b"] for c in projections], [c["scale"] for c in projections]
    args = (outs, first["x"], row_order, slot_row_start, lora_a, lora_b, lora_scale)
    if implementation == "triton":
        add_lora_linear_triton(*args, config=config)
    else:
        add_lora_linear_torch(*args)
    return outs


def check_group_matches_reference(implementation, projections, config=None):
    if implementation == "torch":
        projections = [{k: v.cpu() for k, v in case.items()} for case in projections]
    outs = run_group(implementation, projections, config)
    for j, (out, case) in enumerate(zip(outs, projections)):
        assert_close_verbose(out, expected(case), case["x"].dtype, f"add_lora_linear {implementation} projection {j}")
    # One slot's NaN in one projection's A reaches no other slot's rows of any projection.
    first = projections[0]
    victim = int(first["row_slot"].max())
    if victim >= 0:
        nan_a = lambda j, a: a.index_fill(0, torch.tensor([victim], device=a.device), float("nan")) if j == 0 else a  # noqa: E731
        poisoned = run_group(implementation, projections, config, poison=nan_a)
        tokens_per_row = first["x"].shape[0] // first["row_slot"].shape[0]
        others = (first["row_slot"] != victim).repeat_interleave(tokens_per_row)
        for j, (clean, bad) in enumerate(zip(outs, poisoned)):
            assert torch.equal(bad[others], clean[others]), f"slot {victim}'s NaN in projection 0 reached projection {j}"


@given(projections=group_cases((torch.float32, torch.float16, torch.bfloat16)))
def test_torch_group_matches_reference(projections):
    check_group_matches_reference("torch", projections)


@interpreted_examples(10)  # interpreted: two calls of up to two launches each, 1-4 s an example
@given(projections=group_cases(TRITON_DTYPES), config=linear_configs())
def test_triton_group_matches_reference(projections, config):
    check_group_matches_reference("triton", projections, config)


def test_group_arguments_are_named():
    group = _args(T=8, rows=4, L=3, R=5, IN=12, OUT=7)
    other = make_case(4, 2, 3, 5, 12, 3, torch.float32, DEVICE, 1)
    outs, x, row_order, slot_row_start = [group[0], other["base"]], *group[1:4]
    tables = [group[4], other["a"]], [group[5], other["b"]], [group[6], other["scale"]]
    with pytest.raises(ValueError, match=r"lora_b\[1\] must be \[L, out, R\] = \[3, out, 5\]"):
        add_lora_linear_group(outs, x, row_order, slot_row_start, tables[0], [group[5], other["b"][..., :2]], tables[2])
    with pytest.raises(ValueError, match=r"share L and R: lora_a\[1\] is \[3, 2, 12\]"):
        narrow = [group[4], other["a"][:, :2]], [group[5], other["b"][..., :2]]
        add_lora_linear_group(outs, x, row_order, slot_row_start, *narrow, tables[2])
    with pytest.raises(ValueError, match="one out, lora_a, lora_b and lora_scale per projection, got 2 outs, 1 lora_a"):
        add_lora_linear_group(outs, x, row_order, slot_row_start, tables[0][:1], *tables[1:])
    with pytest.raises(ValueError, match="share their column stride"):
        wide = torch.zeros(3, 8, device=DEVICE).T
        add_lora_linear_group([group[0], wide[:, :3]], x, row_order, slot_row_start, *tables)


def test_nan_reaches_its_own_rows():
    """The poison test is not vacuous: the poisoned slot's own rows do turn NaN."""
    case = make_case(4, 3, 3, 4, 16, 8, torch.float32, DEVICE, 0, row_slot=torch.tensor([1, 0, -1, 1]))
    for implementation in IMPLEMENTATIONS:
        out = run(implementation, case, a=case["a"].index_fill(0, torch.tensor([1], device=DEVICE), float("nan")))
        own = (case["row_slot"] == 1).repeat_interleave(3)
        assert out[own].isnan().all() and not out[~own].isnan().any(), implementation


def test_slot_segments():
    row_order, slot_row_start = slot_segments(torch.tensor([2, -1, 0, 2, 0]), 4)
    assert row_order.tolist() == [2, 4, 0, 3, 1] and slot_row_start.tolist() == [0, 2, 2, 4, 4]
    for bad in ([3], [-2]):
        with pytest.raises(ValueError, match=r"slots must be in \[-1, 3\)"):
            slot_segments(torch.tensor(bad), 3)
    with pytest.raises(ValueError, match="1-D int32/int64"):
        slot_segments(torch.tensor([0.0]), 3)


def _args(T=6, rows=3, L=2, R=4, IN=8, OUT=5, dtype=torch.float32, device=DEVICE):
    case = make_case(rows, T // rows, L, R, IN, OUT, dtype, device, 0)
    row_order, slot_row_start = slot_segments(case["row_slot"], L)
    return [case["base"], case["x"], row_order, slot_row_start, case["a"], case["b"], case["scale"]]


def _as_group(args):
    """The op's arguments (lists of one projection) from ``add_lora_linear``'s."""
    out, x, row_order, slot_row_start, a, b, scale = args
    return [out], x, row_order, slot_row_start, [a], [b], [scale]


BAD_ARGS = [
    ("x 1-D", lambda a: a.__setitem__(1, a[1][0]), ValueError, r"x must be \[T, in\]"),
    ("x int", lambda a: a.__setitem__(1, a[1].long()), TypeError, "x must be float32, float16 or bfloat16"),
    ("a width", lambda a: a.__setitem__(4, a[4][..., :3]), ValueError, r"lora_a must be \[L, R, in\] with in = 8"),
    ("b rank", lambda a: a.__setitem__(5, a[5][..., :3]), ValueError, r"lora_b must be \[L, out, R\] = \[2, out, 4\]"),
    ("out rows", lambda a: a.__setitem__(0, a[0][:5]), ValueError, r"out must be \[T, out\] = \[6, 5\]"),
    ("out dtype", lambda a: a.__setitem__(0, a[0].half()), TypeError, "out must have x's dtype"),
    ("scale dtype", lambda a: a.__setitem__(6, a[6].double()), ValueError, r"lora_scale must be float32 \[L\]"),
    ("rows", lambda a: a.__setitem__(2, torch.arange(4, device=DEVICE)), ValueError, "6 tokens are not a whole number of rows of the 4-row"),
    ("segments", lambda a: a.__setitem__(3, a[3][:2]), ValueError, r"slot_row_start must be int32/int64 \[L \+ 1\] = \[3\]"),
]  # fmt: skip


@pytest.mark.parametrize("what, edit, error, message", BAD_ARGS, ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments_are_named(what, edit, error, message):
    args = _args()
    edit(args)
    with pytest.raises(error, match=message):
        add_lora_linear(*args)


def test_opcheck():
    examples = [_args(), _args(T=0, rows=3), _args(T=7, rows=7, L=3, R=1, IN=3, OUT=1), _args(T=4, rows=1, L=1)]
    if HAS_CUDA:
        examples.append(_args(T=33, rows=11, L=5, R=20, IN=130, OUT=70, dtype=torch.bfloat16))
    group = _args(T=8, rows=4, L=3, R=5, IN=12, OUT=7)
    second = make_case(4, 2, 3, 5, 12, 3, torch.float32, DEVICE, 1)
    for args in examples:
        torch.library.opcheck(torch.ops.moe_lora.add_lora_linear.default, _as_group(args))
    torch.library.opcheck(
        torch.ops.moe_lora.add_lora_linear.default,
        ([group[0], second["base"]], *group[1:4], [group[4], second["a"]], [group[5], second["b"]], [group[6], second["scale"]]),
    )


def test_compile_fullgraph_matches_eager():
    case = make_case(4, 3, 3, 4, 16, 8, torch.float32, DEVICE, 1, row_slot=torch.tensor([1, -1, 0, 1]))
    weight = torch.randn(8, 16, device=DEVICE)
    row_order, slot_row_start = slot_segments(case["row_slot"], 3)

    def layer(x, row_order, slot_row_start):
        out = F.linear(x, weight)
        add_lora_linear(out, x, row_order, slot_row_start, case["a"], case["b"], case["scale"])
        return out

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager = layer(case["x"], row_order, slot_row_start)
    torch.testing.assert_close(compiled(case["x"], row_order, slot_row_start), eager)
    other_order, other_start = slot_segments(torch.tensor([0, 0, 2, -1], device=DEVICE), 3)
    torch.testing.assert_close(compiled(case["x"], other_order, other_start), layer(case["x"], other_order, other_start))
    torch._dynamo.reset()


def test_eager_calls_skip_the_dispatcher_only_where_they_are_the_same_call():
    """The public functions run the implementation directly on plain tensors in eager mode, and go
    through the op (so that modes, fake tensors and autograd see it) everywhere else."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from torch_moe_lora.ops.checks import direct_call

    class SeenOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    args = _args(T=6, rows=3, L=2, R=4, IN=8, OUT=5)
    want = args[0].clone()
    add_lora_linear_torch(*_as_group([want, *args[1:]]))
    assert direct_call(*args) and direct_call(torch.nn.Parameter(args[1], requires_grad=False), None)
    out = args[0].clone()
    add_lora_linear(out, *args[1:])
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    with SeenOps() as seen:
        assert not direct_call(*args)
        out = args[0].clone()
        add_lora_linear(out, *args[1:])
    assert "moe_lora.add_lora_linear.default" in seen.ops
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in args]
        assert not direct_call(*fake)
    needs_grad = args[1].clone().requires_grad_()
    assert not direct_call(args[0], needs_grad)
    with torch.no_grad():
        assert direct_call(args[0], needs_grad)
    assert not direct_call(args[0], args[1].to("meta"))
    if HAS_CUDA:  # tensors on two devices: the op's checks name the one on the other
        assert not direct_call(args[0], args[1].to("cpu" if args[1].is_cuda else "cuda"))


@requires_cuda
def test_cuda_graph_replays_new_mappings():
    case = make_case(8, 4, 4, 16, 256, 384, torch.bfloat16, "cuda", 2)
    row_order, slot_row_start = slot_segments(case["row_slot"], 4)
    out = case["base"].clone()
    graph = torch.cuda.CUDAGraph()
    add_lora_linear(out, case["x"], row_order, slot_row_start, case["a"], case["b"], case["scale"])  # warm-up
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        add_lora_linear(out, case["x"], row_order, slot_row_start, case["a"], case["b"], case["scale"])
    for mapping in ([0, 1, 2, 3, -1, -1, 3, 3], [3, 3, 3, 3, 3, 3, 3, 3], [-1] * 8):
        case["row_slot"] = torch.tensor(mapping, device="cuda")
        new_order, new_start = slot_segments(case["row_slot"], 4)
        row_order.copy_(new_order)
        slot_row_start.copy_(new_start)
        out.copy_(case["base"])
        graph.replay()
        assert_close_verbose(out, expected(case), torch.bfloat16, f"graph replay {mapping}")
