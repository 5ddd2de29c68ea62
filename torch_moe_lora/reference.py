"""Plain eager definitions of every ``moe_lora`` op.

This module is the ground truth: tests, benchmarks and documentation compare against it. It loops
over experts and adapter slots and computes in float64 by default, trading all speed for being easy
to check by eye. Nothing here is used on a hot path.

Conventions shared by all ops (see ``torch_moe_lora.fused_experts`` for the full argument list):

* ``x [T, H]`` hidden states, ``topk_ids [T, K]`` expert ids, ``topk_weights [T, K]`` routing
  weights. A pair ``(t, k)`` is flattened to ``t * K + k``. Expert ids outside ``[0, E)`` (the
  sentinels expert parallelism uses for experts held by other ranks) contribute nothing.
* ``w13 [E, 2I, H]``: gate rows then up rows (``interleaved=False``) or gate/up alternating
  (``interleaved=True``, GPT-OSS); ``[E, I, H]`` when ``gated=False``. ``w2 [E, H, I]``.
* ``token_lora [T]``: the adapter slot of each token, ``-1`` for none.
* LoRA slot tables for ``L`` slots (see ``torch_moe_lora.lora.LoRAWeights``):
  ``gate_up_a [L, E, Ra, H]``, ``gate_up_b [L, E, 2I, R]``, ``down_a [L, E, Rd, I]``,
  ``down_b [L, E, H, Rd]``, ``gate_up_scale [L]``, ``down_scale [L]``. ``Ra == R`` is one joint
  gate_up LoRA; ``Ra == 2R`` holds separate gate and up LoRAs: gate rows of ``gate_up_b`` contract
  with the first ``R`` shrink outputs, up rows with the last ``R``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2", "swigluoai")
"""Activation names the ops accept. ``swigluoai`` is GPT-OSS's clamped swiglu (gated only)."""


def activation_ref(
    h: torch.Tensor,
    activation: str,
    *,
    gated: bool = True,
    interleaved: bool = False,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> torch.Tensor:
    """Applies the expert activation to the gate_up projection ``h [..., 2I]`` (or ``[..., I]``).

    Gated: ``act(gate) * up``, or for ``swigluoai``
    ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = clamp(gate, max=limit)``.
    Not gated: ``act(h)``.
    """
    if gated:
        if interleaved:
            gate, up = h[..., 0::2], h[..., 1::2]
        else:
            gate, up = h.chunk(2, dim=-1)
    else:
        gate, up = h, None
    if activation == "swigluoai":
        if not gated:
            raise ValueError("activation 'swigluoai' needs gated=True")
        gate = gate.clamp(max=swiglu_limit)
        up = up.clamp(min=-swiglu_limit, max=swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * swiglu_alpha))
    if activation == "silu":
        a = F.silu(gate)
    elif activation == "gelu":
        a = F.gelu(gate)
    elif activation == "gelu_tanh":
        a = F.gelu(gate, approximate="tanh")
    elif activation == "relu":
        a = F.relu(gate)
    elif activation == "relu2":
        a = F.relu(gate).square()
    else:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return a * up if gated else a


def gate_rows_ref(num_rows: int, *, gated: bool, interleaved: bool, device=None) -> torch.Tensor:
    """Boolean mask ``[num_rows]`` of the gate_up rows that are gate rows (all True if not gated)."""
    rows = torch.arange(num_rows, device=device)
    if not gated:
        return torch.ones(num_rows, dtype=torch.bool, device=device)
    if interleaved:
        return rows % 2 == 0
    return rows < num_rows // 2


def lora_delta_ref(
    xs: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale, gate_rows: torch.Tensor | None = None
) -> torch.Tensor:
    """``scale * B (A x)`` for rows ``xs [n, in]`` with ``a [Ra, in]`` and ``b [out, R]``.

    When ``Ra == 2R`` (separate gate and up LoRAs), rows of ``b`` where ``gate_rows`` is True use the
    first ``R`` shrink outputs and the other rows the last ``R``.
    """
    shrunk = xs @ a.T
    rank = b.shape[-1]
    if a.shape[0] == rank:
        return scale * (shrunk @ b.T)
    assert a.shape[0] == 2 * rank and gate_rows is not None
    delta = torch.empty(xs.shape[0], b.shape[0], dtype=xs.dtype, device=xs.device)
    delta[:, gate_rows] = shrunk[:, :rank] @ b[gate_rows].T
    delta[:, ~gate_rows] = shrunk[:, rank:] @ b[~gate_rows].T
    return scale * delta


def fused_experts_ref(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    token_lora: torch.Tensor | None = None,
    lora=None,
    activation: str = "silu",
    gated: bool = True,
    interleaved: bool = False,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    weight_on_input: bool = False,
    activation_group: int | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """One MoE layer's experts with per-token LoRA adapters, by loops over experts and slots.

    ``y_t = sum_k w_tk * (w2_e act(w13_e x_t + b13_e + d13) + b2_e + d2)`` with ``e = topk_ids[t, k]``
    and the LoRA deltas ``d = scale * B (A .)`` of the token's slot (none for slot ``-1``). With
    ``weight_on_input`` (Llama 4) the weight scales the expert's input instead:
    ``y_t = sum_k (w2_e act(w13_e (w_tk x_t) + ...) + ...)``.

    ``lora`` is a ``LoRAWeights`` (or any object with its six fields) or None. With
    ``activation_group`` (FP8 weights read by FP8 tensor-core GEMMs, the launch config's
    ``fp8_activations``) the two base GEMMs read their inputs quantized to e4m3 per token and group
    of that many features (``quantize_groups_ref``): ``x``, and the activations ``act(...)`` after
    rounding to x's dtype; the LoRA terms read them unquantized.
    Returns ``[T, H]`` in ``compute_dtype``.
    """
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.shape[0]
    cd = compute_dtype
    out = torch.zeros(num_tokens, x.shape[1], dtype=cd, device=x.device)
    if num_tokens == 0:
        return out
    slot_of_token = token_lora.long() if token_lora is not None else torch.full((num_tokens,), -1, device=x.device)
    num_slots = lora.gate_up_a.shape[0] if lora is not None else 0
    gate_rows = gate_rows_ref(w13.shape[1], gated=gated, interleaved=interleaved, device=x.device)
    ids = topk_ids.long()
    for e in range(num_experts):
        for slot in range(-1, num_slots):
            tok, k = torch.nonzero((ids == e) & (slot_of_token[:, None] == slot), as_tuple=True)
            if tok.numel() == 0:
                continue
            w = topk_weights[tok, k].to(cd)[:, None]
            xs = x[tok].to(cd)
            base_in = xs if activation_group is None else quantized_ref(x[tok], activation_group, cd)
            if weight_on_input:
                xs, base_in = xs * w, base_in * w
            h = base_in @ w13[e].to(cd).T
            if w13_bias is not None:
                h = h + w13_bias[e].to(cd)
            if slot >= 0:
                h = h + lora_delta_ref(
                    xs,
                    lora.gate_up_a[slot, e].to(cd),
                    lora.gate_up_b[slot, e].to(cd),
                    lora.gate_up_scale[slot].to(cd),
                    gate_rows,
                )
            act = activation_ref(
                h,
                activation,
                gated=gated,
                interleaved=interleaved,
                swiglu_alpha=swiglu_alpha,
                swiglu_limit=swiglu_limit,
            )
            base_in = act if activation_group is None else quantized_ref(act.to(x.dtype), activation_group, cd)
            y = base_in @ w2[e].to(cd).T
            if w2_bias is not None:
                y = y + w2_bias[e].to(cd)
            if slot >= 0:
                y = y + lora_delta_ref(
                    act, lora.down_a[slot, e].to(cd), lora.down_b[slot, e].to(cd), lora.down_scale[slot].to(cd)
                )
            if not weight_on_input:
                y = y * w
            out.index_add_(0, tok, y)
    return out


def quantize_blocks_ref(
    weight: torch.Tensor, block: tuple[int, int], rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [E, N, K]`` as float8 e4m3 with one float32 scale per ``block = (bn, bk)`` (its
    absmax over the FP8 maximum), the FP8 checkpoints' recipe: ``(weight_fp8, scale [E, ceil(N / bn),
    ceil(K / bk)])``, which ``dequantize_blocks_ref`` takes back to ``weight`` within FP8 rounding.
    ``rows``: scale rows to allocate when more than the blocks need (transformers gives gate_up 2);
    the extra rows hold 1. On ``weight``'s device."""
    fp8 = torch.float8_e4m3fn
    (E, N, K), (bn, bk) = weight.shape, block
    nb, kb = -(-N // bn), -(-K // bk)
    padded = torch.zeros(E, nb * bn, kb * bk, dtype=torch.float32, device=weight.device)
    padded[:, :N, :K] = weight.float()
    blocks = padded.view(E, nb, bn, kb, bk)
    scale = (blocks.abs().amax(dim=(2, 4)) / torch.finfo(fp8).max).clamp_min(1e-12)
    quantized = (blocks / scale[:, :, None, :, None]).view(E, nb * bn, kb * bk)[:, :N, :K].to(fp8)
    if rows is not None and rows > nb:
        scale = torch.cat([scale, torch.ones(E, rows - nb, kb, device=weight.device)], dim=1)
    return quantized, scale


def quantize_groups_ref(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` as float8 e4m3 with one float32 scale per row and ``group`` consecutive features
    (the FP8 checkpoints' activation recipe): ``scale = max(amax / 448, 1e-12)``, ``q = x / scale``,
    both in float32. Returns ``(q [M, K], scale [M, ceil(K / group)])``."""
    rows, cols = x.shape
    groups = -(-cols // group)
    padded = torch.zeros(rows, groups * group, dtype=torch.float32, device=x.device)
    padded[:, :cols] = x.float()
    blocks = padded.view(rows, groups, group)
    scale = (blocks.abs().amax(dim=2) / torch.finfo(torch.float8_e4m3fn).max).clamp_min(1e-12)
    return (blocks / scale[:, :, None]).view(rows, -1)[:, :cols].to(torch.float8_e4m3fn), scale


def quantized_ref(x: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """``x [M, K]`` quantized per token group (``quantize_groups_ref``) and back, in ``dtype``."""
    q, scale = quantize_groups_ref(x, group)
    return q.to(dtype) * scale.to(dtype).repeat_interleave(group, dim=1)[:, : x.shape[1]]


def dequantize_blocks_ref(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Block-scaled FP8 expert weights as real numbers: ``w[e, n, k] * scale[e, n // bn, k // bk]``.

    ``weight [E, N, K]`` (float8 e4m3), ``scale [E, >= ceil(N / bn), >= ceil(K / bk)]`` (the
    checkpoints' ``weight_scale_inv``: the factor that takes a stored value back to the weight),
    ``block = (bn, bk)``. A per-tensor scale is ``block = (N, K)`` with ``scale [E, 1, 1]``; per
    channel, ``(1, K)``. The FP8 op is the bf16 op on these weights (``fused_experts_ref`` of them).
    """
    rows, cols = weight.shape[-2:]
    full = scale.to(dtype).repeat_interleave(block[0], dim=-2)[..., :rows, :]
    full = full.repeat_interleave(block[1], dim=-1)[..., :cols]
    return weight.to(dtype) * full


def align_block_size_ref(
    topk_ids: torch.Tensor,
    token_lora: torch.Tensor | None,
    num_experts: int,
    max_loras: int,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups the flattened (token, k) pairs into blocks of ``block_size`` pairs of one expert.

    Experts are visited in order. An expert's pairs are ordered by adapter slot, the adapter-less
    pairs last, and padded to a multiple of ``block_size``. Pairs of one (expert, slot) keep their
    flattened order; padding entries hold the pair count ``N = T * K``. Pairs whose expert id is
    outside ``[0, num_experts)`` are dropped.

    Returns the used prefix only (the op pads every output to a static bound):
    ``sorted_pair_ids [num_blocks * block_size]`` and ``expert_of_block [num_blocks]``, int64.
    """
    num_pairs = topk_ids.numel()
    ids = topk_ids.reshape(-1).long().cpu()
    if token_lora is None:
        slot_of_pair = torch.full((num_pairs,), -1, dtype=torch.long)
    else:
        slot_of_pair = token_lora.long().cpu().repeat_interleave(topk_ids.shape[-1])
    sorted_ids: list[int] = []
    expert_of_block: list[int] = []
    for e in range(num_experts):
        pairs: list[int] = []
        for slot in [*range(max_loras), -1]:
            pairs += torch.nonzero((ids == e) & (slot_of_pair == slot)).flatten().tolist()
        if pairs:
            padded = -(-len(pairs) // block_size) * block_size
            sorted_ids.extend(pairs + [num_pairs] * (padded - len(pairs)))
            expert_of_block.extend([e] * (padded // block_size))
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return as_long(sorted_ids), as_long(expert_of_block)


def lora_linear_ref(
    x: torch.Tensor,
    token_slot: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    lora_scale: torch.Tensor,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The LoRA delta of each token, ``[T, out]``: ``scale[s] * B[s] (A[s] x[t])`` with
    ``s = token_slot[t]``, zero where ``s == -1``; a loop over tokens, each reading only its own
    slot (``moe_lora::add_lora_linear`` adds this to its ``out``).

    Args:
        x: ``[T, in]``; token_slot: ``[T]`` int; lora_a: ``[L, R, in]``; lora_b: ``[L, out, R]``;
        lora_scale: ``[L]``.
    """
    delta = torch.zeros(x.shape[0], lora_b.shape[1], dtype=compute_dtype, device=x.device)
    for t, slot in enumerate(token_slot.tolist()):
        if slot >= 0:
            a, b = lora_a[slot].to(compute_dtype), lora_b[slot].to(compute_dtype)
            delta[t] = lora_scale[slot].to(compute_dtype) * (b @ (a @ x[t].to(compute_dtype)))
    return delta
