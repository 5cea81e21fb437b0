"""Matrix products with quantized weights (`dgemma.quant.formats.QTensor`), fused and reference.

The fused path never builds the whole float weight: it dequantizes a tile of output channels (about `TILE_ELEMENTS`
weights; on a GPU `GPU_TILE_ELEMENTS`, for few launches) and multiplies it at once into its columns of the output, tile
after tile; weights with one scale per output channel skip the weight-side multiply and scale the tile's output
instead. Stacked expert weights [E, N, K] (`grouped_linear`) are dequantized a few experts at a time and multiplied with
torch._grouped_mm, one call per tile of experts. The reference path dequantizes the whole weight, then calls the plain
PyTorch op; tests check that both agree on CPU. `FUSED` switches between them. Weights are decoded into the activations'
dtype (float32, bfloat16 or float16; in float16 per-channel weights are dequantized too, as sums of their raw codes
could overflow) and outputs come in that dtype, with one exception: on a CPU that multiplies bfloat16 in
hardware (AMX matrix units or AVX-512 BF16 dot products, `CPU_BF16`), the fused path multiplies float32 activations as
bfloat16 (float32 accumulation, bfloat16 result), two to several times faster than float32 there, at bfloat16's
rounding (about 2e-3 relative), the precision quantized weights are judged against. Only products of at least
`BF16_MIN_WORK` multiply-adds go that way: below it the casts and oneDNN's per-call cost eat the faster arithmetic
(on a 2-core AVX-512 BF16 CPU, one thread, 32 rows x 128 inputs x 256 outputs: about as fast either way when the CPU was
quiet, 2.8x as long in bfloat16 beside another job; generating with the bundled model, whose products are all that
small, took 1.4x as long with every product in bfloat16 beside another job).
DGEMMA_CPU_BF16=0 keeps float32 products on such CPUs; =1 takes bfloat16 ones anywhere.
On the CPU a tile's decoded weight goes into a buffer kept per thread and dtype (`_decoded`), not a fresh tensor of a
few MB, which the allocator may map anew and page-fault on first touch (on a 2-core AVX2 machine, one `small` layer's
expert product, 1024 rows over 32 experts, took 16.0 instead of 18.7 ms for int8 and 16.6 instead of 18.7 for int4).
Tiles are large (4M weights: 8 MB in bfloat16) because a matrix product's cost per call (packing the activations,
short output blocks) falls as the tile grows, while the decoding runs `DECODE_ELEMENTS` weights at a time, whose
passes stay in cache. On a 2-core AMX CPU, a 1408 x 2816 int4 weight times 256 rows took 3.2 ms in 4M-weight tiles
against 6.1 ms in the 256K-weight tiles used before (int8 per channel 1.7 against 4.2 ms).
Where autograd may keep the weight for a backward pass, a fresh tensor is used.
This is plain PyTorch and runs anywhere; on a GPU, `linear` with a 2-D int8 or int4 weight goes to the Triton kernel
in `triton_dequant` when Triton is installed (fp8 weights, `matmul` and `embedding` stay here).
Must not: know modules, checkpoints or which weights are quantized.
"""

from __future__ import annotations

import math
import os
import threading

import torch
import torch.nn.functional as F

from ..quant.formats import QTensor, dequantize
from . import triton_dequant

FUSED = True
TILE_ELEMENTS = 1 << 22
DECODE_ELEMENTS = 1 << 18
GPU_TILE_ELEMENTS = 1 << 26
EXPERT_TILE_ELEMENTS = 1 << 22
BF16_MIN_WORK = 1 << 24


def _native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles or AVX-512 BF16), where oneDNN's bfloat16 products
    run at two or more times float32's speed; elsewhere they are emulated and slower."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


CPU_BF16 = {"0": False, "1": True}.get(os.environ.get("DGEMMA_CPU_BF16", ""), _native_cpu_bf16())


def _compute_dtype(x: torch.Tensor, work: int) -> torch.dtype:
    """The dtype the fused CPU path multiplies `x` in for a product of `work` multiply-adds: bfloat16 for float32
    activations when `CPU_BF16` and the product is at least `BF16_MIN_WORK`."""
    cpu_float32 = x.dtype == torch.float32 and x.device.type == "cpu"
    return torch.bfloat16 if CPU_BF16 and cpu_float32 and work >= BF16_MIN_WORK else x.dtype


def _per_channel(q: QTensor, dtype: torch.dtype) -> bool:
    """Whether products in `dtype` may use q's codes as they are and scale the output: one scale per output channel, no
    offset (int8 per channel, fp8), and a dtype with float32's range (float16 sums of raw codes, up to 448 times the
    activations, would overflow)."""
    return q.scale.shape[-1] == 1 and q.offset is None and dtype != torch.float16


def _autograd(x: torch.Tensor) -> bool:
    """Whether autograd records products with `x` (and may save their operands for the backward pass)."""
    return torch.is_grad_enabled() and x.requires_grad


_BUFFERS = threading.local()  # .by_dtype: {dtype: flat CPU tensor}, grown as needed


def _buffer(shape: torch.Size, dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor | None:
    """A kept CPU tensor of `shape` for one decoded tile multiplied with activations `x`, or None where a fresh tensor
    is needed: off the CPU (the caching allocator is cheap there), or when autograd may save the weight for the
    backward pass of a product with `x`. Its contents are overwritten by the next tile of the same dtype."""
    if x.device.type != "cpu" or _autograd(x):
        return None
    kept = getattr(_BUFFERS, "by_dtype", None)
    if kept is None:
        kept = _BUFFERS.by_dtype = {}
    n = math.prod(shape)
    if dtype not in kept or kept[dtype].numel() < n:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            kept[dtype] = torch.empty(n, dtype=dtype)
    return kept[dtype][:n].view(shape)


def _decoded(q: QTensor, dtype: torch.dtype, x: torch.Tensor, codes_only: bool = False) -> torch.Tensor:
    """q's weight in `dtype` for a product with `x`: its codes as they are (`codes_only`, for per-channel weights
    whose scales are applied to the output) or dequantized; in kept buffers where `_buffer` allows, decoded
    `DECODE_ELEMENTS` weights at a time so each decoding pass works in cache (for bfloat16 through a float32 scratch
    of that size)."""
    out = _buffer(q.shape, dtype, x)
    if codes_only:
        return q.codes.to(dtype) if out is None else out.copy_(q.codes)
    if out is None:
        return dequantize(q, dtype)
    rows, step = math.prod(q.shape[:-1]), max(1, DECODE_ELEMENTS // q.in_features)
    parts = [(q, out)]  # (weight rows, their place in `out`)
    if rows > step:
        flat, dests = q.map(lambda t: t.reshape(rows, -1)), out.view(rows, -1)  # [R, K or K // 2], [R, K]
        parts = [(flat.rows(start, start + step), dests[start:start + step]) for start in range(0, rows, step)]
    for part, dest in parts:
        if dtype == torch.float32:
            dequantize(part, out=dest)
        else:
            dest.copy_(dequantize(part, out=_buffer(part.shape, torch.float32, x)))
    return out


def _tile_rows(q: QTensor) -> int:
    elements = GPU_TILE_ELEMENTS if q.codes.is_cuda else TILE_ELEMENTS
    return max(1, elements // q.in_features)


def linear_reference(x: torch.Tensor, q: QTensor) -> torch.Tensor:
    """x [..., K] @ W[N, K]^T -> [..., N] by dequantizing W first."""
    return F.linear(x, dequantize(q, x.dtype))


def _tile_linear(x: torch.Tensor, q: QTensor, out: torch.Tensor) -> None:
    """out [M, N] (a column slice of the whole output) = x [M, K] (in the compute dtype) @ W[N, K]^T for one tile,
    written in place: a fresh [M, N] result per tile would cost page faults and a copy. With one scale per row and no
    offset (per-channel int8, fp8) the codes are multiplied as they are and the scales applied to the much smaller
    output."""
    per_channel = _per_channel(q, x.dtype)
    w = _decoded(q, x.dtype, x, codes_only=per_channel)  # [N, K]
    if out.dtype == x.dtype and not _autograd(x):
        torch.mm(x, w.t(), out=out)
    else:
        out.copy_(torch.mm(x, w.t()))
    if per_channel:
        out.mul_(q.scale.view(1, -1))  # the float32 scale, rounded once with the product


def linear(x: torch.Tensor, q: QTensor) -> torch.Tensor:
    """x [..., K] @ W[N, K]^T -> [..., N], dequantizing W one tile of output channels at a time."""
    if not FUSED:
        return linear_reference(x, q)
    if x.is_cuda and q.kind in triton_dequant.KINDS and q.codes.dim() == 2 and triton_dequant.available(x):
        return triton_dequant.linear(x, q)
    n, k = q.shape
    step = _tile_rows(q)
    flat = x.reshape(-1, k)  # [M, K]
    flat = flat.to(_compute_dtype(x, flat.shape[0] * n * k))
    out = x.new_empty(flat.shape[0], n)  # [M, N]
    for start in range(0, n, step):
        stop = min(start + step, n)
        _tile_linear(flat, q.rows(start, stop), out[:, start:stop])
    return out.view(*x.shape[:-1], n)


def grouped_ok(xs: torch.Tensor, q: QTensor) -> bool:
    """Whether `grouped_linear` can take xs [P, K] and the stacked weight `q` [E, N, K]: `FUSED`, torch._grouped_mm
    present, and rows that meet its 16-byte alignment in the compute dtype."""
    size = torch.finfo(_compute_dtype(xs, xs.shape[0] * q.shape[1] * q.shape[2])).bits // 8
    return FUSED and hasattr(torch, "_grouped_mm") and q.codes.dim() == 3 and \
        all(d * size % 16 == 0 for d in q.shape[1:])


def grouped_linear(xs: torch.Tensor, counts: torch.Tensor, q: QTensor) -> torch.Tensor:
    """xs [P, K] -> [P, N] in xs's dtype: the counts[e] consecutive rows from sum(counts[:e]) on times W[e]^T, for a
    stacked weight W [E, N, K]; counts [E] sums to P. A few experts (about `EXPERT_TILE_ELEMENTS` weights) are
    dequantized at once and multiplied in one torch._grouped_mm, instead of one small product per expert; as in
    `linear`, per-channel weights scale the output rather than the weight. Needs `grouped_ok(xs, q)`."""
    e, n, k = q.shape
    x = xs.to(_compute_dtype(xs, xs.shape[0] * n * k))  # [P, K]
    per_channel = _per_channel(q, x.dtype)
    ends = counts.cumsum(0)  # [E]
    bounds = [0] + ends.tolist()
    step = max(1, EXPERT_TILE_ELEMENTS // (n * k))
    tiles = [(first, min(first + step, e)) for first in range(0, e, step)]
    tiles = [(first, last) for first, last in tiles if bounds[last] > bounds[first]]  # those with rows
    # One tile holds every row: its product is the output (a fresh [P, N] tensor to copy into costs page faults).
    out = None if len(tiles) == 1 else xs.new_empty(xs.shape[0], n)  # [P, N]
    for first, last in tiles:
        lo, hi = bounds[first], bounds[last]
        tile = q.map(lambda t: t[first:last])
        w = _decoded(tile, x.dtype, xs, codes_only=per_channel)  # [T, N, K]
        y = torch._grouped_mm(x[lo:hi], w.transpose(1, 2), offs=(ends[first:last] - lo).to(torch.int32))
        if out is None:
            out = y.to(xs.dtype)  # [P, N]
        else:
            out[lo:hi] = y  # [rows, N]
        if per_channel:
            out[lo:hi].mul_(tile.scale.view(last - first, n).repeat_interleave(counts[first:last], 0))
    return out


def matmul_reference(x: torch.Tensor, q: QTensor) -> torch.Tensor:
    """x [..., N] @ W[N, K] -> [..., K] (W used untransposed, e.g. an embedding table) by dequantizing W first."""
    return x @ dequantize(q, x.dtype)


def matmul(x: torch.Tensor, q: QTensor) -> torch.Tensor:
    """x [..., N] @ W[N, K] -> [..., K], summing tile products in float32 over row tiles of W."""
    if not FUSED:
        return matmul_reference(x, q)
    n, k = q.shape
    step = _tile_rows(q)
    flat = x.reshape(-1, n)  # [M, N]
    flat = flat.to(_compute_dtype(x, flat.shape[0] * n * k))
    acc = torch.zeros(flat.shape[0], k, dtype=torch.float32, device=x.device)  # [M, K]
    for start in range(0, n, step):
        stop = min(start + step, n)
        acc.add_(flat[:, start:stop] @ _decoded(q.rows(start, stop), flat.dtype, x))
    return acc.to(x.dtype).view(*x.shape[:-1], k)


def embedding(ids: torch.Tensor, q: QTensor, dtype: torch.dtype) -> torch.Tensor:
    """ids [...] -> rows of W [..., K] in `dtype`; only the rows asked for are dequantized."""
    flat = ids.reshape(-1)
    rows = q.map(lambda t: t.index_select(0, flat))
    return dequantize(rows, dtype).view(*ids.shape, q.in_features)
