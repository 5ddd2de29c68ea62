"""The fused experts op: one MoE layer's experts with per-token multi-LoRA.

Reading order: the op's options, argument checks shared by every implementation, the registered op
with its fake, the portable PyTorch implementation (the CPU path), and the public function. The
registered op takes its arguments as one flat list; inside, the implementations take the LoRA
tensors as a ``LoRAWeights`` and the other arguments as one ``ExpertOptions``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..configs import LaunchConfig, get_config
from ..lora import LoRAWeights
from ..reference import ACTIVATIONS, activation_ref
from .checks import FLOAT_DTYPES, INDEX_DTYPES, direct_call, spelled_shape
from .fused_experts_triton import fused_experts_triton

_OP = "moe_lora::fused_experts"


class ExpertOptions(NamedTuple):
    """The op's arguments after its tensors, in the op's order; ``fused_experts`` documents each."""

    activation: str = "silu"
    gated: bool = True
    interleaved: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    weight_on_input: bool = False


def _lora_weights(gate_up_a, gate_up_b, down_a, down_b, gate_up_scale, down_scale) -> LoRAWeights | None:
    """The op's six LoRA arguments as one table; None when all six are None."""
    tensors = (gate_up_a, gate_up_b, down_a, down_b, gate_up_scale, down_scale)
    return None if all(t is None for t in tensors) else LoRAWeights(*tensors)


FP8_DTYPES = (torch.float8_e4m3fn,)
"""Expert weight dtypes read with block scales (``WeightScales``)."""
SCALE_DTYPES = (torch.float32,) + ((torch.float8_e8m0fnu,) if hasattr(torch, "float8_e8m0fnu") else ())
"""Scale dtypes: float32, and UE8M0 (powers of two) where torch has it."""


class WeightScales(NamedTuple):
    """The block scales of FP8 expert weights: ``w[e, n, k] * scale[e, n // block_n, k // block_k]``.

    ``w13_scale [E, ceil(2I / block_n), ceil(H / block_k)]`` (at least 2 rows, as transformers
    allocates gate_up's), ``w2_scale [E, ceil(H / block_n), ceil(I / block_k)]``, float32 or UE8M0:
    the checkpoints' ``weight_scale_inv``. Per tensor is one block over the whole matrix, per channel
    ``block_n = 1``; see ``reference.dequantize_blocks_ref``.
    """

    w13_scale: torch.Tensor
    w2_scale: torch.Tensor
    block_n: int
    block_k: int


def _weight_scales(w13_scale, w2_scale, block_n: int, block_k: int) -> WeightScales | None:
    return None if w13_scale is None and w2_scale is None else WeightScales(w13_scale, w2_scale, block_n, block_k)


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, block_n: int, block_k: int, dtype) -> torch.Tensor:
    """``weight [E, N, K]`` FP8 times its block scales, in ``dtype`` (``[E, N, K]``, contiguous).

    Expands the scales over rows and broadcasts them over each block's columns (no second
    weight-sized tensor of scales); static shapes, no host sync.
    """
    rows, cols = weight.shape[-2:]
    full_blocks, rest = divmod(cols, block_k)
    row_scale = scale.float().repeat_interleave(block_n, dim=1)[:, :rows]
    out = weight.to(torch.float32)
    head = out[..., : full_blocks * block_k].unflatten(-1, (full_blocks, block_k))
    head.mul_(row_scale[..., :full_blocks, None])
    if rest:
        out[..., full_blocks * block_k :].mul_(row_scale[..., full_blocks : full_blocks + 1])
    return out.to(dtype)


def _check_weight_scales(w13, w2, scales: WeightScales | None, x_dtype, inter: int) -> None:
    """Weights in x's dtype with no scales, or both FP8 with both scales of the right shapes."""
    quantized = [t.dtype in FP8_DTYPES for t in (w13, w2)]
    if not any(quantized):
        for name, t in (("w13", w13), ("w2", w2)):
            if t.dtype != x_dtype:
                raise TypeError(
                    f"fused_experts: {name} must have x's dtype {x_dtype} (or be float8_e4m3fn with block scales), "
                    f"got {t.dtype}"
                )
        if scales is not None:
            raise ValueError(
                f"fused_experts: w13_scale/w2_scale were given but the weights are {w13.dtype}, not float8_e4m3fn; "
                "scales go with FP8 weights only"
            )
        return
    if not all(quantized):
        raise TypeError(
            f"fused_experts: w13 and w2 must both be float8_e4m3fn or neither, got {w13.dtype} and {w2.dtype}"
        )
    if scales is None or scales.w13_scale is None or scales.w2_scale is None:
        raise ValueError(
            "fused_experts: float8_e4m3fn w13 and w2 need both w13_scale and w2_scale (their block scales)"
        )
    block_n, block_k = scales.block_n, scales.block_k
    if block_n < 1 or block_k < 1:
        raise ValueError(
            f"fused_experts: the scales' block must be positive [block_n, block_k], got [{block_n}, {block_k}]"
        )
    E, rows13, H = w13.shape
    spec = [
        ("w13_scale", scales.w13_scale, (rows13, H), (-(-rows13 // block_n), max(2, -(-rows13 // block_n)))),
        ("w2_scale", scales.w2_scale, (H, inter), (-(-H // block_n),)),
    ]
    for name, scale, (n, k), rows in spec:
        cols = -(-k // block_k)
        if scale.dim() != 3 or scale.shape[0] != E or scale.shape[1] not in rows or scale.shape[2] != cols:
            want = " or ".join(dict.fromkeys(f"[{E}, {r}, {cols}]" for r in rows))
            raise ValueError(
                f"fused_experts: {name} must be {want} (one scale per {block_n}x{block_k} block of each expert's "
                f"[{n}, {k}] weight), got {spelled_shape(scale)}"
            )
        if scale.dtype not in SCALE_DTYPES:
            raise TypeError(f"fused_experts: {name} must be one of {SCALE_DTYPES}, got {scale.dtype}")


def _expect_shape(name: str, t: torch.Tensor, expected: tuple, spelled: str) -> None:
    if t.dim() != len(expected) or any(e is not None and s != e for s, e in zip(t.shape, expected)):
        raise ValueError(f"fused_experts: {name} must have shape {spelled}, got {spelled_shape(t)}")


def check_fused_experts_args(
    x, topk_ids, topk_weights, w13, w2, *, w13_bias, w2_bias, token_lora, lora: LoRAWeights | None,
    options: ExpertOptions, scales: WeightScales | None = None,
) -> None:  # fmt: skip
    """Validates shapes, dtypes and devices of the op's arguments; raises ValueError/TypeError.

    Works on real, fake and symbolic-shape tensors (no data is read).
    """
    activation, gated = options.activation, options.gated
    if activation not in ACTIVATIONS:
        raise ValueError(f"fused_experts: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "swigluoai" and not gated:
        raise ValueError("fused_experts: activation 'swigluoai' needs gated=True")
    if x.dim() != 2:
        raise ValueError(f"fused_experts: x must be [T, H], got {spelled_shape(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fused_experts: x must be float32, float16 or bfloat16, got {x.dtype}")
    T, H = x.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"fused_experts: topk_ids must be [T, K] = [{T}, K], got {spelled_shape(topk_ids)}")
    if topk_ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"fused_experts: topk_ids must be int32 or int64, got {topk_ids.dtype}")
    K = topk_ids.shape[1]
    _expect_shape("topk_weights", topk_weights, (T, K), f"[T, K] = [{T}, {K}]")
    if not topk_weights.is_floating_point():
        raise TypeError(f"fused_experts: topk_weights must be floating point, got {topk_weights.dtype}")
    if w13.dim() != 3:
        raise ValueError(f"fused_experts: w13 must be [E, 2I, H], got {spelled_shape(w13)}")
    E, rows13 = w13.shape[0], w13.shape[1]
    if gated and rows13 % 2 != 0:
        raise ValueError(f"fused_experts: gated w13 [E, 2I, H] needs an even row count, got {spelled_shape(w13)}")
    inter = rows13 // 2 if gated else rows13
    _expect_shape("w13", w13, (E, rows13, H), f"[E, {'2I' if gated else 'I'}, H] with H = {H}")
    _expect_shape("w2", w2, (E, H, inter), f"[E, H, I] = [{E}, {H}, {inter}]")
    _check_weight_scales(w13, w2, scales, x.dtype, inter)
    if w13_bias is not None:
        _expect_shape("w13_bias", w13_bias, (E, rows13), f"[E, {'2I' if gated else 'I'}] = [{E}, {rows13}]")
    if w2_bias is not None:
        _expect_shape("w2_bias", w2_bias, (E, H), f"[E, H] = [{E}, {H}]")
    if lora is not None and any(t is None for t in lora):
        raise ValueError("fused_experts: give all six LoRA tensors (a LoRAWeights) or none")
    gate_up_a, gate_up_b, down_a, down_b, gate_up_scale, down_scale = (None,) * 6 if lora is None else lora
    if gate_up_a is not None and token_lora is None:
        raise ValueError(
            "fused_experts: lora was given without token_lora; give token_lora [T] (the adapter slot of each "
            "token, -1 for none), or lora=None for the base experts"
        )
    if token_lora is not None:
        _expect_shape("token_lora", token_lora, (T,), f"[T] = [{T}]")
        if token_lora.dtype not in INDEX_DTYPES:
            raise TypeError(f"fused_experts: token_lora must be int32 or int64, got {token_lora.dtype}")
    if gate_up_a is not None:
        if gate_up_a.dim() != 4:
            raise ValueError(f"fused_experts: gate_up_a must be [L, E, Ra, H], got {spelled_shape(gate_up_a)}")
        L, R = gate_up_a.shape[0], gate_up_b.shape[-1] if gate_up_b.dim() == 4 else -1
        _expect_shape("gate_up_b", gate_up_b, (L, E, rows13, None), f"[L, E, {'2I' if gated else 'I'}, R] = [{L}, {E}, {rows13}, R]")
        shrink = gate_up_a.shape[2]
        if shrink != R and not (gated and shrink == 2 * R):
            raise ValueError(
                f"fused_experts: gate_up_a's rank dim must equal gate_up_b's R = {R}"
                f"{' or 2R (separate gate and up LoRAs)' if gated else ''}, got gate_up_a {spelled_shape(gate_up_a)}"
            )
        _expect_shape("gate_up_a", gate_up_a, (L, E, shrink, H), f"[L, E, Ra, H] = [{L}, {E}, Ra, {H}]")
        Rd = down_a.shape[2] if down_a.dim() == 4 else -1
        _expect_shape("down_a", down_a, (L, E, Rd, inter), f"[L, E, Rd, I] = [{L}, {E}, Rd, {inter}]")
        _expect_shape("down_b", down_b, (L, E, H, Rd), f"[L, E, H, Rd] = [{L}, {E}, {H}, {Rd}]")
        for name, t in (("gate_up_a", gate_up_a), ("gate_up_b", gate_up_b), ("down_a", down_a), ("down_b", down_b)):
            if t.dtype != x.dtype:
                raise TypeError(f"fused_experts: {name} must have x's dtype {x.dtype}, got {t.dtype}")
        for name, t in (("gate_up_scale", gate_up_scale), ("down_scale", down_scale)):
            _expect_shape(name, t, (L,), f"[L] = [{L}]")
            if t.dtype != torch.float32:
                raise TypeError(f"fused_experts: {name} must be float32, got {t.dtype}")
    named = (
        ("topk_ids", topk_ids), ("topk_weights", topk_weights), ("w13", w13), ("w2", w2),
        ("w13_bias", w13_bias), ("w2_bias", w2_bias), ("token_lora", token_lora), ("gate_up_a", gate_up_a),
        ("gate_up_b", gate_up_b), ("down_a", down_a), ("down_b", down_b),
        ("gate_up_scale", gate_up_scale), ("down_scale", down_scale),
        ("w13_scale", scales and scales.w13_scale), ("w2_scale", scales and scales.w2_scale),
    )  # fmt: skip
    for name, t in named:
        if t is not None and t.device != x.device:
            raise ValueError(f"fused_experts: {name} is on {t.device} but x is on {x.device}")
    for name, t in (("w13_bias", w13_bias), ("w2_bias", w2_bias)):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"fused_experts: {name} must be floating point, got {t.dtype}")


def check_token_lora_values(token_lora: torch.Tensor | None, num_slots: int) -> None:
    """Raises when a slot index is outside ``[-1, num_slots)``. Reads the data: not for the GPU hot path."""
    if token_lora is None or token_lora.numel() == 0:
        return
    lo, hi = int(token_lora.min()), int(token_lora.max())
    if lo < -1 or hi >= num_slots:
        raise ValueError(
            f"fused_experts: token_lora values must be in [-1, {num_slots}) (-1 = no adapter, else a slot of the "
            f"{num_slots}-slot LoRA table), got values in [{lo}, {hi}]"
        )


def fused_experts_cpu(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    w13_bias: Optional[torch.Tensor],
    w2_bias: Optional[torch.Tensor],
    token_lora: Optional[torch.Tensor],
    gate_up_a: Optional[torch.Tensor],
    gate_up_b: Optional[torch.Tensor],
    down_a: Optional[torch.Tensor],
    down_b: Optional[torch.Tensor],
    gate_up_scale: Optional[torch.Tensor],
    down_scale: Optional[torch.Tensor],
    activation: str,
    gated: bool,
    interleaved: bool,
    swiglu_alpha: float,
    swiglu_limit: float,
    weight_on_input: bool,
    w13_scale: Optional[torch.Tensor] = None,
    w2_scale: Optional[torch.Tensor] = None,
    block_n: int = 0,
    block_k: int = 0,
) -> torch.Tensor:
    """The op's portable implementation (the CPU path): checks, FP8 weights dequantized, then
    ``fused_experts_torch``."""
    tensors = dict(w13_bias=w13_bias, w2_bias=w2_bias, token_lora=token_lora)
    lora = _lora_weights(gate_up_a, gate_up_b, down_a, down_b, gate_up_scale, down_scale)
    options = ExpertOptions(activation, gated, interleaved, swiglu_alpha, swiglu_limit, weight_on_input)
    scales = _weight_scales(w13_scale, w2_scale, block_n, block_k)
    check_fused_experts_args(x, topk_ids, topk_weights, w13, w2, **tensors, lora=lora, options=options, scales=scales)
    if scales is not None:
        block = (scales.block_n, scales.block_k)
        w13 = dequantize_weight(w13, scales.w13_scale, *block, torch.float32)
        w2 = dequantize_weight(w2, scales.w2_scale, *block, torch.float32)
    return fused_experts_torch(x, topk_ids, topk_weights, w13, w2, **tensors, lora=lora, options=options)


_fused_experts_op = torch.library.custom_op(_OP, fused_experts_cpu, mutates_args=())


@_fused_experts_op.register_fake
def _(
    x, topk_ids, topk_weights, w13, w2, w13_bias, w2_bias, token_lora,
    gate_up_a, gate_up_b, down_a, down_b, gate_up_scale, down_scale,
    activation, gated, interleaved, swiglu_alpha, swiglu_limit, weight_on_input,
    w13_scale=None, w2_scale=None, block_n=0, block_k=0,
):  # fmt: skip
    check_fused_experts_args(
        x, topk_ids, topk_weights, w13, w2, w13_bias=w13_bias, w2_bias=w2_bias, token_lora=token_lora,
        lora=_lora_weights(gate_up_a, gate_up_b, down_a, down_b, gate_up_scale, down_scale),
        options=ExpertOptions(activation, gated, interleaved, swiglu_alpha, swiglu_limit, weight_on_input),
        scales=_weight_scales(w13_scale, w2_scale, block_n, block_k),
    )  # fmt: skip
    return x.new_empty(x.shape)


@_fused_experts_op.register_kernel("cuda")
def fused_experts_cuda(
    x, topk_ids, topk_weights, w13, w2, w13_bias, w2_bias, token_lora,
    gate_up_a, gate_up_b, down_a, down_b, gate_up_scale, down_scale,
    activation, gated, interleaved, swiglu_alpha, swiglu_limit, weight_on_input,
    w13_scale=None, w2_scale=None, block_n=0, block_k=0,
):  # fmt: skip
    """The op's CUDA implementation: checks, then the Triton kernels."""
    tensors = dict(w13_bias=w13_bias, w2_bias=w2_bias, token_lora=token_lora)
    lora = _lora_weights(gate_up_a, gate_up_b, down_a, down_b, gate_up_scale, down_scale)
    options = ExpertOptions(activation, gated, interleaved, swiglu_alpha, swiglu_limit, weight_on_input)
    scales = _weight_scales(w13_scale, w2_scale, block_n, block_k)
    check_fused_experts_args(x, topk_ids, topk_weights, w13, w2, **tensors, lora=lora, options=options, scales=scales)
    return fused_experts_triton(
        x, topk_ids, topk_weights, w13, w2, **tensors, lora=lora, options=options,
        config=launch_config(x, topk_ids, w2), scales=scales,
    )  # fmt: skip


@functools.cache
def _device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def launch_config(x, topk_ids, w2) -> LaunchConfig:
    """The tuned launch config for this call's device, shapes and weight format (``torch_moe_lora/configs``)."""
    weights = "fp8" if w2.dtype in FP8_DTYPES else None
    return get_config(
        _device_name(x.device), w2.shape[0], x.shape[1], w2.shape[2], topk_ids.shape[1], x.shape[0], weights
    )


def _lora_delta(xs, a, b, scale, gate_rows):
    """``scale * B (A xs)`` in float32 for one (expert, slot) group; see reference.lora_delta_ref."""
    shrunk = xs @ a.float().T
    rank = b.shape[-1]
    b = b.float()
    if a.shape[0] == rank:
        return (shrunk @ b.T) * scale
    gate_part = shrunk[:, :rank] @ b.T
    up_part = shrunk[:, rank:] @ b.T
    return torch.where(gate_rows, gate_part, up_part) * scale


def fused_experts_torch(
    x, topk_ids, topk_weights, w13, w2, *, w13_bias, w2_bias, token_lora, lora: LoRAWeights | None,
    options: ExpertOptions,
) -> torch.Tensor:  # fmt: skip
    """Portable implementation in PyTorch ops (the CPU path); arguments as ``fused_experts``
    (already validated), the op's other arguments in ``options``. Computes in float32.

    Pairs are sorted by (expert, slot) once; a Python loop then runs over the non-empty experts and
    (expert, slot) groups only, never over tokens.
    """
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    has_lora = lora is not None and token_lora is not None
    num_slots = lora.num_slots if lora is not None else 0
    if token_lora is not None:
        check_token_lora_values(token_lora, num_slots)
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return out.to(x.dtype)

    expert_of_pair = topk_ids.reshape(-1).long()
    valid = (expert_of_pair >= 0) & (expert_of_pair < num_experts)
    slot_of_pair = (
        token_lora.long().repeat_interleave(top_k) if has_lora else torch.full_like(expert_of_pair, -1)
    )
    # Key (expert, slot) with slot -1 stored as num_slots; invalid pairs sort last and are not counted.
    num_keys = num_experts * (num_slots + 1)
    slot_key = torch.where(slot_of_pair < 0, num_slots, slot_of_pair)
    key = torch.where(valid, expert_of_pair * (num_slots + 1) + slot_key, num_keys)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_keys + 1)[:num_keys].view(num_experts, num_slots + 1)
    expert_counts = counts.sum(1).tolist()
    group_counts = counts.tolist()

    gate_rows = torch.arange(w13.shape[1], device=x.device)
    gate_rows = (gate_rows % 2 == 0) if options.interleaved else (gate_rows < w13.shape[1] // 2)
    weight_of_pair = topk_weights.reshape(-1).float()
    start = 0
    for e, n in enumerate(expert_counts):
        if n == 0:
            continue
        pairs = order[start : start + n]
        start += n
        tokens = pairs // top_k
        w = weight_of_pair[pairs, None]
        xs = x[tokens].float()
        if options.weight_on_input:
            xs = xs * w
        h = F.linear(xs, w13[e].float(), None if w13_bias is None else w13_bias[e].float())
        group_starts = [0]
        for c in group_counts[e]:
            group_starts.append(group_starts[-1] + c)
        lora_groups = [
            (slot, group_starts[slot], group_starts[slot + 1])
            for slot in range(num_slots)
            if group_starts[slot + 1] > group_starts[slot]
        ]
        for slot, lo, hi in lora_groups:
            h[lo:hi] += _lora_delta(
                xs[lo:hi], lora.gate_up_a[slot, e], lora.gate_up_b[slot, e], lora.gate_up_scale[slot], gate_rows
            )
        act = activation_ref(
            h, options.activation, gated=options.gated, interleaved=options.interleaved,
            swiglu_alpha=options.swiglu_alpha, swiglu_limit=options.swiglu_limit,
        )  # fmt: skip
        y = F.linear(act, w2[e].float(), None if w2_bias is None else w2_bias[e].float())
        for slot, lo, hi in lora_groups:
            y[lo:hi] += _lora_delta(act[lo:hi], lora.down_a[slot, e], lora.down_b[slot, e], lora.down_scale[slot], None)
        if not options.weight_on_input:
            y = y * w
        out.index_add_(0, tokens, y)
    return out.to(x.dtype)


def fused_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    token_lora: torch.Tensor | None = None,
    lora: LoRAWeights | None = None,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    activation: str = "silu",
    gated: bool = True,
    interleaved: bool = False,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    weight_on_input: bool = False,
    scales: WeightScales | None = None,
) -> torch.Tensor:
    """One MoE layer's routed experts with a LoRA adapter per token (``torch.ops.moe_lora.fused_experts``).

    ``y_t = sum_k w_tk * (w2_e act(w13_e x_t + b13_e + dgu) + b2_e + dd)`` with ``e = topk_ids[t, k]``
    and ``d = scale * B (A .)`` from the token's adapter slot; see ``torch_moe_lora.reference``.

    Args:
        x: ``[T, H]`` float32, float16 or bfloat16 hidden states.
        topk_ids: ``[T, K]`` int32/int64 expert of each (token, k); ids outside ``[0, E)`` are
            skipped (expert-parallel sentinels).
        topk_weights: ``[T, K]`` float routing weights.
        w13: ``[E, 2I, H]`` (``[E, I, H]`` if not gated) in x's dtype; any strides (a transposed
            view of a ``[E, H, 2I]`` parameter is read in place).
        w2: ``[E, H, I]`` in x's dtype; any strides. Both weights may instead be float8_e4m3fn
            with ``scales``.
        token_lora: ``[T]`` int32/int64 adapter slot per token, ``-1`` for none. Values outside
            ``[-1, L)`` raise on the CPU and trip a device-side assert on CUDA.
        lora: a ``LoRAWeights`` slot table (``L`` slots) or None for no LoRA; with a table,
            ``token_lora`` is required.
        w13_bias: optional ``[E, 2I]`` (``[E, I]``); w2_bias: optional ``[E, H]``.
        activation: one of ``reference.ACTIVATIONS``.
        gated: ``act(gate) * up`` (else ``act(up)``).
        interleaved: gate/up rows of ``w13`` alternate (GPT-OSS) instead of gate block then up block.
        swiglu_alpha, swiglu_limit: parameters of ``swigluoai``.
        weight_on_input: scale the expert's input by the routing weight instead of its output (Llama 4).
        scales: the block scales of FP8 ``w13``/``w2`` (``WeightScales``), or None for weights in
            x's dtype. The result is the op on the dequantized weights
            (``reference.dequantize_blocks_ref``); LoRA tables stay in x's dtype. On the GPU, a
            launch config with ``fp8_activations`` (prefill buckets that set it) also quantizes the
            base GEMMs' inputs per token and scale block (``reference.fused_experts_ref`` with
            ``activation_group=block_k``).

    Returns:
        ``[T, H]`` in x's dtype (accumulated in float32).

    In eager mode on plain CPU or CUDA tensors it runs the op's implementation directly
    (``checks.direct_call``); compiled or traced, it calls the op.
    """
    lora_args = tuple(lora) if lora is not None else (None,) * 6
    options = ExpertOptions(activation, gated, interleaved, float(swiglu_alpha), float(swiglu_limit), weight_on_input)
    quantized = () if scales is None else tuple(scales)
    tensors = (x, topk_ids, topk_weights, w13, w2, w13_bias, w2_bias, token_lora, *lora_args)
    args = (*tensors, *options, *quantized)
    if direct_call(*tensors, *quantized[:2]):  # the scales' tensors, not their block sizes
        return (fused_experts_cuda if x.is_cuda else fused_experts_cpu)(*args)
    return torch.ops.moe_lora.fused_experts(*args)
