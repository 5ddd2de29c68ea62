"""Timing, device ceilings and problem builders shared by the benchmarks (GPU only)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from torch_moe_lora import LoRAWeights


def _median_ms_per_call(run_all, num_calls: int, replays: int, budget_ms: float) -> float:
    """Median over replays of ``run_all()`` (which makes ``num_calls`` calls), in ms per call.

    Timed with CUDA events; replays stop early once ``budget_ms`` is spent (after at least three).
    """
    times = []
    spent = 0.0
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_all()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / num_calls)
        spent += times[-1] * num_calls
        if spent > budget_ms and len(times) >= 3:
            break
    return statistics.median(times)


def _run_each(calls) -> None:
    for call in calls:
        call()


def time_graph(calls, *, replays: int = 20, budget_ms: float = 400.0) -> float:
    """Median milliseconds per call of ``calls`` (a list of closures) captured in one CUDA graph.

    The closures run different input sets one after another inside the graph, so repeated replays
    do not find one set's weights in L2.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _run_each(calls)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _run_each(calls)
    graph.replay()
    torch.cuda.synchronize()
    return _median_ms_per_call(graph.replay, len(calls), replays, budget_ms)


def time_eager(calls, *, replays: int = 10, budget_ms: float = 400.0) -> float:
    """Median milliseconds per call for code that cannot be captured (host syncs), rotating inputs."""
    _run_each(calls)
    torch.cuda.synchronize()
    return _median_ms_per_call(lambda: _run_each(calls), len(calls), replays, budget_ms)


@dataclass
class Ceilings:
    copy_bytes_per_s: float
    matmul_flops_per_s: float


def measure_ceilings() -> Ceilings:
    """Device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate, measured here.

    Each runs for about a second first so that clocks settle; the best of several timings counts.
    """
    src = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    warm_up(lambda: dst.copy_(src), seconds=1.0)
    ms = min(time_graph([lambda: dst.copy_(src)], replays=20) for _ in range(3))
    copy = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    del src, dst
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    warm_up(lambda: a @ b, seconds=1.0)
    ms = min(time_graph([lambda: a @ b], replays=20) for _ in range(3))
    return Ceilings(copy, 2 * n**3 / (ms * 1e-3))


def warm_up(fn, seconds: float) -> None:
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()


def random_lora(num_slots, num_experts, hidden, inter, rank, dtype, device="cuda") -> LoRAWeights:
    """A full slot table with random weights (every slot's rank is ``rank``)."""
    def rnd(*shape, fan_in):
        return torch.randn(*shape, dtype=dtype, device=device) * fan_in**-0.5

    return LoRAWeights(
        gate_up_a=rnd(num_slots, num_experts, rank, hidden, fan_in=hidden),
        gate_up_b=rnd(num_slots, num_experts, 2 * inter, rank, fan_in=rank),
        down_a=rnd(num_slots, num_experts, rank, inter, fan_in=inter),
        down_b=rnd(num_slots, num_experts, hidden, rank, fan_in=rank),
        gate_up_scale=torch.full((num_slots,), 0.5, device=device),
        down_scale=torch.full((num_slots,), 0.5, device=device),
    )


def random_routing(num_tokens, num_experts, top_k, device="cuda"):
    """Uniform random routing: K distinct experts per token, softmax-like weights."""
    scores = torch.rand(num_tokens, num_experts, device=device)
    topk_weights, topk_ids = scores.topk(top_k, dim=1)
    return topk_ids.to(torch.int32), (topk_weights / topk_weights.sum(1, keepdim=True)).float()


def token_mapping(num_tokens, scenario: str, num_slots: int, device="cuda") -> torch.Tensor:
    """Adapter slot per token: ``uniform<n>`` spreads tokens over n slots, ``one`` puts all on slot 0,
    ``half_none`` puts half the tokens on no adapter and the rest over all slots, ``none`` is all -1."""
    if scenario == "none":
        return torch.full((num_tokens,), -1, dtype=torch.int32, device=device)
    if scenario == "one":
        return torch.zeros(num_tokens, dtype=torch.int32, device=device)
    if scenario.startswith("uniform"):
        n = int(scenario[len("uniform"):])
        return torch.randint(0, n, (num_tokens,), dtype=torch.int32, device=device)
    if scenario == "half_none":
        slots = torch.randint(0, num_slots, (num_tokens,), dtype=torch.int32, device=device)
        return torch.where(torch.rand(num_tokens, device=device) < 0.5, -1, slots).int()
    raise ValueError(f"unknown scenario {scenario!r}")
