"""What the benchmark scripts share: model shapes, random problems, the CUDA-graph timer, device
ceilings, the results folder, launch-config changes (``with_changes``) and the fused experts runner
(``ExpertsRunner``). The timers, the ceilings and the runner need a GPU.

Only public names of ``torch_moe_lora`` are imported at the top; ``results_dir`` and
``ExpertsRunner`` import the internals they use where they use them, because ``compare_builds.py``
imports this module while running other builds of the library, which may lack them.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import triton
import triton.language as tl

from torch_moe_lora import LoRAWeights

if TYPE_CHECKING:
    from torch_moe_lora.configs import LaunchConfig


class MoEShape(NamedTuple):
    """The experts of one MoE layer."""

    hidden: int
    """H: the model width."""
    inter: int
    """I: one expert's intermediate width."""
    num_experts: int
    """E: experts in the layer."""
    top_k: int
    """K: experts per token."""


SHAPES = {
    "qwen3_30b_a3b": MoEShape(hidden=2048, inter=768, num_experts=128, top_k=8),
    "deepseek_v2_lite": MoEShape(hidden=2048, inter=1408, num_experts=64, top_k=6),
    "mixtral_8x7b": MoEShape(hidden=4096, inter=14336, num_experts=8, top_k=2),
    "fine_grained": MoEShape(hidden=2048, inter=512, num_experts=512, top_k=10),
}
"""The MoE shapes the fused experts scripts run, by name (``fine_grained``: many small experts)."""
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
"""Token counts of the benchmark tables, and the buckets ``tune.py`` tunes."""
NUM_SLOTS = 16
"""Adapter slots of every LoRA table the scripts make."""

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


def moe_roofline(shape, topk_ids, token_lora, rank, ceilings, weight_bytes: float, dtype_bytes: int = 2):
    """(seconds, bytes, flops, LoRA byte share, LoRA flop share) the fused experts op needs at least
    for one input set: bytes over the read bandwidth or FLOPs over the matmul rate, whichever is more.

    The bytes are the routed experts' weights read once (``weight_bytes`` an element, with any
    scales: ``1 + 4 / block**2`` for FP8 with float32 block scales), each distinct (slot, expert)
    pair's LoRA A and B, and x read and the output written (``dtype_bytes`` an element, as LoRA)."""
    hidden, inter, num_experts, _ = shape
    base_bytes = torch.unique(topk_ids).numel() * 3 * hidden * inter * weight_bytes
    slots = token_lora.long()[:, None].expand_as(topk_ids)
    with_lora = slots >= 0
    pairs = torch.unique((slots * num_experts + topk_ids.long())[with_lora]).numel()
    lora_bytes = pairs * rank * (2 * hidden + 3 * inter) * dtype_bytes
    act_bytes = 2 * topk_ids.shape[0] * hidden * dtype_bytes
    base_flops = 2 * topk_ids.numel() * 3 * hidden * inter
    lora_flops = 2 * int(with_lora.sum()) * rank * (2 * hidden + 3 * inter)
    total_bytes, total_flops = base_bytes + lora_bytes + act_bytes, base_flops + lora_flops
    seconds = max(total_bytes / ceilings.read_bytes_per_s, total_flops / ceilings.matmul_flops_per_s)
    return seconds, total_bytes, total_flops, lora_bytes / total_bytes, lora_flops / total_flops


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


def random_experts(shape: MoEShape, dtype=torch.bfloat16, device="cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """Random expert weights ``w13 [E, 2I, H]`` and ``w2 [E, H, I]``, scaled by their fan-in."""
    hidden, inter, num_experts, _ = shape
    w13 = torch.randn(num_experts, 2 * inter, hidden, dtype=dtype, device=device) * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, dtype=dtype, device=device) * inter**-0.5
    return w13, w2


def random_tokens(shape: MoEShape, num_tokens: int, dtype=torch.bfloat16, device="cuda"):
    """``(x [T, H], topk_ids [T, K] int32, topk_weights [T, K] float32)``: random tokens, uniform routing."""
    x = torch.randn(num_tokens, shape.hidden, dtype=dtype, device=device)
    return (x, *random_routing(num_tokens, shape.num_experts, shape.top_k, device))


def results_dir(out: Path, device_name: str) -> Path:
    """``out/<gpu>``, the folder of one GPU's results (named as its launch-config file), created."""
    from torch_moe_lora.configs import device_file_name

    path = out / Path(device_file_name(device_name)).stem
    path.mkdir(parents=True, exist_ok=True)
    return path


def with_changes(config: LaunchConfig, changes: list[str]) -> LaunchConfig:
    """``config`` with each ``name=JSON`` of ``changes`` set (``part.name`` inside a kernel's tiles),
    checked as a config file's entry is."""
    data = config.to_dict()
    for change in changes:
        name, _, value = change.partition("=")
        *path, key = name.split(".")
        target = data
        for part in path:
            target = target.setdefault(part, {})
        target[key] = json.loads(value)
    return type(config).from_dict(data, f"--set {' '.join(changes)}")


FP8_BLOCK = 128
"""The scale blocks of the FP8 benchmarks' expert weights (the FP8 checkpoints' 128x128)."""


def fp8_experts(w13: torch.Tensor, w2: torch.Tensor, block: int = FP8_BLOCK):
    """``(w13, w2, WeightScales)``: the experts in float8 e4m3 with float32 scales per ``block`` x
    ``block`` block (``reference.quantize_blocks_ref``)."""
    from torch_moe_lora import WeightScales
    from torch_moe_lora.reference import quantize_blocks_ref

    (q13, s13), (q2, s2) = (quantize_blocks_ref(w, (block, block)) for w in (w13, w2))
    return q13, q2, WeightScales(s13, s2, block, block)


class ExpertsRunner:
    """The fused experts kernels with a given ``LaunchConfig``, on random problems of one shape and
    token count.

    Holds random expert weights (with ``fp8_block``, quantized to float8 e4m3 in square blocks of
    that size with float32 scales, as the FP8 checkpoints ship them), a table of ``NUM_SLOTS`` LoRA
    slots of rank ``rank`` (none where ``rank`` is 0), and ``rotations`` input sets, each with its
    own tokens, routing and token mapping (``token_mapping(scenario)``). ``time`` runs one call per
    input set inside one CUDA graph, so that replays do not find one set's weights in L2.
    """

    def __init__(
        self, shape: MoEShape, num_tokens: int, *, rank: int = 16, scenario: str = "uniform4", rotations: int = 3,
        dtype=torch.bfloat16, fp8_block: int | None = None,
    ):  # fmt: skip
        self.w13, self.w2 = random_experts(shape, dtype)
        self.scales = None
        if fp8_block is not None:
            self.w13, self.w2, self.scales = fp8_experts(self.w13, self.w2, fp8_block)
        self.lora = random_lora(NUM_SLOTS, shape.num_experts, shape.hidden, shape.inter, rank, dtype) if rank else None
        self.inputs = [
            (*random_tokens(shape, num_tokens, dtype), token_mapping(num_tokens, scenario, NUM_SLOTS) if rank else None)
            for _ in range(rotations)
        ]

    def call(self, config: LaunchConfig, index: int = 0, *, with_lora: bool = True) -> torch.Tensor:
        """One call on input set ``index``; ``with_lora=False`` passes no LoRA table at all."""
        from torch_moe_lora.ops.fused_experts import ExpertOptions
        from torch_moe_lora.ops.fused_experts_triton import fused_experts_triton

        x, topk_ids, topk_weights, token_lora = self.inputs[index]
        return fused_experts_triton(
            x, topk_ids, topk_weights, self.w13, self.w2,
            token_lora=token_lora if with_lora else None, lora=self.lora if with_lora else None,
            options=ExpertOptions(), config=config, scales=self.scales,
        )  # fmt: skip

    def time(self, config: LaunchConfig, *, replays: int = 8, budget_ms: float = 150.0) -> float:
        """Median milliseconds per call, every input set in turn inside one CUDA graph (``time_graph``)."""
        calls = [lambda i=i: self.call(config, i) for i in range(len(self.inputs))]
        return time_graph(calls, replays=replays, budget_ms=budget_ms)
