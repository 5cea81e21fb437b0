"""Triton kernels for y = x @ W^T where W is int8 or int4 (a `QTensor`, decoded tile by tile inside the matmul) or a
plain float weight in x's dtype; one 2-D weight (`linear`) or stacked expert weights (`grouped_linear`).

Owns `available`, `linear` (one 2-D weight) and `grouped_linear` (stacked expert weights [E, N, K], each applied to
its own consecutive rows of x, all experts in one launch), and the launch shapes (`TILES`).
Each program computes one [BLOCK_M, BLOCK_N] tile of y (`_tile`, shared by both kernels), streaming its BLOCK_N rows
of W along K: the weights read decide the time when few rows of x meet each weight (a denoising step at batch 1 gives
each of 128 experts about 16 rows), so W tiles are read as stored, [BLOCK_N, K-block] with K contiguous, and multiplied
with `tl.dot` into a float32 accumulator; y is written in x's dtype. Codes are small integers, exact in any float
dtype, so the kernels multiply x by the codes and apply scales (and offsets) to the float32 sums, never forming a
decoded weight: the same products as dequantize-then-matmul, without its rounding of each weight to x's dtype.
Layouts read (see `dgemma.quant.formats`):
- float: W [N, K] in x's dtype.
- int8: codes [N, K], scale [N, K // G], optional offset [N, K // G]. One scale per row (G = K) and no offset
  multiplies the row's whole sum; smaller groups or offsets (imported blocks) are decoded per element, code * scale
  (+ offset) in float32, to x's dtype before the product instead.
- int4: codes uint8 [N, K // 2]; within each group of G inputs byte j holds input j in its low nibble and input
  j + G/2 in its high nibble; scale and offset [N, K // G]. A K-step is one group: the G/2 bytes (padded to a power
  of two of at least 16, tl.dot's smallest, and masked, as for G = 88 or 16) give the low nibbles, multiplied with
  x's first half-group, and the high ones, with the second; the group's sum s of x * code becomes
  s * scale + sum(x) * offset.
Edges over M, N, K and groups are masked, so no size needs to be a multiple of a block.
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

import torch

from ..quant.formats import QTensor
from . import interpreting, triton_available

triton = tl = None  # imported with the kernels' first launch, so importing dgemma never imports Triton

KINDS = ("int8", "int4")  # the quantized kinds the kernels decode; plain float weights are taken too
_FLOAT, _INT8, _INT4 = 0, 1, 2
# Launch shape per weight kind: BLOCK_N weight rows per program, about BLOCK_K inputs per K-step, and Triton's warps
# and pipeline stages. BLOCK_M follows the rows of x per weight (`_block_m`).
# Chosen by timing a 26b-a4b layer's experts at batch 1 on an H200 (2048 token-expert rows over 128 experts).
# int4 takes one group per K-step whatever BLOCK_K says.
TILES = {"float": {"BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
         "int8": {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4},
         "int4": {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}}


available = triton_available


def _tile(x_ptr, w_ptr, scale_ptr, offset_ptr, y_ptr, rm, rn, M, N, K, G, stride_x, stride_w, stride_scale, stride_y,
          KIND: tl.constexpr, PER_ROW: tl.constexpr, OFFSET: tl.constexpr, HALF: tl.constexpr,
          FLOAT32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Writes y[rm, rn] = x[rm] @ W[rn]^T for the rows rm < M and the columns rn < N."""
    x_rows = rm.to(tl.int64)[:, None]  # [BLOCK_M, 1]; 64-bit, as M x N passes 2^31 for a large head
    w_rows = rn.to(tl.int64)[:, None]  # [BLOCK_N, 1]
    m_ok = rm[:, None] < M
    n_ok = rn[:, None] < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if KIND == 2:  # int4: one group per K-step, its product scaled and offset after the dot
        half = G // 2
        j = tl.arange(0, HALF)[None, :]  # [1, HALF] byte within the half-group
        j_ok = j < half
        for g in range(0, K // G):
            packed = tl.load(w_ptr + w_rows * stride_w + g * half + j, mask=n_ok & j_ok, other=0)  # [BN, HALF]
            x_at = x_ptr + x_rows * stride_x + g * G + j  # [BLOCK_M, HALF]: inputs of the low nibbles
            x_low = tl.load(x_at, mask=m_ok & j_ok, other=0.0)
            x_high = tl.load(x_at + half, mask=m_ok & j_ok, other=0.0)
            # Codes 0..15, exact in any float dtype (through float32: the interpreter mis-converts ints to bfloat16).
            low, high = (packed & 15).to(tl.float32).to(dtype), (packed >> 4).to(tl.float32).to(dtype)
            if FLOAT32_DOT:
                # The interpreter's dot multiplies bfloat16 operands as their raw bits; in float32 the products of
                # bfloat16 values are exact, so only the order of the float32 sums differs from a bfloat16 dot.
                low, high, x_low, x_high = low.to(tl.float32), high.to(tl.float32), x_low.to(tl.float32), \
                    x_high.to(tl.float32)
            part = tl.dot(x_low, tl.trans(low), input_precision="ieee")  # [BLOCK_M, BLOCK_N] sum of x * code
            part = tl.dot(x_high, tl.trans(high), part, input_precision="ieee")
            at = rn.to(tl.int64) * stride_scale + g  # [BLOCK_N]
            scale = tl.load(scale_ptr + at, mask=rn < N, other=0.0).to(tl.float32)
            offset = tl.load(offset_ptr + at, mask=rn < N, other=0.0).to(tl.float32)
            x_sum = tl.sum(x_low.to(tl.float32) + x_high.to(tl.float32), 1)  # [BLOCK_M]
            acc += part * scale[None, :] + x_sum[:, None] * offset[None, :]  # x . (code * scale + offset)
    else:
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)[None, :]  # [1, BLOCK_K] inputs
            x = tl.load(x_ptr + x_rows * stride_x + rk, mask=m_ok & (rk < K), other=0.0)  # [BLOCK_M, BLOCK_K]
            w_ok = n_ok & (rk < K)
            w = tl.load(w_ptr + w_rows * stride_w + rk, mask=w_ok, other=0)  # [BLOCK_N, BLOCK_K]
            if KIND == 1:
                if PER_ROW:  # int8 codes are exact in any float dtype; the row's scale comes after the sum
                    w = w.to(tl.float32).to(dtype)
                else:
                    at = w_rows * stride_scale + rk // G  # [BLOCK_N, BLOCK_K] each weight's group
                    w = w.to(tl.float32) * tl.load(scale_ptr + at, mask=w_ok, other=0.0).to(tl.float32)
                    if OFFSET:
                        w += tl.load(offset_ptr + at, mask=w_ok, other=0.0).to(tl.float32)
                    w = w.to(dtype)
            if FLOAT32_DOT:  # see the int4 branch
                x, w = x.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        if KIND == 1 and PER_ROW:
            row_scale = tl.load(scale_ptr + rn.to(tl.int64) * stride_scale, mask=rn < N, other=0.0)  # [BLOCK_N]
            acc = acc * row_scale.to(tl.float32)[None, :]
    tl.store(y_ptr + x_rows * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok & (rn[None, :] < N))


def _linear_kernel(x_ptr, w_ptr, scale_ptr, offset_ptr, y_ptr, M, N, K, G, stride_x, stride_w, stride_scale, stride_y,
                   KIND: tl.constexpr, PER_ROW: tl.constexpr, OFFSET: tl.constexpr, HALF: tl.constexpr,
                   FLOAT32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows of x and y
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] rows of W, columns of y
    _tile(x_ptr, w_ptr, scale_ptr, offset_ptr, y_ptr, rm, rn, M, N, K, G, stride_x, stride_w, stride_scale, stride_y,
          KIND, PER_ROW, OFFSET, HALF, FLOAT32_DOT, BLOCK_M, BLOCK_N, BLOCK_K)


def _grouped_kernel(x_ptr, counts_ptr, w_ptr, scale_ptr, offset_ptr, y_ptr, E, N, K, G,
                    stride_x, stride_w_e, stride_w, stride_scale_e, stride_scale, stride_y,
                    KIND: tl.constexpr, PER_ROW: tl.constexpr, OFFSET: tl.constexpr, HALF: tl.constexpr,
                    FLOAT32_DOT: tl.constexpr, BLOCK_E: tl.constexpr,
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
    _tile(x_ptr, w_ptr + e64 * stride_w_e, scale_ptr + e64 * stride_scale_e if KIND != 0 else scale_ptr,
          offset_ptr + e64 * stride_scale_e if OFFSET else offset_ptr, y_ptr, rm, rn, stop, N, K, G,
          stride_x, stride_w, stride_scale, stride_y, KIND, PER_ROW, OFFSET, HALF, FLOAT32_DOT,
          BLOCK_M, BLOCK_N, BLOCK_K)


@functools.cache
def _kernels():
    """(2-D kernel, grouped kernel), decorated on the first launch. The kernels call `_tile` by its global name, so
    it is decorated first and put back under that name."""
    global _tile, triton, tl
    import triton
    import triton.language as tl

    _tile = triton.jit(_tile)
    return triton.jit(_linear_kernel), triton.jit(_grouped_kernel)


def _operands(x: torch.Tensor, w: QTensor | torch.Tensor, dims: int):
    """-> (codes or weight, scale, offset, group size, compile-time arguments) for weight `w` against input `x`."""
    if isinstance(w, QTensor):
        if w.kind not in KINDS or w.codes.dim() != dims:
            raise ValueError(f"the Triton kernel takes {dims}-D int8 or int4 weights, got {w.kind} {tuple(w.shape)}")
        codes, scale = w.codes.contiguous(), w.scale.contiguous()  # codes [.., N, K or K // 2], scale [.., N, K // G]
        offset = None if w.offset is None else w.offset.contiguous()  # int4; int8 from Q5 GGUF blocks
        kind, group, tile = (_INT4 if w.kind == "int4" else _INT8), w.group_size, TILES[w.kind]
    else:
        if w.dim() != dims or w.dtype != x.dtype:
            raise ValueError(f"the Triton kernel takes a {dims}-D weight in the input's dtype {x.dtype}, got "
                             f"{w.dtype} {tuple(w.shape)}")
        codes, scale, offset, kind, group, tile = w.contiguous(), None, None, _FLOAT, w.shape[-1], TILES["float"]
    k = w.shape[-1]
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {k}")
    half = max(16, triton.next_power_of_2(group // 2)) if kind == _INT4 else 1
    flags = {"KIND": kind, "PER_ROW": group == k and offset is None, "OFFSET": offset is not None, "HALF": half,
             "FLOAT32_DOT": interpreting() and x.dtype == torch.bfloat16, "BLOCK_N": tile["BLOCK_N"],
             "BLOCK_K": tile["BLOCK_K"]}
    if not interpreting():
        flags.update(num_warps=tile["num_warps"], num_stages=tile["num_stages"])
    return codes, scale, offset, group, flags


def _block_m(rows_per_weight: float) -> int:
    return 16 if rows_per_weight <= 16 else 32 if rows_per_weight <= 32 else 64


def linear(x: torch.Tensor, w: QTensor | torch.Tensor) -> torch.Tensor:
    """x [..., K] @ W[N, K]^T -> [..., N] in x's dtype, for a 2-D int8 or int4 QTensor or a float weight in x's dtype,
    on x's device; needs `available(x)`."""
    kernel = _kernels()[0]
    codes, scale, offset, group, flags = _operands(x, w, 2)
    n, k = w.shape
    flat = x.reshape(-1, k).contiguous()  # [M, K]
    m = flat.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    block_m = _block_m(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, flags["BLOCK_N"]))
    kernel[grid](flat, codes, scale, offset, y, m, n, k, group, flat.stride(0), codes.stride(0),
                 0 if scale is None else scale.stride(0), y.stride(0), BLOCK_M=block_m, **flags)
    return y.view(*x.shape[:-1], n)


def grouped_linear(xs: torch.Tensor, counts: torch.Tensor, w: QTensor | torch.Tensor) -> torch.Tensor:
    """xs [P, K] -> [P, N] in xs's dtype: the counts[e] consecutive rows from sum(counts[:e]) on times W[e]^T, for a
    3-D int8 or int4 QTensor or a float weight W [E, N, K] in xs's dtype, on xs's device, and integer counts [E]
    summing to P (rows past the sum are left unwritten). One launch, no host sync; needs `available(xs)`."""
    kernel = _kernels()[1]
    codes, scale, offset, group, flags = _operands(xs, w, 3)
    e, n, k = w.shape
    p = xs.shape[0]
    if counts.shape != (e,):
        raise ValueError(f"counts has shape {tuple(counts.shape)}, the weight has {e} experts")
    xs = xs.contiguous()
    y = torch.empty(p, n, dtype=xs.dtype, device=xs.device)  # [P, N]
    block_m = _block_m(p / e)  # by the mean rows per expert
    # Each non-empty expert leaves at most BLOCK_M - 1 rows of its last tile empty.
    grid = ((p + min(e, p) * (block_m - 1)) // block_m, triton.cdiv(n, flags["BLOCK_N"]))
    kernel[grid](xs, counts.contiguous(), codes, scale, offset, y, e, n, k, group,
                 xs.stride(0), codes.stride(0), codes.stride(1), 0 if scale is None else scale.stride(0),
                 0 if scale is None else scale.stride(1), y.stride(0), BLOCK_E=triton.next_power_of_2(e),
                 BLOCK_M=block_m, **flags)
    return y
