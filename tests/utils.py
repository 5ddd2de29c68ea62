"""Shared test helpers: seeding, tolerances, a verbose allclose, device markers."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

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


def seed_all(seed: int = 0) -> None:
    torch.manual_seed(seed)


def interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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
