"""What the ops' argument checks share: the dtypes they accept and how a shape is spelled in errors."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def spelled_shape(t: torch.Tensor) -> str:
    """``t``'s shape as an error message writes it, e.g. ``[4, 16]``."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]"
