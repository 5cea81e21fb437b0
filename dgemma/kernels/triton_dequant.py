"""Triton kernels for y = x @ W^T with int8 or int4 `QTensor` weights, dequantizing each weight tile inside the matmul.

Owns `available`, `linear` (one 2-D weight) and `grouped_linear` (stacked expert weights [E, N, K], each applied to
its own consecutive rows of x, all experts in one launch).
Each program computes one [BLOCK_M, BLOCK_N] tile of y (`_tile`, shared by both kernels). For each step of BLOCK_K
inputs it loads the x tile, the codes of the weight tile, and for every input the scale (and int4 offset) of its group,
forms the weights in float32 (code * scale + offset), rounds them to x's dtype (as `dequantize(q, x.dtype)` does) and
adds their product with `tl.dot` to a float32 accumulator; y is written in x's dtype. Layout read (see
`dgemma.quant.formats`): int8 codes [N, K] with scale [N, K // G] (any G that divides K, G = K being one scale per
row); int4 codes uint8 [N, K // 2] where, within each group of G inputs, byte j holds input j in its low nibble and
input j + G/2 in its high nibble, scale and offset [N, K // G]. Block edges over M, N and K are masked, so no size
needs to be a multiple of a block, and a group may straddle two K steps (G = 88).
Grouped: the m-tiles of all experts are numbered in expert order (expert e has cdiv(counts[e], BLOCK_M)); program t
reads all E counts and finds its expert and rows itself, so there is no host sync and no extra launch, and an empty
expert gets no program. The grid is sized from a bound known on the host, (P + min(E, P) * (BLOCK_M - 1)) // BLOCK_M
m-tiles; the programs past the last tile return at once.
Triton is optional and imported only when a kernel first runs: without it `available` is False and callers keep the
PyTorch path. The kernels (and their shared helper) are decorated on that first launch, so TRITON_INTERPRET=1 set
before then runs them on CPU tensors (the tests do).
Must not: handle fp8 weights, know modules or checkpoints, or choose between itself and PyTorch.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..quant.formats import QTensor

triton = tl = None  # imported with the kernels' first launch, so importing dgemma never imports Triton

KINDS = ("int8", "int4")
BLOCK_N = 64
BLOCK_K = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x`: Triton is installed and x is on a GPU, or the Triton interpreter is on."""
    return (x.is_cuda or _interpreting()) and importlib.util.find_spec("triton") is not None


def _tile(x_ptr, codes_ptr, scale_ptr, offset_ptr, y_ptr, rm, rn, M, N, K, G,
          stride_xm, stride_xk, stride_codes, stride_scale, stride_y,
          INT4: tl.constexpr, FLOAT32_DOT: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Writes y[rm, rn] = x[rm] @ W[rn]^T for the rows rm < M and the columns rn < N, W [N, K] decoded tile by tile."""
    w_rows = rn.to(tl.int64)[None, :]  # [1, BLOCK_N]
    x_rows = rm.to(tl.int64)[:, None]  # [BLOCK_M, 1]; 64-bit, as M x N passes 2^31 for a large head
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K] inputs
        x_mask = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + x_rows * stride_xm + rk[None, :] * stride_xk, mask=x_mask, other=0.0)  # [BM, BK]
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
    tl.store(y_ptr + x_rows * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _dequant_matmul_kernel(x_ptr, codes_ptr, scale_ptr, offset_ptr, y_ptr, M, N, K, G,
                           stride_xm, stride_xk, stride_codes, stride_scale, stride_y,
                           INT4: tl.constexpr, FLOAT32_DOT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows of x and y
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] rows of W, columns of y
    _tile(x_ptr, codes_ptr, scale_ptr, offset_ptr, y_ptr, rm, rn, M, N, K, G,
          stride_xm, stride_xk, stride_codes, stride_scale, stride_y, INT4, FLOAT32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)


def _grouped_kernel(x_ptr, counts_ptr, codes_ptr, scale_ptr, offset_ptr, y_ptr, E, N, K, G,
                    stride_xm, stride_xk, stride_codes_e, stride_codes, stride_scale_e, stride_scale, stride_y,
                    INT4: tl.constexpr, FLOAT32_DOT: tl.constexpr, BLOCK_E: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0).to(tl.int32)  # [BLOCK_E] rows per expert
    tiles = (counts + BLOCK_M - 1) // BLOCK_M  # [BLOCK_E] m-tiles per expert
    tile_ends = tl.cumsum(tiles, 0)  # [BLOCK_E] m-tiles of experts 0..e
    t = tl.program_id(0)
    expert = tl.sum((tile_ends <= t).to(tl.int32), 0)  # the first expert whose tiles reach past t
    if expert >= E:  # t is past the last tile
        return
    this = experts == expert
    stop = tl.sum(tl.where(this, tl.cumsum(counts, 0), 0), 0)  # the row after the expert's last
    start = stop - tl.sum(tl.where(this, counts, 0), 0)  # the expert's first row
    first_tile = tl.sum(tl.where(this, tile_ends - tiles, 0), 0)  # the number of the expert's first m-tile
    rm = start + (t - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows of x and y
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] rows of W[expert], columns of y
    e64 = expert.to(tl.int64)
    _tile(x_ptr, codes_ptr + e64 * stride_codes_e, scale_ptr + e64 * stride_scale_e,
          offset_ptr + e64 * stride_scale_e if INT4 else offset_ptr, y_ptr, rm, rn, stop, N, K, G,
          stride_xm, stride_xk, stride_codes, stride_scale, stride_y, INT4, FLOAT32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)


@functools.cache
def _kernels():
    """(2-D kernel, grouped kernel), decorated on the first launch. The kernels call `_tile` by its global name, so
    it is decorated first and put back under that name."""
    global _tile, triton, tl
    import triton
    import triton.language as tl

    _tile = triton.jit(_tile)
    return triton.jit(_dequant_matmul_kernel), triton.jit(_grouped_kernel)


def _check(q: QTensor, dims: int, k: int) -> None:
    if q.kind not in KINDS or q.codes.dim() != dims:
        raise ValueError(f"the Triton kernel takes {dims}-D int8 or int4 weights, got {q.kind} {tuple(q.shape)}")
    if q.in_features != k:
        raise ValueError(f"input has {k} features, the weight expects {q.in_features}")


def _flags(x: torch.Tensor, q: QTensor) -> dict:
    """The compile-time arguments both kernels take, BLOCK_M aside."""
    return {"INT4": q.kind == "int4", "FLOAT32_DOT": _interpreting() and x.dtype == torch.bfloat16,
            "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K}


def linear(x: torch.Tensor, q: QTensor) -> torch.Tensor:
    """x [..., K] @ W[N, K]^T -> [..., N] in x's dtype, for a 2-D int8 or int4 QTensor on x's device; needs
    `available(x)`."""
    _check(q, 2, x.shape[-1])
    n, k = q.shape
    flat = x.reshape(-1, k)  # [M, K]
    m = flat.shape[0]
    codes, scale = q.codes.contiguous(), q.scale.contiguous()  # codes [N, K or K // 2], scale [N, K // G]
    offset = None if q.offset is None else q.offset.contiguous()  # [N, K // G], int4 only
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    block_m = 16 if m <= 16 else 64
    kernel = _kernels()[0]
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, BLOCK_N))
    kernel[grid](flat, codes, scale, offset, y, m, n, k, q.group_size,
                 flat.stride(0), flat.stride(1), codes.stride(0), scale.stride(0), y.stride(0),
                 BLOCK_M=block_m, **_flags(x, q))
    return y.view(*x.shape[:-1], n)


def grouped_linear(xs: torch.Tensor, counts: torch.Tensor, q: QTensor) -> torch.Tensor:
    """xs [P, K] -> [P, N] in xs's dtype: the counts[e] consecutive rows from sum(counts[:e]) on times W[e]^T, for a
    3-D int8 or int4 QTensor W [E, N, K] on xs's device and integer counts [E] summing to P (rows past the sum are
    left unwritten). One launch, no host sync; needs `available(xs)`."""
    _check(q, 3, xs.shape[-1])
    e, n, k = q.shape
    p = xs.shape[0]
    if counts.shape != (e,):
        raise ValueError(f"counts has shape {tuple(counts.shape)}, the weight has {e} experts")
    y = torch.empty(p, n, dtype=xs.dtype, device=xs.device)  # [P, N]
    codes, scale = q.codes.contiguous(), q.scale.contiguous()  # codes [E, N, K or K // 2], scale [E, N, K // G]
    offset = None if q.offset is None else q.offset.contiguous()  # [E, N, K // G], int4 only
    block_m = 16 if p <= 16 * e else 64  # by the mean rows per expert
    # Each non-empty expert leaves at most BLOCK_M - 1 rows of its last tile empty.
    kernel = _kernels()[1]
    grid = ((p + min(e, p) * (block_m - 1)) // block_m, triton.cdiv(n, BLOCK_N))
    kernel[grid](xs, counts.contiguous(), codes, scale, offset, y, e, n, k, q.group_size,
                 xs.stride(0), xs.stride(1), codes.stride(0), codes.stride(1), scale.stride(0),
                 scale.stride(1), y.stride(0), BLOCK_E=triton.next_power_of_2(e), BLOCK_M=block_m,
                 **_flags(xs, q))
    return y
