"""Fast paths, each beside the plain PyTorch reference it is tested against (same signature, switchable).

`triton_available(x)`: whether the Triton kernels here can run on `x` (Triton installed and x on a GPU where a first
small kernel compiled, ran and agreed with PyTorch, or the Triton interpreter on, TRITON_INTERPRET=1, which runs them
on CPU tensors for the tests)."""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

_WORKS: dict[torch.device, bool] = {}  # GPU -> whether Triton's probe (`_probe`) passed there


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _installed() -> bool:
    """Whether the triton package can be imported (looked up once: norms ask on every call)."""
    return importlib.util.find_spec("triton") is not None


def _probe(device: torch.device) -> bool:
    """Run the Triton RMSNorm on a small tensor on `device` against PyTorch's: False, with a warning, where it cannot
    compile or launch there (no C compiler for Triton's driver module, a Triton that does not fit this PyTorch, ...)
    or computes something else, so the PyTorch paths run instead of every norm failing."""
    from . import triton_norm

    try:
        x = torch.arange(1.0, 33.0, device=device).view(2, 16)  # [2, 16]
        ok = torch.allclose(triton_norm.rms_norm(x, None, 1e-6), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        why = "its RMSNorm disagreed with PyTorch's"
    except Exception as err:  # any failure to build or launch
        ok, why = False, f"{type(err).__name__}: {err}"
    if not ok:
        warnings.warn(f"Triton kernels cannot run on {device} ({why}); using the PyTorch paths", RuntimeWarning,
                      stacklevel=3)
    return ok


def triton_available(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on `x`: Triton is installed and x is on a GPU where `_probe` passed (probed
    on the first call for that GPU outside a CUDA graph capture), or the interpreter is on."""
    if not (x.is_cuda or interpreting()) or not _installed():
        return False
    if interpreting():
        return True
    if x.device not in _WORKS:
        if torch.cuda.is_current_stream_capturing():  # no launch or host sync may happen now; probe later
            return True
        _WORKS[x.device] = _probe(x.device)
    return _WORKS[x.device]
