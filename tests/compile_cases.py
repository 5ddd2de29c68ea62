"""Compiles the library's Triton kernels for an sm_90 GPU (the H200's) on a machine without one, as
the launchers launch them under the tuned H200 configs, and checks each kernel's shared memory.

Triton's interpreter (how the CPU tests run the kernels) does not run Triton's compiler: a kernel
it runs can still fail to compile (e.g. a helper returning tiles of two shapes) or ask more shared
memory than the GPU has (pipeline stages of a tile the launcher did not count). Here the launchers
run on CPU tensors with a stand-in driver that reports an sm_90 target; every launch compiles
(``warmup``) and launches nothing. The launchers see the H200's shared memory and PDL support.

    python tests/compile_cases.py        # exits non-zero on a compile error or a kernel over the limit

Run without ``TRITON_INTERPRET`` (the switch is read when a kernel is decorated).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_cases.py compiles the kernels: run it without TRITON_INTERPRET")

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).parent))
from utils import make_problem  # noqa: E402

import torch_moe_lora.ops.fused_experts_triton as experts_launcher  # noqa: E402
from torch_moe_lora import WeightScales, slot_segments  # noqa: E402
from torch_moe_lora.configs import CONFIG_DIR, parse_buckets  # noqa: E402
from torch_moe_lora.ops.fused_experts import ExpertOptions  # noqa: E402
from torch_moe_lora.ops.lora_linear import add_lora_linear_triton  # noqa: E402
from torch_moe_lora.reference import quantize_blocks_ref  # noqa: E402

H200_SHARED_MEMORY = 232448  # opt-in bytes per block (torch.cuda.get_device_properties on an H200)
H200 = GPUTarget("cuda", 90, 32)
SHAPE = "E=128,H=2048,I=768,K=8"  # Qwen3-30B-A3B: its H200 buckets, decode to prefill


class CompileOnlyDriver:
    """What ``JITFunction.run`` asks of the active driver, for a device that is not there."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return H200

    def get_active_torch_device(self):
        return torch.device("cpu")


compiled: dict[tuple, tuple[str, int]] = {}  # (kernel, specialization) -> (what, shared bytes)
_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    compiled.setdefault((self.__name__, kernel.hash), (self.__name__, kernel.metadata.shared))
    return kernel


def install() -> None:
    driver.set_active(CompileOnlyDriver())
    JITFunction.run = _compile_only
    experts_launcher.shared_memory_limit = lambda device: H200_SHARED_MEMORY
    experts_launcher.supports_pdl = lambda device: True


def experts_cases():
    """(name, launch) of every tuned bucket of SHAPE with and without LoRA, and FP8 weights with a
    scale per tile row (blocks of 128) and per element (blocks of 1) at decode and prefill."""
    buckets = parse_buckets(json.loads((CONFIG_DIR / "NVIDIA_H200.json").read_text())[SHAPE], SHAPE)
    fields = dict(kv.split("=") for kv in SHAPE.split(","))
    H, I, K = int(fields["H"]), int(fields["I"]), int(fields["K"])
    for T, config in buckets.items():
        # Two experts: the expert count is a runtime argument of the kernels, never a constant.
        p = make_problem(T=min(T, 4096), H=H, I=I, E=2, K=min(K, 2), L=2, R=16, dtype=torch.bfloat16)
        for lora in (True, False):
            kwargs = dict(token_lora=p.token_lora, lora=p.lora) if lora else {}
            yield f"T={T} {'LoRA' if lora else 'no LoRA'}", p, config, kwargs, None
        if T in (1, 1024):
            for block in ((128, 128), (1, 1)):
                (w13, s13), (w2, s2) = quantize_blocks_ref(p.w13, block), quantize_blocks_ref(p.w2, block)
                fp8 = dataclasses.replace(p, w13=w13, w2=w2)
                kwargs = dict(token_lora=p.token_lora, lora=p.lora)
                yield f"T={T} FP8 block {block}", fp8, config, kwargs, WeightScales(s13, s2, *block)


def check() -> int:
    install()
    failures = 0
    for name, p, config, kwargs, scales in experts_cases():
        before = set(compiled)
        try:
            experts_launcher.fused_experts_triton(
                p.x, p.topk_ids, p.topk_weights, p.w13, p.w2, options=ExpertOptions(), config=config,
                scales=scales, **kwargs,
            )  # fmt: skip
        except Exception as error:  # a compile error: report it and go on with the other cases
            failures += 1
            print(f"FAILED fused_experts {name}: {type(error).__name__}: {str(error).splitlines()[0]}")
            continue
        new = [compiled[key] for key in compiled if key not in before]
        print(f"fused_experts {name}: " + (", ".join(f"{k} {b}" for k, b in new) or "nothing new"))
    gen = torch.Generator().manual_seed(0)
    for T in (1, 64, 1024, 16384):
        x = torch.randn(T, 2048, generator=gen).bfloat16()
        a, b = torch.randn(4, 16, 2048).bfloat16(), torch.randn(4, 512, 16).bfloat16()
        slots = torch.randint(-1, 4, (T,), generator=gen)
        add_lora_linear_triton([x.new_zeros(T, 512)], x, *slot_segments(slots, 4), [a], [b], [torch.ones(4)])
    too_big = [(kernel, shared) for kernel, shared in compiled.values() if shared > H200_SHARED_MEMORY]
    for kernel, shared in too_big:
        print(f"FAILED {kernel}: {shared} bytes of shared memory, the H200 has {H200_SHARED_MEMORY}")
    kernels = sorted({kernel for kernel, _ in compiled.values()})
    print(f"{len(compiled)} kernels compiled for sm_90 ({', '.join(kernels)}); largest shared memory "
          f"{max(shared for _, shared in compiled.values())} bytes")  # fmt: skip
    return failures + len(too_big)


if __name__ == "__main__":
    sys.exit(1 if check() else 0)
