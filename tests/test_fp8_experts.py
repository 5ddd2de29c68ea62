"""FP8 (e4m3) expert weights with block scales in ``fused_experts``: the op on FP8 weights is the
op on the dequantized weights (``reference.dequantize_blocks_ref``), LoRA tables stay in x's dtype;
bad scales are refused with messages that say what was expected."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from utils import (
    HAS_CUDA,
    REL_TOL,
    assert_close_verbose,
    interpreted_examples,
    make_problem,
    problems,
    requires_cuda,
)

from torch_moe_lora import WeightScales, fused_experts
from torch_moe_lora.configs import GemmTiles, LaunchConfig, ShrinkTiles, SumTiles
from torch_moe_lora.ops.fused_experts import ExpertOptions, dequantize_weight
from torch_moe_lora.ops.fused_experts_triton import fused_experts_triton
from torch_moe_lora.reference import dequantize_blocks_ref, fused_experts_ref, quantize_blocks_ref, quantize_groups_ref

UE8M0 = getattr(torch, "float8_e8m0fnu", None)


def quantized_problem(problem, block_n: int, block_k: int):
    w13, s13 = quantize_blocks_ref(problem.w13, (block_n, block_k))
    w2, s2 = quantize_blocks_ref(problem.w2, (block_n, block_k))
    return w13, w2, WeightScales(s13, s2, block_n, block_k)


def reference(problem, w13, w2, scales: WeightScales):
    block = (scales.block_n, scales.block_k)
    return fused_experts_ref(
        problem.x, problem.topk_ids, problem.topk_weights,
        dequantize_blocks_ref(w13, scales.w13_scale, block), dequantize_blocks_ref(w2, scales.w2_scale, block),
        **problem.kwargs(),
    )  # fmt: skip


BLOCKS = st.tuples(st.sampled_from([1, 3, 4, 8, 16, 128]), st.sampled_from([1, 5, 8, 16, 128]))


@given(problem=problems(), block=BLOCKS)
def test_fp8_weights_are_the_op_on_the_dequantized_weights(problem, block):
    """Every activation, layout, mapping and dtype; block boundaries that are not multiples of any tile."""
    w13, w2, scales = quantized_problem(problem, *block)
    out = fused_experts(problem.x, problem.topk_ids, problem.topk_weights, w13, w2, scales=scales, **problem.kwargs())
    assert out.dtype == problem.x.dtype
    assert_close_verbose(out, reference(problem, w13, w2, scales), problem.x.dtype, f"fp8 block {block}")


@requires_cuda
@given(problem=problems(dtypes=(torch.float16, torch.bfloat16)), block=BLOCKS)
def test_fp8_weights_on_the_gpu(problem, block):
    w13, w2, scales = quantized_problem(problem, *block)
    gpu = problem.to("cuda")
    scales_gpu = WeightScales(scales.w13_scale.cuda(), scales.w2_scale.cuda(), *block)
    out = fused_experts(gpu.x, gpu.topk_ids, gpu.topk_weights, w13.cuda(), w2.cuda(), scales=scales_gpu, **gpu.kwargs())
    assert_close_verbose(out, reference(problem, w13, w2, scales), problem.x.dtype, f"fp8 on the GPU, block {block}")


@pytest.mark.parametrize(
    "shape, block", [((3, 40, 24), (16, 16)), ((2, 7, 9), (7, 9)), ((2, 6, 10), (1, 10)), ((1, 300, 260), (128, 128))]
)
def test_dequantize_matches_the_reference(shape, block):
    """Blocks, one scale per tensor (``block = (N, K)``), one per channel (``(1, K)``), partial blocks."""
    weight, scale = quantize_blocks_ref(torch.randn(shape), block)
    got = dequantize_weight(weight, scale, *block, torch.float32)
    assert torch.equal(got.double(), dequantize_blocks_ref(weight, scale, block).float().double())


def test_quantize_is_within_fp8_rounding_of_the_weights():
    """``quantize_blocks_ref`` (the checkpoints' recipe, which the tests and the FP8 benchmark use),
    dequantized by the op's own rule, is within e4m3 rounding of the weights, block by block."""
    weight = torch.randn(3, 256, 384) * torch.logspace(-3, 1, 256)[None, :, None]
    quantized, scale = quantize_blocks_ref(weight, (128, 128))
    assert quantized.dtype == torch.float8_e4m3fn and scale.shape == (3, 2, 3)
    back = dequantize_weight(quantized, scale, 128, 128, torch.float32)
    block_max = weight.abs().view(3, 2, 128, 3, 128).amax(dim=(2, 4))
    block_max = block_max.repeat_interleave(128, 1).repeat_interleave(128, 2)
    assert ((back - weight).abs() <= block_max / 16 + 1e-12).all(), "e4m3 keeps 3 mantissa bits of each block's range"
    assert (back - weight).abs().max() > 0, "the weights are quantized, not passed through"


@pytest.mark.skipif(UE8M0 is None, reason="this torch has no float8_e8m0fnu")
def test_ue8m0_scales():
    """Power-of-two scales stored as UE8M0 give the same result as the same scales in float32."""
    problem = next_problem()
    w13, w2, scales = quantized_problem(problem, 8, 8)
    pow2 = WeightScales(*(torch.exp2(torch.ceil(torch.log2(s))) for s in scales[:2]), 8, 8)
    ue8m0 = WeightScales(*(s.to(UE8M0) for s in pow2[:2]), 8, 8)
    args = (problem.x, problem.topk_ids, problem.topk_weights, w13, w2)
    want = fused_experts(*args, scales=pow2, **problem.kwargs())
    assert torch.equal(fused_experts(*args, scales=ue8m0, **problem.kwargs()), want)


def next_problem():
    return make_problem(T=6, H=24, I=16, E=3, K=2, L=2, R=4)


def test_bad_scales_are_refused():
    problem = next_problem()
    w13, w2, scales = quantized_problem(problem, 8, 8)
    args = (problem.x, problem.topk_ids, problem.topk_weights)
    with pytest.raises(ValueError, match="need both w13_scale and w2_scale"):
        fused_experts(*args, w13, w2, **problem.kwargs())
    with pytest.raises(ValueError, match="scales go with FP8 weights only"):
        fused_experts(*args, problem.w13, problem.w2, scales=scales, **problem.kwargs())
    with pytest.raises(TypeError, match="must both be float8_e4m3fn or neither"):
        fused_experts(*args, w13, problem.w2, scales=scales, **problem.kwargs())
    with pytest.raises(TypeError, match="w13 must have x's dtype torch.float32 \\(or be float8_e4m3fn"):
        fused_experts(*args, problem.w13.half(), problem.w2, **problem.kwargs())
    bad = scales._replace(w2_scale=scales.w2_scale[:, :2])
    with pytest.raises(ValueError, match=r"w2_scale must be \[3, 3, 2\] \(one scale per 8x8 block .* got \[3, 2, 2\]"):
        fused_experts(*args, w13, w2, scales=bad, **problem.kwargs())
    with pytest.raises(ValueError, match=r"w13_scale must be \[3, 4, 3\]"):
        fused_experts(*args, w13, w2, scales=scales._replace(w13_scale=scales.w13_scale[:, :3]), **problem.kwargs())
    with pytest.raises(TypeError, match="w2_scale must be one of"):
        fused_experts(*args, w13, w2, scales=scales._replace(w2_scale=scales.w2_scale.half()), **problem.kwargs())
    with pytest.raises(ValueError, match=r"block must be positive \[block_n, block_k\], got \[0, 8\]"):
        fused_experts(*args, w13, w2, scales=scales._replace(block_n=0), **problem.kwargs())


def test_gate_up_scales_may_have_the_rows_transformers_allocates():
    """transformers gives gate_up at least 2 scale rows even when one block covers all 2I rows."""
    problem = next_problem()
    w13, s13 = quantize_blocks_ref(problem.w13, (128, 8), rows=2)
    w2, s2 = quantize_blocks_ref(problem.w2, (128, 8))
    scales = WeightScales(s13, s2, 128, 8)
    out = fused_experts(problem.x, problem.topk_ids, problem.topk_weights, w13, w2, scales=scales, **problem.kwargs())
    assert_close_verbose(out, reference(problem, w13, w2, scales), torch.float32, "2 gate_up scale rows")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_opcheck_and_compile(device):
    problem = next_problem().to(device)
    w13, w2, scales = quantized_problem(next_problem(), 8, 8)
    w13, w2 = w13.to(device), w2.to(device)
    scales = WeightScales(scales.w13_scale.to(device), scales.w2_scale.to(device), 8, 8)
    lora = tuple(problem.lora)
    args = (problem.x, problem.topk_ids, problem.topk_weights, w13, w2, None, None, problem.token_lora, *lora,
            "silu", True, False, 1.702, 7.0, False, *scales)  # fmt: skip
    # test_schema compares inputs before and after with allclose, which torch has no FP8 kernel for.
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.moe_lora.fused_experts.default, args, test_utils=utils)

    def layer(x, token_lora):
        return fused_experts(x, problem.topk_ids, problem.topk_weights, w13, w2, token_lora=token_lora,
                             lora=problem.lora, scales=scales)  # fmt: skip

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(problem.x, problem.token_lora), layer(problem.x, problem.token_lora))
    torch._dynamo.reset()


def kernel_config(block_k: int, **switches) -> LaunchConfig:
    tiles = GemmTiles(block_n=16, block_k=block_k, group_m=2, num_warps=4, num_stages=2)
    shrink = ShrinkTiles(max_block_r=16, block_k=16, num_warps=4, num_stages=2)
    return LaunchConfig(block_m=16, sub_m=16, gate_up=tiles, down=tiles, shrink=shrink,
                        sum=SumTiles(block_n=64, num_warps=4), **switches)  # fmt: skip


KERNEL_CONFIGS = {
    "tiles": kernel_config(16), "wide_k": kernel_config(32), "pair_blocks": kernel_config(16, pair_blocks=True),
    "tma": kernel_config(16, tma=True),
}  # fmt: skip
"""The GEMM kernels' FP8 paths: with scale blocks of 16 or 128 along K the K tile (16, 32) lies in one
scale block (a scale per row of the tile); with 5 or 8 it does not (a scale per element)."""
DEVICE = "cuda" if HAS_CUDA else "cpu"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16) if HAS_CUDA else (torch.float32, torch.float16)


@interpreted_examples(25)
@given(
    problem=problems(dtypes=KERNEL_DTYPES, max_tokens=40 if HAS_CUDA else 12),
    block=st.tuples(st.sampled_from([1, 8, 16, 128]), st.sampled_from([5, 8, 16, 128])),
    config=st.sampled_from(sorted(KERNEL_CONFIGS)),
)
def test_fp8_kernels_match_the_reference(problem, block, config):
    """The Triton GEMMs dequantize FP8 tiles in their K loops (Triton's interpreter on the CPU)."""
    out, w13, w2, scales = run_fp8_kernels(problem, block, KERNEL_CONFIGS[config])
    assert_close_verbose(out, reference(problem, w13, w2, scales), problem.x.dtype, f"fp8 kernels {config} {block}")


def run_fp8_kernels(problem, block, launch: LaunchConfig):
    """The Triton launcher on ``problem`` with its experts quantized in ``block``, launched with
    ``launch`` on ``DEVICE`` into a NaN-filled output: (that output, the FP8 w13 and w2, their scales)."""
    w13, w2, scales = quantized_problem(problem, *block)
    gpu = problem.to(DEVICE)
    on_device = WeightScales(scales.w13_scale.to(DEVICE), scales.w2_scale.to(DEVICE), *block)
    out = torch.full_like(gpu.x, float("nan"))
    fused_experts_triton(
        gpu.x, gpu.topk_ids, gpu.topk_weights, w13.to(DEVICE), w2.to(DEVICE), w13_bias=gpu.w13_bias,
        w2_bias=gpu.w2_bias, token_lora=gpu.token_lora, lora=gpu.lora, options=ExpertOptions(**gpu.options),
        config=launch, out=out, scales=on_device,
    )  # fmt: skip
    return out, w13, w2, scales


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


FP8_ACTIVATION_CONFIGS = {
    "tiles": kernel_config(32, fp8_activations=True), "narrow_k": kernel_config(16, fp8_activations=True),
    "pair_blocks": kernel_config(32, pair_blocks=True, fp8_activations=True),
    "tma": kernel_config(32, tma=True, fp8_activations=True),
}  # fmt: skip
FP8_DOT_MIN_K = 32
"""The FP8 tensor cores' K step: ``narrow_k``'s K tiles of 16 are under it, so its GEMMs convert the
weights (Triton refuses an FP8 dot of K 16 on the GPU; its interpreter would run one)."""
FP8_ACTIVATION_TOL = {torch.float32: 5e-2, torch.float16: 5e-2, torch.bfloat16: 1e-1}
"""Relative error of the FP8-activation GEMMs against ``fused_experts_ref(activation_group=...)`` on
drawn problems, per x's dtype. The kernel's activations carry x's rounding (its LoRA shrink output
is stored in x's dtype, and the activations are rounded to it before they are quantized); the
reference's are exact. Where the two land on either side of an e4m3 rounding boundary that
activation differs by one e4m3 step (up to 2^-3 of its value): in float32 that is rare, in float16
about one activation in sixty, in bfloat16 more. Elsewhere they agree to x's dtype
(``test_fp8_activation_gemms_on_a_fixed_problem``)."""


def fp8_activation_run(problem, block, launch):
    """(the Triton output, the activation-quantized reference, the unquantized reference)."""
    out, w13, w2, scales = run_fp8_kernels(problem, block, launch)
    dequantized = (dequantize_blocks_ref(w13, scales.w13_scale, block), dequantize_blocks_ref(w2, scales.w2_scale, block))
    args = (problem.x, problem.topk_ids, problem.topk_weights, *dequantized)
    quantized = fused_experts_ref(*args, activation_group=block[1], **problem.kwargs())
    return out, quantized, fused_experts_ref(*args, **problem.kwargs())


@interpreted_examples(25)
@given(
    problem=problems(dtypes=KERNEL_DTYPES, max_tokens=40 if HAS_CUDA else 12),
    block=st.tuples(st.sampled_from([1, 16, 128]), st.sampled_from([8, 16, 32, 128])),
    config=st.sampled_from(sorted(FP8_ACTIVATION_CONFIGS)),
)
def test_fp8_activation_gemms_quantize_per_token_group(problem, block, config):
    """``fp8_activations``: x and the activations quantized per token and scale block along K, FP8
    tensor-core dots, LoRA on the unquantized activations. Where the K tile does not lie inside one
    scale block (block_k 8 or 16 under a K tile of 32), or where the K tile is under the FP8 dot's
    least K (16 < 32), the GEMMs convert the weights instead, as without the switch."""
    launch = FP8_ACTIVATION_CONFIGS[config]
    out, quantized, dequantized = fp8_activation_run(problem, block, launch)
    assert not out.isnan().any()
    if block[1] % launch.gate_up.block_k or launch.gate_up.block_k < FP8_DOT_MIN_K:  # x not quantized
        assert_close_verbose(out, dequantized, problem.x.dtype, f"fp8 weights {config} {block}")
        return
    error, unquantized_error = relative_error(out, quantized), relative_error(out, dequantized)
    print(f"fp8 activations {config} {block} [{problem.x.dtype}]: relative error {error:.3e}, "
          f"against the unquantized reference {unquantized_error:.3e}")  # fmt: skip
    tol = FP8_ACTIVATION_TOL[problem.x.dtype]
    assert error <= tol, f"fp8 activations {config} {block}: relative error {error:.3e} > {tol}"
    if problem.x.dtype == torch.float32:  # no rounding flips to speak of: the quantization must show
        assert error < unquantized_error / 4 or unquantized_error <= REL_TOL[torch.float32], (error, unquantized_error)


@pytest.mark.parametrize("config", sorted(FP8_ACTIVATION_CONFIGS))
def test_fp8_activation_gemms_on_a_fixed_problem(config):
    """A fixed problem (LoRA, bias, a gated activation) whose activations lie away from e4m3 rounding
    boundaries: the output agrees with the quantized reference to float32's tolerance, and is
    percents away from the unquantized one. K tiles under the FP8 dot's least K: the unquantized
    result."""
    problem = make_problem(T=10, H=64, I=32, E=4, K=2, L=3, R=4, bias=True, seed=3)
    launch = FP8_ACTIVATION_CONFIGS[config]
    out, quantized, dequantized = fp8_activation_run(problem, (16, 32), launch)
    if launch.gate_up.block_k < FP8_DOT_MIN_K:
        assert_close_verbose(out, dequantized, torch.float32, f"fp8 weights {config}")
        return
    assert_close_verbose(out, quantized, torch.float32, f"fp8 activations {config}")
    assert relative_error(out, dequantized) > 1e-3


@requires_cuda  # on CPU tensors quantize_groups is the reference (the interpreter rounds to e4m3 wrongly)
@pytest.mark.parametrize("shape, group", [((5, 40), 16), ((3, 7), 128), ((4, 256), 128)])
def test_activation_groups_quantize_as_the_reference(shape, group):
    """``quantize_groups`` (Triton) and ``quantize_groups_ref``: the same FP8 values and scales; a row
    of zeros gets the smallest scale, and a NaN stays in its own value (its group's scale may skip it)."""
    from torch_moe_lora.ops.quant_triton import quantize_groups

    x = torch.randn(shape) * torch.logspace(-2, 2, shape[1])
    x[1] = 0
    x[2, 3] = float("nan")
    q, scale = quantize_groups(x.cuda(), group)
    q, scale = q.cpu(), scale.cpu()
    q_ref, scale_ref = quantize_groups_ref(x, group)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == scale_ref.shape
    clean = torch.ones(shape[0], dtype=torch.bool)
    clean[2] = False
    assert torch.equal(scale[clean], scale_ref[clean]) and torch.equal(q[clean].float(), q_ref[clean].float())
    assert q[2, 3].float().isnan() and not q[2].float().isnan().sum() > 1
    assert (scale[1] == 1e-12).all() and (q[1].float() == 0).all()


@pytest.mark.parametrize("config", ["tiles", "pair_blocks"])
def test_fp8_activations_keep_a_token_s_nan_in_its_row(config):
    """A NaN in one token's x, quantized per token group: only that token's output is NaN (blocks mix
    tokens of several adapters)."""
    problem = make_problem(T=8, H=64, I=32, E=2, K=2, L=3, R=4, seed=5)
    problem.x[3, 5] = float("nan")
    out, _, _ = fp8_activation_run(problem, (16, 32), FP8_ACTIVATION_CONFIGS[config])
    nan_rows = out.isnan().any(dim=1).cpu()
    assert nan_rows[3] and nan_rows.sum() == 1, nan_rows
