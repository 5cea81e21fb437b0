"""RMSNorm in one Triton launch: y = [residual +] cast(x * (mean(x^2) + eps)^-1/2 [* weight]) over the last dim.

Owns `rms_norm`, the fused form of `dgemma.model.layers.rms_norm` (plus the residual add that follows several of the
model's norms, or the rotary embedding that follows the q and k norms). The unfused PyTorch form is about nine
kernels per norm (casts, square, mean, add, power, products), and a layer has eleven norms, so at batch 1, where
each kernel has little to do, their launches cost more than their work; one program per row does it all here. Same
arithmetic as the PyTorch form: the row in float32, the normalised row times the weight in float32, one rounding to
x's dtype, then the residual add in float32 rounded once more (as `residual + normed` rounds); the rotation rounds
each product and the sum as `apply_rope`'s separate ops do. Only the order of the float32 sum of squares may differ.
Triton is imported on the first launch (see `dgemma.kernels.triton_available`); TRITON_INTERPRET=1 set before then
runs the kernel on CPU tensors.
Must not: be used where gradients are needed (it has no backward).
"""

from __future__ import annotations

import functools

import torch

from . import interpreting

triton = tl = None  # imported with the kernel's first launch


def _rms_norm_kernel(x_ptr, w_ptr, r_ptr, cos_ptr, sin_ptr, y_ptr, D, eps, HEADS, ANGLE_ROWS,
                     HAS_WEIGHT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ROPE: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    row = pid.to(tl.int64) * D
    dtype = y_ptr.dtype.element_ty
    if ROPE:  # D == BLOCK_D: the row as its two halves, as rotate-half pairs them
        cols = tl.arange(0, BLOCK_D // 2)  # [D / 2]
        half = BLOCK_D // 2
        x1 = tl.load(x_ptr + row + cols).to(tl.float32)
        x2 = tl.load(x_ptr + row + half + cols).to(tl.float32)
        inv = tl.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / D + eps)
        y1, y2 = x1 * inv, x2 * inv
        if HAS_WEIGHT:
            y1 = y1 * tl.load(w_ptr + cols).to(tl.float32)
            y2 = y2 * tl.load(w_ptr + half + cols).to(tl.float32)
        y1, y2 = y1.to(dtype).to(tl.float32), y2.to(dtype).to(tl.float32)  # the norm's output, rounded
        angle = ((pid // HEADS) % ANGLE_ROWS).to(tl.int64) * D  # this row's (position's) cos/sin row
        c1, c2 = tl.load(cos_ptr + angle + cols).to(tl.float32), tl.load(cos_ptr + angle + half + cols).to(tl.float32)
        s1, s2 = tl.load(sin_ptr + angle + cols).to(tl.float32), tl.load(sin_ptr + angle + half + cols).to(tl.float32)
        # x * cos + rotate_half(x) * sin, each product and the sum rounded to the dtype as separate ops round.
        out1 = (y1 * c1).to(dtype).to(tl.float32) + (-y2 * s1).to(dtype).to(tl.float32)
        out2 = (y2 * c2).to(dtype).to(tl.float32) + (y1 * s2).to(dtype).to(tl.float32)
        tl.store(y_ptr + row + cols, out1.to(dtype))
        tl.store(y_ptr + row + half + cols, out2.to(dtype))
    else:
        cols = tl.arange(0, BLOCK_D)  # [BLOCK_D]
        ok = cols < D
        x = tl.load(x_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)
        y = x * tl.rsqrt(tl.sum(x * x, 0) / D + eps)
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        y = y.to(dtype)
        if HAS_RESIDUAL:
            y = (tl.load(r_ptr + row + cols, mask=ok, other=0.0).to(tl.float32) + y.to(tl.float32)).to(dtype)
        tl.store(y_ptr + row + cols, y, mask=ok)


@functools.cache
def _kernel():
    global triton, tl
    import triton
    import triton.language as tl

    return triton.jit(_rms_norm_kernel)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None,
             rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x [..., D] -> [..., D] in x's dtype: [residual +] rms_norm(x, weight, eps); weight [D] or None, residual shaped
    like x. With rope = (cos, sin), x is [B, T, H, D] (D a power of two), cos/sin [T, D] or [B, T, D] in x's dtype,
    and the normed rows are rotated as `layers.apply_rope` rotates them. Needs `dgemma.kernels.triton_available(x)`."""
    kernel = _kernel()
    d = x.shape[-1]
    if weight is not None and weight.shape != (d,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, the rows have {d} elements")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, x has {tuple(x.shape)}")
    if residual is not None and rope is not None:
        raise ValueError("a norm takes a residual or a rotation, not both")
    flat = x.contiguous().view(-1, d)  # [R, D]
    y = torch.empty_like(flat)
    res = None if residual is None else residual.to(x.dtype).contiguous().view(-1, d)
    cos = sin = None
    heads = angle_rows = 1
    if rope is not None:
        if x.dim() != 4 or d & (d - 1):
            raise ValueError(f"rotation needs x [B, T, H, D] with D a power of two, got {tuple(x.shape)}")
        cos, sin = (t.to(x.dtype).contiguous().view(-1, d) for t in rope)  # [T or B * T, D]
        heads, angle_rows = x.shape[2], cos.shape[0]
    block = triton.next_power_of_2(d)
    launch = {} if interpreting() else {"num_warps": min(16, max(1, block // 256))}
    kernel[(flat.shape[0],)](flat, weight, res, cos, sin, y, d, eps, heads, angle_rows, HAS_WEIGHT=weight is not None,
                             HAS_RESIDUAL=residual is not None, ROPE=rope is not None, BLOCK_D=block, **launch)
    return y.view(x.shape)
