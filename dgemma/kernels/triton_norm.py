"""RMSNorm in one Triton launch: y = [residual +] cast(x * (mean(x^2) + eps)^-1/2 [* weight]) over the last dim.

Owns `rms_norm`, the fused form of `dgemma.model.layers.rms_norm` (plus the residual add that follows several of the
model's norms). The unfused PyTorch form is about nine kernels per norm (casts, square, mean, add, power, products),
and a layer has eleven norms, so at batch 1, where each kernel has little to do, their launches cost more than their
work; one program per row does it all here. Same arithmetic as the PyTorch form: the row in float32, the normalised
row times the weight in float32, one rounding to x's dtype, then the residual add in float32 rounded once more (as
`residual + normed` rounds). Only the order of the float32 sum of squares may differ.
Triton is imported on the first launch (see `dgemma.kernels.triton_available`); TRITON_INTERPRET=1 set before then
runs the kernel on CPU tensors.
Must not: be used where gradients are needed (it has no backward).
"""

from __future__ import annotations

import functools

import torch

from . import interpreting

triton = tl = None  # imported with the kernel's first launch


def _rms_norm_kernel(x_ptr, w_ptr, r_ptr, y_ptr, D, eps,
                     HAS_WEIGHT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * D
    cols = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    ok = cols < D
    x = tl.load(x_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, 0) / D + eps)
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = y.to(y_ptr.dtype.element_ty)
    if HAS_RESIDUAL:
        y = (tl.load(r_ptr + row + cols, mask=ok, other=0.0).to(tl.float32) + y.to(tl.float32))
        y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row + cols, y, mask=ok)


@functools.cache
def _kernel():
    global triton, tl
    import triton
    import triton.language as tl

    return triton.jit(_rms_norm_kernel)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., D] -> [..., D] in x's dtype: [residual +] rms_norm(x, weight, eps); weight [D] or None, residual shaped
    like x. Needs `dgemma.kernels.triton_available(x)`."""
    kernel = _kernel()
    d = x.shape[-1]
    if weight is not None and weight.shape != (d,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, the rows have {d} elements")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, x has {tuple(x.shape)}")
    flat = x.contiguous().view(-1, d)  # [R, D]
    y = torch.empty_like(flat)
    res = None if residual is None else residual.to(x.dtype).contiguous().view(-1, d)
    block = triton.next_power_of_2(d)
    launch = {} if interpreting() else {"num_warps": min(16, max(1, block // 256))}
    kernel[(flat.shape[0],)](flat, weight, res, y, d, eps, HAS_WEIGHT=weight is not None,
                             HAS_RESIDUAL=residual is not None, BLOCK_D=block, **launch)
    return y.view(x.shape)
