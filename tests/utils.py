"""Shared test helpers. Test modules import these; no test module imports another.

Sections, in order:
  devices, seeding and example counts  ``HAS_CUDA``, ``requires_cuda``, ``seed_all``, ``interpreted_examples``
  tolerances                           ``REL_TOL``, ``ELEM_TOL``, ``assert_close_verbose``
  MoE problems                         ``Problem``, ``make_problem``, the ``problems`` strategy, slot poisons
  align outputs                        ``valid_prefix``, ``assert_aligned``
  tiny models                          ``COMMON``, ``TINY``, ``tiny_model``
  PEFT adapters                        ``ADAPTERS``, ``ROWS``, ``make_peft_adapters``, ``batch_ids``, row checks
  per-expert (4.x) adapters            ``legacy_adapter``, ``save_adapter``

Fixtures (``peft_adapters``) and the hypothesis profiles are in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from unittest import mock

import pytest
import torch
import transformers
from hypothesis import settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from torch_moe_lora import ExpertLoRASlots, LoRAWeights
from torch_moe_lora.models import FAMILIES, find_moe_blocks
from torch_moe_lora.ops.align import max_num_blocks

# --- devices, seeding and example counts ---------------------------------------------------------

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def seed_all(seed: int = 0) -> None:
    torch.manual_seed(seed)


def interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def interpreted_examples(count: int) -> settings:
    """Hypothesis settings for a property test that runs Triton kernels: ``count`` examples where
    they run in Triton's interpreter on the CPU (tenths of a second to seconds an example; ``count``
    keeps the test within ~20 s), the profile's count where they are compiled for a GPU."""
    if interpreting_triton():
        return settings(max_examples=min(count, settings.default.max_examples))
    return settings()


# --- tolerances ----------------------------------------------------------------------------------

# Relative tolerance on ||out - ref|| / ||ref|| against a float64 reference, per dtype. bf16 keeps 8
# mantissa bits (eps 2**-8); an experts layer rounds its input, its intermediate and its output.
REL_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}
# Element-wise tolerances (atol relative to the reference's max magnitude) for torch.testing.
ELEM_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
}


def assert_close_verbose(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Prints max/mean abs error, relative Frobenius error and mismatch count, then asserts.

    Passes when the relative error ||out - ref|| / ||ref|| is within REL_TOL[dtype] and every element
    is within ELEM_TOL[dtype] with atol scaled by the reference's largest magnitude. NaN never passes.
    """
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out64.shape == ref64.shape, f"{what}: shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}"
    assert not torch.isnan(out64).any(), f"{what}: output has NaN"
    if out64.numel() == 0:
        return
    diff = (out64 - ref64).abs()
    scale = ref64.abs().max().clamp_min(1e-30)
    rel = (diff.norm() / ref64.norm().clamp_min(1e-30)).item()
    tol = ELEM_TOL[dtype]
    bad = diff > tol["atol"] * scale + tol["rtol"] * ref64.abs()
    print(
        f"{what} [{dtype}] max_abs={diff.max().item():.3e} mean_abs={diff.mean().item():.3e} "
        f"rel={rel:.3e} ref_max={scale.item():.3e} mismatched={int(bad.sum())}/{bad.numel()}"
    )
    assert rel <= REL_TOL[dtype], f"{what}: relative error {rel:.3e} > {REL_TOL[dtype]:.1e} for {dtype}"
    assert not bad.any(), f"{what}: {int(bad.sum())} elements outside tolerance {tol} (x ref max {scale.item():.3e})"


# --- MoE problems: random routed-experts calls with a multi-LoRA table ----------------------------


@dataclass
class Problem:
    x: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    token_lora: torch.Tensor | None = None
    lora: LoRAWeights | None = None
    w13_bias: torch.Tensor | None = None
    w2_bias: torch.Tensor | None = None
    options: dict = field(default_factory=dict)

    def kwargs(self) -> dict:
        return dict(
            token_lora=self.token_lora, lora=self.lora, w13_bias=self.w13_bias, w2_bias=self.w2_bias, **self.options
        )

    def to(self, device) -> "Problem":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        lora = None if self.lora is None else LoRAWeights(*(t.to(device) for t in self.lora))
        return Problem(
            move(self.x), move(self.topk_ids), move(self.topk_weights), move(self.w13), move(self.w2),
            move(self.token_lora), lora, move(self.w13_bias), move(self.w2_bias), dict(self.options),
        )  # fmt: skip


def make_problem(
    *,
    T: int,
    H: int,
    I: int,
    E: int,
    K: int,
    L: int,
    R: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    split_gate_up: bool = False,
    gated: bool = True,
    interleaved: bool = False,
    bias: bool = False,
    activation: str = "silu",
    weight_on_input: bool = False,
    out_of_range_ids: bool = False,
    no_adapter_fraction: float = 0.25,
    ranks: list[int] | None = None,
) -> Problem:
    """A problem with weights scaled so activations stay O(1) in every dtype.

    LoRA B is non-zero (random), so a wrong adapter mapping changes the result. ``ranks`` gives each
    slot's true rank (<= R); the table pads the rest with zeros.
    """
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std)  # noqa: E731
    rows = (2 if gated else 1) * I
    x = randn(T, H)
    if E >= K:
        topk_ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.empty(0, K)
    else:
        topk_ids = torch.randint(0, E, (T, K), generator=g)
    topk_ids = topk_ids.long()
    if out_of_range_ids and T:
        drop = torch.rand(T, K, generator=g) < 0.2
        topk_ids = torch.where(drop, torch.randint(E, E + 3, (T, K), generator=g), topk_ids)
        topk_ids[0, 0] = -1
    topk_weights = torch.rand(T, K, generator=g) + 0.1
    w13 = randn(E, rows, H, std=H**-0.5)
    w2 = randn(E, H, I, std=I**-0.5)
    w13_bias = randn(E, rows, std=0.1) if bias else None
    w2_bias = randn(E, H, std=0.1) if bias else None
    token_lora, lora = None, None
    if L > 0:
        slots = ExpertLoRASlots(
            L, E, H, I, R, gated=gated, interleaved=interleaved, split_gate_up=split_gate_up and gated
        )
        ranks = ranks or [R] * L
        for slot, r in enumerate(ranks):
            pair = lambda n_in, n_out, rr=r: (randn(E, rr, n_in, std=n_in**-0.5), randn(E, n_out, rr, std=rr**-0.5))  # noqa: E731
            gate_up = {"gate": pair(H, I), "up": pair(H, I)} if split_gate_up and gated else {"gate_up": pair(H, rows)}
            slots.set_slot(slot, **gate_up, down=pair(I, H), gate_up_scale=0.5 + slot, down_scale=1.5 - 0.25 * slot)
        lora = slots.weights
        token_lora = torch.randint(0, L, (T,), generator=g)
        token_lora[torch.rand(T, generator=g) < no_adapter_fraction] = -1
    options = dict(activation=activation, gated=gated, interleaved=interleaved, weight_on_input=weight_on_input)
    problem = Problem(x, topk_ids, topk_weights, w13, w2, token_lora, lora, w13_bias, w2_bias, options)
    if dtype != torch.float32:
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        problem.x, problem.w13, problem.w2 = cast(x), cast(w13), cast(w2)
        problem.w13_bias, problem.w2_bias = cast(w13_bias), cast(w2_bias)
        if lora is not None:
            problem.lora = LoRAWeights(*(cast(t) for t in lora[:4]), *lora[4:])
    return problem


@st.composite
def problems(draw, dtypes=(torch.float32, torch.float16, torch.bfloat16), max_tokens: int = 24) -> Problem:
    """A hypothesis strategy over shapes, mappings, layouts, activations and dtypes."""
    gated = draw(st.booleans()) if draw(st.integers(0, 4)) == 0 else True
    activation = draw(st.sampled_from(["silu", "gelu", "gelu_tanh", "relu", "relu2"] + (["swigluoai"] if gated else [])))
    L = draw(st.integers(0, 4))
    R = draw(st.sampled_from([1, 2, 4, 8, 16]))
    return make_problem(
        T=draw(st.one_of(st.just(0), st.just(1), st.integers(2, max_tokens))),
        H=draw(st.sampled_from([8, 16, 24, 32, 48])),
        I=draw(st.sampled_from([4, 8, 12, 16, 32])),
        E=draw(st.integers(1, 9)),
        K=draw(st.integers(1, 4)),
        L=L,
        R=R,
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**31 - 1)),
        split_gate_up=draw(st.booleans()),
        gated=gated,
        interleaved=gated and draw(st.booleans()),
        bias=draw(st.booleans()),
        activation=activation,
        weight_on_input=draw(st.booleans()),
        out_of_range_ids=draw(st.booleans()),
        ranks=[draw(st.integers(1, R)) for _ in range(L)] if L else None,
    )


# --- FP8 expert weights ----------------------------------------------------------------------------


FP8_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
"""The linears ``fp8_models(..., attention=True)`` quantizes (as transformers' FP8 quantizer does)."""


def fp8_models(family: str, block: tuple[int, int], attention: bool = False):
    """(the tiny model of ``family`` with its experts as transformers' ``FP8Experts``, quantized in
    blocks ``block`` of (rows, columns), the same model with those experts dequantized to float32).
    With ``attention``, the ``FP8_ATTENTION`` projections of the first model are transformers'
    ``FP8Linear`` in the same blocks too, and the second model's hold their dequantized weights."""
    from transformers.integrations import finegrained_fp8 as fp8
    from transformers.integrations.moe import use_experts_implementation

    from torch_moe_lora.reference import dequantize_blocks_ref, quantize_blocks_ref

    model, dequantized = tiny_model(family), tiny_model(family)
    for moe, plain in zip(find_moe_blocks(model), find_moe_blocks(dequantized)):
        experts = moe.experts
        cls = use_experts_implementation(
            experts_class=fp8.FP8Experts, experts_interface=fp8.ALL_FP8_EXPERTS_FUNCTIONS, has_gate=experts.has_gate
        )
        new = cls(experts.config, block_size=block)
        for spec_weight, name in ((moe.spec.w13(experts), "gate_up_proj"), (moe.spec.w2(experts), "down_proj")):
            weight, scale = quantize_blocks_ref(spec_weight.detach(), block, rows=2 if name == "gate_up_proj" else None)
            setattr(new, name, torch.nn.Parameter(weight, requires_grad=False))
            setattr(new, f"{name}_scale_inv", torch.nn.Parameter(scale, requires_grad=False))
            real = dequantize_blocks_ref(weight, scale, block, torch.float32)
            target = getattr(plain.experts, name)
            with torch.no_grad():
                target.copy_(real.transpose(1, 2) if plain.spec.transposed else real)
        setattr(moe.block, moe.family.experts_attr, new)
    if attention:
        for name, linear in list(model.named_modules()):
            if name.rpartition(".")[2] not in FP8_ATTENTION or type(linear) is not nn.Linear:
                continue
            plain = dequantized.get_submodule(name)
            fp8_linear = fp8.FP8Linear(linear.in_features, linear.out_features, block_size=block,
                                       has_bias=linear.bias is not None)  # fmt: skip
            weight, scale = quantize_blocks_ref(linear.weight.detach()[None], block)
            fp8_linear.weight = nn.Parameter(weight[0], requires_grad=False)
            fp8_linear.weight_scale_inv = nn.Parameter(scale[0], requires_grad=False)
            if linear.bias is not None:
                fp8_linear.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
            with torch.no_grad():
                plain.weight.copy_(dequantize_blocks_ref(weight, scale, block, torch.float32)[0])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, fp8_linear)
    return model.eval(), dequantized.eval()


# One adapter slot's table entries poisoned (slot index tensor v). The kernels keep every one of
# these in the slot's own tokens. ``NONFINITE_B`` too, on the PyTorch path only: the GPU expand adds
# ``0 * B`` of each slot present in a block to the others' rows, so slot tables refuse them.
def _fill(field: str, value: float):
    return lambda w, v: w._replace(**{field: getattr(w, field).index_fill(0, v, value)})


def _huge(w) -> float:
    return torch.finfo(w.gate_up_b.dtype).max / 2


POISONS = {
    "nan_gate_up_a": _fill("gate_up_a", float("nan")),
    "inf_down_a": _fill("down_a", float("inf")),
    "overflowing_scales": lambda w, v: _fill("down_scale", 3e38)(_fill("gate_up_scale", 3e38)(w, v), v),
    "overflowing_gate_up_b": lambda w, v: _fill("gate_up_b", _huge(w))(w, v),
    "overflowing_down_b": lambda w, v: _fill("down_b", -_huge(w))(w, v),
}
NONFINITE_B = {
    "inf_gate_up_b": _fill("gate_up_b", float("inf")),
    "nan_down_b": _fill("down_b", float("nan")),
}


def assert_poison_stays_in_its_rows(run, problem, victim: int, poison: str):
    clean = run(problem)
    poisons = {**POISONS, **NONFINITE_B}
    bad = dataclasses.replace(problem, lora=poisons[poison](problem.lora, torch.tensor([victim], device=problem.x.device)))
    poisoned = run(bad)
    others = problem.token_lora != victim
    assert torch.equal(poisoned[others], clean[others]), f"{poison} in slot {victim} reached other tokens"
    assert torch.isfinite(poisoned[others]).all()


# --- align outputs -------------------------------------------------------------------------------


def valid_prefix(outputs, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The used prefix of ``align_block_size``'s outputs, int64 on CPU, laid out as
    ``align_block_size_ref`` returns it."""
    sorted_pair_ids, expert_of_block, num_blocks = (t.cpu().long() for t in outputs)
    count = int(num_blocks[0])
    return sorted_pair_ids[: count * block_size], expert_of_block[:count]


def assert_aligned(outputs, expected, *, num_pairs: int, num_experts: int, block_size: int, exact: bool) -> None:
    """Checks ``align_block_size``'s outputs against an expected used prefix (the reference's, or
    another device's).

    Sizes, dtypes, num_blocks, block metadata, padding positions and the tail are compared exactly.
    Pair ids are compared exactly when ``exact``, else as one set per run of blocks of one expert.
    """
    sorted_pair_ids, expert_of_block, num_blocks = outputs
    bound = max_num_blocks(num_pairs, num_experts, block_size)
    shapes = [tuple(t.shape) for t in outputs]
    assert shapes == [(bound * block_size,), (bound,), (1,)], f"shapes {shapes}, bound {bound}"
    assert all(t.dtype == torch.int32 for t in outputs), [t.dtype for t in outputs]
    expected_ids, expected_experts = (t.long() for t in expected)
    count = expected_experts.numel()
    assert int(num_blocks[0]) == count
    got_ids, got_experts = valid_prefix(outputs, block_size)
    assert torch.equal(got_experts, expected_experts), f"expert_of_block {got_experts} != {expected_experts}"
    assert (expert_of_block[count:] == -1).all(), "tail metadata != -1"
    assert (sorted_pair_ids[count * block_size :] == num_pairs).all(), "tail of sorted_pair_ids != N"
    if exact:
        assert torch.equal(got_ids, expected_ids), f"sorted_pair_ids {got_ids} != {expected_ids}"
        return
    assert torch.equal(got_ids == num_pairs, expected_ids == num_pairs), "padding positions differ"
    start = 0
    for blocks in torch.unique_consecutive(expected_experts, return_counts=True)[1].tolist():
        span = slice(start * block_size, (start + blocks) * block_size)
        got_set, expected_set = got_ids[span].sort().values, expected_ids[span].sort().values
        assert torch.equal(got_set, expected_set), f"blocks {start}..{start + blocks}: {got_set} != {expected_set}"
        start += blocks


# --- tiny models: a random transformers model of every registered family --------------------------

COMMON = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    max_position_embeddings=64,
)  # fmt: skip
MLA = dict(num_key_value_heads=2, head_dim=8, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
# family -> (config class, config overrides, number of MoE blocks the model has)
TINY = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2), 2),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
             num_experts_per_tok=2, norm_topk_prob=False),
        2,
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(intermediate_size=48, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
        2,
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
             num_experts_per_tok=2, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
             linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"]),
        2,
    ),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2, eos_token_id=1), 2),
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
             num_experts_per_tok=2, first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=2,
             topk_group=1, q_lora_rank=None, routed_scaling_factor=1.5, **MLA),
        1,
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
             num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=24,
             routed_scaling_factor=2.5, norm_topk_prob=True, **MLA),
        1,
    ),
    "phimoe": ("PhimoeConfig", dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2), 2),
    "gpt_oss": (
        "GptOssConfig",
        dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
             layer_types=["sliding_attention", "full_attention"]),
        2,
    ),
    "granitemoe": ("GraniteMoeConfig", dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2), 2),
    "llama4": (
        "Llama4TextConfig",
        dict(intermediate_size=24, intermediate_size_mlp=48, num_local_experts=4, num_experts_per_tok=2,
             interleave_moe_layer_step=2, attention_chunk_size=16),
        1,
    ),
}  # fmt: skip


def tiny_model(family: str, experts_implementation: str | None = None) -> nn.Module:
    """A float32 tiny random model of ``family``, with experts and routers re-drawn at a scale where
    routing is spread out, activations leave their linear range and GPT-OSS's clamps bite."""
    seed_all(0)
    config_class, overrides, _ = TINY[family]
    config = getattr(transformers, config_class)(**{**COMMON, **overrides})
    kwargs = {} if experts_implementation is None else dict(experts_implementation=experts_implementation)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32, **kwargs)
    with torch.no_grad():
        for block in find_moe_blocks(model):
            for name, param in block.experts.named_parameters():
                param.normal_(0.0, 0.5 if name.endswith("bias") else 0.3)
            for param in getattr(block.block, FAMILIES[family].router_attr).parameters():
                param.normal_(0.0, 0.5)
            for buffer in getattr(block.block, FAMILIES[family].router_attr).buffers():
                buffer.normal_(0.0, 0.5)
            if family == "gpt_oss":  # module attributes both versions read (5.17 ignores the config's)
                block.experts.alpha, block.experts.limit = 1.3, 1.5
    return model.eval()


# --- PEFT adapters of the tiny models, and row-by-row comparisons ---------------------------------

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
LINEARS = [
    "q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
    "in_proj_qkvz", "in_proj_ba", "out_proj", "gate_proj", "up_proj", "down_proj", "shared_expert_gate",
]  # fmt: skip
# LoraConfig arguments of the three adapters every family gets (names absent from a family are skipped).
ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=LINEARS, target_parameters=EXPERTS),
    "b": dict(
        r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "kv_b_proj", "out_proj", "down_proj"],
        target_parameters=EXPERTS, rank_pattern={"experts.down_proj": 5, "o_proj": 3},
        alpha_pattern={"experts.gate_up_proj": 7, "q_proj": 1},
    ),
    "c": dict(
        r=3, lora_alpha=6, use_rslora=True, target_modules=["v_proj", "kv_a_proj_with_mqa", "in_proj_qkvz", "up_proj"],
        target_parameters=["experts.down_proj"],
    ),
}  # fmt: skip
# The adapter of each row of the mixed batch (``batch_ids()``), and how its greedy tokens are drawn.
ROWS = ["a", "b", None, "c"]
GENERATE = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)


@contextlib.contextmanager
def no_v4_renaming():
    """PEFT's LoRA layers without its transformers-4-to-5 target renaming.

    PEFT 0.21 reads ``gate_proj``/``up_proj``/``down_proj`` in ``target_modules`` as the per-expert
    modules of 4.x checkpoints for the families it converts (Mixtral and the Qwen2-MoE group), even
    when they name real ``nn.Linear`` shared experts or dense MLPs; it then targets the experts instead
    (or refuses ``up_proj`` alone). With the renaming off PEFT targets exactly the named linears.
    """
    with mock.patch("peft.utils.transformers_weight_conversion.convert_peft_config_for_transformers"):
        yield


def make_peft_adapters(family: str, root, configs: dict = ADAPTERS) -> dict[str, tuple[str, nn.Module]]:
    """Adapters made and saved by PEFT: name -> (directory, the PEFT model that made it)."""
    made = {}
    for seed, (name, kwargs) in enumerate(configs.items(), start=100):
        model = tiny_model(family)
        torch.manual_seed(seed)
        with no_v4_renaming():
            peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **kwargs)).eval()
        path = str(root / name)
        peft_model.save_pretrained(path)
        made[name] = (path, peft_model)
    return made


def batch_ids(rows: int = len(ROWS), length: int = 7) -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (rows, length), generator=torch.Generator().manual_seed(1))


def row_references(rows, models: dict, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B, S, V]`` and greedy tokens ``[B, S + n]`` of each row run alone on its own model."""
    logits, tokens = [], []
    with torch.no_grad():
        for row, name in enumerate(rows):
            model = models[name]
            logits.append(model(input_ids=ids[row : row + 1]).logits[0])
            tokens.append(model.generate(input_ids=ids[row : row + 1], **GENERATE)[0])
    return torch.stack(logits), torch.stack(tokens)


def assert_rows_match(out: torch.Tensor, ref: torch.Tensor, rows, what: str, rel: float = 1e-4) -> None:
    """Row-wise max |out - ref| <= rel * max |ref| (float32); prints every row's difference."""
    scale = ref.abs().max().item()
    diffs = (out.double() - ref.double()).abs().amax(dim=tuple(range(1, out.dim())))
    print(
        f"{what}: logit scale {scale:.3e}, max |diff| per row " + ", ".join(f"{r}={d:.2e}" for r, d in zip(rows, diffs))
    )
    assert diffs.max().item() <= rel * scale, what


def assert_error_is_pefts_own(ours: torch.Tensor, peft: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Low-precision logits against float32 PEFT: our mean |error| at most 2x PEFT's own in the same
    dtype, and our max |error| at most 4x (+1e-3 of the logit scale). A few layers of a tiny random
    model amplify rounding chaotically, so the largest single error of two computations rounded at
    different points differs by up to ~3x from run to run; the mean is the stable statistic."""
    ours_err, peft_err = (ours.double() - ref.double()).abs(), (peft.double() - ref.double()).abs()
    scale = ref.abs().max().item()
    print(
        f"{what}: |error| vs float32 PEFT: ours mean {ours_err.mean():.3e} max {ours_err.max():.3e}, PEFT's own "
        f"mean {peft_err.mean():.3e} max {peft_err.max():.3e}, logit scale {scale:.3e}"
    )
    assert ours_err.mean() <= 2 * peft_err.mean(), what
    assert ours_err.max() <= 4 * peft_err.max() + 1e-3 * scale, what


# --- per-expert (transformers 4.x) adapters, built by hand ---------------------------------------

LEGACY_RANK, LEGACY_ALPHA = 3, 4
# Only where PEFT does not convert: its conversion ignores per-module patterns, and with use_rslora
# it scales the joined gate_up by 2 alpha / sqrt(2 r) instead of alpha / sqrt(r).
LEGACY_PATTERNS = {"rank_pattern": {"experts.1.{gate}": 4}, "alpha_pattern": {"{up}": 3, "{down}": 6}}
LEGACY_RSLORA = {"qwen2_moe"}


def projection_names(family: str) -> dict[str, str]:
    """role -> the 4.x per-expert module name (``w1``, ``gate_proj``, ...)."""
    return {role: name for name, role in FAMILIES[family].legacy.roles.items()}


def legacy_adapter(family: str, patterns: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """A 4.x-style adapter: per-expert gate/up/down LoRAs on every MoE block, plus q_proj; with
    ``patterns``, per-expert ranks, per-projection alphas (and rsLoRA for ``LEGACY_RSLORA`` families)."""
    names = projection_names(family)
    config = dict(peft_type="LORA", r=LEGACY_RANK, lora_alpha=LEGACY_ALPHA, target_modules=[*names.values(), "q_proj"])
    if patterns:
        config.update(
            {kind: {p.format(**names): v for p, v in pattern.items()} for kind, pattern in LEGACY_PATTERNS.items()}
        )
        config["use_rslora"] = family in LEGACY_RSLORA
    rank_pattern = config.get("rank_pattern", {})
    generator = torch.Generator().manual_seed(7)
    state_dict = {}
    model = tiny_model(family)
    for block in find_moe_blocks(model):
        num_experts, hidden, inter = block.spec.w2(block.experts).shape
        layer = block.name.rsplit(".", 1)[0]
        for expert in range(num_experts):
            for role, name in names.items():
                rank = rank_pattern.get(f"experts.{expert}.{name}", LEGACY_RANK)
                fan_in, fan_out = (inter, hidden) if role == "down" else (hidden, inter)
                key = f"base_model.model.{layer}.{FAMILIES[family].legacy.block_attr}.experts.{expert}.{name}"
                state_dict[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.5
                state_dict[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.5
        q_proj, q_key = model.get_submodule(f"{layer}.self_attn.q_proj"), f"base_model.model.{layer}.self_attn.q_proj"
        state_dict[f"{q_key}.lora_A.weight"] = torch.randn(LEGACY_RANK, q_proj.in_features)
        state_dict[f"{q_key}.lora_B.weight"] = torch.randn(q_proj.out_features, LEGACY_RANK)
    return state_dict, config


def save_adapter(path, state_dict: dict, config: dict) -> str:
    """Saves a hand-made adapter where PEFT would: the weights and the full ``LoraConfig`` as JSON."""
    path.mkdir()
    save_file(state_dict, str(path / "adapter_model.safetensors"))
    full = LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}).to_dict()
    full["peft_type"] = "LORA"
    (path / "adapter_config.json").write_text(
        json.dumps({k: v for k, v in full.items() if k != "runtime_config"}, default=list)
    )
    return str(path)
