"""Fast paths, each beside the plain PyTorch reference it is tested against (same signature, switchable).

`triton_available(x)`: whether the Triton kernels here can run on `x` (Triton installed and x on a GPU, or the Triton
interpreter on, TRITON_INTERPRET=1, which runs them on CPU tensors for the tests)."""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on `x`: Triton is installed and x is on a GPU, or the interpreter is on."""
    return (x.is_cuda or interpreting()) and importlib.util.find_spec("triton") is not None
