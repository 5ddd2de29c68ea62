"""Timing, device ceilings and problem builders shared by the benchmarks (GPU only)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from torch_moe_lora import LoRAWeights

READ_CHUNK = 65536  # elements one program of the read-bandwidth kernel sums


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


@triton.jit
def _sum_chunks_kernel(src_ptr, out_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """``out[i] = sum(src[i * CHUNK:(i + 1) * CHUNK])`` in float32 for program ``i``, ``BLOCK`` elements a step."""
    start = tl.program_id(0).to(tl.int64) * CHUNK
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for step in range(0, CHUNK, BLOCK):
        acc += tl.load(src_ptr + start + step + offs).to(tl.float32)
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc))


def sum_chunks(src: torch.Tensor, out: torch.Tensor, chunk: int = READ_CHUNK, block: int = 4096) -> None:
    """Write the float32 sum of every ``chunk`` consecutive elements of ``src`` into ``out``.

    A kernel that streams ``src`` once and writes next to nothing, for measuring read bandwidth.

    Args:
        src: contiguous tensor of any floating dtype, ``numel`` a multiple of ``chunk``.
        out: float32 tensor of ``src.numel() // chunk`` elements, on the same device.
        chunk: elements summed by one program, a multiple of ``block``.
        block: elements one program loads per step.
    """
    if not src.is_contiguous() or src.numel() % chunk or chunk % block or out.numel() != src.numel() // chunk:
        raise ValueError(f"sum_chunks: bad sizes {src.numel()=} {chunk=} {block=} {out.numel()=}")
    _sum_chunks_kernel[(out.numel(),)](src, out, CHUNK=chunk, BLOCK=block, num_warps=8)


@dataclass
class Ceilings:
    """Measured device ceilings that the rooflines divide by.

    ``read_bytes_per_s``: bytes read per second by a kernel that only streams a buffer far larger
    than L2; ``copy_bytes_per_s``: bytes read plus bytes written per second by a device-to-device
    copy; ``matmul_flops_per_s``: bf16 matmul FLOPs per second.
    """

    read_bytes_per_s: float
    copy_bytes_per_s: float
    matmul_flops_per_s: float


def measure_ceilings() -> Ceilings:
    """Read bandwidth, device-to-device copy bandwidth and the bf16 matmul rate, measured here.

    Bandwidths use a 2 GiB bf16 buffer, well over L2. Each runs for about a second first so that
    clocks settle; the best of several timings counts.
    """
    src = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    read = _read_bytes_per_s(src)
    copy = _copy_bytes_per_s(src)
    del src
    return Ceilings(read_bytes_per_s=read, copy_bytes_per_s=copy, matmul_flops_per_s=_matmul_flops_per_s(8192))


def _best_ms(fn) -> float:
    """Best of three CUDA-graph timings of ``fn`` in ms, after about a second of warm-up."""
    warm_up(fn, seconds=1.0)
    return min(time_graph([fn], replays=20) for _ in range(3))


def _read_bytes_per_s(src: torch.Tensor) -> float:
    sums = torch.empty(src.numel() // READ_CHUNK, dtype=torch.float32, device=src.device)
    return src.numel() * src.element_size() / (_best_ms(lambda: sum_chunks(src, sums)) * 1e-3)


def _copy_bytes_per_s(src: torch.Tensor) -> float:
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (_best_ms(lambda: dst.copy_(src)) * 1e-3)


def _matmul_flops_per_s(n: int) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    return 2 * n**3 / (_best_ms(lambda: a @ b) * 1e-3)


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
