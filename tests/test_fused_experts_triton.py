"""The Triton kernels against the reference.

On a GPU the kernels are compiled; without one they run in Triton's interpreter on CPU tensors
(conftest sets TRITON_INTERPRET=1), on tiny shapes and in float32/float16 only, because the
interpreter computes ``tl.dot`` on bfloat16 operands wrongly.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from utils import (
    HAS_CUDA,
    POISONS,
    assert_close_verbose,
    assert_poison_stays_in_its_rows,
    interpreted_examples,
    make_problem,
    problems,
    requires_cuda,
)

import torch_moe_lora.ops.fused_experts as fused_experts_module
from torch_moe_lora import fused_experts
from torch_moe_lora.configs import CONFIG_DIR, GemmTiles, LaunchConfig, ShrinkTiles, SumTiles, parse_buckets
from torch_moe_lora.ops.fused_experts import ExpertOptions
from torch_moe_lora.ops.fused_experts_triton import fused_experts_triton
from torch_moe_lora.reference import fused_experts_ref

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16) if HAS_CUDA else (torch.float32, torch.float16)


def small_config(block_m=16, block_n=16, block_k=16, group_m=2, block_r=16, sub_m=16, **switches) -> LaunchConfig:
    tiles = GemmTiles(block_n=block_n, block_k=block_k, group_m=group_m, num_warps=4, num_stages=2)
    return LaunchConfig(
        block_m=block_m,
        sub_m=sub_m,
        gate_up=tiles,
        down=tiles,
        shrink=ShrinkTiles(max_block_r=block_r, block_k=block_k, num_warps=4, num_stages=2),
        sum=SumTiles(block_n=64, num_warps=4),
        **switches,
    )


CONFIGS = {
    "small": small_config(),
    "wide": small_config(block_m=32, block_n=32, block_k=32, group_m=1, block_r=32),
    "four_subblocks": small_config(block_m=64, block_n=16, block_k=32, group_m=1),
    "two_wide_subblocks": small_config(block_m=64, block_n=32, block_k=16, sub_m=32),
    # No align op: every (token, k) pair a block of its own.
    "pair_blocks": small_config(block_m=64, pair_blocks=True),
    # One shrink program per sub-block, taking all its slots in turn.
    "one_shrink_program": dataclasses.replace(
        small_config(block_m=32, sub_m=16),
        shrink=ShrinkTiles(max_block_r=16, block_k=16, num_warps=4, num_stages=2, slot_programs=1),
    ),
    # The shrinks' input features over several programs (float32 partial sums), with and without align.
    "split_shrink": dataclasses.replace(
        small_config(block_m=32), shrink=ShrinkTiles(max_block_r=16, block_k=16, num_warps=4, num_stages=2, k_per_program=16)
    ),
    "split_shrink_pair_blocks": dataclasses.replace(
        small_config(pair_blocks=True), shrink=ShrinkTiles(max_block_r=16, block_k=16, num_warps=4, num_stages=2, k_per_program=32)
    ),
    # Expert weight tiles through tensor descriptors (where the layout allows; else the pointer path).
    "tma": small_config(block_m=32, tma=True),
    "tma_pair_blocks": small_config(block_n=32, block_k=32, pair_blocks=True, tma=True),
}


def run_triton(problem, config, out=None):
    return fused_experts_triton(
        problem.x, problem.topk_ids, problem.topk_weights, problem.w13, problem.w2,
        w13_bias=problem.w13_bias, w2_bias=problem.w2_bias, token_lora=problem.token_lora, lora=problem.lora,
        options=ExpertOptions(**problem.options), config=config, out=out,
    )  # fmt: skip


def reference(problem):
    return fused_experts_ref(
        problem.x, problem.topk_ids, problem.topk_weights, problem.w13, problem.w2, **problem.kwargs()
    )


@interpreted_examples(60)  # interpreted: 0.1-0.5 s an example: 8-17 s on 2 CPU cores
@given(problem=problems(dtypes=DTYPES, max_tokens=40 if HAS_CUDA else 12), config=st.sampled_from(sorted(CONFIGS)))
def test_kernels_match_reference(problem, config):
    problem = problem.to(DEVICE)
    out = torch.full_like(problem.x, float("nan"))
    run_triton(problem, CONFIGS[config], out=out)
    assert_close_verbose(out, reference(problem), problem.x.dtype, f"triton {config}")


@pytest.mark.parametrize(
    "case",
    [
        dict(T=9, H=32, I=24, E=4, K=2, L=3, R=4),
        dict(T=9, H=32, I=24, E=4, K=2, L=3, R=4, split_gate_up=True, bias=True, interleaved=True, activation="swigluoai", out_of_range_ids=True),
        dict(T=5, H=24, I=16, E=3, K=3, L=0, R=4, gated=False, activation="relu2", weight_on_input=True),
        dict(T=20, H=40, I=20, E=5, K=2, L=2, R=20, activation="gelu_tanh", dtype=torch.float16, weight_on_input=True),
        dict(T=40, H=32, I=16, E=2, K=2, L=4, R=8, no_adapter_fraction=0.0),
    ],
    ids=["plain", "gpt_oss_like", "ungated", "rank20_fp16", "many_rows_per_block"],
)
def test_kernel_cases(case):
    problem = make_problem(**case).to(DEVICE)
    for name, config in CONFIGS.items():
        out = torch.full_like(problem.x, float("nan"))
        run_triton(problem, config, out=out)
        assert_close_verbose(out, reference(problem), problem.x.dtype, f"case, config {name}")


def test_transposed_weights_read_in_place():
    """GPT-OSS stores gate_up as [E, H, 2I]: the op reads the transposed view without a copy."""
    problem = make_problem(T=7, H=32, I=16, E=3, K=2, L=2, R=4, interleaved=True, activation="swigluoai", bias=True)
    problem = problem.to(DEVICE)
    problem.w13 = problem.w13.transpose(1, 2).contiguous().transpose(1, 2)
    problem.w2 = problem.w2.transpose(1, 2).contiguous().transpose(1, 2)
    assert not problem.w13.is_contiguous()
    out = run_triton(problem, CONFIGS["small"])
    assert_close_verbose(out, reference(problem), problem.x.dtype, "transposed weights")


def test_strided_routing_mapping_scales_and_output():
    """topk_ids, topk_weights, token_lora and the LoRA scales as strided views (e.g. columns of a
    larger routing tensor), written into a transposed output buffer."""
    problem = make_problem(T=6, H=32, I=16, E=4, K=2, L=3, R=4).to(DEVICE)
    expected = reference(problem)
    every_other = lambda t: torch.stack([t, -torch.ones_like(t)], -1)[..., 0]  # noqa: E731
    problem.topk_ids = every_other(problem.topk_ids)
    problem.topk_weights = problem.topk_weights.t().contiguous().t()
    problem.token_lora = every_other(problem.token_lora)
    problem.lora = problem.lora._replace(
        gate_up_scale=every_other(problem.lora.gate_up_scale), down_scale=every_other(problem.lora.down_scale)
    )
    strided = (problem.topk_ids, problem.topk_weights, problem.token_lora, *problem.lora[4:])
    assert not any(t.is_contiguous() for t in strided)
    for name in ("small", "pair_blocks"):
        out = torch.full_like(problem.x.t(), float("nan")).t()
        run_triton(problem, CONFIGS[name], out=out)
        assert_close_verbose(out, expected, problem.x.dtype, f"strided routing, scales and output, config {name}")


@pytest.mark.parametrize("config", ["small", "pair_blocks"])
def test_tokens_without_local_pair_are_zero(config):
    """Tokens whose every expert is outside this rank's range (expert parallelism) get zeros."""
    problem = make_problem(T=7, H=40, I=16, E=4, K=2, L=2, R=4).to(DEVICE)
    problem.topk_ids[1] = 4
    problem.topk_ids[4] = -1
    problem.topk_ids[5, 0] = 7
    out = torch.full_like(problem.x, float("nan"))
    run_triton(problem, CONFIGS[config], out=out)
    assert out[[1, 4]].eq(0).all()
    assert_close_verbose(out, reference(problem), problem.x.dtype, f"tokens without a local pair, config {config}")


def poisoned_problems():
    """Problems with at least one adapter slot, and a slot to poison."""
    return problems(dtypes=DTYPES, max_tokens=40 if HAS_CUDA else 8).filter(lambda p: p.lora is not None)


@interpreted_examples(30)  # interpreted: two runs of up to 1 s an example: 10-20 s on 2 CPU cores
@given(problem=poisoned_problems(), config=st.sampled_from(sorted(CONFIGS)), poison=st.sampled_from(sorted(POISONS)), data=st.data())
def test_a_poisoned_slot_changes_no_other_token(problem, config, poison, data):
    """NaN or Inf in one slot's A, or values that overflow: every token of another slot, and every
    token without an adapter, is bit-identical to the run without it (blocks mix slots). Non-finite
    B values are refused by the slot tables (``utils.NONFINITE_B``)."""
    problem = problem.to(DEVICE)
    victim = data.draw(st.integers(0, problem.lora.num_slots - 1))
    assert_poison_stays_in_its_rows(lambda p: run_triton(p, CONFIGS[config]), problem, victim, poison)


def test_poisoned_rows_of_a_mixed_block_stay_apart():
    """One block holding every slot's tokens (many per expert): the victim's values stay in its rows."""
    problem = make_problem(T=24, H=32, I=16, E=2, K=2, L=4, R=8, no_adapter_fraction=0.2).to(DEVICE)
    for config in ("wide", "one_shrink_program", "split_shrink"):
        for poison in POISONS:
            assert_poison_stays_in_its_rows(lambda p: run_triton(p, CONFIGS[config]), problem, 2, poison)


# ---------------------------------------------------------------------------------------------
# GPU only: the registered op, larger shapes, CUDA graphs, torch.compile.


def poison_cache(nbytes=1 << 26):
    """Fills freed caching-allocator memory with NaN so that a read of an unwritten buffer shows."""
    torch.full((nbytes // 4,), float("nan"), device="cuda")
    torch.cuda.synchronize()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 4, 64, 300, 2100])
def test_op_on_gpu_realistic_shapes(dtype, T):
    problem = make_problem(T=T, H=256, I=128, E=16, K=4, L=6, R=16, dtype=dtype, ranks=[16, 4, 8, 16, 1, 12]).to("cuda")
    poison_cache()
    out = fused_experts(problem.x, problem.topk_ids, problem.topk_weights, problem.w13, problem.w2, **problem.kwargs())
    assert_close_verbose(out, reference(problem), dtype, f"gpu T={T}")


@requires_cuda
@given(problem=problems(dtypes=DTYPES, max_tokens=300))
def test_op_on_gpu_default_configs(problem):
    problem = problem.to("cuda")
    poison_cache()
    out = fused_experts(problem.x, problem.topk_ids, problem.topk_weights, problem.w13, problem.w2, **problem.kwargs())
    assert_close_verbose(out, reference(problem), problem.x.dtype, "gpu default config")


@requires_cuda
def test_cuda_graph_replay_matches_eager():
    problem = make_problem(T=48, H=128, I=64, E=8, K=2, L=4, R=8, dtype=torch.bfloat16).to("cuda")
    args = (problem.x, problem.topk_ids, problem.topk_weights, problem.w13, problem.w2)
    kwargs = problem.kwargs()
    eager = fused_experts(*args, **kwargs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused_experts(*args, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_experts(*args, **kwargs)
    graph.replay()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)
    # New routing, mapping and inputs in the same buffers: the replay follows them.
    fresh = make_problem(T=48, H=128, I=64, E=8, K=2, L=4, R=8, dtype=torch.bfloat16, seed=7).to("cuda")
    for name in ("x", "topk_ids", "topk_weights", "token_lora"):
        getattr(problem, name).copy_(getattr(fresh, name))
    graph.replay()
    expected = fused_experts(problem.x, problem.topk_ids, problem.topk_weights, problem.w13, problem.w2, **kwargs)
    torch.testing.assert_close(captured, expected, rtol=0, atol=0)


@requires_cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_on_gpu(mode):
    torch._dynamo.reset()
    problem = make_problem(T=32, H=128, I=64, E=8, K=2, L=4, R=8, dtype=torch.bfloat16).to("cuda")

    def layer(x, token_lora):
        y = fused_experts(x, problem.topk_ids, problem.topk_weights, problem.w13, problem.w2, token_lora=token_lora, lora=problem.lora)
        return torch.nn.functional.rms_norm(y + x, (x.shape[-1],))

    compiled = torch.compile(layer, fullgraph=True, mode=None if mode == "default" else mode)
    for mapping in (problem.token_lora, problem.token_lora.flip(0), torch.full_like(problem.token_lora, -1)):
        for _ in range(3):
            got = compiled(problem.x, mapping)
        torch.testing.assert_close(got, layer(problem.x, mapping), rtol=2e-2, atol=2e-2)


@requires_cuda
def test_op_launches_with_the_config_of_its_bucket(monkeypatch):
    """The registered op on the GPU hands the kernels the config of its call's bucket: two token
    counts on either side of the first edge between default buckets that differ (a shape no device
    file tunes: rows per expert T * K / E = T / 2) launch with those two buckets' configs."""
    buckets = parse_buckets(json.loads((CONFIG_DIR / "default.json").read_text()), "default.json")
    edge, after = next((b, c) for b, c in zip(buckets, list(buckets)[1:]) if buckets[b] != buckets[c])
    launched = []

    def recording_launcher(*args, config, **kwargs):
        launched.append(config)
        return fused_experts_triton(*args, config=config, **kwargs)

    monkeypatch.setattr(fused_experts_module, "fused_experts_triton", recording_launcher)
    for T in (2 * edge, 2 * edge + 1):
        problem = make_problem(T=T, H=64, I=32, E=4, K=2, L=1, R=4).to("cuda")
        args = (problem.x, problem.topk_ids, problem.topk_weights, problem.w13, problem.w2)
        assert_close_verbose(fused_experts(*args, **problem.kwargs()), reference(problem), problem.x.dtype, f"T={T}")
    assert launched == [buckets[edge], buckets[after]], launched


def test_weight_descriptor_only_where_the_copy_engine_can_read():
    from torch_moe_lora.ops.launch import weight_descriptor

    w = torch.randn(3, 24, 40, dtype=torch.float16)
    desc = weight_descriptor(w, 16, 32)
    assert desc is not None and list(desc.shape) == [72, 40] and list(desc.block_shape) == [16, 32]
    assert weight_descriptor(w.transpose(1, 2).contiguous().transpose(1, 2), 16, 32) is None, "K not contiguous"
    assert weight_descriptor(torch.randn(3, 24, 41, dtype=torch.float16)[..., :40], 16, 32) is None, "rows unaligned"
    assert weight_descriptor(w[:, :20], 16, 32) is None, "experts not stacked row after row"
    assert weight_descriptor(w, 512, 32) is None, "tile past the copy engine's box"


def test_fit_shared_memory_shrinks_stages_then_k_tile():
    """Stages first, then the K tile, until the base loop's tiles and the LoRA loop's partial sums fit."""
    from torch_moe_lora.ops.launch import fit_shared_memory

    tiles = GemmTiles(block_n=128, block_k=128, num_stages=4, num_warps=8, group_m=1)
    assert fit_shared_memory(tiles, 64, 2 * 128, 2, None) == tiles
    assert fit_shared_memory(tiles, 64, 2 * 128, 2, 1 << 20) == tiles
    fp32 = fit_shared_memory(tiles, 64, 2 * 128, 4, 232448)
    assert fp32.num_stages * fp32.block_k * (64 + 2 * 128) * 4 <= 232448
    assert (fp32.num_stages, fp32.block_k) == (2, 64)
    assert dataclasses.replace(fp32, num_stages=4, block_k=128) == tiles, "only stages and the K tile change"
    # An H100 decode bucket (5 stages of 16 x 128 and 128 x 2 x 32) with the shrink split 8 ways: the
    # LoRA loop's float32 partial sums asked 294912 bytes of Triton, over the 232448 there.
    decode = GemmTiles(block_n=32, block_k=128, num_stages=5, num_warps=4, group_m=1)
    assert fit_shared_memory(decode, 16, 2 * 32, 2, 232448) == decode, "unsplit: as tuned"
    split = fit_shared_memory(decode, 16, 2 * 32, 2, 232448, partial_sums=8)
    assert split.num_stages * split.block_k * (8 * 16 * 4 + 2 * 32 * 2) <= 232448
    assert (split.num_stages, split.block_k) == (2, 128)
