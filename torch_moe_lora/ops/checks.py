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
    CUDA device, none requiring grad with grad mode on (the dispatcher then raises as for any op
    without a derivative). ``None`` entries (optional arguments) are skipped.
    """
    if (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
    ):
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    grad = torch.is_grad_enabled()
    device = None
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN_TYPES or (grad and t.requires_grad) or t.device.type not in ("cpu", "cuda"):
            return False
        if device is None:
            device = t.device
        elif t.device != device:
            return False  # the implementations' own checks name the tensor on another device
    return True
