"""Random MoE + multi-LoRA problems shared by the op tests, kernel tests and benchmarks' checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from torch_moe_lora import ExpertLoRASlots, LoRAWeights


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
