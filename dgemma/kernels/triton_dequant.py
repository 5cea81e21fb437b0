"""A Triton kernel for y = x @ W^T with an int8 or int4 `QTensor` W, dequantizing each weight tile inside the matmul.

Each program computes one [BLOCK_M, BLOCK_N] tile of y. For each step of BLOCK_K inputs it loads the x tile, the
codes of the weight tile, and for every input the scale (and int4 offset) of its group, forms the weights in float32
(code * scale + offset), rounds them to x's dtype (as `dequantize(q, x.dtype)` does) and adds their product with
`tl.dot` to a float32 accumulator; y is written in x's dtype. Layout read (see `dgemma.quant.formats`):
int8 codes [N, K] with scale [N, K // G] (any G that divides K, G = K being one scale per row); int4 codes uint8
[N, K // 2] where, within each group of G inputs, byte j holds input j in its low nibble and input j + G/2 in its
high nibble, scale and offset [N, K // G]. Block edges over M, N and K are masked, so no size needs to be a multiple
of a block, and a group may straddle two K steps (G = 88).
Triton is optional: without it `available` is False and callers keep the PyTorch path. The kernel is decorated on its
first launch, so TRITON_INTERPRET=1 set before then runs it on CPU tensors (the tests do).
Must not: handle fp8 or 3-D (stacked expert) weights, know modules or checkpoints, or choose between itself and PyTorch.
"""

from __future__ import annotations

import functools
import os

import torch

from ..quant.formats import QTensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

KINDS = ("int8", "int4")
BLOCK_N = 64
BLOCK_K = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(x: torch.Tensor) -> bool:
    """Whether the kernel can run on `x`: Triton is installed and x is on a GPU, or the Triton interpreter is on."""
    return triton is not None and (x.is_cuda or _interpreting())


def _dequant_matmul_kernel(x_ptr, codes_ptr, scale_ptr, offset_ptr, y_ptr, M, N, K, G,
                           stride_xm, stride_xk, stride_codes, stride_scale, stride_y,
                           INT4: tl.constexpr, FLOAT32_DOT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows of x and y
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] rows of W, columns of y
    w_rows = rn.to(tl.int64)[None, :]  # [1, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K] inputs
        x_mask = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=x_mask, other=0.0)  # [BM, BK]
        w_mask = (rk[:, None] < K) & (rn[None, :] < N)  # [BLOCK_K, BLOCK_N]; W is read transposed
        group = rk // G  # [BLOCK_K]
        scale_at = scale_ptr + w_rows * stride_scale + group[:, None]
        if INT4:
            half = G // 2
            within = rk % G
            byte = group * half + within % half  # [BLOCK_K] byte holding each input
            shift = (within // half) * 4  # 0: low nibble (first half of the group), 4: high nibble
            packed = tl.load(codes_ptr + w_rows * stride_codes + byte[:, None], mask=w_mask, other=0)
            code = (packed.to(tl.int32) >> shift[:, None]) & 15
            offset = tl.load(offset_ptr + w_rows * stride_scale + group[:, None], mask=w_mask, other=0.0)
            w = code.to(tl.float32) * tl.load(scale_at, mask=w_mask, other=0.0).to(tl.float32) + offset.to(tl.float32)
        else:
            code = tl.load(codes_ptr + w_rows * stride_codes + rk[:, None], mask=w_mask, other=0)
            w = code.to(tl.float32) * tl.load(scale_at, mask=w_mask, other=0.0).to(tl.float32)
        w = w.to(x_ptr.dtype.element_ty)  # [BLOCK_K, BLOCK_N], rounded like dequantize(q, x.dtype)
        if FLOAT32_DOT:
            # The interpreter's dot multiplies bfloat16 operands as their raw bits; in float32 the products of
            # bfloat16 values are exact, so only the order of the float32 sums differs from a bfloat16 dot.
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision="ieee")
    y_mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@functools.cache
def _kernel():
    return triton.jit(_dequant_matmul_kernel)


def linear(x: torch.Tensor, q: QTensor) -> torch.Tensor:
    """x [..., K] @ W[N, K]^T -> [..., N] in x's dtype, for a 2-D int8 or int4 QTensor on x's device; needs
    `available(x)`."""
    if q.kind not in KINDS or q.codes.dim() != 2:
        raise ValueError(f"the Triton kernel takes 2-D int8 or int4 weights, got {q.kind} {tuple(q.shape)}")
    n, k = q.shape
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {k}")
    flat = x.reshape(-1, k)  # [M, K]
    m = flat.shape[0]
    codes, scale = q.codes.contiguous(), q.scale.contiguous()  # codes [N, K or K // 2], scale [N, K // G]
    offset = None if q.offset is None else q.offset.contiguous()  # [N, K // G], int4 only
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, BLOCK_N))
    _kernel()[grid](flat, codes, scale, offset, y, m, n, k, q.group_size,
                    flat.stride(0), flat.stride(1), codes.stride(0), scale.stride(0), y.stride(0),
                    INT4=q.kind == "int4", FLOAT32_DOT=_interpreting() and x.dtype == torch.bfloat16,
                    BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y.view(*x.shape[:-1], n)
