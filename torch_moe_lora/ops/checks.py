"""What the ops' argument checks share: the dtypes they accept and how a shape is spelled in errors."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def spelled_shape(t: torch.Tensor) -> str:
    """``t``'s shape as an error message writes it, e.g. ``[4, 16]``."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def direct_call(*tensors: torch.Tensor | None) -> bool:
    """Whether a public function may run its op's implementation directly, skipping the dispatcher.

    In eager mode the dispatcher's round trips through Python (the custom op's autograd and backend
    wrappers) cost more host time than a small call's kernels take on the GPU: a model runs its
    prefill eagerly, and there the host sets the pace. A direct call is taken only where it is the
    same call: not while compiling or tracing (dynamo, fake, proxy or functional tensors, a torch
    function or dispatch mode, a functorch transform), on plain tensors (or parameters) of one CPU or
    CUDA device, none requiring grad with grad mode on (autograd then sees the op, which has no
    derivative: its output carries no gradient). ``None`` entries (optional arguments) are skipped.
    """
    if (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
    ):
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    present = [t for t in tensors if t is not None]
    if not all(type(t) in _PLAIN_TYPES for t in present):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    # One device (the implementations' own checks name a tensor on another), a CPU or CUDA one.
    devices = {t.device for t in present}
    return len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
