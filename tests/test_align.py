"""Tests of ``moe_lora::align_block_size`` (``torch_moe_lora.ops.align``) against ``align_block_size_ref``.

On CPU the op must equal the reference exactly. On CUDA the order of the pairs inside a group is not
deterministic, so each group is compared as a set, and the padding positions and block metadata
exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import expecttest
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from utils import assert_aligned, requires_cuda, valid_prefix

from torch_moe_lora.ops.align import align_block_size
from torch_moe_lora.reference import align_block_size_ref

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
BLOCK_SIZES = (1, 2, 4, 16, 64)


@dataclass(frozen=True)
class AlignProblem:
    """One set of arguments; ``inputs`` draws the tensors from ``seed``."""

    num_tokens: int
    top_k: int
    num_experts: int
    max_loras: int
    block_size: int
    used_experts: int  # the experts the tokens pick are drawn from this many (duplicates likely)
    invalid_fraction: float  # share of expert ids replaced by out-of-range ones (<0 or >=E)
    id_dtype: torch.dtype
    lora_dtype: torch.dtype | None  # None: token_lora is None
    seed: int

    def inputs(self, device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        generator = torch.Generator().manual_seed(self.seed)
        shape = (self.num_tokens, self.top_k)
        used = torch.randperm(self.num_experts, generator=generator)[: self.used_experts]
        topk_ids = used[torch.randint(0, self.used_experts, shape, generator=generator)]
        out_of_range = torch.tensor([-1, -7, self.num_experts, self.num_experts + 5])
        invalid = torch.rand(shape, generator=generator) < self.invalid_fraction
        topk_ids = torch.where(invalid, out_of_range[torch.randint(0, 4, shape, generator=generator)], topk_ids)
        token_lora = None
        if self.lora_dtype is not None:
            token_lora = torch.randint(-1, self.max_loras, (self.num_tokens,), generator=generator)
            token_lora = token_lora.to(device=device, dtype=self.lora_dtype)
        return topk_ids.to(device=device, dtype=self.id_dtype), token_lora

    def run(self, device: str):
        topk_ids, token_lora = self.inputs(device)
        args = (topk_ids, token_lora, self.num_experts, self.max_loras, self.block_size)
        return align_block_size(*args), align_block_size_ref(*args)


@st.composite
def align_problems(draw) -> AlignProblem:
    num_experts = draw(st.integers(1, 300))
    max_loras = draw(st.integers(0, 8))
    return AlignProblem(
        num_tokens=draw(st.integers(0, 64)),
        top_k=draw(st.integers(1, 8)),
        num_experts=num_experts,
        max_loras=max_loras,
        block_size=draw(st.sampled_from(BLOCK_SIZES)),
        used_experts=draw(st.integers(1, num_experts)),
        invalid_fraction=draw(st.sampled_from([0.0, 0.1, 0.5])),
        id_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        lora_dtype=draw(st.sampled_from([torch.int32, torch.int64, None])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def check_problem(problem: AlignProblem, device: str) -> None:
    outputs, reference = problem.run(device)
    sizes = dict(
        num_pairs=problem.num_tokens * problem.top_k, num_experts=problem.num_experts, block_size=problem.block_size
    )
    assert all(t.device.type == device for t in outputs)
    assert_aligned(outputs, reference, exact=device == "cpu", **sizes)
    if device != "cpu":
        cpu_outputs, _ = problem.run("cpu")
        assert_aligned(outputs, valid_prefix(cpu_outputs, problem.block_size), exact=False, **sizes)


def small_problem(num_tokens, id_dtype, lora_dtype) -> AlignProblem:
    """A problem with E=8, L=3, K=4, block_size=4 and some out-of-range experts: explicit edge cases."""
    return AlignProblem(
        num_tokens=num_tokens,
        top_k=4,
        num_experts=8,
        max_loras=3,
        block_size=4,
        used_experts=5,
        invalid_fraction=0.1,
        id_dtype=id_dtype,
        lora_dtype=lora_dtype,
        seed=0,
    )


@pytest.mark.parametrize("device", DEVICES)
@given(problem=align_problems())
@example(problem=small_problem(0, torch.int64, torch.int64))
@example(problem=small_problem(0, torch.int32, None))
@example(problem=small_problem(1, torch.int32, torch.int32))
@example(problem=small_problem(1, torch.int64, torch.int32))
@example(problem=small_problem(37, torch.int64, None))
@example(problem=small_problem(37, torch.int32, torch.int64))
def test_matches_reference(device, problem):
    check_problem(problem, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_experts", [1024, 4096])
def test_many_groups(device, num_experts):
    """Many groups: on an H100 (227 KB of opt-in shared memory per block) E=1024 keeps the counters in
    shared memory above the default 48 KB, and E=4096 needs the global-memory workspace."""
    problem = AlignProblem(
        num_tokens=512,
        top_k=8,
        num_experts=num_experts,
        max_loras=16,
        block_size=16,
        used_experts=num_experts,
        invalid_fraction=0.05,
        id_dtype=torch.int32,
        lora_dtype=torch.int64,
        seed=1,
    )
    check_problem(problem, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_experts", [64, 1024])
def test_large_batch(device, num_experts):
    """More pairs than one CUDA block handles: the grid-wide count (with per-block histograms for
    E=64, with global atomics for E=1024 x 17 slot groups, 68 KB of counters) and scatter."""
    problem = AlignProblem(
        num_tokens=2048,
        top_k=8,
        num_experts=num_experts,
        max_loras=16,
        block_size=64,
        used_experts=num_experts,
        invalid_fraction=0.05,
        id_dtype=torch.int64,
        lora_dtype=torch.int32,
        seed=3,
    )
    check_problem(problem, device)


@pytest.mark.parametrize("device", DEVICES)
def test_one_hot_expert(device):
    """Every pair on one expert and one slot: one long group, many blocks found by one binary search each."""
    topk_ids = torch.full((300, 3), 7, dtype=torch.int64, device=device)
    token_lora = torch.full((300,), 2, dtype=torch.int32, device=device)
    args = (topk_ids, token_lora, 9, 4, 16)
    assert_aligned(
        align_block_size(*args), align_block_size_ref(*args), num_pairs=900, num_experts=9, block_size=16,
        exact=device == "cpu",
    )


def bad_call(**changes):
    """A valid CPU call of ``align_block_size`` with some arguments replaced."""
    arguments = dict(
        topk_ids=torch.zeros(4, 2, dtype=torch.int64),
        token_lora=torch.zeros(4, dtype=torch.int64),
        num_experts=8,
        max_loras=2,
        block_size=4,
    )
    arguments.update(changes)
    return arguments


BAD_ARGUMENTS = [
    (dict(topk_ids=torch.zeros(8, dtype=torch.int64)), ValueError, "topk_ids must be a 2-D tensor"),
    (dict(topk_ids=torch.zeros(4, 2, 1, dtype=torch.int64)), ValueError, "topk_ids must be a 2-D tensor"),
    (dict(topk_ids=torch.zeros(4, 0, dtype=torch.int64)), ValueError, "topk_ids must have K >= 1"),
    (dict(topk_ids=torch.zeros(4, 2)), TypeError, "topk_ids must be int32 or int64, got torch.float32"),
    (dict(topk_ids=[[0, 1]]), TypeError, "topk_ids must be a torch.Tensor"),
    (dict(token_lora=torch.zeros(3, dtype=torch.int64)), ValueError, "token_lora must have length T = 4"),
    (dict(token_lora=torch.zeros(4, 1, dtype=torch.int64)), ValueError, "token_lora must be a 1-D tensor"),
    (dict(token_lora=torch.zeros(4)), TypeError, "token_lora must be int32 or int64"),
    (dict(token_lora=torch.zeros(4, dtype=torch.int64, device="meta")), ValueError, "token_lora must be on"),
    (dict(block_size=0), ValueError, "block_size must be >= 1, got 0"),
    (dict(block_size=2.0), TypeError, "block_size must be an int"),
    (dict(num_experts=0), ValueError, "num_experts must be >= 1, got 0"),
    (dict(max_loras=-1), ValueError, "max_loras must be >= 0, got -1"),
    (dict(token_lora=torch.tensor([0, 1, 2, 0])), RuntimeError, r"token_lora\[2\] = 2 is outside \[-1, max_loras\)"),
    (dict(token_lora=torch.tensor([0, -2, 0, 0], dtype=torch.int32)), RuntimeError, r"token_lora\[1\] = -2"),
]


@pytest.mark.parametrize(("changes", "error", "message"), BAD_ARGUMENTS)
def test_bad_arguments_raise(changes, error, message):
    with pytest.raises(error, match=message):
        align_block_size(**bad_call(**changes))


# The C++ checks behind the Python ones, reached by calling the registered op directly.
BAD_OP_ARGUMENTS = [
    (dict(topk_ids=torch.zeros(8, dtype=torch.int64)), "topk_ids must be 2-D"),
    (dict(topk_ids=torch.zeros(4, 0, dtype=torch.int64)), "topk_ids must have K >= 1"),
    (dict(topk_ids=torch.zeros(4, 2)), "topk_ids must be int32 or int64"),
    (dict(token_lora=torch.zeros(3, dtype=torch.int64)), r"token_lora must have shape \[T\] = \[4\]"),
    (dict(token_lora=torch.zeros(4, dtype=torch.float64)), "token_lora must be int32 or int64"),
    (dict(block_size=0), "block_size must be in"),
    (dict(num_experts=0), "num_experts must be in"),
    (dict(max_loras=-1), "max_loras must be in"),
    (dict(token_lora=torch.tensor([0, 0, 0, 5])), r"token_lora\[3\] = 5 is outside"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_OP_ARGUMENTS)
def test_op_checks_arguments(changes, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.moe_lora.align_block_size.default(*bad_call(**changes).values())


@requires_cuda
def test_mixed_devices_raise():
    arguments = bad_call(topk_ids=torch.zeros(4, 2, dtype=torch.int64, device="cuda"))
    with pytest.raises(ValueError, match="token_lora must be on topk_ids' device"):
        align_block_size(**arguments)
    with pytest.raises(RuntimeError, match="token_lora must be on topk_ids' device"):
        torch.ops.moe_lora.align_block_size.default(*arguments.values())


@requires_cuda
def test_cuda_token_lora_out_of_range_asserts_on_device():
    """A device-side assert poisons the CUDA context, so it runs in a separate process."""
    script = (
        "import torch; from torch_moe_lora.ops.align import align_block_size\n"
        "ids = torch.zeros(4, 2, dtype=torch.int64, device='cuda')\n"
        "token_lora = torch.tensor([0, 1, 2, 0], device='cuda')\n"
        "align_block_size(ids, token_lora, 8, 2, 4)\n"
        "torch.cuda.synchronize()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode != 0
    assert "token_lora values must lie in [-1, max_loras)" in result.stderr + result.stdout


OPCHECK_CASES = [
    # (T, K, E, L, block_size, token_lora present)
    (0, 2, 4, 2, 4, True),
    (0, 1, 4, 0, 1, False),
    (7, 3, 5, 3, 4, True),
    (7, 3, 5, 3, 1, True),
    (13, 1, 3, 2, 16, False),
    (5, 5, 2, 0, 2, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(device, case):
    num_tokens, top_k, num_experts, max_loras, block_size, with_lora = case
    topk_ids = torch.randint(-1, num_experts + 1, (num_tokens, top_k), device=device)
    token_lora = torch.randint(-1, max_loras, (num_tokens,), device=device) if with_lora else None
    args = (topk_ids, token_lora, num_experts, max_loras, block_size)
    torch.library.opcheck(torch.ops.moe_lora.align_block_size.default, args)


def test_compile_fullgraph_matches_eager():
    def align(topk_ids, token_lora):
        return align_block_size(topk_ids, token_lora, num_experts=6, max_loras=3, block_size=4)

    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)
    topk_ids = torch.randint(-1, 7, (9, 2), generator=generator, dtype=torch.int32)
    token_lora = torch.randint(-1, 3, (9,), generator=generator)
    explanation = torch._dynamo.explain(align)(topk_ids, token_lora)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(align, fullgraph=True)
    for num_tokens in (9, 16, 33):
        topk_ids = torch.randint(-1, 7, (num_tokens, 2), generator=generator, dtype=torch.int32)
        token_lora = torch.randint(-1, 3, (num_tokens,), generator=generator)
        for got, want in zip(compiled(topk_ids, token_lora), align(topk_ids, token_lora)):
            assert got.shape == want.shape and torch.equal(got, want)
    torch._dynamo.reset()


@requires_cuda
@pytest.mark.parametrize("num_experts,shape", [(64, (128, 4)), (4096, (128, 4)), (128, (2048, 8))])
def test_cuda_graph_replay(num_experts, shape):
    """The op captures into a CUDA graph (no host syncs, static sizes) and replays on new inputs,
    on the single-block path and the grid path."""
    generator = torch.Generator().manual_seed(2)
    max_loras, block_size = 8, 16

    def draw():
        topk_ids = torch.randint(0, num_experts, shape, generator=generator, dtype=torch.int32)
        return topk_ids, torch.randint(-1, max_loras, (shape[0],), generator=generator)

    topk_ids, token_lora = (t.cuda() for t in draw())
    args = (num_experts, max_loras, block_size)
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        align_block_size(topk_ids, token_lora, *args)
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = align_block_size(topk_ids, token_lora, *args)
    for _ in range(2):
        new_ids, new_lora = draw()
        topk_ids.copy_(new_ids)
        token_lora.copy_(new_lora)
        graph.replay()
        torch.cuda.synchronize()
        expected = align_block_size_ref(new_ids, new_lora, *args)
        assert_aligned(
            outputs, expected, num_pairs=new_ids.numel(), num_experts=num_experts, block_size=block_size, exact=False,
        )


class TestSchema(expecttest.TestCase):
    def test_schema(self):
        self.assertExpectedInline(
            str(torch.ops.moe_lora.align_block_size.default._schema),
            """moe_lora::align_block_size(Tensor topk_ids, Tensor? token_lora, int num_experts, int max_loras, int block_size) -> (Tensor sorted_pair_ids, Tensor expert_of_block, Tensor num_blocks)""",
        )
